"""Parameter names as the model defines them, whatever parallel wrappers were applied."""

# Module names that parallelization wraps around sub-modules (activation checkpointing, torch.compile,
# DDP); they show up as extra segments in parameter names.
WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "module")


def clean_name(name: str) -> str:
    """`name` without wrapper segments: "_orig_mod.blocks.0._checkpoint_wrapped_module.mlp.fc1.weight"
    → "blocks.0.mlp.fc1.weight"."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)
