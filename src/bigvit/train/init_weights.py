"""Initial weights for a fresh run (`trainer.init_weights`): a `.safetensors` file (bigvit-export,
bigvit-convert) or a bigvit run / checkpoint directory (any layout), fitted to the run's model and
copied into its parameters under the run's layout.

Fitting: position embeddings are resampled to the run's grid and the patch embedding to its patch size
(models/resample.py); a classifier of another shape (new data.num_classes) stays at its fresh zero init;
anything else that does not match is an error naming every key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.nn as nn

from bigvit.errors import CheckpointError, ConfigError
from bigvit.models.convert import fit_problems, import_safetensors, safetensors_metadata
from bigvit.models.resample import adapt_state_dict
from bigvit.models.vit import ViTConfig
from bigvit.parallel.materialize import copy_full_
from bigvit.parallel.names import clean_name
from bigvit.train.checkpoint import META_FILE
from bigvit.train.export import load_full_state, resolve_checkpoint
from bigvit.train.safe_load import read_json

log = logging.getLogger("bigvit")

HEAD = ("head.weight", "head.bias")  # the classifier: its shape follows data.num_classes
# Model keys that may differ from the weights' own config: the fitting above (or the training recipe) covers them.
ADAPTABLE = {
    "name", "image_size", "patch_size", "num_classes", "head_bias_init", "drop_path", "patch_dropout", "attn_impl"
}


def read_weights(path: str | Path, what: str = "weights") -> tuple[dict[str, torch.Tensor], dict | None]:
    """(full state dict on the CPU, the model config stored with it, or None where the file has none).

    `path`: a .safetensors file (its metadata `model` is the config as JSON), or a checkpoint dir, run dir
    or run_dir/checkpoints (the newest complete checkpoint). Read as data only, in this process.
    """
    path = Path(path)
    if path.is_dir():
        state, meta = load_full_state(resolve_checkpoint(path))
        return state, meta["model"]
    if not path.is_file():
        raise ConfigError(
            f"{what}={path}: no such file or directory; give a .safetensors file (bigvit-export, "
            "bigvit-convert), a bigvit run dir or a checkpoint dir"
        )
    return import_safetensors(path), stored_model_config(path)


def stored_model_config(path: str | Path, what: str = "weights") -> dict | None:
    """The model config stored with the weights at `path` (as read_weights), without reading the tensors."""
    path = Path(path)
    if path.is_dir():
        return read_json(resolve_checkpoint(path) / META_FILE).get("model")
    if not path.is_file():
        read_weights(path, what)  # raises, naming what `path` may be
    stored = safetensors_metadata(path).get("model")
    try:
        return json.loads(stored) if stored else None
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata 'model' is not a JSON model config") from None


def fit_weights(
    state: dict[str, torch.Tensor],
    cfg: ViTConfig,
    shapes: dict[str, torch.Size],
    fresh: Sequence[str] = (),
    source: str = "weights",
    new_head: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the tensors to load, one note per change) for a model of config `cfg` whose parameters have
    `shapes` (clean names → full shapes).

    Parameters matching a `fresh` fnmatch pattern, and (with `new_head`) a classifier the weights lack or
    hold in another shape, keep their fresh initialization; a classifier the model lacks (num_classes=0)
    is dropped. Raises CheckpointError naming every other missing / unexpected key and shape mismatch.
    """
    state, notes = adapt_state_dict(state, cfg)
    kept = set()  # model parameters that keep their fresh init
    for name in sorted(set(shapes) | set(state)):
        if name not in shapes and name in HEAD and new_head:
            notes.append(f"{name}: dropped (the model has no classifier, model.num_classes=0)")
        elif name in shapes and any(fnmatch(name, pattern) for pattern in fresh):
            notes.append(f"{name}: fresh init (trainer.init_fresh)")
            kept.add(name)
        elif name in HEAD and new_head and tuple(state.get(name, torch.empty(0)).shape) != tuple(shapes[name]):
            had = tuple(state[name].shape) if name in state else "none"
            notes.append(f"{name}: fresh init for {tuple(shapes[name])} (the weights' is {had})")
            kept.add(name)
        else:
            continue
        state.pop(name, None)
    given = {name: tuple(tensor.shape) for name, tensor in state.items()}
    problems = fit_problems(given, shapes, kept, mismatch="{key} {got} vs model {want}")
    if problems:
        raise CheckpointError(
            f"{source} do not fit model {cfg.name!r} (check model=... and its keys): {'; '.join(problems)}"
        )
    return state, notes


def config_differences(stored: dict | None, cfg: ViTConfig) -> list[str]:
    """Architecture keys where the weights' own config differs from the run's (beyond what fitting adapts)."""
    if not stored:
        return []
    ours = cfg.to_dict()
    return [
        f"{key}={stored[key]!r} (run: {ours[key]!r})"
        for key in sorted(set(stored) & set(ours) - ADAPTABLE)
        if stored[key] != ours[key]
    ]


@torch.no_grad()
def copy_weights_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (by clean parameter name) into a parallelized `model`'s parameters, each rank
    keeping its shard; parameters absent from `state` keep their values."""
    for raw_name, param in model.named_parameters():
        full = state.get(clean_name(raw_name))
        if full is not None:
            copy_full_(param, full.to(param.device))


def parameter_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Clean parameter name → full (global) shape, under any wrapper or sharding."""
    return {clean_name(name): param.shape for name, param in model.named_parameters()}


def load_initial_weights(
    model: nn.Module,
    path: str | Path,
    cfg: ViTConfig,
    fresh: Sequence[str] = (),
    what: str = "trainer.init_weights",
    new_head: bool = True,
) -> list[str]:
    """Read `path`, fit it to `cfg` (fit_weights) and copy it into the parallelized, materialized `model`
    on every rank; returns the notes it logged. Every rank reads the file: one full copy at most each.
    `what` names the setting in messages."""
    state, stored = read_weights(path, what)
    for difference in config_differences(stored, cfg):
        log.warning("%s=%s: the weights' model has %s", what, path, difference)
    shapes = parameter_shapes(model)
    state, notes = fit_weights(state, cfg, shapes, fresh, source=f"{what}={path}", new_head=new_head)
    copy_weights_(model, state)
    log.info(
        "%s: %d tensors (%s parameters) from %s%s",
        what,
        len(state),
        f"{sum(t.numel() for t in state.values()):,}",
        path,
        "".join(f"\n  {note}" for note in notes),
    )
    return notes
