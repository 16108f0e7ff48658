"""Real-time chunking and anytime decisions (policy/chunking.py; algorithms.md 9.8): an anytime stop after k steps
is the k-step run; a budget picks the step count from measured step latency and a budget under one step skips,
counted; RTC's mask values; replacement inpainting holds the frozen prefix exactly; on the bimodal toy with an exact
denoiser, the new chunk continues the prefix's mode under guidance (and more often than naive under replacement)
where a fresh draw picks either."""

import math

import numpy as np
import pytest
import torch

from policy.chunking import (
    AnytimePolicy,
    ChunkingConfig,
    PrefixConditionedPolicy,
    guided_denoiser,
    prefix_weights,
    replacement_denoiser,
)
from policy.diffusion import NoiseSchedule, sample
from policy.diffusion_policy import DiffusionPolicy
from policy.normalizer import FieldNormalizer, Normalizer
from policy.rti import RTIConfig, RTIPolicy
from tests.conftest import tiny_config


def make_policy(steps: int = 10) -> DiffusionPolicy:
    cfg = tiny_config().policy
    cfg.inference.steps = steps
    rng = np.random.default_rng(0)
    norm = Normalizer({"state": FieldNormalizer.fit_minmax(rng.uniform(-1, 1, (64, 4))),
                       "action": FieldNormalizer.fit_minmax(rng.uniform(-1, 1, (64, 2)))})
    torch.manual_seed(0)
    return DiffusionPolicy(cfg, norm).eval()


