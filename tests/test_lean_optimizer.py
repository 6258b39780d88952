"""The memory-lean Adam (factored second moment, bf16 momentum): its state, its update, its layout independence."""

import pytest
import torch

from bigvit.optim.lean import LeanAdam, optimizer_state_bytes
from tests.helpers import TINY, losses, run_train


def state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


def test_matrix_state_is_bf16_momentum_plus_row_and_column_statistics():
    weight = torch.nn.Parameter(torch.randn(64, 48))
    optimizer = LeanAdam([weight], lr=1e-3)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    state = optimizer.state[weight]
    assert (
        state["momentum"].dtype == torch.bfloat16
        and state["row"].shape == (64,)
        and state["col"].shape == (48,)
    )
    assert state_bytes(state) == optimizer_state_bytes((64, 48)) == 2 * 64 * 48 + 4 * (64 + 48)
    assert optimizer_state_bytes((64, 48)) < 8 * 64 * 48 / 3.5  # vs AdamW's two fp32 moments


def test_vectors_follow_adam_up_to_bf16_momentum():
    torch.manual_seed(0)
    lean, adam = torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.zeros(100))
    adam.data.copy_(lean.data)
    optimizers = [LeanAdam([lean], lr=1e-2, eps=1e-30), torch.optim.Adam([adam], lr=1e-2, eps=1e-12)]
    for _ in range(5):
        grad = torch.randn(100)
        lean.grad, adam.grad = grad.clone(), grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(lean, adam, rtol=0, atol=2e-4)


def test_factored_estimate_is_exact_for_rank_one_squared_gradients():
    rows, cols = torch.rand(8) + 0.5, torch.rand(6) + 0.5
    grad = (rows[:, None] * cols[None, :]).sqrt()  # grad² = rows ⊗ cols, rank one
    weight = torch.nn.Parameter(torch.zeros(8, 6))
    optimizer = LeanAdam([weight], lr=1.0, betas=(0.0, 0.0), eps=1e-30)
    weight.grad = grad
    optimizer.step()
    torch.testing.assert_close(
        weight.detach(), -torch.ones(8, 6), rtol=1e-5, atol=1e-5
    )  # m / sqrt(v) = sign(g)


@pytest.mark.slow
def test_lean_optimizer_trains_the_same_under_fsdp(tmp_path):
    common = [
        *TINY,
        "data=synthetic",
        "data.batch_size=8",
        "trainer.max_steps=6",
        "optim=lean",
        "optim.lr=3e-3",
    ]
    run_train(tmp_path / "one", [*common, "parallel=single"])
    run_train(tmp_path / "two", [*common, "parallel=fsdp"], nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one[6] < one[1]  # it trains
    assert max(abs(two[s] - one[s]) / one[s] for s in one) < 1e-5
