"""BAC on a trained transformer policy (point-mass reach): `rtdp cache` calibrates schedules from rollouts and
saves them in the checkpoint, `rtdp eval --cache` counts exactly the branch evaluations the schedule predicts,
stale or missing schedules are refused, the schedule composes with an RTI tail, and the cached chunk
approaches the uncached one as the budget grows, closer with the bubbling union than without."""

import json
import shutil

import numpy as np
import pytest
import torch

from envs.collect import collect_demos
from policy.cache import CachedDenoiser, calibrate, find_schedule, make_schedule
from policy.checkpoint import load_policy, record_checksums, save_tensors
from rtdp.cli import main
from tests.conftest import train_small_policy

N_LAYER = 3


@pytest.fixture(scope="module")
def transformer_checkpoint(tmp_path_factory):
    """A 3-layer, 48-wide transformer on 60 point-mass demos: 500 steps, about 30 s on 2 cores."""
    def configure(cfg):
        cfg.policy.transformer.n_layer, cfg.policy.transformer.n_emb, cfg.policy.transformer.n_head = N_LAYER, 48, 4

    return train_small_policy(tmp_path_factory.mktemp("bac") / "policy", "point_mass/reach", 60, configure,
                              steps=500, lr=1e-3, denoiser="transformer", warmup_steps=50)


def cache_cli(checkpoint, *args):
    return main(["cache", "--checkpoint", str(checkpoint), "--episodes", "1", "--samples", "16", "--no-progress",
                 *args])


def eval_cli(checkpoint, report, *args):
    code = main(["eval", "--checkpoint", str(checkpoint), "--episodes", "2", "--workers", "1", "--no-progress",
                 "--report", str(report), *args])
    return code, (json.loads(report.read_text()) if code == 0 else None)


def test_cache_cli_writes_schedules_and_eval_counts_exactly_what_they_predict(transformer_checkpoint, tmp_path,
                                                                              capsys):
    assert cache_cli(transformer_checkpoint, "--budget", "5,10", "--sampler", "ddpm", "--steps", "100",
                     "--report", str(tmp_path / "cache.json")) == 0
    out = capsys.readouterr().out
    assert f"of {3 * N_LAYER * 100} branch evaluations per decision" in out
    made = json.loads((tmp_path / "cache.json").read_text())["schedules"]
    assert [s["budget"] for s in made] == [5, 10]
    sched = find_schedule(transformer_checkpoint, "bac", 10, "ddpm", list(range(99, -1, -1)))
    assert sched.block_evals == made[1]["block_evals_per_decision"]
    assert sched.block_evals * 4 <= 3 * N_LAYER * 100  # at least 4x fewer at S = 10
    code, report = eval_cli(transformer_checkpoint, tmp_path / "bac.json", "--sampler", "ddpm", "--steps", "100",
                            "--cache", "bac:10")
    assert code == 0
    assert report["block_evals_per_decision"] == sched.block_evals
    assert report["config"]["cache"]["kind"] == "bac" and report["config"]["cache"]["budget"] == 10
    assert report["nfe_per_decision"] == 100
    code, uniform = eval_cli(transformer_checkpoint, tmp_path / "uni.json", "--sampler", "ddpm", "--steps", "100",
                             "--cache", "uniform:10")
    assert code == 0 and uniform["block_evals_per_decision"] == 3 * N_LAYER * 11  # 10 updates and the last step
    code, plain = eval_cli(transformer_checkpoint, tmp_path / "plain.json", "--sampler", "ddim", "--steps", "10")
    assert plain["block_evals_per_decision"] == 3 * N_LAYER * 10


def test_a_schedule_for_another_step_list_or_other_weights_is_refused(transformer_checkpoint, tmp_path, capsys):
    assert cache_cli(transformer_checkpoint, "--budget", "4", "--sampler", "ddim", "--steps", "10") == 0
    capsys.readouterr()
    code, _ = eval_cli(transformer_checkpoint, tmp_path / "r.json", "--sampler", "ddim", "--steps", "20",
                       "--cache", "bac:4")
    assert code == 2
    assert "has no bac:4 cache schedule for ddim over 20 steps" in capsys.readouterr().err
    other = tmp_path / "retrained"
    shutil.copytree(transformer_checkpoint, other)
    policy, _ = load_policy(other)
    save_tensors(other / "model.safetensors", {k: v + 1e-3 for k, v in policy.state_dict().items()})
    record_checksums(other, ["model.safetensors"])  # as retraining leaves it: new weights, their own checksum
    code, _ = eval_cli(other, tmp_path / "r2.json", "--sampler", "ddim", "--steps", "10", "--cache", "bac:4")
    assert code == 2
    assert "calibrated on other weights" in capsys.readouterr().err
    code, _ = eval_cli(transformer_checkpoint, tmp_path / "r3.json", "--cache", "lru:4")
    assert code == 2 and "--cache takes bac:S, error:S or uniform:S" in capsys.readouterr().err


