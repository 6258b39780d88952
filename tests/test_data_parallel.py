"""Data-parallel layouts train the same model as one process: losses, SGD parameters and grad norms.

Every run sees the same global batches (data=synthetic); fp32 differences come only from the order
of floating-point reductions. AdamW amplifies rounding, so parameters are compared after plain SGD.
"""

import json

import pytest
import torch

from tests.helpers import TINY, final_params, losses, run_train

pytestmark = pytest.mark.slow

# A large SGD step with clipping engaged: with the zero-initialized head, small steps leave the blocks
# almost still and a wrong gradient would go unnoticed in the parameters. Layer-wise LR decay and
# weight-decay masks are on, so per-parameter groups must survive each layout.
COMMON = [
    *TINY,
    "data=synthetic",
    "data.batch_size=8",
    "trainer.max_steps=5",
    "trainer.precision=fp32",
    "optim=sgd",
    "optim.lr=4.0",
    "optim.momentum=0.0",
    "optim.grad_clip=0.3",
    "optim.layer_decay=0.75",
    "optim.weight_decay=0.01",
]

LAYOUTS = {
    "ddp": (["parallel=ddp"], 2),
    "fsdp": (["parallel=fsdp"], 2),
    "fsdp_no_reshard": (["parallel=fsdp", "parallel.reshard_after_forward=false"], 2),
    "fsdp_ac_full": (["parallel=fsdp", "parallel.activation_checkpointing=full"], 2),
    "fsdp_ac_selective": (
        ["parallel=fsdp", "parallel.activation_checkpointing=selective", "parallel.ac_every=2"],
        2,
    ),
    "fsdp_cpu_offload": (["parallel=fsdp", "parallel.cpu_offload=true"], 2),
    "hsdp_2x2": (["parallel=hsdp", "parallel.dp_shard=2"], 4),
}


def grad_norms(run_dir) -> dict[int, float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["train/grad_norm"] for r in rows if "train/grad_norm" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run_train(run_dir, [*COMMON, "parallel=single"])
    return run_dir


def relative_gap(expected: dict, got: dict) -> float:
    assert expected.keys() == got.keys()
    return max(abs(got[k] - expected[k]) / abs(expected[k]) for k in expected)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(tmp_path, reference, layout):
    overrides, nproc = LAYOUTS[layout]
    run_dir = tmp_path / layout
    run_train(run_dir, [*COMMON, *overrides], nproc=nproc)
    assert len(losses(run_dir)) == 5
    assert relative_gap(losses(reference), losses(run_dir)) < 1e-5
    assert relative_gap(grad_norms(reference), grad_norms(run_dir)) < 1e-5  # clipped by the true global norm
    expected, got = final_params(reference), final_params(run_dir)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


def test_clipping_engages_with_the_global_norm(tmp_path, reference):
    """The reference runs clip at 0.3; the logged norm is the pre-clip norm and must exceed it."""
    assert min(grad_norms(reference).values()) > 0.3


def test_bf16_fsdp_stays_close_to_fp32(tmp_path, reference):
    run_dir = tmp_path / "bf16"
    run_train(run_dir, [*COMMON, "parallel=fsdp", "trainer.precision=bf16"], nproc=2)
    assert relative_gap(losses(reference), losses(run_dir)) < 1e-2
