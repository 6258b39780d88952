"""AdamW parameter groups: layer-wise LR decay and which parameters get weight decay.

Only names, `.ndim` and `requires_grad` are read, so this works unchanged on meta tensors and on the
DTensor parameters of FSDP2 / tensor-parallel models.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatch

import torch.nn as nn

from bigvit.errors import ConfigError
from bigvit.parallel.names import clean_name

EMBEDDINGS = ("patch_embed", "cls_token", "reg_tokens", "pos_embed")
NO_DECAY = ("pos_embed", "cls_token", "reg_tokens", "*.probe")


def layer_id(name: str, num_blocks: int) -> int:
    """Depth of a (clean) parameter name: embeddings 0, `blocks.i` i+1, everything after the blocks
    (final norm, MAP head, classifier) num_blocks+1."""
    first = name.split(".", 1)[0]
    if first in EMBEDDINGS:
        return 0
    if first == "blocks":
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    no_decay: Sequence[str] = NO_DECAY,
) -> list[dict]:
    """Parameter groups for `torch.optim.AdamW`, one per (layer, decay or not), ordered by layer.

    Each group has `params`, `param_names` (clean names, which torch keeps in the optimizer's
    state_dict), `name` (e.g. "layer3_decay"), `weight_decay` (0.0 for 1-D parameters and names
    matching a `no_decay` fnmatch pattern) and `lr_scale = layer_decay ** (L + 1 - layer)`, where L is
    the number of blocks; `apply_lr` multiplies the LR by `lr_scale`. Frozen parameters are left out.
    """
    if weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={weight_decay} must be >= 0")
    if layer_decay <= 0:
        raise ConfigError(f"optim.layer_decay={layer_decay} must be > 0 (1.0 turns layer decay off)")
    named = [(clean_name(n), p) for n, p in model.named_parameters()]
    # max index + 1 rather than a count, so a model holding only some blocks keeps global depths.
    num_blocks = 1 + max((int(n.split(".")[1]) for n, _ in named if n.startswith("blocks.")), default=-1)

    groups: dict[tuple[int, bool], dict] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        layer = layer_id(name, num_blocks)
        # Norm weights, biases and layer-scale gammas are 1-D: decaying them only shrinks the scale.
        decay = param.ndim > 1 and not any(fnmatch(name, pattern) for pattern in no_decay)
        group = groups.setdefault(
            (layer, decay),
            {
                "name": f"layer{layer}_{'decay' if decay else 'no_decay'}",
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_blocks + 1 - layer),
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]
