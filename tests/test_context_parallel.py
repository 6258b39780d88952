"""Ulysses context parallelism: the all-to-all attention on real gloo ranks, the gradient scale of cp
ranks, and end-to-end parity through the CLI with one process, alone and composed with FSDP, HSDP
and tensor parallelism."""

import json
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

import bigvit
from bigvit.errors import ConfigError
from bigvit.models.attention import attention
from bigvit.models.vit import AttentionKernel
from bigvit.parallel.context import UlyssesAttention, apply_cp, check_cp
from bigvit.parallel.distributed import teardown
from bigvit.parallel.materialize import materialize
from tests.helpers import TINY, final_params, free_port, losses, run_train

COMMON = [*TINY, "data=synthetic", "data.batch_size=8", "trainer.max_steps=5", "trainer.precision=fp32"]
# SGD makes a wrongly scaled gradient visible in the weights (AdamW would normalize it away).
SGD = [*COMMON, "optim=sgd"]


def grad_norms(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/grad_norm"] for r in map(json.loads, lines) if "train/grad_norm" in r}


def max_rel_diff(expected: dict, got: dict) -> float:
    assert expected.keys() == got.keys() and expected
    return max(abs(got[k] - expected[k]) / abs(expected[k]) for k in expected)


def max_param_diff(expected: dict, got: dict) -> float:
    assert expected.keys() == got.keys()
    return max((got[k] - expected[k]).abs().max().item() for k in expected)


def assert_matches_single(single_dir, cp_dir) -> None:
    """Per-step losses and global grad norms within 1e-5 relative, final weights within 1e-5."""
    assert max_rel_diff(losses(single_dir), losses(cp_dir)) <= 1e-5
    assert max_rel_diff(grad_norms(single_dir), grad_norms(cp_dir)) <= 1e-5
    assert max_param_diff(final_params(single_dir), final_params(cp_dir)) <= 1e-5


# -- the building blocks on two gloo ranks -------------------------------------------------------
# No classifier (its zero init would zero every other gradient): the loss reads the pooled features.
VIT = dict(depth=2, width=48, heads=4, mlp_dim=96, image_size=16, patch_size=4, num_classes=0)
VIT.update(class_token=False, pool="gap")


def cp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
        # UlyssesAttention on this rank's token slice; inputs and upstream gradient are the same on all ranks.
        gen = torch.Generator().manual_seed(0)
        q, k, v, upstream = (torch.randn(2, 16, 4, 12, generator=gen) for _ in range(4))
        local = [t.chunk(world_size, dim=1)[rank].clone().requires_grad_() for t in (q, k, v)]
        out = UlyssesAttention(AttentionKernel("math"), mesh.get_group())(*local)
        out.backward(upstream.chunk(world_size, dim=1)[rank])
        # A whole ViT, context-parallel but without FSDP: the raw per-rank parameter gradients.
        model = bigvit.build_model("vit_ti16", device="meta", **VIT)
        apply_cp(model, mesh["cp"])
        materialize(model, torch.device("cpu"), seed=3)
        images = torch.randn(4, 3, 16, 16, generator=gen)
        model(images).square().mean().backward()
        result = {
            "out": out.detach(),
            "grads": [t.grad for t in local],
            "params": {n: p.grad for n, p in model.named_parameters()},
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        teardown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("cp_ranks")
    mp.spawn(cp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_ulysses_attention_matches_plain_attention(two_ranks):
    gen = torch.Generator().manual_seed(0)
    q, k, v, upstream = (torch.randn(2, 16, 4, 12, generator=gen) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, "math")
    out.backward(upstream)
    for rank, got in enumerate(two_ranks):
        torch.testing.assert_close(got["out"], out.detach().chunk(2, dim=1)[rank], rtol=0, atol=1e-6)
        for grad, full in zip(got["grads"], (q.grad, k.grad, v.grad), strict=True):
            torch.testing.assert_close(grad, full.chunk(2, dim=1)[rank], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_cp_rank_gradients_average_to_the_single_process_gradient(two_ranks):
    model = materialize(bigvit.build_model("vit_ti16", device="meta", **VIT), torch.device("cpu"), seed=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):  # q, k, v, upstream of the attention check
        torch.randn(2, 16, 4, 12, generator=gen)
    model(torch.randn(4, 3, 16, 16, generator=gen)).square().mean().backward()
    for name, param in model.named_parameters():
        ranks = [r["params"][name] for r in two_ranks]
        # Each rank holds cp × its share: the mean over cp ranks (what FSDP over dp_shard×cp takes) is exact.
        torch.testing.assert_close((ranks[0] + ranks[1]) / 2, param.grad, rtol=1e-5, atol=1e-7)
        if not name.startswith(("blocks.", "patch_embed", "pos_embed")):  # after the gather: full, identical
            torch.testing.assert_close(ranks[0], param.grad, rtol=1e-5, atol=1e-7)
    # Before the gather the ranks' gradients differ (each saw its own tokens).
    fc1 = model.blocks[0].mlp.fc1.weight.grad
    assert fc1.abs().max() > 1e-4
    assert not torch.allclose(two_ranks[0]["params"]["blocks.0.mlp.fc1.weight"], fc1, rtol=1e-2)


# -- end to end through the CLI --------------------------------------------------------------------
# 4 heads (1 per rank at cp=4, or tp=2 × cp=2). ViT-B/16's 196 patches + a class token = 197 tokens,
# which no cp > 1 divides: the model pads them to 198 (cp=2) or 200 (cp=4, tp=2 × cp=2), masked.
MODELS = {
    "gap": ["model.heads=4", "model.class_token=false", "model.pool=gap"],  # 16 patches
    "map": ["model.heads=4", "model.class_token=false", "model.pool=map"],  # MAP head on the gathered tokens
    "cls": ["model.heads=4", "model.pool=cls", "model.num_registers=1"],  # class + register + 16 = 18
    "cls197": ["model.heads=4", "model.pool=cls", "model.patch_size=16", "data.image_size=224"],
    # 8 of 16 patches kept + class = 9 tokens, padded to 10; cp ranks draw the same patches.
    "dropout": ["model.heads=4", "model.pool=cls", "model.patch_dropout=0.5"],
}


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """Model name → its one-process run, made on first use and shared by the layouts."""
    runs = {}

    def get(model: str):
        if model not in runs:
            runs[model] = tmp_path_factory.mktemp(f"single_{model}") / "run"
            run_train(runs[model], [*SGD, *MODELS[model], "parallel=single"])
        return runs[model]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,layout,nproc",
    [
        ("cls197", ["parallel=fsdp_cp"], 2),  # cp 2: 197 tokens padded to 198
        ("cls197", ["parallel=fsdp_cp", "parallel.cp=4"], 4),  # cp 4: one head and 50 tokens per rank
        ("map", ["parallel=fsdp_cp", "parallel.dp_shard=2"], 4),  # FSDP 2 × cp 2
        ("cls", ["parallel=hsdp", "parallel.dp_shard=1", "parallel.cp=2"], 4),  # replicate 2 × cp 2
        ("cls197", ["parallel=fsdp_cp", "parallel.tp=2"], 4),  # tp 2 (sequence parallel) × cp 2: pad to 200
        ("dropout", ["parallel=fsdp_cp"], 2),  # patch dropout: 9 kept tokens padded to 10
    ],
    ids=["cp2-cls197", "cp4-cls197", "fsdp2xcp2-map", "hsdp2xcp2-cls", "tp2xcp2-cls197", "cp2-patch-dropout"],
)
def test_context_parallel_matches_one_process(tmp_path, single_runs, model, layout, nproc):
    run_train(tmp_path / "cp", [*SGD, *MODELS[model], *layout], nproc=nproc)
    assert_matches_single(single_runs(model), tmp_path / "cp")


@pytest.mark.parametrize(
    "model,cp,message",
    [
        (dict(heads=3, class_token=False, pool="gap"), 2, "parallel.cp=2 does not divide model.heads=3"),
        (dict(heads=4, window_size=2), 2, "parallel.cp=2 shards the token sequence, which model.window_size=2"),
    ],
)
def test_layouts_that_do_not_split_are_named(model, cp, message):
    vit = bigvit.build_model("vit_ti16", device="meta", **{**VIT, "num_classes": 10, **model})
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_cp(vit, cp)


@pytest.mark.slow
def test_windowed_attention_under_cp_fails_at_start_up_in_one_line(tmp_path):
    windowed = ["model.heads=4", "model.class_token=false", "model.pool=gap", "model.window_size=2"]
    result = run_train(tmp_path / "bad", [*COMMON, *windowed, "parallel=fsdp_cp"], nproc=2, check=False)
    assert result.returncode != 0
    errors = {line for line in result.stderr.splitlines() if line.startswith("bigvit: error:")}
    assert errors == {
        "bigvit: error: parallel.cp=2 shards the token sequence, which model.window_size=2 attention "
        "partitions by windows of the patch grid instead; use parallel.tp for windowed models or "
        "model.window_size=0"
    }  # the same line from each rank, and no Python traceback
    assert "ConfigError" not in result.stderr
