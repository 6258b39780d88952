"""`bigvit-convert --from timm|big_vision|bigvit --model NAME [key=value ...] SRC DST.safetensors`:
import weights from another codebase (or any bigvit checkpoint) as full fp32 bigvit tensors.

The trailing key=value pairs override the zoo model NAME (e.g. `depth=4 class_token=false pool=gap`).
The converted tensors are checked against that model exactly before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import yaml

from bigvit.errors import CheckpointError, ConfigError
from bigvit.models.convert import (
    check_state_dict,
    export_safetensors,
    from_big_vision,
    from_timm,
    load_npz,
    load_timm_file,
)
from bigvit.models.registry import build_model

SOURCES = ("timm", "big_vision", "bigvit")


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` strings → model overrides, values read as YAML scalars (4, false, gap, 1e-5)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"model override {pair!r} is not key=value (e.g. depth=4 pool=gap)")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-5 as a string
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        overrides[key.removeprefix("model.")] = parsed
    return overrides


def read_source(source: str, path: Path, cfg) -> dict:
    """The weights at `path` from `source` in bigvit's names (full fp32 tensors)."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if source == "timm":
        return from_timm(load_timm_file(path), cfg)
    if source == "big_vision":
        return from_big_vision(load_npz(path), cfg)
    from bigvit.train.export import load_full_state, resolve_checkpoint  # DCP machinery, only for this source

    state, _ = load_full_state(resolve_checkpoint(path))
    return {k: v.detach().float() for k, v in state.items()}


def convert(source: str, model: str, overrides: dict, src: Path, dst: Path) -> str:
    """Convert, check exactly against the model, write `dst`; returns the summary line."""
    if source not in SOURCES:
        raise ConfigError(f"--from {source!r} is not one of {list(SOURCES)}")
    target = build_model(model, device="meta", **overrides)
    state = read_source(source, src, target.cfg)
    check_state_dict(state, target.state_dict(), f"{src} (--from {source})")
    metadata = {"model": json.dumps(target.cfg.to_dict()), "source": f"{source}:{src}"}
    export_safetensors(state, dst, metadata)
    params = sum(t.numel() for t in state.values())
    return f"converted {len(state)} tensors ({params:,} parameters) of {source} {src} to {dst} as {model}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bigvit-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES)
    parser.add_argument("--model", required=True, help="zoo name (conf/model/*.yaml)")
    parser.add_argument("args", nargs="+", help="[key=value ...] SRC DST.safetensors")
    args = parser.parse_args(argv)
    if len(args.args) < 2:
        parser.error("needs SRC and DST.safetensors after the model overrides")
    *pairs, src, dst = args.args
    try:
        print(convert(args.source, args.model, parse_overrides(pairs), Path(src), Path(dst)))
    except (ConfigError, CheckpointError) as error:
        raise SystemExit(f"bigvit: error: {error}") from None


if __name__ == "__main__":
    main()
