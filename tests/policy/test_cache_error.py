"""The error-aware block-cache schedule (policy/cache_error.py): its dynamic programs against brute force, and its
first-order costs against the final chunk's true error when one branch output is reused."""

import itertools

import numpy as np
import torch

from policy.cache import CachedDenoiser, CacheSchedule
from policy.cache_error import allocate, block_costs, error_costs, updates_for
from policy.diffusion import sample
from policy.diffusion_policy import DiffusionPolicy
from tests.conftest import tiny_config, tiny_normalizer


def reuse_cost(cost: np.ndarray, updates: list[int]) -> float:
    """Each step reuses the latest update at or before it."""
    last, total = 0, 0.0
    for t in range(cost.shape[0]):
        if t in updates:
            last = t
        else:
            total += cost[last, t]
    return total


def test_block_costs_finds_the_least_cost_update_set_for_every_budget():
    rng = np.random.default_rng(0)
    K = 7
    cost = rng.uniform(0, 1, (K, K))
    best, arg = block_costs(cost)
    for m in range(1, K + 1):
        brute = min(reuse_cost(cost, [0, *rest]) for rest in itertools.combinations(range(1, K), m - 1))
        assert best[m] == np.float64(brute) or abs(best[m] - brute) < 1e-12
        chosen = updates_for(arg, K, m)
        assert len(chosen) == m and chosen[0] == 0
        assert abs(reuse_cost(cost, chosen) - brute) < 1e-12


def test_allocate_splits_the_evaluations_as_brute_force_does():
    rng = np.random.default_rng(1)
    # decreasing costs per block, as more updates can only help
    best = {b: np.concatenate([[np.inf], np.sort(rng.uniform(0, 5, 5))[::-1]]) for b in "abc"}
    for total in range(3, 16):
        got = allocate(best, total)
        assert sum(got.values()) == total and min(got.values()) >= 1
        brute = min(sum(best[b][m] for b, m in zip("abc", ms, strict=True))
                    for ms in itertools.product(range(1, 6), repeat=3) if sum(ms) == total)
        assert abs(sum(best[b][got[b]] for b in "abc") - brute) < 1e-12


def test_first_order_costs_predict_the_chunk_error_of_a_single_reuse():
    cfg = tiny_config("transformer")
    policy = DiffusionPolicy(cfg.policy, tiny_normalizer()).eval()
    policy.configure_inference("ddpm", 12)
    ts = policy.timesteps
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = policy.encode_obs({"state": torch.randn(16, 2, 4, generator=g)})
    x = torch.randn(policy.chunk_shape(16), generator=g)
    noise = torch.randn(len(ts), *x.shape, generator=g)
    costs = error_costs(policy, list(policy.denoiser.residual_branches()), cond, x, ts, "ddpm", noise, probes=64)
    with torch.no_grad():
        ref = sample(lambda a, t: policy.denoise(a, t, cond), x, policy.schedule, ts, "ddpm", step_noise=noise)
    K, blocks = len(ts), list(costs)
    for block, step in [("layers.0.self_attn", 3), ("layers.1.feed_forward", 6), ("layers.0.feed_forward", 10)]:
        updates = {b: list(range(K)) for b in blocks}
        updates[block] = [k for k in range(K) if k != step]  # step reuses step - 1's output
        cached = CachedDenoiser(policy, CacheSchedule("error", 0, "ddpm", ts, updates, ""))
        with torch.no_grad():
            got = sample(lambda a, t, cached=cached: cached(a, t, cond), x, policy.schedule, ts, "ddpm",
                         step_noise=noise)
        true = float(((got - ref) ** 2).sum() / len(got))
        predicted = float(costs[block][step - 1, step])
        assert true > 0 and 0.6 < predicted / true < 1.6, (block, step, predicted, true)
