"""Checkpoints are data: a tampered or foreign file gives one `bigvit: error:` line and runs nothing,
for resume, export and import; secrets in the environment never reach a run directory."""

import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from bigvit.errors import CheckpointError
from bigvit.train.safe_load import load_dcp, read_metadata
from tests.helpers import ROOT, TINY, run_train, train_env

RUN = [*TINY, "data=synthetic", "data.batch_size=8", "trainer.max_steps=2", "parallel=single"]


class Exploit:
    """Unpickling this runs `touch MARKER`: what a checkpoint from a stranger could do to DCP's pickle.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("safe") / "run"
    run_train(run_dir, RUN)
    return run_dir


def tampered_copy(finished_run, tmp_path, file: str, payload: bytes):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    (checkpoint / file).write_bytes(payload)
    return run_dir, checkpoint


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("bigvit: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=train_env(1), capture_output=True, text=True, timeout=300
    )


COMMANDS = {
    "resume": lambda run, out: run_train(run, [*RUN, "trainer.max_steps=3"], check=False),
    "export": lambda run, out: run_cli("bigvit.train.export", str(run), str(out / "weights.safetensors")),
    "eval": lambda run, out: run_cli("bigvit.train.evaluate_cli", "classify", str(run)),
}


# Export and eval read the weights only; resume also reads this rank's state.
TAMPERED = [
    ("resume", ".metadata", "refers to posix.system"),
    ("export", ".metadata", "refers to posix.system"),
    ("eval", ".metadata", "refers to posix.system"),
    ("resume", "rank0.safetensors", "is not a readable safetensors file"),
]


@pytest.mark.slow
@pytest.mark.parametrize("command,file,what", TAMPERED, ids=[f"{c}-{f}" for c, f, _ in TAMPERED])
def test_tampered_checkpoint_is_refused_without_running_it(finished_run, tmp_path, command, file, what):
    marker = tmp_path / "code_ran"
    run_dir, checkpoint = tampered_copy(finished_run, tmp_path, file, pickle.dumps(Exploit(marker)))
    line = one_error_line(COMMANDS[command](run_dir, tmp_path))
    assert not marker.exists()  # the payload never ran
    assert str(checkpoint / file) in line and what in line, line


def test_broken_metadata_json_is_named(finished_run, tmp_path):
    run_dir, checkpoint = tampered_copy(finished_run, tmp_path, "bigvit.json", b"{not json")
    line = one_error_line(run_cli("bigvit.train.export", str(run_dir), str(tmp_path / "w.safetensors")))
    assert f"{checkpoint / 'bigvit.json'} is not readable JSON" in line


def test_non_tensor_items_load_as_plain_data_only(tmp_path):
    marker = tmp_path / "code_ran"
    dcp.save({"weights": torch.ones(3), "step": 7, "evil": Exploit(marker)}, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    state = {"weights": torch.zeros(3), "step": 0}
    load_dcp(state, tmp_path / "c", no_dist=True)  # plain items load
    assert state["step"] == 7 and torch.equal(state["weights"], torch.ones(3))
    with pytest.raises(CheckpointError, match="item 'evil' is not plain data"):
        load_dcp({"evil": None}, tmp_path / "c", no_dist=True)
    assert not marker.exists()


def test_metadata_of_a_real_checkpoint_passes_the_restricted_unpickler(finished_run):
    metadata = read_metadata(finished_run / "checkpoints" / "step_00000002" / ".metadata")
    assert any(key.startswith("model.") for key in metadata.state_dict_metadata)


@pytest.mark.slow
def test_foreign_weights_file_is_refused_on_import(tmp_path):
    marker = tmp_path / "code_ran"
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(pickle.dumps(Exploit(marker)))
    line = one_error_line(run_cli("bigvit.train.evaluate_cli", "classify", str(weights)))
    assert str(weights) in line and not marker.exists()


SECRETS = {
    "WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef01234567",
    "HF_TOKEN": "hf_secretTOKENabcdefghijklmnopqrstuv",
    "AWS_SECRET_ACCESS_KEY": "aws/secret+ACCESSkey0123456789abcdefghij",
    "GITHUB_TOKEN": "ghp_secret0123456789abcdefghijklmnopqr",
}


@pytest.mark.slow
def test_secrets_in_the_environment_never_reach_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    env = {**train_env(1), **SECRETS, "WANDB_DIR": str(run_dir)}
    overrides = [*RUN, "logger=wandb", "logger.wandb.mode=offline", "trainer.checkpoint_every=1"]
    result = subprocess.run(
        [sys.executable, "-m", "bigvit.train", *overrides, f"trainer.run_dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".wandb" for p in files)
    for path in files:
        data = path.read_bytes()
        for name, secret in SECRETS.items():
            assert secret.encode() not in data, f"{name} found in {path}"
    for name, secret in SECRETS.items():
        assert secret not in result.stdout + result.stderr, f"{name} found in the logs"
