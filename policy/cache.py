"""BAC: block-wise adaptive caching of transformer residual branches (Ji et al., ICLR 2026).

A transformer denoiser's layer is x += SA(x); x += CA(x, memory); x += FFN(x). Across the steps of one
denoise, a branch's output changes little between some steps, so it can be computed on a few scheduled steps
and reused on the others, while the residual stream itself is always recomputed.

1. `calibrate`: run the uncached sampler on held-out observations with fixed starting points and record every
   branch output at every step; per block, S[a, t] = mean cosine between the output computed at step a and the
   true output at step t, and the block's reuse error (mean L1 distance between its outputs at any two steps).
2. `acs_schedule`: per block, the dynamic program that picks `budget` update steps (the first always) maximising
   the similarity of every skipped step to the update it reuses; the final step is then always added.
3. `bubbling_union`: the `n` blocks with the largest reuse error also update whenever any feed-forward block
   downstream of them does, which stops their reuse error surging through the downstream FFNs.
4. `CachedDenoiser`: a model_fn that recomputes each branch on its scheduled steps and reuses it otherwise,
   counting branch evaluations. `uniform_schedule` is the baseline: every block every K/S steps.

A `CacheSchedule` is bound to the step list (sampler and timesteps) and to the weights it was calibrated on;
it is saved in the checkpoint as `cache_schedule.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cache_error import error_aware_updates, error_costs
from .denoising import Denoised, DenoisingWrapper
from .nets.dit import DiT
from .nets.transformer import TransformerForDiffusion

SCHEDULE_FILE = "cache_schedule.json"
SCHEDULE_VERSION = 1
CACHE_KINDS = ("bac", "uniform", "error")


class CacheScheduleError(ValueError):
    pass


# -- calibration --

@dataclass
class CacheCalibration:
    blocks: list[str]  # in network order: layer, then self_attn < cross_attn < feed_forward
    similarity: dict[str, np.ndarray]  # block -> (K, K): cos(output computed at step a, true output at step t)
    reuse_error: dict[str, float]  # block -> mean L1 distance between its outputs at two steps
    samples: int
    distance: dict[str, np.ndarray] = field(default_factory=dict)  # block -> (K, K) mean |X_a - X_t| per element
    # block -> (K, K) first-order final-chunk cost of reusing step a's output at step t (policy/cache_error.py)
    costs: dict[str, np.ndarray] = field(default_factory=dict)


def block_names(model: TransformerForDiffusion) -> list[str]:
    return list(model.residual_branches())


@torch.no_grad()
def calibrate(policy, cond: torch.Tensor, x_init: torch.Tensor, timesteps, method: str,
              generator: torch.Generator | None = None, costs: bool = False) -> CacheCalibration:
    """Record every residual-branch output over one uncached denoise of a batch (cond, x_init); `costs` adds the
    final-chunk costs an error-aware schedule is made from (backward passes through the whole denoise)."""
    model = transformer_of(policy)
    branches = model.residual_branches()
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in branches}

    def recorder(name):
        def hook(_module, _inputs, output):
            outputs[name].append(output.detach().flatten(1).double())
        return hook

    handles = [m.register_forward_hook(recorder(name)) for name, m in branches.items()]
    try:
        policy.sample_normalized(cond, x_init, timesteps, method, generator)
    finally:
        for h in handles:
            h.remove()
    similarity, reuse_error, distance = {}, {}, {}
    for name, steps in outputs.items():
        feats = torch.stack(steps)  # (K, N, F)
        unit = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        similarity[name] = torch.einsum("anf,tnf->at", unit, unit).div(feats.shape[1]).numpy()
        l1 = torch.cdist(feats.transpose(0, 1), feats.transpose(0, 1), p=1)  # (N, K, K)
        # l_j = 1/K^2 sum_t sum_u |X_t - X_u|_1, per sample, averaged over samples
        reuse_error[name] = float(l1.mean())
        distance[name] = (l1.mean(0) / feats.shape[-1]).numpy()
    calibration = CacheCalibration(list(branches), similarity, reuse_error, int(cond.shape[0]), distance)
    if costs:
        step_noise = None
        if method == "ddpm":
            step_noise = torch.randn(len(timesteps), *x_init.shape, generator=generator)
        calibration.costs = error_costs(policy, list(branches), cond, x_init, timesteps, method, step_noise)
    return calibration


def transformer_of(policy) -> TransformerForDiffusion | DiT:
    """The transformer denoiser of a denoising policy (or of one wrapped), or a CacheScheduleError."""
    model = getattr(policy.model, "denoiser", None)
    if not isinstance(model, (TransformerForDiffusion, DiT)):
        raise CacheScheduleError(f"block caching needs a transformer denoiser; this policy's is "
                                 f"{type(model).__name__}")
    return model


# -- scheduling --

def acs_schedule(similarity: np.ndarray, budget: int) -> list[int]:
    """The `budget` update steps (step 0 always among them) maximising, over the K steps, the similarity of
    each step's true output to the output of the update it reuses: sum over segments [c_m, c_{m+1}) of
    sum_t S[c_m, t]. O(budget * K^2)."""
    S = np.asarray(similarity, dtype=np.float64)
    K = S.shape[0]
    if S.shape != (K, K):
        raise ValueError(f"similarity must be square, got {S.shape}")
    if not 1 <= budget <= K:
        raise ValueError(f"cache budget must be in [1, {K}] for {K} steps, got {budget}")
    # seg[i, j]: updating at i and reusing through j - 1
    prefix = np.concatenate([np.zeros((K, 1)), np.cumsum(S, axis=1)], axis=1)
    seg = np.full((K, K + 1), -np.inf)
    for i in range(K):
        seg[i, i + 1 :] = prefix[i, i + 1 :] - prefix[i, i]
    best = np.full((budget + 1, K + 1), -np.inf)
    arg = np.zeros((budget + 1, K + 1), dtype=np.int64)
    best[1, 1:] = seg[0, 1:]
    for m in range(2, budget + 1):
        for j in range(m, K + 1):
            cand = best[m - 1, m - 1 : j] + seg[m - 1 : j, j]
            i = int(np.argmax(cand))
            best[m, j], arg[m, j] = cand[i], i + m - 1
    updates, j = [], K
    for m in range(budget, 1, -1):
        j = int(arg[m, j])
        updates.append(j)
    return sorted([0, *updates])


def schedule_score(similarity: np.ndarray, updates: list[int]) -> float:
    """The ACS objective of an update set (for tests and reports)."""
    S = np.asarray(similarity)
    K = S.shape[0]
    bounds = [*sorted(updates), K]
    return float(sum(S[a, a:b].sum() for a, b in zip(bounds[:-1], bounds[1:], strict=True)))


def downstream_ffns(blocks: list[str], block: str) -> list[str]:
    """Feed-forward blocks at or after `block` in network order (its own layer's FFN included)."""
    i = blocks.index(block)
    return [b for b in blocks[i + 1 :] if b.endswith(".feed_forward")]


def bubbling_union(schedules: dict[str, list[int]], blocks: list[str], reuse_error: dict[str, float],
                   n: int = 3) -> tuple[dict[str, list[int]], list[str]]:
    """Add to each of the `n` blocks with the largest reuse error the update steps of every FFN downstream of
    it. Walking the blocks from the last layer up makes the union transitive."""
    selected = sorted(blocks, key=lambda b: -reuse_error[b])[:n]
    out = {b: set(s) for b, s in schedules.items()}
    for b in reversed(blocks):
        if b in selected:
            for v in downstream_ffns(blocks, b):
                out[b] |= out[v]
    return {b: sorted(s) for b, s in out.items()}, selected


def uniform_updates(K: int, budget: int) -> list[int]:
    if not 1 <= budget <= K:
        raise ValueError(f"cache budget must be in [1, {K}] for {K} steps, got {budget}")
    return sorted({int(round(i * K / budget)) for i in range(budget)} | {K - 1})


# -- the schedule file --

@dataclass
class CacheSchedule:
    kind: str  # bac | uniform
    budget: int
    method: str
    timesteps: list[int]
    blocks: dict[str, list[int]]  # block -> the step indices (0 .. K-1) on which it is recomputed
    model_sha256: str  # of the weights it was calibrated on
    selected: list[str] = field(default_factory=list)  # blocks the bubbling union extended
    calibration: dict = field(default_factory=dict)

    @property
    def block_evals(self) -> int:
        """Branch evaluations in one denoise: exactly what CachedDenoiser will count."""
        return sum(len(s) for s in self.blocks.values())

    def key(self) -> str:
        return f"{self.kind}:{self.budget}@{self.method}{self.timesteps}"

    def check(self, blocks: list[str], method: str, timesteps: list[int], model_sha256: str) -> None:
        if (method, list(timesteps)) != (self.method, self.timesteps):
            raise CacheScheduleError(
                f"the {self.kind}:{self.budget} cache schedule was made for {self.method} over "
                f"{_steps_text(self.timesteps)}, not {method} over {_steps_text(timesteps)}: run "
                f"`rtdp cache` for this step list")
        if sorted(blocks) != sorted(self.blocks):
            raise CacheScheduleError(f"the cache schedule names blocks {sorted(self.blocks)[:3]}..., the model "
                                     f"has {sorted(blocks)[:3]}...: it was made for another model")
        if self.model_sha256 and model_sha256 and self.model_sha256 != model_sha256:
            raise CacheScheduleError("the cache schedule was calibrated on other weights (model.safetensors "
                                     "hash differs): run `rtdp cache` again")
        K = len(self.timesteps)
        for b, steps in self.blocks.items():
            if not steps or steps[0] != 0 or steps[-1] >= K:
                raise CacheScheduleError(f"cache schedule block {b}: update steps {steps} must start at 0 and "
                                         f"stay below {K}")


def _steps_text(ts: list[int]) -> str:
    ts = list(ts)
    return f"{len(ts)} steps [{ts[0]}..{ts[-1]}]" if len(ts) > 4 else f"steps {ts}"


def make_schedule(kind: str, budget: int, method: str, timesteps, blocks: list[str], model_sha256: str,
                  calibration: CacheCalibration | None = None, bubble_n: int = 3, metric: str = "cosine",
                  evaluations: int | None = None) -> CacheSchedule:
    """`kind:budget`: uniform (every block on the same `budget` evenly spread steps), bac (ACS per block, then the
    bubbling union) or error (policy/cache_error.py: `evaluations` branch evaluations per denoise in all, by
    default Uniform's at the same budget)."""
    timesteps = [int(t) for t in timesteps]
    K = len(timesteps)
    if kind == "uniform":
        steps = uniform_updates(K, budget)
        return CacheSchedule(kind, budget, method, timesteps, {b: steps for b in blocks}, model_sha256)
    if kind == "error":
        if calibration is None or not calibration.costs:
            raise ValueError("an error-aware schedule needs a calibration with final-chunk costs")
        if list(calibration.costs) != blocks:
            raise CacheScheduleError("the calibration was recorded on another model's blocks")
        total = evaluations if evaluations is not None else len(uniform_updates(K, budget)) * len(blocks)
        return CacheSchedule(kind, budget, method, timesteps, error_aware_updates(calibration.costs, total),
                             model_sha256, [], {"samples": calibration.samples, "evaluations": total})
    if kind != "bac":
        raise ValueError(f"cache kind must be one of {CACHE_KINDS}, got {kind!r}")
    if calibration is None:
        raise ValueError("a BAC schedule needs a calibration")
    if calibration.blocks != blocks:
        raise CacheScheduleError("the calibration was recorded on another model's blocks")
    if metric not in ("cosine", "l1"):
        raise ValueError(f"cache metric must be cosine or l1, got {metric!r}")
    score = calibration.similarity if metric == "cosine" else {b: -d for b, d in calibration.distance.items()}
    per_block = {b: sorted(set(acs_schedule(score[b], budget)) | {K - 1}) for b in blocks}
    per_block, selected = bubbling_union(per_block, blocks, calibration.reuse_error, bubble_n)
    return CacheSchedule(kind, budget, method, timesteps, per_block, model_sha256, selected,
                         {"samples": calibration.samples, "bubble_n": bubble_n,
                          "reuse_error": calibration.reuse_error})


def save_schedule(checkpoint: str | Path, schedule: CacheSchedule) -> Path:
    """Add (or replace) a schedule in the checkpoint's cache_schedule.json."""
    path = Path(checkpoint) / SCHEDULE_FILE
    existing = [s for s in load_schedules(checkpoint) if s.key() != schedule.key()] if path.is_file() else []
    payload = {"version": SCHEDULE_VERSION, "schedules": [asdict(s) for s in [*existing, schedule]]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path


def load_schedules(checkpoint: str | Path) -> list[CacheSchedule]:
    path = Path(checkpoint) / SCHEDULE_FILE
    if not path.is_file():
        return []
    try:
        payload = json.loads(path.read_text())
        if payload.get("version") != SCHEDULE_VERSION:
            raise ValueError(f"version {payload.get('version')}, expected {SCHEDULE_VERSION}")
        return [CacheSchedule(**s) for s in payload["schedules"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CacheScheduleError(f"{path}: not a valid cache schedule file: {e}") from None


def find_schedule(checkpoint: str | Path, kind: str, budget: int, method: str, timesteps) -> CacheSchedule:
    timesteps = [int(t) for t in timesteps]
    schedules = load_schedules(checkpoint)
    for s in schedules:
        if (s.kind, s.budget, s.method, s.timesteps) == (kind, budget, method, timesteps):
            return s
    have = ", ".join(f"{s.kind}:{s.budget} for {s.method} over {_steps_text(s.timesteps)}" for s in schedules)
    raise CacheScheduleError(
        f"{checkpoint} has no {kind}:{budget} cache schedule for {method} over {_steps_text(timesteps)}"
        f" (it has: {have or 'none'}); make one with `rtdp cache --checkpoint {checkpoint} --budget {budget}`")


# -- the cached denoiser --

def _step_flags(steps: list[int], K: int) -> list[bool]:
    flags = [False] * K
    for k in steps:
        flags[k] = True
    return flags


class CachedDenoiser:
    """model_fn(x, t, cond) for a transformer policy that recomputes each residual branch only on its scheduled
    steps: the network's own forward runs, and its `branch` callback hands back the cached output of a branch not
    due. Call `reset()` before each denoise: the cache and the step counter are per decision."""

    def __init__(self, policy, schedule: CacheSchedule):
        self.policy = policy
        self.model = transformer_of(policy)
        self.schedule = schedule
        names = block_names(self.model)
        missing = sorted(set(names) - set(schedule.blocks))
        if missing:
            raise CacheScheduleError(f"the cache schedule has no entry for blocks {missing[:3]}")
        K = len(schedule.timesteps)
        self._update = {name: _step_flags(schedule.blocks[name], K) for name in names}
        self.steps = K
        self.block_evals = 0
        self._cache: dict[str, torch.Tensor] = {}
        self._step = 0
        self.reset()

    def reset(self) -> None:
        self._cache = {}
        self._step = 0
        self.block_evals = 0

    def _branch(self, name: str, compute) -> torch.Tensor:
        if name not in self._cache or self._update[name][self._step]:
            self._cache[name] = compute()
            self.block_evals += 1
        return self._cache[name]

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self._step >= self.steps:
            raise RuntimeError(f"the cache schedule covers {self.steps} steps; call reset() before each denoise")
        out = self.policy.denoise(sample, timestep, cond, branch=self._branch)
        self._step += 1
        return out


class CachedPolicy(DenoisingWrapper):
    """A transformer denoising policy whose denoises over the schedule's step list run through a CachedDenoiser;
    the same contract. The schedule fixes the sampler and steps of its decisions; a denoise over any other step
    list (RTI's full denoise at an episode start, when the schedule is made for RTI's tail) runs uncached."""

    def __init__(self, policy, schedule: CacheSchedule):
        super().__init__(policy)
        self.cache_schedule = schedule
        self.denoiser = CachedDenoiser(policy.model, schedule)

    @property
    def method(self) -> str:
        return self.cache_schedule.method

    @property
    def timesteps(self) -> list[int]:
        return self.cache_schedule.timesteps

    def sample_normalized(self, cond, x_init, timesteps, method, generator=None, denoiser=None, stop=None
                          ) -> Denoised:
        steps = timesteps.tolist() if torch.is_tensor(timesteps) else [int(t) for t in timesteps]
        if denoiser is not None or (method, steps) != (self.cache_schedule.method, self.cache_schedule.timesteps):
            return self.inner.sample_normalized(cond, x_init, timesteps, method, generator, denoiser, stop)
        self.denoiser.reset()
        out = self.inner.sample_normalized(cond, x_init, timesteps, method, generator, denoiser=self.denoiser,
                                           stop=stop)
        out.block_evals = self.denoiser.block_evals
        return out
