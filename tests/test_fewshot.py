"""Few-shot linear probes: the closed-form ridge solution, every sample once under FSDP2, the CLI."""

import json

import pytest
import torch

from bigvit.train.evaluate_cli import main as eval_main
from bigvit.train.fewshot import fewshot_errors, ridge_weights
from tests.helpers import TINY, run_train, summary

SHOTS = (1, 2, 5)
# 37 held-out and 37 support samples: the two ranks hold 19 and 18, in batches of 4 with a partial last one.
COMMON = [
    *TINY,
    "data=synthetic",
    "data.batch_size=8",
    "data.eval_samples=37",
    "trainer.max_steps=4",
    "trainer.precision=fp32",
    "optim=sgd",
    "optim.lr=0.5",
    "optim.momentum=0.0",
    "trainer.fewshot_every=2",
    f"fewshot.shots=[{','.join(map(str, SHOTS))}]",
    "fewshot.draws=2",
    "fewshot.ridge=4.0",
]


@pytest.mark.parametrize("samples", [7, 40])  # fewer and more samples than features: both normal systems
def test_ridge_solution_equals_least_squares_on_the_augmented_system(samples):
    generator = torch.Generator().manual_seed(samples)
    x = torch.randn(samples, 12, generator=generator, dtype=torch.float64)
    y = torch.randn(samples, 3, generator=generator, dtype=torch.float64)
    ridge = 0.7
    # min |x w − y|² + λ|w|²  ⇔  least squares on [x; √λ I] w = [y; 0].
    augmented_x = torch.cat([x, ridge**0.5 * torch.eye(12, dtype=torch.float64)])
    augmented_y = torch.cat([y, torch.zeros(12, 3, dtype=torch.float64)])
    expected = torch.linalg.lstsq(augmented_x, augmented_y).solution
    torch.testing.assert_close(ridge_weights(x, y, ridge), expected, rtol=0, atol=1e-6)


def test_separable_features_are_probed_without_error_and_noise_at_chance():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    centers = 10 * torch.randn(4, 8, generator=generator)
    features = centers[labels] + torch.randn(200, 8, generator=generator)
    support, query = (features[:100], labels[:100]), (features[100:], labels[100:])
    assert fewshot_errors(support, query, 4, shots=(1, 5)) == {1: 0.0, 5: 0.0}
    noise = (torch.randn(200, 8, generator=generator), labels)
    errors = fewshot_errors(
        (noise[0][:100], labels[:100]), (noise[0][100:], labels[100:]), 4, shots=(5,), draws=5
    )
    assert 0.5 < errors[5] < 0.95


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fewshot") / "single"
    results = run_dir.parent / "results.jsonl"
    run_train(run_dir, [*COMMON, "parallel=single", f"trainer.results_file={results}"])
    return run_dir


@pytest.mark.slow
def test_fsdp_fewshot_sees_every_sample_once_and_matches_one_process(tmp_path, single):
    run_dir = tmp_path / "fsdp"
    run_train(run_dir, [*COMMON, "parallel=fsdp"], nproc=2)
    expected, got = summary(single)["eval"], summary(run_dir)["eval"]
    for figures in expected, got:
        assert figures["fewshot_support_samples"] == figures["fewshot_query_samples"] == 37
    for k in SHOTS:
        assert abs(got[f"fewshot_{k}shot_error"] - expected[f"fewshot_{k}shot_error"]) < 1e-6, k
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "eval/fewshot_1shot_error" in row] == [2, 4]


def test_results_line_carries_the_fewshot_errors(single):
    line = json.loads((single.parent / "results.jsonl").read_text().splitlines()[-1])
    for k in SHOTS:
        assert line[f"fewshot_{k}shot_error"] == summary(single)["eval"][f"fewshot_{k}shot_error"]


def test_bigvit_eval_fewshot_reproduces_the_trainers_figures(single, capsys):
    eval_main(["fewshot", str(single)])
    out = capsys.readouterr().out
    assert "37 support, 37 query samples, 2 draws, ridge 4" in out
    rows = dict(line.split() for line in out.splitlines()[-len(SHOTS) :])
    figures = summary(single)["eval"]
    assert {int(k): float(e) for k, e in rows.items()} == pytest.approx(
        {k: figures[f"fewshot_{k}shot_error"] for k in SHOTS}, abs=1e-4
    )
