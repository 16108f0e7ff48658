"""`rtdp train` end to end on a small point-mass dataset: the loss falls, resume is exact, torchrun works."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from envs.collect import collect_demos
from policy.checkpoint import load_policy
from policy.config import config_to_yaml
from rtdp.cli import main
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    collect_demos("point_mass/reach", 20, seed=0, progress=False).save(tmp / "pm.zarr")
    cfg = tiny_config()
    cfg.policy.state_dim = cfg.policy.action_dim = 0  # filled from the dataset
    cfg.train.steps, cfg.train.checkpoint_every = 120, 60
    cfg.train.lr = 1e-3
    (tmp / "tiny.yaml").write_text(config_to_yaml(cfg))
    return tmp


def train(ws, out, *extra):
    return main(["train", "--config", str(ws / "tiny.yaml"), "--data", str(ws / "pm.zarr"), "--out", str(out),
                 "--no-progress", "--report", str(out) + ".json", *extra])


def test_train_makes_a_loadable_checkpoint_and_the_loss_falls(workspace):
    out = workspace / "run"
    assert train(workspace, out) == 0
    report = json.loads(Path(str(out) + ".json").read_text())
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert report["episodes"] == 20 and report["steps"] == 120 and report["world_size"] == 1
    assert report["loss_last"] < 0.5 * report["loss_first"]
    policy, cfg = load_policy(out)
    assert cfg.policy.state_dim == 4 and cfg.policy.action_dim == 2
    chunk = policy.predict_chunk({"state": torch.zeros(1, 2, 4)}).action
    assert chunk.shape == (1, 4, 2) and torch.isfinite(chunk).all()


class CrashingData:
    """Wraps a dataset and fails on its n-th batch, as a killed run would stop."""

    def __init__(self, data, crash_at):
        self.data, self.crash_at, self.calls = data, crash_at, 0

    def __getattr__(self, name):
        return getattr(self.data, name)

    def __len__(self):
        return len(self.data)

    def batch(self, indices):
        self.calls += 1
        if self.calls > self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        return self.data.batch(indices)


def test_resume_after_a_crash_continues_exactly(workspace):
    from envs.datasets import PolicyDataset, ReplayBuffer
    from policy.config import load_config
    from policy.train import train as train_fn

    cfg = load_config(workspace / "tiny.yaml", ["train.steps=40", "train.checkpoint_every=20"])
    p = cfg.policy
    data = PolicyDataset(ReplayBuffer.load(workspace / "pm.zarr"), p.horizon, p.n_obs_steps, p.n_action_steps,
                         ["state"], "action")
    straight, crashed = workspace / "straight", workspace / "crashed"
    train_fn(cfg, data, straight, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_fn(load_config(workspace / "tiny.yaml", ["train.steps=40", "train.checkpoint_every=20"]),
                 CrashingData(data, crash_at=27), crashed, progress=False)
    summary = train_fn(load_config(workspace / "tiny.yaml", ["train.steps=40", "train.checkpoint_every=20"]),
                       data, crashed, resume=True, progress=False)
    assert summary.start_step == 20
    a = load_file(straight / "train_state.safetensors")
    b = load_file(crashed / "train_state.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_config(workspace, capsys):
    out = workspace / "changed"
    assert train(workspace, out, "train.steps=5") == 0
    assert train(workspace, out, "train.steps=10", "train.lr=0.5", "--resume") == 2
    assert "config differs" in capsys.readouterr().err


def test_cli_errors_name_the_problem(workspace, capsys):
    assert train(workspace, workspace / "x", "train.stepz=3") == 2
    assert "'train.stepz'" in capsys.readouterr().err
    code = main(["train", "--config", str(workspace / "tiny.yaml"), "--data", str(workspace / "none.zarr"),
                 "--out", str(workspace / "y"), "--no-progress"])
    assert code == 2 and "none.zarr does not exist" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_process_data_parallel(workspace):
    out = workspace / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "rtdp", "train", "--config", str(workspace / "tiny.yaml"),
           "--data", str(workspace / "pm.zarr"), "--out", str(out), "--no-progress", "--report",
           str(out) + ".json", "train.steps=30", "train.checkpoint_every=30"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "train_report.json").read_text())
    assert report["world_size"] == 2
    # Both ranks end with the same weights: gradients were averaged every step.
    c0, c1 = report["param_checksums"]
    assert c0 == c1
    assert report["loss_last"] < report["loss_first"]
    load_policy(out)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_into_a_run_already_there_is_refused_and_nothing_changes(workspace, capsys):
    out = workspace / "refused"
    assert train(workspace, out, "train.steps=30", "train.checkpoint_every=30") == 0
    before = snapshot(out)
    assert train(workspace, out, "train.steps=30", "train.checkpoint_every=30") == 2
    assert "already holds files; nothing was written" in capsys.readouterr().err
    # --resume on a run already past the asked steps: refused before any file is touched
    assert train(workspace, out, "--resume", "train.steps=10", "train.checkpoint_every=30") == 2
    assert "already at step 30, and train.steps is 10" in capsys.readouterr().err
    assert snapshot(out) == before
    assert train(workspace, out, "--overwrite", "train.steps=30", "train.checkpoint_every=30") == 0


def test_a_bad_override_is_one_line_not_a_traceback(workspace, capsys):
    assert train(workspace, workspace / "never", "train.steps=[1,2") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rtdp train: error: override 'train.steps=[1,2'") and len(err.splitlines()) == 1
    assert not (workspace / "never").exists()
