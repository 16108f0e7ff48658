"""An error-aware block-cache schedule: each block's update steps, and how many each block gets, chosen to
minimise the error of the final chunk, not the feature similarity between steps (beyond the BAC paper).

BAC's similarity objective spends updates where a branch's output changes most, the early noisy steps, though the
later steps correct what goes wrong there (BENCHMARKS.md, BAC). What matters is how far the final chunk moves.
To first order, reusing block b's output computed at step a in place of the one due at step t moves the final
chunk by J_bt (X_b(a) - X_b(t)), with J_bt the Jacobian of the final chunk with respect to that branch output.

1. `error_costs`: one uncached denoise of the calibration batch with every branch output recorded; then
   `probes` backward passes of <v, x0> with random v (v ~ N(0, I): E[(v . J d)^2] = |J d|^2) give, for every
   block, step and sample, the gradient g_bt. cost_b[a, t] = mean over samples and probes of
   (g_bt . (X_b(a) - X_b(t)))^2: the squared error of the final chunk that one reuse causes.
2. `block_costs`: per block, the least total cost of m updates for every m (step 0 always updated; each other
   step reuses the latest update before it): the same dynamic program as BAC's ACS with -cost as its objective.
3. `allocate`: the number of updates per block, summing to the total evaluations given, that minimises the summed
   costs (a knapsack over blocks; first order, so the blocks' errors add).

A schedule made here has exactly the evaluations asked for, so it is compared with ACS and Uniform at equal
evaluations by construction.
"""

from __future__ import annotations

import numpy as np
import torch

from .diffusion import sample


def error_costs(policy, names: list[str], cond: torch.Tensor, x_init: torch.Tensor, timesteps, method: str,
                step_noise: torch.Tensor | None = None, probes: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """block -> (K, K) first-order cost of reusing the output computed at step a (row) at step t (column), for
    the residual branches `names` of a transformer policy (policy/cache.py names them)."""
    K = len(timesteps)
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    deltas: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def branch(name, compute):
        out = compute()
        outputs[name].append(out.detach())
        delta = torch.zeros_like(out, requires_grad=True)  # d x0 / d delta = d x0 / d (the branch output)
        deltas[name].append(delta)
        return out + delta

    if step_noise is None and method == "ddpm":
        step_noise = torch.randn(K, *x_init.shape, generator=torch.Generator().manual_seed(seed))
    with torch.enable_grad():
        x0 = sample(lambda x, t: policy.denoise(x, t, cond, branch=branch), x_init, policy.schedule, timesteps,
                    method, eta=policy.cfg.inference.eta, step_noise=step_noise)
        flat = [d for n in names for d in deltas[n]]
        g = torch.Generator().manual_seed(seed)
        grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for p in range(probes):
            v = torch.randn(x0.shape, generator=g)
            got = torch.autograd.grad((x0 * v).sum(), flat, retain_graph=p < probes - 1, allow_unused=True)
            i = 0
            for n in names:
                grads[n].append(torch.stack([torch.zeros_like(d) if gr is None else gr
                                             for d, gr in zip(deltas[n], got[i:i + K], strict=True)]))
                i += K
    costs = {}
    for n in names:
        X = torch.stack(outputs[n]).flatten(2).double()  # (K, N, F)
        G = torch.stack(grads[n]).flatten(3).double()  # (P, K, N, F)
        proj = torch.einsum("ptnf,anf->ptna", G, X)  # g_t . X_a per probe, step t, sample n, source a
        own = torch.diagonal(proj, dim1=1, dim2=3).permute(0, 2, 1)  # (P, K, N): g_t . X_t
        cost = ((proj - own[..., None]) ** 2).mean(dim=(0, 2))  # (t, a)
        costs[n] = cost.T.numpy()  # (a, t)
    return costs


def block_costs(cost: np.ndarray, max_updates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(best, arg): best[m] is the least summed cost of `m` updates (step 0 always one), for m = 1 .. max_updates;
    `arg` backtracks it (see `updates_for`)."""
    C = np.asarray(cost, dtype=np.float64)
    K = C.shape[0]
    M = min(max_updates or K, K)
    # seg[i, j]: update at i, reuse its output on steps i+1 .. j-1
    prefix = np.concatenate([np.zeros((K, 1)), np.cumsum(C, axis=1)], axis=1)
    seg = np.full((K, K + 1), np.inf)
    for i in range(K):
        seg[i, i + 1:] = prefix[i, i + 1:] - prefix[i, i + 1]
    best = np.full((M + 1, K + 1), np.inf)
    arg = np.zeros((M + 1, K + 1), dtype=np.int64)
    best[1, 1:] = seg[0, 1:]
    for m in range(2, M + 1):
        for j in range(m, K + 1):
            cand = best[m - 1, m - 1:j] + seg[m - 1:j, j]
            i = int(np.argmin(cand))
            best[m, j], arg[m, j] = cand[i], i + m - 1
    return best[:, K], arg


def updates_for(arg: np.ndarray, K: int, m: int) -> list[int]:
    """The `m` update steps the dynamic program of `block_costs` chose."""
    updates, j = [0], K
    for k in range(m, 1, -1):
        j = int(arg[k, j])
        updates.append(j)
    return sorted(updates)


def allocate(best: dict[str, np.ndarray], total: int) -> dict[str, int]:
    """Updates per block (each >= 1) summing to `total`, minimising the summed per-block least costs."""
    names = list(best)
    if not len(names) <= total <= sum(len(b) - 1 for b in best.values()):
        raise ValueError(f"an error-aware schedule over {len(names)} blocks needs between {len(names)} and "
                         f"{sum(len(b) - 1 for b in best.values())} evaluations, got {total}")
    INF = np.inf
    table = np.full(total + 1, INF)  # least cost of the blocks so far with e evaluations
    table[0] = 0.0
    choices = []
    for n in names:
        b = best[n]
        new = np.full(total + 1, INF)
        pick = np.zeros(total + 1, dtype=np.int64)
        for m in range(1, min(len(b), total + 1)):
            shifted = np.full(total + 1, INF)
            shifted[m:] = table[: total + 1 - m] + b[m]
            better = shifted < new
            new[better], pick[better] = shifted[better], m
        table = new
        choices.append(pick)
    counts, e = {}, total
    for n, pick in zip(reversed(names), reversed(choices), strict=True):
        counts[n] = int(pick[e])
        e -= counts[n]
    return {n: counts[n] for n in names}


def error_aware_updates(costs: dict[str, np.ndarray], total: int) -> dict[str, list[int]]:
    """block -> its update steps, `total` evaluations in all."""
    K = next(iter(costs.values())).shape[0]
    tables = {n: block_costs(c) for n, c in costs.items()}
    counts = allocate({n: best for n, (best, _) in tables.items()}, total)
    return {n: updates_for(tables[n][1], K, counts[n]) for n in costs}