def test_schedule_made_for_the_rti_tail_composes_with_rti(transformer_checkpoint, tmp_path):
    assert cache_cli(transformer_checkpoint, "--budget", "2", "--rti", "3") == 0
    sched = find_schedule(transformer_checkpoint, "bac", 2, "ddim", [3, 2, 1, 0])  # RTI's default tail sampler
    code, report = eval_cli(transformer_checkpoint, tmp_path / "rti.json", "--rti", "3", "--cache", "bac:2")
    assert code == 0
    r = report["rti"]
    full = 3 * N_LAYER * 100  # the full denoise at each episode start is uncached
    expected = (r["full_decisions"] * full + r["warm_decisions"] * sched.block_evals) / report["decisions"]
    assert report["block_evals_per_decision"] == pytest.approx(expected)
    assert sched.block_evals < 3 * N_LAYER * 4
    cache = report["config"]["cache"]
    assert (cache["kind"], cache["budget"], cache["method"], cache["steps"]) == ("bac", 2, "ddim", 4)


def test_cached_chunk_approaches_the_uncached_one_as_the_budget_grows(transformer_checkpoint):
    policy, _ = load_policy(transformer_checkpoint)
    blocks = list(policy.denoiser.residual_branches())
    demos = collect_demos("point_mass/reach", 12, seed=300, progress=False)
    histories = [np.stack([ep["state"][max(t - 1, 0)], ep["state"][t]]) for ep in map(demos.episode, range(12))
                 for t in range(0, len(ep["state"]), 3)]
    states = torch.from_numpy(np.stack(histories))
    with torch.no_grad():
        cal_cond, test_cond = policy.condition({"state": states[::2]}), policy.condition({"state": states[1::2]})
    ts = list(range(99, -1, -1))
    cal = calibrate(policy, cal_cond, torch.randn(policy.chunk_shape(cal_cond.shape[0])), ts, "ddpm",
                    torch.Generator().manual_seed(0))
    noise = torch.randn(policy.chunk_shape(test_cond.shape[0]), generator=torch.Generator().manual_seed(1))
    ref = policy.sample_normalized(test_cond, noise, ts, "ddpm", torch.Generator().manual_seed(2)).x0

    def error(schedule):
        cached = CachedDenoiser(policy, schedule)
        x = policy.sample_normalized(test_cond, noise, ts, "ddpm", torch.Generator().manual_seed(2), cached).x0
        return float((x - ref).norm() / ref.norm())

    errors = {s: error(make_schedule("bac", s, "ddpm", ts, blocks, "", cal)) for s in (5, 10, 20, 50, 100)}
    assert errors[100] == 0.0
    assert errors[5] > errors[10] > errors[20] > errors[50] > 0, errors
    # The bubbling union exists to stop upstream reuse error surging through downstream FFNs (paper, Prop. 3.1).
    without = {s: error(make_schedule("bac", s, "ddpm", ts, blocks, "", cal, bubble_n=0)) for s in (5, 10)}
    assert without[5] > errors[5] and without[10] > errors[10], (without, errors)


def test_error_aware_schedule_beats_acs_and_uniform_on_held_out_chunks_at_equal_evaluations(transformer_checkpoint,
                                                                                           tmp_path):
    """The schedule that places Uniform's evaluations by final-chunk error (policy/cache_error.py), calibrated
    through `rtdp cache --kind error`, against Uniform and ACS (BAC without its union, so all three spend exactly
    the same evaluations) on held-out observations."""
    assert cache_cli(transformer_checkpoint, "--budget", "10", "--sampler", "ddim", "--steps", "20", "--kind",
                     "error", "--episodes", "3", "--samples", "48") == 0
    ts = list(range(95, -1, -5))
    made = find_schedule(transformer_checkpoint, "error", 10, "ddim", ts)
    policy, _ = load_policy(transformer_checkpoint)
    blocks = list(policy.denoiser.residual_branches())
    uniform = make_schedule("uniform", 10, "ddim", ts, blocks, "")
    assert made.block_evals == uniform.block_evals
    demos = collect_demos("point_mass/reach", 8, seed=400, progress=False)
    states = torch.from_numpy(np.stack([np.stack([ep["state"][max(t - 1, 0)], ep["state"][t]])
                                        for ep in map(demos.episode, range(8)) for t in range(0, len(ep["state"]), 3)]))
    with torch.no_grad():
        cond = policy.condition({"state": states})
    noise = torch.randn(policy.chunk_shape(cond.shape[0]), generator=torch.Generator().manual_seed(5))
    ref = policy.sample_normalized(cond, noise, ts, "ddim").x0

    def error(schedule):
        x = policy.sample_normalized(cond, noise, ts, "ddim", denoiser=CachedDenoiser(policy, schedule)).x0
        return float((x - ref).norm() / ref.norm())

    cal_cond = cond[:4]  # any calibration: ACS gets the same budget, by construction exactly Uniform's evaluations
    acs = make_schedule("bac", 10, "ddim", ts, blocks, "", calibrate(policy, cal_cond, noise[:4], ts, "ddim"),
                        bubble_n=0)
    assert acs.block_evals <= made.block_evals
    errors = {"error": error(made), "uniform": error(uniform), "acs": error(acs)}
    assert errors["error"] < errors["uniform"] and errors["error"] < errors["acs"], errors
