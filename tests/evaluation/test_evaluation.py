"""Closed-loop evaluation: statistics, refusal of mismatched checkpoints, determinism, and a collect -> train ->
eval run on an easy task that must reach a stated success."""

import json

import pytest

from envs.collect import collect_demos
from envs.datasets import PolicyDataset
from evaluation.evaluate import EvalSettings, evaluate
from evaluation.report import wilson_interval
from policy.config import load_config
from policy.train import train
from rtdp.cli import main
from tests.conftest import train_small_policy

ROOT_CONFIG = "configs/policy/unet_lowdim.yaml"


@pytest.mark.parametrize("wins,n,lo,hi", [(0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634),
                                          (45, 50, 0.7864, 0.9565)])
def test_wilson_interval_matches_published_values(wins, n, lo, hi):
    got = wilson_interval(wins, n)
    assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4)


@pytest.fixture(scope="module")
def point_mass_policy(tmp_path_factory):
    """A tiny U-Net trained on 60 point-mass demos: 400 steps, about 20 s on 2 cores."""
    def configure(cfg):
        cfg.policy.unet.down_dims, cfg.policy.unet.diffusion_step_embed_dim = [32, 64], 32

    return train_small_policy(tmp_path_factory.mktemp("pm") / "policy", "point_mass/reach", 60, configure,
                              steps=400, lr=2e-3)


def test_collect_train_eval_reaches_the_stated_success(point_mass_policy, tmp_path):
    report = evaluate(EvalSettings(checkpoint=str(point_mass_policy), episodes=20, workers=1, sampler="ddim",
                                   steps=10), progress=False)
    assert report["task"] == "point_mass/reach" and report["episodes"] == 20
    assert report["success_rate"] >= 0.8
    assert report["nfe_per_decision"] == 10 and report["actions_per_decision"] == 4
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert report["success_ci95"][0] <= report["success_rate"] <= report["success_ci95"][1]
    assert report["config"]["sampler"] == "ddim" and report["config"]["steps"] == 10


def test_same_seed_same_rollouts_however_split_among_workers(point_mass_policy):
    kw = dict(checkpoint=str(point_mass_policy), episodes=6, seed=3, sampler="ddpm", steps=20)
    one = evaluate(EvalSettings(**kw, workers=1), progress=False)["per_episode"]
    again = evaluate(EvalSettings(**kw, workers=1), progress=False)["per_episode"]
    two = evaluate(EvalSettings(**kw, workers=2), progress=False)["per_episode"]
    assert one == again == two
    other = evaluate(EvalSettings(**{**kw, "seed": 4}, workers=1), progress=False)["per_episode"]
    assert [e["seed"] for e in other] != [e["seed"] for e in one]


def test_checkpoint_that_does_not_fit_the_task_is_refused(point_mass_policy, capsys):
    code = main(["eval", "--checkpoint", str(point_mass_policy), "--task", "metaworld/reach-v3", "--episodes", "1",
                 "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "expects a 4-d state, a 2-d action; task metaworld/reach-v3 gives a 39-d state, a 4-d action" in err


def test_eval_cli_writes_the_report_and_a_summary_line(point_mass_policy, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(point_mass_policy), "--episodes", "4", "--steps", "5",
                 "--workers", "1", "--no-progress", "--report", str(report_path),
                 "--plot", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "point_mass/reach  ddim-5  success" in out
    report = json.loads(report_path.read_text())
    for key in ("task", "episodes", "success_rate", "mean_return", "nfe_per_decision", "actions_per_decision",
                "latency_ms", "config"):
        assert key in report


@pytest.mark.slow
def test_metaworld_drawer_open_collect_train_eval(tmp_path):
    """The demo's path: 50 drawer-open-v3 demos, 1000 steps of the default U-Net, 20 held-out episodes (~5 min)."""
    buffer = collect_demos("metaworld/drawer-open-v3", 50, seed=0, progress=False)
    cfg = load_config(ROOT_CONFIG, ["train.steps=1000", "train.checkpoint_every=1000",
                                    "data.task=metaworld/drawer-open-v3"])
    p = cfg.policy
    data = PolicyDataset(buffer, p.horizon, p.n_obs_steps, p.n_action_steps, ["state"], "action")
    train(cfg, data, tmp_path / "policy", progress=False)
    report = evaluate(EvalSettings(checkpoint=str(tmp_path / "policy"), episodes=20, sampler="ddim", steps=10,
                                   video_dir=str(tmp_path / "video"), video_episodes=1), progress=False)
    assert report["success_rate"] >= 0.8
    assert len(report["videos"]) == 1
