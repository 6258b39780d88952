"""Read an offline W&B run (`run-<id>.wandb`) without syncing it: history rows and config.

The file is a LevelDB-style log (32 KiB blocks of checksummed chunks) of wandb's protobuf records.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK_SIZE, CHUNK_HEADER, FILE_HEADER = 32768, 7, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: str | Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run log (header {data[:4]!r})")
    pos, pending = FILE_HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        _, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if left_in_block < CHUNK_HEADER or (length == 0 and kind == 0):
            pos += left_in_block  # block trailer padding
            continue
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def item_key(item) -> str:
    """W&B stores a metric name either whole (`key`) or split at slashes (`nested_key`)."""
    return item.key or "/".join(item.nested_key)


def read_run(path: str | Path) -> dict:
    """{"history": [row dicts with _step], "config": {key: value}, "artifacts": [...]} of an offline run log.

    Each artifact: {"name", "type", "aliases", "metadata", "files": {path: reference URI or digest}}.
    """
    from wandb.proto import wandb_internal_pb2

    history, config, artifacts = [], {}, []
    for raw in raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            config.update({item_key(item): json.loads(item.value_json) for item in items})
        elif kind == "artifact":
            artifact = record.artifact
            artifacts.append(
                {
                    "name": artifact.name,
                    "type": artifact.type,
                    "aliases": list(artifact.aliases),
                    "metadata": json.loads(artifact.metadata or "{}"),
                    "files": {e.path: e.ref or e.digest for e in artifact.manifest.contents},
                }
            )
    return {"history": history, "config": config, "artifacts": artifacts}
