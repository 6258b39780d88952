"""Reading checkpoints as data: nothing bigvit loads can run code.

A DCP checkpoint is a pickled `.metadata` file, tensor files and, for non-tensor items (the step,
optimizer hyper-parameters), small `torch.save` blobs; DCP reads them with `pickle.load` and
`torch.load(weights_only=False)`, either of which runs whatever a tampered file asks. Here the metadata
goes through an unpickler that admits only DCP's own metadata classes (and the torch types they hold),
and non-tensor items through `torch.load(weights_only=True)`. Per-rank state is a safetensors file.
Any refusal is a CheckpointError naming the file and what was wrong in it.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from safetensors.torch import save_file
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException

from bigvit.errors import CheckpointError, weights_only_reason
from bigvit.models.convert import import_safetensors

# What DCP's `.metadata` pickle refers to, and nothing else (checked against torch 2.13's writer).
METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # layout name → torch.layout, as weights_only admits
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other global (a function to call, a class to build) is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.path} refers to {module}.{name}, which DCP metadata never holds: refusing to load a "
            "checkpoint that could run code (was it tampered with or written by something else?)"
        )


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """A DCP `.metadata` file, through MetadataUnpickler."""
    try:
        with open(path, "rb") as file:
            metadata = MetadataUnpickler(file, path).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is not DCP checkpoint metadata ({type(error).__name__}: {error})") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP checkpoint metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read by MetadataUnpickler (or given, already read so)."""

    def __init__(self, path: Path, metadata: dcp_metadata.Metadata | None = None):
        super().__init__(path)
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        given = self.metadata if rank is None else None
        metadata = given or read_metadata(Path(self._get_metadata_path(rank)))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor items read by torch.load(weights_only=True)."""

    def __init__(self, path: Path, **kwargs):
        super().__init__(**kwargs)
        self.path = path

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{self.path}: item {read_item.dest_index.fqn!r} is not plain data, refusing it "
                f"({weights_only_reason(error)})"
            ) from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def load_dcp(state: dict, path: Path, no_dist: bool = False) -> None:
    """dcp.load of `state` (in place) from the checkpoint directory `path`, as data only."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} holds no DCP checkpoint (no .metadata)")
    metadata = read_metadata(path / ".metadata")  # refused here, before DCP, which logs and retries a failed read
    reader = SafeFileSystemReader(path, metadata)
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(path), no_dist=no_dist)
    except CheckpointError:
        raise
    except CheckpointException as error:  # DCP wraps each rank's failure with its stack
        causes = [failure[0] for failure in error.failures.values()]
        first = next((c for c in causes if isinstance(c, CheckpointError)), None)
        if first is not None:
            raise first from None
        raise CheckpointError(f"{path} could not be read: {causes[0] if causes else error}") from None
    except pickle.UnpicklingError as error:  # a tensor file that is not plain tensors
        raise CheckpointError(f"{path}: a tensor file is not plain data ({weights_only_reason(error)})") from None


def saved_groups(path: Path) -> set[str]:
    """The top-level keys of the DCP checkpoint directory `path` ("model", "optim", "ema", ...)."""
    metadata = read_metadata(Path(path) / ".metadata")
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


def read_json(path: Path) -> dict:
    """A JSON file bigvit wrote (checkpoint metadata), or a CheckpointError naming it."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not readable JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def save_tensors(path: Path, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """A two-level dict of tensors ({"rng": {"torch": ...}}) as one safetensors file."""
    flat = {f"{group}.{key}": tensor.contiguous() for group, tensors in state.items() for key, tensor in tensors.items()}
    save_file(flat, str(path))


def load_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of save_tensors; a CheckpointError names a missing or broken file."""
    flat = import_safetensors(path)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        group, _, key = name.partition(".")
        state.setdefault(group, {})[key] = tensor
    return state