def obs(seed=0, batch=1):
    return {"state": torch.rand(batch, 2, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1}


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_an_anytime_stop_after_k_steps_is_the_run_on_the_first_k_steps(method, k):
    schedule = NoiseSchedule(100, "squaredcos_cap_v2", "epsilon")
    weight = torch.randn(2, 2, generator=torch.Generator().manual_seed(1)) * 0.3

    def model(x, t):
        return torch.tanh(x @ weight) * (1 + t[:, None, None].float() / 100)

    ts = schedule.timesteps(8).tolist()
    x = torch.randn(3, 8, 2, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(len(ts), 3, 8, 2, generator=torch.Generator().manual_seed(3))
    stopped = sample(model, x, schedule, ts, method, step_noise=noise, stop=lambda calls: calls >= k)
    truncated = sample(model, x, schedule, ts[:k], method, step_noise=noise[:k])
    torch.testing.assert_close(stopped, truncated, atol=1e-5, rtol=0)
    full = sample(model, x, schedule, ts, method, step_noise=noise)
    assert not torch.allclose(stopped, full, atol=1e-3)


def test_the_budget_picks_the_step_count_and_a_budget_under_one_step_skips_counted():
    budget = {"ms": 1e6}
    policy = AnytimePolicy(make_policy(steps=10), lambda: budget["ms"], margin_ms=0.0)
    first = policy.predict_chunk(obs())
    assert first.nfe == 10 and first.extras["steps"] == 10 and policy.step_ms > 0
    policy.step_ms, policy.overhead_ms = 2.0, 0.0  # a known step latency (the measured one varies with the machine)
    budget["ms"] = 7.0
    assert policy.affordable_steps(7.0) == 3
    assert policy.affordable_steps(float("inf")) == 10  # a new episode's first decision, step latency known
    policy.step_ms, policy.overhead_ms = 2.0, 0.0
    chunk = policy.predict_chunk(obs(1))
    assert chunk.nfe == 3 and chunk.kind == "anytime" and chunk.action.shape == (1, 4, 2)
    budget["ms"] = 1.0
    policy.step_ms, policy.overhead_ms = 2.0, 0.0
    skipped = policy.predict_chunk(obs(2))
    assert skipped.kind == "skipped" and skipped.action.shape[1] == 0 and skipped.nfe == 0
    assert policy.stats == {"decisions": 3, "stopped_early": 1, "skipped": 1, "probes": 0}


def test_a_decisions_fixed_cost_is_measured_apart_from_its_steps():
    """A slow encoder (100 ms here) is paid once per decision whatever the step count: charged to the steps it
    would make every step look 10 ms and a budget under one "step" skip every decision after it."""
    import time

    inner = make_policy(steps=10)
    condition = inner.condition
    inner.condition = lambda o: (time.sleep(0.1), condition(o))[1]
    policy = AnytimePolicy(inner, lambda: 1e6, margin_ms=0.0)
    policy.predict_chunk(obs())
    assert policy.overhead_ms >= 95 and policy.step_ms < policy.overhead_ms / 2, (policy.overhead_ms, policy.step_ms)
    assert policy.affordable_steps(policy.overhead_ms + 3.5 * policy.step_ms) == 3


def test_a_slow_decision_does_not_starve_the_next_and_skips_in_a_row_measure_again():
    """Preempted once, a decision leaves the median cost where it was; an estimate that does rise above the
    budget skips decisions until `probe_after` of them in a row, then one step runs, its costs replace the
    estimate, and the decisions after it get the steps the budget covers again."""
    budget = [1e4]
    policy = AnytimePolicy(make_policy(steps=10), lambda: budget[0], margin_ms=0.0, probe_after=3)
    for total in (12.0, 11.0, 13.0):
        policy.add_cost(total, sampling=10.0, calls=10)
    policy.add_cost(500.0, sampling=10.0, calls=10)  # preempted for half a second
    assert (policy.step_ms, policy.overhead_ms) == (1.0, 2.5)  # an average would say 124 ms
    assert policy.affordable_steps(12.5) == 10
    for _ in range(9):  # the estimate goes stale: a step looks like 100 seconds
        policy.add_cost(1e6, sampling=1e6, calls=10)
    kinds = [policy.predict_chunk(obs(i)).kind for i in range(4)]
    assert kinds == ["skipped", "skipped", "anytime", "anytime"]  # the third, a probe, measures again
    assert policy.stats["probes"] == 1 and policy.stats["skipped"] == 2 and len(policy._costs) == 2
    assert policy.predict_chunk(obs(4)).nfe == 10


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_respaced_anytime_runs_the_shorter_schedule_the_budget_covers_and_a_cap_binds(sampler):
    full = make_policy(steps=10).configure_inference(sampler=sampler)
    policy = AnytimePolicy(full, lambda: 1e6, margin_ms=0.0, mode="respace", max_budget_ms=11.0)
    policy.step_ms, policy.overhead_ms = 2.0, 0.0  # the cap leaves 11 ms: 5 steps of 2 ms
    noise = torch.randn(1, 8, 2, generator=torch.Generator().manual_seed(4))
    chunk = policy.predict_chunk(obs(3), noise=noise, generator=torch.Generator().manual_seed(5))
    five = make_policy(steps=5).configure_inference(sampler=sampler)  # the same weights, DDIM/DDPM-5
    reference = five.predict_chunk(obs(3), noise=noise, generator=torch.Generator().manual_seed(5))
    assert chunk.nfe == 5 and chunk.extras == {"steps": 5, "budget_ms": 11.0}
    torch.testing.assert_close(chunk.action_pred, reference.action_pred, atol=1e-5, rtol=0)
    truncated = AnytimePolicy(make_policy(steps=10).configure_inference(sampler=sampler), lambda: 11.0,
                              margin_ms=0.0)
    truncated.step_ms, truncated.overhead_ms = 2.0, 0.0
    cut = truncated.predict_chunk(obs(3), noise=noise, generator=torch.Generator().manual_seed(5))
    assert cut.nfe == 5 and not torch.allclose(cut.action_pred, chunk.action_pred, atol=1e-3)
    # An episode's first decision (nothing is executing: an unbounded budget) is made before the clock starts.
    policy.budget_ms = lambda: math.inf
    assert policy.predict_chunk(obs(3)).nfe == 10
    with pytest.raises(ValueError, match="anytime mode must be one of"):
        AnytimePolicy(full, mode="halve")
    with pytest.raises(ValueError, match="max_budget_ms must be > 0"):
        AnytimePolicy(full, max_budget_ms=0.0)


def test_replacement_inpainting_holds_the_frozen_prefix_exactly():
    policy = PrefixConditionedPolicy(make_policy(), ChunkingConfig(method="inpaint", delay=2))
    g = torch.Generator().manual_seed(0)
    first = policy.predict_chunk(obs(0), generator=g)
    assert first.kind == "full"
    second = policy.predict_chunk(obs(1), executed=1, generator=g)
    assert second.kind == "prefix" and second.extras == {"frozen": 2, "overlap": 6}
    # exec_start = 1: positions 0 .. 2 are frozen (the past one and the 2 that run during the decision)
    torch.testing.assert_close(second.action_pred[:, :3], first.action_pred[:, 1:4], atol=1e-6, rtol=0)
    assert not torch.allclose(second.action_pred[:, 3:7], first.action_pred[:, 4:8], atol=1e-3)  # the rest moves
    gap = policy.predict_chunk(obs(2), executed=7, generator=g)
    assert gap.kind == "full" and gap.extras["fallback"] == "gap"
    assert policy.stats == {"full": 2, "prefix": 1, "gap_fallbacks": 1}


def test_rti_with_an_inpainted_prefix_holds_the_executed_chunk_in_its_warm_tail():
    cfg = RTIConfig(k0=5, steps=3, full_steps=10)
    rti = RTIPolicy(make_policy(), cfg, prefix=ChunkingConfig(method="inpaint", delay=2))
    free = RTIPolicy(make_policy(), cfg)
    g, g_free = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    first = rti.predict_chunk(obs(0), generator=g)
    free.predict_chunk(obs(0), generator=g_free)
    assert first.kind == "full" and first.nfe == 10 and "frozen" not in first.extras
    second = rti.predict_chunk(obs(1), executed=1, generator=g)
    unconditioned = free.predict_chunk(obs(1), executed=1, generator=g_free)
    assert second.kind == "warm" and second.nfe == 3 and second.extras == {"frozen": 2, "overlap": 6}
    # exec_start = 1: positions 0 .. 2 are the executed chunk's, shifted by the one action run since
    torch.testing.assert_close(second.action_pred[:, :3], first.action_pred[:, 1:4], atol=1e-6, rtol=0)
    assert (unconditioned.action_pred[:, :3] - first.action_pred[:, 1:4]).abs().max() > 1e-3  # a free tail moves it
    assert not torch.allclose(second.action_pred[:, 3:7], first.action_pred[:, 4:8], atol=1e-3)
    assert rti.describe()["prefix"]["method"] == "inpaint"


def test_an_anytime_rti_decision_respaces_its_tail_and_its_full_denoise_to_the_calls_that_fit():
    capped = RTIPolicy(make_policy(), RTIConfig(k0=5, steps=3, full_steps=10))
    two_call = RTIPolicy(make_policy(), RTIConfig(k0=5, steps=2, full_steps=10))
    g, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    first = capped.predict_chunk_within(obs(0), None, "respace", generator=g)
    two_call.predict_chunk(obs(0), generator=g2)
    assert first.kind == "full" and first.nfe == 10 and "capped" not in first.extras
    warm = capped.predict_chunk_within(obs(1), 2, "respace", executed=1, generator=g)
    reference = two_call.predict_chunk(obs(1), executed=1, generator=g2)
    assert warm.kind == "warm" and warm.nfe == 2 and warm.extras["capped"]  # [5, 0] instead of [5, 2, 0]
    torch.testing.assert_close(warm.action_pred, reference.action_pred)
    assert capped.predict_chunk_within(obs(2), 1, "respace", executed=1, generator=g).nfe == 1  # x0 at k0
    assert capped.predict_chunk_within(obs(2), 3, "truncate", executed=1, generator=g).extras == {}  # fits
    gap = capped.predict_chunk_within(obs(3), 4, "respace", executed=7, generator=g)
    assert gap.kind == "full" and gap.nfe == 4 and gap.extras == {"fallback": "gap", "capped": True}
    with pytest.raises(ValueError, match="at least one call"):
        capped.predict_chunk_within(obs(3), 0, "respace", executed=1)


def test_an_anytime_policy_over_rti_gives_each_decision_the_calls_its_budget_covers():
    rti = RTIPolicy(make_policy(), RTIConfig(k0=5, steps=3, full_steps=10))
    budget = [float("inf")]
    policy = AnytimePolicy(rti, budget_ms=lambda: budget[0], margin_ms=0.0, mode="truncate")
    g = torch.Generator().manual_seed(0)
    assert policy.predict_chunk(obs(0), generator=g).nfe == 10  # the episode start: unbounded, all its calls
    policy.step_ms, policy.overhead_ms = 2.0, 0.0
    budget[0] = 4.5
    chunk = policy.predict_chunk(obs(1), executed=1, generator=g)
    assert (chunk.kind, chunk.nfe, chunk.extras["steps"]) == ("warm", 2, 2) and chunk.extras["capped"]
    policy.step_ms, policy.overhead_ms = 2.0, 0.0
    budget[0] = 1.5
    assert policy.predict_chunk(obs(2), executed=1, generator=g).kind == "skipped"
    assert policy.stats == {"decisions": 3, "stopped_early": 1, "skipped": 1, "probes": 0}


def test_the_delay_follows_measured_latency_and_bad_settings_are_refused():
    policy = PrefixConditionedPolicy(make_policy(), ChunkingConfig(period_ms=20.0))
    assert policy.delay_actions() == 0
    for ms, ticks in ((31.0, 2), (45.0, 3), (52.0, 3)):  # ceil at 50 Hz
        policy.delay.latency_ms = ms
        assert policy.delay_actions() == ticks
    with pytest.raises(ValueError, match="chunking method must be one of"):
        PrefixConditionedPolicy(make_policy(), ChunkingConfig(method="splice"))
    with pytest.raises(ValueError, match="delay must be >= 0"):
        PrefixConditionedPolicy(make_policy(), ChunkingConfig(delay=-1))


def test_rtc_prefix_weights_match_the_papers_mask():
    # H = 10, s = 4, d = 2 (Kinetix's docstring) and H = 50, s = 25, d = 6
    w = prefix_weights(10, 2, 6)
    np.testing.assert_allclose(w.numpy(), [1, 1, .5706, .2871, .1145, .0258, 0, 0, 0, 0], atol=1e-4)
    w = prefix_weights(50, 6, 25)
    np.testing.assert_allclose(w[[6, 10, 15, 20, 24]].numpy(), [.8767, .4876, .1888, .0413, .0015], atol=1e-4)


def bimodal_denoiser(schedule: NoiseSchedule, spread: float = 0.1):
    """The exact epsilon of x0 ~ 1/2 N(+1, spread^2 I) + 1/2 N(-1, spread^2 I) over the whole chunk."""
    ab_table = schedule.alphas_cumprod

    def eps(x, t, cond=None):
        ab = ab_table.to(x)[t].reshape(-1, 1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        var = a**2 * spread**2 + s**2
        logits = torch.stack([-((x - a * m) ** 2).sum((1, 2)) / (2 * var[:, 0, 0]) for m in (1.0, -1.0)], dim=1)
        p = torch.softmax(logits, dim=1)[:, :, None, None]
        means = [m + a * spread**2 / var * (x - a * m) for m in (1.0, -1.0)]
        x0 = p[:, 0] * means[0] + p[:, 1] * means[1]
        return (x - a * x0) / s

    return eps


@pytest.mark.parametrize("steps", [5, 20])
def test_on_the_bimodal_toy_the_new_chunk_keeps_the_prefixs_mode(steps):
    """algorithms.md 9.8 (6): H = 8, prefix Y = +1 on d = 2 frozen actions, soft mask over H - s = 5, beta = 5,
    DDIM from noise, 2000 chunks. A fresh draw agrees with the prefix half the time."""
    schedule = NoiseSchedule(100, "squaredcos_cap_v2", "epsilon")
    eps = bimodal_denoiser(schedule)
    ts = schedule.timesteps(steps).tolist()
    n, d = 2000, 2
    x = torch.randn(n, 8, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.ones(n, 8, 1, dtype=torch.float64)

    def agreement(fn):
        x0 = sample(lambda xx, t: fn(xx, t, None), x, schedule, ts, "ddim")
        return float((x0[:, d:, 0].mean(1) > 0).double().mean()), x0

    naive, _ = agreement(eps)
    replaced, _ = agreement(replacement_denoiser(eps, schedule, target, d, torch.Generator().manual_seed(1)))
    guided, x0 = agreement(guided_denoiser(eps, schedule, target, prefix_weights(8, d, 5), 5.0))
    assert 0.45 <= naive <= 0.55, naive
    assert replaced >= 0.62, replaced
    assert guided >= (0.88 if steps == 5 else 0.96), guided
    assert float((x0[:, d, 0] - 1.0).abs().mean()) <= 0.25  # the first free action joins the prefix
