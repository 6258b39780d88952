"""The activation-memory model (scaling/activations.py) against the bytes autograd really saves for
backward, counted with saved-tensor hooks on real models: zoo models on CPU, model options on a small
ViT, and tensor/context-parallel layouts on a fake process group (one process, real local shapes)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor

import bigvit
from bigvit.parallel.mesh import ParallelDims, build_mesh
from bigvit.parallel.parallelize import apply_ac
from bigvit.scaling.activations import ActivationLayout, backward_working_bytes, saved_activation_bytes
from tests.helpers import VIT_22B_STYLE

TOLERANCE = 0.10  # the bound; the fp32 figures agree to the byte, bf16 ones within ~2%

SMALL = dict(image_size=64, patch_size=8, width=64, depth=3, mlp_dim=96, heads=4, num_classes=10)
OPTIONS = {
    "registers": dict(num_registers=4),
    "gap": dict(pool="gap"),
    "gap_fc_norm": dict(pool="gap", class_token=False, fc_norm=True),
    "map_fc_norm": dict(pool="map", class_token=False, fc_norm=True),
    "map": dict(pool="map", class_token=False),
    "layer_scale": dict(layer_scale=1e-5),
    "qk_norm": dict(qk_norm=True),
    "parallel_block": dict(parallel_block=True),
    "no_biases": dict(qkv_bias=False, proj_bias=False, mlp_bias=False, norm_bias=False),
    "math_kernel": dict(attn_impl="math"),
    "vit_22b_style": VIT_22B_STYLE,
    "patch_dropout": dict(patch_dropout=0.5),
    # 8×8 patches in 3×3 windows of 3×3 (the grid padded to 9×9), block 1 global.
    "windowed": dict(class_token=False, pool="gap", window_size=3, global_every=2),
}


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage:
    """The storage behind a saved tensor: a DTensor's local shard, an unwaited collective's result."""
    if isinstance(tensor, DTensor):
        tensor = tensor._local_tensor
    if isinstance(tensor, AsyncCollectiveTensor):
        tensor = tensor.elem
    return tensor.untyped_storage()


def measured_saved_bytes(model: torch.nn.Module, images: torch.Tensor, autocast: bool = False) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward pass and cross-entropy
    loss. Views share a storage and count once; parameters (saved weights) are not activations."""
    params = {_storage(p).data_ptr() for p in model.parameters()}
    seen: dict[int, torch.UntypedStorage] = {}  # holding storages keeps their addresses unique

    def pack(tensor):
        storage = _storage(tensor)
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage)
        return tensor

    labels = torch.zeros(images.shape[0], dtype=torch.long)
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        F.cross_entropy(model(images).float(), labels)  # as the trainer computes its loss
    return sum(storage.nbytes() for storage in seen.values())


def measure_and_model(cfg, precision="fp32", checkpointing="none", batch=2) -> tuple[int, int]:
    torch.manual_seed(0)
    model = bigvit.build_model(cfg)
    apply_ac(model, checkpointing, every=2)
    size = model.cfg.image_size
    images = torch.randn(batch, model.cfg.in_chans, size, size)
    if precision == "bf16":  # parameters cast, as FSDP2's MixedPrecisionPolicy and DeepSpeed run the forward
        model, images = model.to(torch.bfloat16), images.bfloat16()
    measured = measured_saved_bytes(model, images, autocast=precision == "autocast")
    modelled = saved_activation_bytes(model.cfg, ActivationLayout(batch, precision, checkpointing))
    return measured, modelled


@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("name", ["vit_ti16", "vit_s16", "vit_b16"])
def test_model_matches_saved_bytes_of_zoo_models(name, checkpointing):
    measured, modelled = measure_and_model(name, checkpointing=checkpointing)
    assert modelled == pytest.approx(measured, rel=TOLERANCE)


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_model_matches_saved_bytes_in_mixed_precision(precision):
    measured, modelled = measure_and_model("vit_ti16", precision)
    assert modelled == pytest.approx(measured, rel=TOLERANCE)


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_model_matches_saved_bytes_for_each_option(options, checkpointing):
    measured, modelled = measure_and_model({**SMALL, **options}, checkpointing=checkpointing)
    assert modelled == pytest.approx(measured, rel=TOLERANCE)


def test_checkpointing_keeps_only_block_inputs():
    cfg = bigvit.model_config("vit_b16")
    full = saved_activation_bytes(cfg, ActivationLayout(8, "bf16", "full"))
    none = saved_activation_bytes(cfg, ActivationLayout(8, "bf16", "none"))
    assert full < none / 5
    # What checkpointing saves comes back, for one block at a time, while backward recomputes it.
    assert backward_working_bytes(cfg, ActivationLayout(8, "bf16", "full")) > backward_working_bytes(
        cfg, ActivationLayout(8, "bf16", "none")
    )


# 7×7 patches + 3 registers = 52 tokens and 4 heads: they split over tp 2 × cp 2.
SHARDED = dict(
    SMALL, image_size=112, patch_size=16, width=128, mlp_dim=256, class_token=False, num_registers=3
)
SHARDED_OPTIONS = {
    "plain_gap": dict(pool="gap"),
    "vit_22b_style": OPTIONS["vit_22b_style"],
    # 49 patches + class token = 50 tokens: padded to 52 for tp 2 × cp 2.
    "class_token_padded": dict(class_token=True, num_registers=0, pool="cls"),
}


@pytest.mark.parametrize(
    "tp,cp,sequence_parallel,checkpointing",
    [
        (2, 1, True, "none"),
        (2, 1, False, "none"),
        (1, 2, False, "none"),
        (2, 2, True, "none"),
        (2, 1, True, "full"),
        (1, 2, False, "full"),
        (2, 2, True, "selective"),
    ],
)
@pytest.mark.parametrize("options", SHARDED_OPTIONS.values(), ids=SHARDED_OPTIONS.keys())
def test_model_matches_saved_bytes_per_rank_under_tensor_and_context_parallel(
    options, tp, cp, sequence_parallel, checkpointing
):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from bigvit.parallel.context import apply_cp
    from bigvit.parallel.tensor import apply_tp

    # A fake process group: collectives are no-ops, every local tensor has the shape a real rank's would.
    dist.init_process_group("fake", rank=0, world_size=tp * cp, store=FakeStore())
    try:
        model = bigvit.build_model({**SHARDED, **options}, device="meta")
        mesh = build_mesh(ParallelDims(1, 1, cp, tp), "cpu")
        if tp > 1:
            apply_tp(model, mesh["tp"], sequence_parallel)
        if cp > 1:
            apply_cp(model, mesh["cp"])
        apply_ac(model, checkpointing, every=2)
        model.to_empty(device="cpu")  # values are irrelevant: only the saved shapes are counted
        measured = measured_saved_bytes(model, torch.randn(2, 3, 112, 112))
    finally:
        dist.destroy_process_group()
    layout = ActivationLayout(2, "fp32", checkpointing, tp=tp, sequence_parallel=sequence_parallel, cp=cp)
    assert saved_activation_bytes(model.cfg, layout) == pytest.approx(measured, rel=TOLERANCE)
