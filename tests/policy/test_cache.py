"""BAC mechanics on small transformers: the scheduler's optimality, exact branch-evaluation accounting, the
bubbling-union invariant, bit-exactness of a full schedule, and the schedule file's refusals. Fidelity on a
trained policy is in tests/deploy/test_bac.py."""

import itertools
import json

import numpy as np
import pytest
import torch

from policy.cache import (
    CachedDenoiser,
    CachedPolicy,
    CacheScheduleError,
    acs_schedule,
    bubbling_union,
    calibrate,
    downstream_ffns,
    find_schedule,
    load_schedules,
    make_schedule,
    save_schedule,
    schedule_score,
    uniform_updates,
)
from policy.diffusion_policy import DiffusionPolicy
from tests.conftest import tiny_config, tiny_normalizer


def transformer_policy(n_layer=2):
    cfg = tiny_config("transformer").policy
    cfg.transformer.n_layer = n_layer
    return DiffusionPolicy(cfg, tiny_normalizer()).eval()


def obs(batch=4, seed=0):
    return {"state": torch.rand(batch, 2, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1}


def brute_force(S, budget):
    K = S.shape[0]
    best = max(itertools.combinations(range(1, K), budget - 1), key=lambda c: schedule_score(S, [0, *c]))
    return schedule_score(S, [0, *best])


@pytest.mark.parametrize("seed", range(40))
def test_acs_dynamic_program_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(2, 11))
    budget = int(rng.integers(1, K + 1))
    S = rng.uniform(-1, 1, (K, K))
    updates = acs_schedule(S, budget)
    assert len(updates) == budget and updates[0] == 0 and updates == sorted(set(updates))
    assert schedule_score(S, updates) == pytest.approx(brute_force(S, budget), abs=1e-12)


def test_acs_refuses_budgets_outside_the_steps():
    with pytest.raises(ValueError, match=r"cache budget must be in \[1, 5\] for 5 steps, got 6"):
        acs_schedule(np.eye(5), 6)


def test_uniform_updates_spread_evenly_and_keep_the_last_step():
    assert uniform_updates(100, 10) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]
    assert uniform_updates(10, 10) == list(range(10))


def test_bubbling_union_gives_selected_blocks_every_downstream_ffn_update():
    blocks = [f"layers.{i}.{k}" for i in range(4) for k in ("self_attn", "cross_attn", "feed_forward")]
    rng = np.random.default_rng(0)
    schedules = {b: sorted({0, 19} | set(rng.choice(20, 4).tolist())) for b in blocks}
    errors = {b: float(rng.uniform()) for b in blocks}
    out, selected = bubbling_union(schedules, blocks, errors, n=3)
    assert selected == sorted(blocks, key=lambda b: -errors[b])[:3]
    for u in selected:
        for v in downstream_ffns(blocks, u):
            assert set(out[v]) <= set(out[u]), (u, v)
    for b in blocks:
        assert set(schedules[b]) <= set(out[b])
        if b not in selected:
            assert out[b] == schedules[b]
    assert downstream_ffns(blocks, "layers.2.cross_attn") == ["layers.2.feed_forward", "layers.3.feed_forward"]


