"""`bigvit-export CHECKPOINT OUT [--format safetensors|onnx] [--batch N|dynamic]`: full (unsharded)
weights of any bigvit checkpoint as safetensors, or its eval-mode graph as ONNX.

Runs in one process without a process group: torch.distributed.checkpoint reassembles the shards
that any layout wrote, by parameter name.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from bigvit.errors import ConfigError
from bigvit.models.convert import export_safetensors
from bigvit.models.registry import build_model
from bigvit.train.checkpoint import META_FILE, CheckpointError, checkpoint_dirs
from bigvit.train.onnx_export import export_onnx
from bigvit.train.safe_load import load_dcp, read_json


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint dir, or the newest one under a run dir or its checkpoints/ dir."""
    for candidate in (path, path / "checkpoints"):
        if (candidate / META_FILE).is_file():
            return candidate
        found = checkpoint_dirs(candidate)
        if found:
            return found[-1]
    raise CheckpointError(
        f"no complete bigvit checkpoint at {path} (looked for {META_FILE} there and under checkpoints/)"
    )


def load_full_state(checkpoint: Path, ema: bool = False) -> tuple[dict, dict]:
    """(full model state dict, checkpoint metadata); `ema`: with the EMA of the weights (train/ema.py)
    in place of the live parameters."""
    meta = read_json(checkpoint / META_FILE)
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{checkpoint / META_FILE} names no model config (key 'model')")
    model = build_model(meta["model"])
    state = {"model": model.state_dict()}
    if ema:
        if not meta.get("ema"):
            raise CheckpointError(f"checkpoint {checkpoint} holds no EMA weights: it was trained with ema.decay=0")
        state["ema"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    with warnings.catch_warnings():  # reading a sharded checkpoint in one process is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_dcp(state, checkpoint, no_dist=True)
    return ({**state["model"], **state["ema"]} if ema else state["model"]), meta


def write_onnx(state: dict, meta: dict, out: Path, batch: str) -> str:
    """Export the checkpoint's model with weights `state` as ONNX; returns the summary line."""
    if batch != "dynamic" and not (batch.isdigit() and int(batch) > 0):
        raise ConfigError(f"--batch {batch!r} must be a positive integer or 'dynamic'")
    model = build_model(meta["model"])
    model.load_state_dict(state, strict=True)
    export_onnx(model, out, batch if batch == "dynamic" else int(batch))
    return f"wrote the ONNX graph of step {meta['step']} (batch {batch}) to {out}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bigvit-export", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="checkpoint dir, run dir, or run_dir/checkpoints")
    parser.add_argument("out", type=Path, help="output .safetensors (or .onnx) file")
    parser.add_argument("--ema", action="store_true", help="the EMA of the weights instead of the live ones")
    parser.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors")
    parser.add_argument("--batch", default="1", help="ONNX batch size: N or 'dynamic'")
    args = parser.parse_args(argv)
    try:
        state, meta = load_full_state(resolve_checkpoint(args.checkpoint), ema=args.ema)
        if args.format == "onnx":
            print(write_onnx(state, meta, args.out, args.batch))
            return
    except (CheckpointError, ConfigError) as error:
        raise SystemExit(f"bigvit: error: {error}") from None
    extra = {"tokenizer": meta["tokenizer"]} if meta.get("tokenizer") else {}  # an image–text model's captions
    export_safetensors(state, args.out, {"model": json.dumps(meta["model"]), "step": meta["step"], **extra})
    print(
        f"wrote {len(state)} {'EMA ' if args.ema else ''}tensors ({sum(t.numel() for t in state.values()):,} parameters) of step "
        f"{meta['step']} to {args.out}"
    )


if __name__ == "__main__":
    main()
