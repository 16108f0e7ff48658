"""RTI in closed loop on a bimodal task (a point mass passing an obstacle on the left or the right, then closing a
gripper at the goal), with a policy trained here with the gripper scaled by 1/10 (RTI's "scale" variant):
the warm start keeps the route chosen by the first full denoise, contracts perturbations, flips the gripper on
time, and `rtdp eval --rti` reports what it ran."""

import json
from collections import deque

import numpy as np
import pytest
import torch

from envs.collect import collect_demos
from envs.tasks import make_env
from policy.checkpoint import load_policy
from policy.rti import RTIConfig, RTIPolicy
from rtdp.cli import main
from tests.conftest import train_small_policy

EPISODES = 20
PAPER = dict(k0=3, steps=None, sampler="ddpm", mode="direct")  # the released code's tail [3, 2, 1, 0]
CONFIGS = {"paper-k0=3": PAPER, "default": {}}


@pytest.fixture(scope="module")
def obstacle_checkpoint(tmp_path_factory):
    """A small U-Net on 100 obstacle demos, gripper trained at +-0.1: 800 steps, about a minute on 2 cores."""
    def configure(cfg):
        p = cfg.policy
        p.horizon, p.n_obs_steps, p.n_action_steps = 16, 2, 8
        p.unet.down_dims, p.unet.diffusion_step_embed_dim = [32, 64], 32
        p.discrete_action_dims, p.discrete_action_scale = [2], 10.0

    return train_small_policy(tmp_path_factory.mktemp("obstacle") / "policy", "point_mass/obstacle", 100,
                              configure, steps=800, lr=2e-3, warmup_steps=50)


@pytest.fixture(scope="module")
def policy(obstacle_checkpoint):
    return load_policy(obstacle_checkpoint)[0]


def route_side(position: np.ndarray, chunk: np.ndarray, dt: float = 0.1) -> int:
    """The side of the obstacle a plan goes round: the sign of its widest planned x excursion."""
    path = position[0] + dt * np.cumsum(chunk[:, 0])
    return 1 if path[np.argmax(np.abs(path))] > 0 else -1


def run(decide, seed: int) -> tuple[bool, int]:
    """One episode executing one action per decision; returns (success, route switches while below the
    obstacle)."""
    env = make_env("point_mass/obstacle")
    obs, _ = env.reset(seed=seed)
    history = deque([obs] * 2, maxlen=2)
    generator = torch.Generator().manual_seed(seed)
    sides, success = [], False
    for _ in range(env.max_episode_steps):
        state = torch.from_numpy(np.stack([h["state"] for h in history]))[None]
        out = decide({"state": state}, generator)
        if obs["state"][1] < -0.15:
            sides.append(route_side(obs["state"][:2], out.action_pred[0, 1:].numpy()))
        obs, _, _, truncated, info = env.step(out.action[0, 0].numpy())
        history.append(obs)
        success = bool(info["success"])
        if success or truncated:
            break
    return success, int(np.count_nonzero(np.diff(sides)))


# the released code's setting runs with `-m slow` (27 s here); the default one keeps the default run under budget
@pytest.mark.parametrize("config", [pytest.param("paper-k0=3", marks=pytest.mark.slow), "default"])
def test_rti_keeps_its_route_where_fresh_noise_at_the_same_cost_dithers(policy, config):
    rti = RTIPolicy(policy, RTIConfig(**CONFIGS[config]))

    def warm(obs, generator):
        return rti.predict_chunk(obs, generator=generator)

    def fresh(obs, generator):
        return policy.predict_chunk(obs, generator=generator)

    rti_runs = []
    for i in range(EPISODES):
        rti.reset()
        rti_runs.append(run(warm, 1000 + i))
    policy.configure_inference("ddim", 4)
    fresh_runs = [run(fresh, 1000 + i) for i in range(EPISODES)]
    rti_switches = np.mean([s for _, s in rti_runs])
    fresh_switches = np.mean([s for _, s in fresh_runs])
    assert rti_switches <= 0.1, f"RTI switched route {rti_switches:.2f} times per episode"
    assert fresh_switches >= 5 * max(rti_switches, 0.1), (rti_switches, fresh_switches)
    assert np.mean([ok for ok, _ in rti_runs]) >= 0.8


def test_warm_start_contracts_perturbations_and_more_so_with_larger_k0(policy):
    demos = collect_demos("point_mass/obstacle", 6, seed=500, progress=False)
    ratios = {}
    for k0 in (1, 3, 5, 10):
        rs = []
        for e in range(demos.n_episodes):
            states = demos.episode(e)["state"]
            rti = RTIPolicy(policy, RTIConfig(**{**PAPER, "k0": k0}))
            rti.reset()
            noise = torch.Generator().manual_seed(e)
            for t in range(16):
                obs = {"state": torch.from_numpy(np.stack([states[max(t - 1, 0)], states[t]]))[None]}
                if t in (5, 10, 15):
                    guess = rti.shifted_guess(1)
                    delta = 0.1 * torch.randn(guess.shape, generator=noise)
                    cond = policy.condition(obs)
                    # The same sampler noise on both runs: only the start differs.
                    a = policy.sample_normalized(cond, guess, rti.tail, "ddpm", torch.Generator().manual_seed(t)).x0
                    b = policy.sample_normalized(cond, guess + delta, rti.tail, "ddpm",
                                                 torch.Generator().manual_seed(t)).x0
                    rs.append(float((a - b).norm() / delta.norm()))
                rti.predict_chunk(obs, generator=noise)
        ratios[k0] = float(np.mean(rs))
    assert ratios[3] < 0.6, ratios
    assert ratios[1] > ratios[3] > ratios[5] > ratios[10], ratios