def test_a_schedule_updating_every_step_is_bit_exact_with_the_uncached_transformer():
    policy = transformer_policy()
    blocks = list(policy.denoiser.residual_branches())
    ts = policy.inference_timesteps(10).tolist()
    schedule = make_schedule("uniform", 10, "ddim", ts, blocks, "")
    noise = torch.randn(4, 8, 2, generator=torch.Generator().manual_seed(1))
    want = policy.configure_inference("ddim", 10).predict_chunk(obs(), noise=noise).action_pred
    got = CachedPolicy(policy, schedule).predict_chunk(obs(), noise=noise).action_pred
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind,budget", [("uniform", 3), ("uniform", 7), ("bac", 4), ("bac", 2)])
def test_measured_branch_evaluations_equal_the_schedules_prediction(kind, budget):
    policy = transformer_policy(n_layer=3)
    blocks = list(policy.denoiser.residual_branches())
    ts = policy.inference_timesteps(20).tolist()
    with torch.no_grad():
        cond = policy.condition(obs(8))
    cal = calibrate(policy, cond, torch.randn(8, 8, 2), ts, "ddpm", torch.Generator().manual_seed(0))
    schedule = make_schedule(kind, budget, "ddpm", ts, blocks, "", cal, bubble_n=2)
    cached = CachedPolicy(policy, schedule)
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in policy.denoiser.residual_branches().values()]
    chunk = cached.predict_chunk(obs(), generator=torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    assert chunk.block_evals == len(calls) == schedule.block_evals
    assert schedule.block_evals < len(blocks) * len(ts)
    assert all(s[0] == 0 and s[-1] == len(ts) - 1 for s in schedule.blocks.values())


def test_calibration_records_every_branch_at_every_step():
    policy = transformer_policy()
    ts = policy.inference_timesteps(6).tolist()
    with torch.no_grad():
        cond = policy.condition(obs(5))
    cal = calibrate(policy, cond, torch.randn(5, 8, 2), ts, "ddim")
    assert cal.blocks == [f"layers.{i}.{k}" for i in range(2) for k in ("self_attn", "cross_attn", "feed_forward")]
    for b in cal.blocks:
        S = cal.similarity[b]
        assert S.shape == (6, 6)
        np.testing.assert_allclose(np.diag(S), 1.0, atol=1e-9)
        np.testing.assert_allclose(S, S.T, atol=1e-9)
        assert cal.reuse_error[b] > 0
    assert cal.samples == 5


def test_schedule_file_round_trip_and_refusals(tmp_path):
    policy = transformer_policy()
    blocks = list(policy.denoiser.residual_branches())
    ts = policy.inference_timesteps(10).tolist()
    with torch.no_grad():
        cond = policy.condition(obs(4))
    cal = calibrate(policy, cond, torch.randn(4, 8, 2), ts, "ddim")
    sched = make_schedule("bac", 4, "ddim", ts, blocks, "abc", cal)
    save_schedule(tmp_path, sched)
    save_schedule(tmp_path, make_schedule("bac", 6, "ddim", ts, blocks, "abc", cal))
    save_schedule(tmp_path, sched)  # replaced, not duplicated
    assert len(load_schedules(tmp_path)) == 2
    got = find_schedule(tmp_path, "bac", 4, "ddim", ts)
    assert got.blocks == sched.blocks and got.block_evals == sched.block_evals
    got.check(blocks, "ddim", ts, "abc")
    with pytest.raises(CacheScheduleError, match=r"no bac:4 cache schedule for ddpm over 100 steps \[99..0\]"):
        find_schedule(tmp_path, "bac", 4, "ddpm", list(range(99, -1, -1)))
    with pytest.raises(CacheScheduleError, match="made for ddim over 10 steps .* not ddim over steps \\[3, 2, 1, 0\\]"):
        got.check(blocks, "ddim", [3, 2, 1, 0], "abc")
    with pytest.raises(CacheScheduleError, match="calibrated on other weights"):
        got.check(blocks, "ddim", ts, "def")
    with pytest.raises(CacheScheduleError, match="made for another model"):
        got.check(blocks[:3], "ddim", ts, "abc")
    (tmp_path / "cache_schedule.json").write_text(json.dumps({"version": 1, "schedules": [{"kind": "bac"}]}))
    with pytest.raises(CacheScheduleError, match="not a valid cache schedule file"):
        load_schedules(tmp_path)


def test_a_unet_policy_cannot_be_cached():
    policy = DiffusionPolicy(tiny_config("unet").policy, tiny_normalizer()).eval()
    with pytest.raises(CacheScheduleError, match="needs a transformer denoiser; this policy's is ConditionalUnet1D"):
        CachedDenoiser(policy, make_schedule("uniform", 2, "ddim", [9, 0], ["layers.0.self_attn"], ""))
