"""Parallel building blocks on real gloo process groups: layout-independent init, mesh validation."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bigvit
from bigvit.errors import ConfigError
from bigvit.parallel.distributed import teardown
from bigvit.parallel.materialize import materialize
from bigvit.parallel.mesh import build_mesh, resolve_dims
from bigvit.parallel.parallelize import apply_fsdp
from tests.helpers import free_port

TINY = dict(depth=2, width=48, heads=3, mlp_dim=96, image_size=16, patch_size=4, num_classes=10)


def fsdp_full_weights(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = bigvit.build_model("vit_ti16", device="meta", **TINY)
        dims = resolve_dims({"dp_shard": -1}, world_size)
        apply_fsdp(model, build_mesh(dims, "cpu")["dp_shard"], cfg=_FsdpCfg(), precision="fp32")
        materialize(model, torch.device("cpu"), seed=7)
        full = {name: p.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save(full, out)
    finally:
        teardown()


class _FsdpCfg:
    reduce_dtype = "fp32"
    cpu_offload = False
    reshard_after_forward = True


@pytest.mark.slow
def test_initial_weights_do_not_depend_on_world_size(tmp_path):
    single = bigvit.build_model("vit_ti16", device="meta", **TINY)
    materialize(single, torch.device("cpu"), seed=7)
    out = str(tmp_path / "full.pt")
    mp.spawn(fsdp_full_weights, args=(2, free_port(), out), nprocs=2, join=True)
    sharded = torch.load(out)
    assert sharded.keys() == dict(single.named_parameters()).keys()
    for name, param in single.named_parameters():
        assert torch.equal(sharded[name], param), name
    assert any(p.abs().sum() > 0 for p in sharded.values())


def test_different_seeds_give_different_weights():
    a, b = (
        materialize(bigvit.build_model("vit_ti16", device="meta", **TINY), torch.device("cpu"), seed=s)
        for s in (0, 1)
    )
    assert not torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    assert torch.equal(a.head.weight, torch.zeros_like(a.head.weight))  # zero-init classifier


@pytest.mark.parametrize(
    "degrees,world,message",
    [
        ({"dp_shard": 3}, 4, "= 3 ranks, but the world size is 4"),
        ({"dp_shard": -1, "tp": 3}, 4, "parallel.dp_shard=-1 cannot fill world size 4"),
        ({"dp_shard": -1, "tp": -1}, 4, "only one parallel degree may be -1"),
        ({"dp_shard": 0}, 4, "must be positive or -1"),
    ],
)
def test_impossible_layouts_are_named(degrees, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve_dims(degrees, world)


def test_fill_dimension_takes_the_rest_of_the_world():
    dims = resolve_dims({"dp_replicate": 2, "dp_shard": -1}, 8)
    assert (dims.dp_replicate, dims.dp_shard, dims.dp) == (2, 4, 8)