@pytest.mark.parametrize("config", list(CONFIGS))
def test_scaled_gripper_flips_within_one_step_of_the_demonstration(policy, config):
    demos = collect_demos("point_mass/obstacle", 5, seed=700, progress=False)
    rti = RTIPolicy(policy, RTIConfig(**CONFIGS[config]))
    for e in range(demos.n_episodes):
        ep = demos.episode(e)
        flip = int(np.argmax(ep["action"][:, 2] > 0))  # the expert closes on arriving at the goal
        rti.reset()
        generator = torch.Generator().manual_seed(e)
        grips = []
        for t in range(len(ep["action"])):
            obs = {"state": torch.from_numpy(ep["state"][[max(t - 1, 0), t]])[None]}
            grips.append(float(rti.predict_chunk(obs, generator=generator).action[0, 0, 2]))
        assert set(grips) <= {-1.0, 1.0}
        rti_flip = int(np.argmax(np.array(grips) > 0)) if max(grips) > 0 else None
        assert rti_flip is not None and abs(rti_flip - flip) <= 1, (e, flip, rti_flip)


def test_eval_cli_runs_rti_and_records_its_settings(obstacle_checkpoint, tmp_path, capsys):
    path = tmp_path / "rti.json"
    assert main(["eval", "--checkpoint", str(obstacle_checkpoint), "--episodes", "6", "--workers", "2",
                 "--rti", "3", "--rti-steps", "all", "--rti-mode", "direct", "--rti-sampler", "ddpm", "--no-progress",
                 "--report", str(path)]) == 0
    report = json.loads(path.read_text())
    rti = report["config"]["rti"]
    assert (rti["k0"], rti["tail"], rti["mode"], rti["discrete"], rti["factor"]) == (3, [3, 2, 1, 0], "direct",
                                                                                       "scale", 10.0)
    assert report["actions_per_decision"] == 1
    assert report["rti"]["nfe_per_warm_decision"] == 4
    assert report["rti"]["full_decisions"] == 6  # one per episode
    total = report["rti"]["full_decisions"] * 100 + report["rti"]["warm_decisions"] * 4
    assert report["nfe_per_decision"] == pytest.approx(total / report["decisions"])
    assert report["success_rate"] >= 0.5
    assert "rti-direct-k0=3-ddpm" in capsys.readouterr().out


def test_eval_cli_runs_the_default_rti_with_rti_alone(obstacle_checkpoint, tmp_path, capsys):
    path = tmp_path / "default.json"
    assert main(["eval", "--checkpoint", str(obstacle_checkpoint), "--episodes", "4", "--workers", "2", "--rti",
                 "--no-progress", "--report", str(path)]) == 0
    report = json.loads(path.read_text())
    rti = report["config"]["rti"]
    assert (rti["k0"], rti["tail"], rti["mode"], rti["sampler"], rti["refresh"]) == (27, [27, 18, 9, 0], "renoise",
                                                                                       "ddim", [])
    assert report["rti"]["nfe_per_warm_decision"] == 4 and report["rti"]["refreshes"] == 0
    assert "rti-renoise-k0=27-ddim-4steps" in capsys.readouterr().out


def test_eval_cli_calibrates_k0_and_records_it(obstacle_checkpoint, tmp_path):
    path = tmp_path / "auto.json"
    assert main(["eval", "--checkpoint", str(obstacle_checkpoint), "--episodes", "1", "--workers", "1",
                 "--rti", "auto", "--rti-calibration-episodes", "1", "--no-progress", "--report", str(path)]) == 0
    report = json.loads(path.read_text())
    cal = report["config"]["rti"]["calibration"]
    assert cal["pairs"] > 10 and cal["k_min"] is not None
    assert report["config"]["rti"]["k0"] == cal["k0"] == cal["k_min"] + 1
    row = cal["table"][cal["k_min"]]
    assert row["deviation"] <= row["noise_var"]
    if cal["k_min"] > 0:
        before = cal["table"][cal["k_min"] - 1]
        assert before["deviation"] > before["noise_var"]


@pytest.mark.parametrize("args,message", [
    (["--rti", "100"], "k0=100 is outside the schedule's steps [0, 99]"),
    (["--rti", "three"], "--rti takes an entry step k0 (an integer) or 'auto'"),
    (["--rti", "3", "--rti-exec", "20"], "n_exec=20: a horizon of 16 with 2 observation steps covers 1 to 14"),
])
def test_eval_cli_refuses_bad_rti_settings(obstacle_checkpoint, capsys, args, message):
    assert main(["eval", "--checkpoint", str(obstacle_checkpoint), "--episodes", "1", "--workers", "1",
                 "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err
