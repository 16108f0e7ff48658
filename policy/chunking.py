"""Chunks that join the one being executed, and decisions that stop at a deadline: wrappers of any denoising
policy (policy/denoising.py), on any sampler.

Prefix-conditioned chunks (real-time chunking, Black et al. 2025). While a decision runs, the robot keeps
executing the previous chunk; the new one's first `delay` actions belong to ticks that will have passed when it
arrives. Denoised freely, the new chunk may sit in another mode than the one being executed, and the loop's splice
jumps. Here the new chunk is denoised with those actions held to the previous chunk's (shifted by the actions
executed since its observation):
- `inpaint`: replacement (RePaint's injection). Before every denoiser call the frozen positions of the sample are
  set to the previous chunk forward-noised to the call's level; the clean chunk's frozen positions are then exactly
  the previous chunk's. The rest sees the prefix only through the network, and at the noisy steps where the mode
  is chosen it sees little of it: on a two-mode toy the rest agrees with the prefix 0.6-0.7 of the time.
- `guidance`: RTC's soft-masked guidance (guided_denoiser): every prediction is pulled toward the previous chunk
  through the denoiser's vector-Jacobian product, weighted 1 on the frozen positions, decaying exponentially over
  the rest of the overlap (where the previous chunk still holds a prediction) and 0 after it. The frozen positions
  end near, not at, the previous chunk; the overlap blends into the new plan.
The delay is `delay` actions when set, else the measured decision latency (plus `added_latency_ms`, a delay the
caller adds) over the control period, rounded up.

Anytime decisions. `AnytimePolicy` gives each decision the denoising steps its time budget covers, from the
measured cost of a step and of the rest of a decision (conditioning, un-normalising: what a step count does not
change, timed apart from the sampler), in one of two ways:
- `truncate`: the sampler's own chain, stopped after those steps; the chunk is the last clean-sample prediction.
  Stopped after k steps it is the same chunk as a run on the first k steps alone, so the chain can be cut wherever
  the deadline falls.
- `respace`: the budget is known when the decision starts (the loop knows when the actions it has run out), so the
  step count is chosen first and the chain respaced over the whole noise range (DDIM-10 with time for 5 steps runs
  DDIM-5, not the first half of DDIM-10, whose clean prediction from mid-chain is still a blur of modes).
Over RTI (policy/rti.py) the same budget caps each decision's calls: a warm tail respaced from k0 (or stopped
early), and a full denoise (an episode start off the clock, or a fallback after a gap, on it) likewise, so a
fallback no longer takes a hundred calls while the robot waits.
A budget shorter than one step returns no chunk (`chunk.kind == "skipped"`, empty action), which the loop treats
as no new chunk: it keeps executing the previous one, or holds. `max_budget_ms` caps every decision made while a
chunk runs (a robot that wants its decisions no slower than that, or a benchmark of decisions at a fraction of
their time); an unbounded budget, an episode's first decision made before the clock starts, stays unbounded.
The costs are medians over the last `window` decisions (one preempted decision must not starve the next ones),
and after `probe_after` skips in a row (fewer than a chunk's actions, so the chunk has not run out) a decision
runs one step anyway, whose costs replace the estimate: a skipped decision measures nothing, so an estimate that
once rose above the budget would otherwise skip every decision after it.

    policy = PrefixConditionedPolicy(policy, ChunkingConfig(method="inpaint", period_ms=20))
    policy = AnytimePolicy(policy, budget_ms=lambda: 30.0, mode="respace")
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .contract import Chunk
from .denoising import Denoised, DenoisingWrapper

CHUNKING_METHODS = ("inpaint", "guidance")
ANYTIME_MODES = ("truncate", "respace")


@dataclass
class ChunkingConfig:
    method: str = "inpaint"  # inpaint | guidance
    delay: int | None = None  # actions of a new chunk executed before it arrives; None: from measured latency
    period_ms: float = 20.0  # the control period, to turn latency into actions
    guidance_max: float = 5.0  # RTC's beta: the largest guidance weight
    latency_smoothing: float = 0.3  # the weight of the newest decision in the latency estimate
    added_latency_ms: float = 0.0  # latency outside the policy that delays its chunks (an injected delay, transport)

    def describe(self) -> dict:
        """What a report's config records."""
        return {"method": self.method, "delay": self.delay, "period_ms": self.period_ms,
                "guidance_max": self.guidance_max if self.method == "guidance" else None}


def base_denoiser(policy) -> Callable:
    """The (x, t, cond) -> prediction function under any wrappers: the backend's where one runs the model."""
    while True:
        backend = getattr(policy, "backend", None)
        if backend is not None:
            return backend.denoise
        if not hasattr(policy, "inner"):
            return policy.denoise
        policy = policy.inner


def base_policy(policy):
    """The denoising policy under any wrappers (the one whose sampler runs)."""
    while hasattr(policy, "inner"):
        policy = policy.inner
    return policy


def prefix_weights(horizon: int, frozen: int, overlap: int) -> torch.Tensor:
    """RTC's soft mask (Eq. 5) over a chunk: 1 on [0, frozen), c (e^c - 1) / (e - 1) with
    c = (overlap - i) / (overlap - frozen + 1) on [frozen, overlap), 0 after."""
    w = torch.zeros(horizon)
    w[:frozen] = 1.0
    span = overlap - frozen
    if span > 0:
        c = (overlap - torch.arange(frozen, overlap, dtype=torch.float64)) / (span + 1)
        w[frozen:overlap] = (c * torch.expm1(c) / (math.e - 1.0)).float()
    return w


def replacement_denoiser(denoise: Callable, schedule, target: torch.Tensor, frozen: int,
                         generator: torch.Generator | None = None) -> Callable:
    """RePaint's injection before every call: the frozen positions set to the target forward-noised to the call's
    level with fresh noise, (x, t, cond) -> the model's prediction on that input."""

    def fn(x, t, cond):
        x = x.clone()
        noise = torch.randn(x[:, :frozen].shape, generator=generator, dtype=x.dtype).to(x.device)
        x[:, :frozen] = schedule.add_noise(target[:, :frozen], noise, t)
        return denoise(x, t, cond)

    return fn


def guided_denoiser(denoise: Callable, schedule, target: torch.Tensor, weights: torch.Tensor,
                    beta: float) -> Callable:
    """RTC's soft-masked guidance in the epsilon form (algorithms.md 9.3 d): with x0 = (x - sigma eps) / alpha and
    g = J^T (W * (Y - x0)), J = dx0/dx_t (one backward pass through the denoiser), the prediction becomes the pair
    x0 + sigma w g, eps - alpha w g, w = min(beta, 1 / (alpha sigma)): RTC's weight at tau = alpha / (alpha + sigma)
    (DDIM fed it is RTC's Euler step). Returned in the schedule's prediction type."""
    ab_table = schedule.alphas_cumprod
    weights = weights.reshape(1, -1, *([1] * (target.dim() - 2)))

    def fn(x, t, cond):
        ab = ab_table.to(x)[t].reshape(-1, *([1] * (x.dim() - 1)))
        a, s = ab.sqrt(), (1.0 - ab).sqrt()
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0, eps = schedule.to_x0_eps(denoise(xg, t, cond), xg, a, s)
            (g,) = torch.autograd.grad(x0, xg, grad_outputs=weights.to(x) * (target - x0))
        w = torch.clamp(1.0 / (a * s), max=beta)
        x0, eps = x0.detach() + s * w * g, eps.detach() - a * w * g
        if schedule.prediction_type == "epsilon":
            return eps
        if schedule.prediction_type == "sample":
            return x0
        return a * eps - s * x0  # v_prediction

    return fn


class DelayEstimate:
    """The actions a new chunk loses to its own decision: `cfg.delay` when set, else the smoothed measured decision
    latency plus `cfg.added_latency_ms`, over the control period, rounded up."""

    def __init__(self, cfg: ChunkingConfig):
        if cfg.method not in CHUNKING_METHODS:
            raise ValueError(f"chunking method must be one of {CHUNKING_METHODS}, got {cfg.method!r}")
        if cfg.delay is not None and cfg.delay < 0:
            raise ValueError(f"chunking delay must be >= 0 actions, got {cfg.delay}")
        if not cfg.period_ms > 0:
            raise ValueError(f"chunking period_ms must be > 0, got {cfg.period_ms}")
        self.cfg = cfg
        self.latency_ms: float | None = None

    def actions(self) -> int:
        if self.cfg.delay is not None:
            return self.cfg.delay
        if self.latency_ms is None:
            return 0
        return math.ceil((self.latency_ms + self.cfg.added_latency_ms) / self.cfg.period_ms)

    def record(self, ms: float) -> None:
        a = self.cfg.latency_smoothing
        self.latency_ms = ms if self.latency_ms is None else (1 - a) * self.latency_ms + a * ms


def prefix_conditioned_sample(policy, cfg: ChunkingConfig, cond, x_init, timesteps, method: str, target, frozen: int,
                              overlap: int, generator, stop=None) -> Denoised:
    """`policy.sample_normalized` on `timesteps` from `x_init`, each call conditioned on the frozen prefix of
    `target` (normalised, the horizon's shape) by cfg.method; inpainting's clean chunk holds the prefix exactly."""
    denoise = base_denoiser(policy)
    if cfg.method == "inpaint":
        fn = replacement_denoiser(denoise, policy.schedule, target, frozen, generator)
        out = policy.sample_normalized(cond, x_init, timesteps, method, generator, denoiser=fn, stop=stop)
        out.x0[:, :frozen] = target[:, :frozen]
        return out
    weights = prefix_weights(target.shape[1], frozen, overlap)
    fn = guided_denoiser(denoise, policy.schedule, target, weights, cfg.guidance_max)
    return policy.sample_normalized(cond, x_init, timesteps, method, generator, denoiser=fn, stop=stop)


class PrefixConditionedPolicy(DenoisingWrapper):
    """Each decision after the first is denoised with its first actions held to the previous chunk's; the same
    contract. Decisions are `full` (the episode's first, or after a gap longer than the chunk) or `prefix`."""

    def __init__(self, policy, cfg: ChunkingConfig | None = None):
        super().__init__(policy)
        self.cfg = cfg = cfg or ChunkingConfig()
        self.delay = DelayEstimate(cfg)
        p = policy.spec
        self.exec_start = p.exec_start
        self.max_shift = p.horizon - p.exec_start - 1
        self.reset()

    def reset(self) -> None:
        self._chunk: torch.Tensor | None = None  # the previous clean chunk, normalised
        self.delay.latency_ms = None
        self.stats = {"full": 0, "prefix": 0, "gap_fallbacks": 0}
        self.inner.reset()

    def delay_actions(self) -> int:
        return self.delay.actions()

    def describe(self) -> dict:
        return self.cfg.describe()

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor], *, executed: int | None = None,
                      generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Chunk:
        start = time.perf_counter()
        cond = self.inner.condition(obs)
        x_init = self.inner.initial_noise(cond, generator, noise)
        executed = self.spec.n_action_steps if executed is None else int(executed)
        if executed < 0:
            raise ValueError(f"executed must be >= 0 actions, got {executed}")
        extras: dict = {}
        if self._chunk is not None and self._chunk.shape[0] != cond.shape[0]:
            raise ValueError(f"observation batch {cond.shape[0]} differs from the previous chunk's "
                             f"{self._chunk.shape[0]}; call reset() first")
        if self._chunk is None or executed > self.max_shift:
            if self._chunk is not None:
                extras["fallback"] = "gap"
                self.stats["gap_fallbacks"] += 1
            denoised = self.inner.sample_normalized(cond, x_init, self.timesteps, self.method, generator)
            kind = "full"
        else:
            horizon = self._chunk.shape[1]
            target = torch.cat([self._chunk[:, executed:], self._chunk[:, -1:].expand(-1, executed, -1)], dim=1)
            overlap = horizon - executed  # positions where the previous chunk holds a prediction
            frozen = min(self.exec_start + self.delay_actions(), overlap)
            denoised = prefix_conditioned_sample(self.inner, self.cfg, cond, x_init, self.timesteps, self.method,
                                                 target, frozen, overlap, generator)
            kind = "prefix"
            extras.update(frozen=frozen - self.exec_start, overlap=overlap - self.exec_start)
        self.stats[kind] += 1
        self._chunk = denoised.x0.clone()
        self.delay.record((time.perf_counter() - start) * 1e3)
        return self.inner.to_chunk(denoised, kind, extras)


class AnytimePolicy(DenoisingWrapper):
    """Decisions that fit a deadline: `budget_ms()` is read when a decision starts (capped at `max_budget_ms`); the
    decision gets the steps the budget covers at the measured step latency (the first decision runs them all and
    measures it), truncating or respacing the chain (`mode`). The chunk's `extras["steps"]` says how many steps
    it got."""

    def __init__(self, policy, budget_ms: Callable[[], float] = lambda: math.inf, margin_ms: float = 1.0,
                 window: int = 9, mode: str = "truncate", max_budget_ms: float | None = None,
                 probe_after: int = 6):
        super().__init__(policy)
        if margin_ms < 0:
            raise ValueError(f"anytime margin_ms must be >= 0, got {margin_ms}")
        if mode not in ANYTIME_MODES:
            raise ValueError(f"anytime mode must be one of {ANYTIME_MODES}, got {mode!r}")
        if max_budget_ms is not None and not max_budget_ms > 0:
            raise ValueError(f"anytime max_budget_ms must be > 0, got {max_budget_ms}")
        if window < 1 or probe_after < 1:
            raise ValueError(f"anytime window and probe_after must be >= 1, got {window} and {probe_after}")
        self.budget_ms, self.margin_ms, self.mode, self.max_budget_ms = budget_ms, margin_ms, mode, max_budget_ms
        self.window, self.probe_after = window, probe_after
        self.step_ms: float | None = None  # one denoising step
        self.overhead_ms = 0.0  # the rest of a decision
        self._costs: deque[tuple[float, float]] = deque(maxlen=window)  # (step, rest) of the latest decisions
        self._sampling = base_policy(policy)
        self._clear_counts()

    def _clear_counts(self) -> None:
        """The counts of an episode; the measured costs stay, they belong to the machine, not the episode."""
        self.stats = {"decisions": 0, "stopped_early": 0, "skipped": 0, "probes": 0}
        self._skips_in_a_row = 0

    def reset(self) -> None:
        self._clear_counts()
        self.inner.reset()

    def affordable_steps(self, budget_ms: float, cap: bool = True) -> int:
        """The denoising steps the budget covers at the measured step latency; at most the decision's step list's
        length unless `cap` is False (an unmeasured step or an unbounded budget covers the whole list)."""
        steps = len(self.timesteps)
        if self.step_ms is None or math.isinf(budget_ms):  # inf // x is NaN, not inf
            return steps
        affordable = max(0, int((budget_ms - self.margin_ms - self.overhead_ms) // self.step_ms))
        return min(steps, affordable) if cap else affordable

    def _record(self, start: float, sampling_before: float, calls: int, probe: bool) -> None:
        """Costs the decision that began at `start` (the sampler's clock read `sampling_before` then)."""
        self.add_cost((time.perf_counter() - start) * 1e3, self._sampling.sampling_ms - sampling_before, calls, probe)

    def add_cost(self, total: float, sampling: float, calls: int, probe: bool = False) -> None:
        """One decision's cost (ms) split into its sampler's time per call and the rest. A probe's costs replace
        the estimate: it was run because the estimate had gone stale."""
        if probe:
            self._costs.clear()
        self._costs.append((sampling / max(calls, 1), max(total - sampling, 0.0)))
        self.step_ms = statistics.median(c[0] for c in self._costs)
        self.overhead_ms = statistics.median(c[1] for c in self._costs)

    def describe(self) -> dict:
        return {"mode": self.mode, "margin_ms": self.margin_ms, "max_budget_ms": self.max_budget_ms,
                "window": self.window, "probe_after": self.probe_after}

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor], *, executed: int | None = None,
                      generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Chunk:
        start, sampling_before = time.perf_counter(), self._sampling.sampling_ms
        budget = float(self.budget_ms())
        if self.max_budget_ms is not None and math.isfinite(budget):
            budget = min(budget, self.max_budget_ms)
        steps = self.affordable_steps(budget)
        steps_by_budget = self.affordable_steps(budget, cap=False)
        self.stats["decisions"] += 1
        if steps_by_budget == 0:
            self._skips_in_a_row += 1
            if self._skips_in_a_row < self.probe_after:
                self.stats["skipped"] += 1
                empty = torch.zeros(1, 0, self.spec.action_dim)
                return Chunk(empty, empty, empty, 0, "skipped", extras={"steps": 0, "budget_ms": budget})
            self.stats["probes"] += 1  # one step, late perhaps, to measure again what the skips could not
            steps = steps_by_budget = 1
        probe, self._skips_in_a_row = self._skips_in_a_row >= self.probe_after, 0
        within = getattr(self.inner, "predict_chunk_within", None)
        if within is not None:  # a policy with its own decision path (RTI) caps its calls itself
            calls = None if self.step_ms is None or math.isinf(budget) else steps_by_budget
            chunk = within(obs, calls, self.mode, executed=executed, generator=generator, noise=noise)
            self._record(start, sampling_before, chunk.nfe, probe)
            if chunk.extras.get("capped"):
                self.stats["stopped_early"] += 1
            chunk.extras.update(steps=chunk.nfe, budget_ms=budget)
            return chunk
        cond = self.inner.condition(obs)
        x_init = self.inner.initial_noise(cond, generator, noise)
        timesteps = self.timesteps
        if self.mode == "respace" and steps < len(timesteps):
            timesteps = self.inner.inference_timesteps(steps).tolist()
        denoised = self.inner.sample_normalized(cond, x_init, timesteps, self.method, generator,
                                                stop=lambda calls: calls >= steps)
        self._record(start, sampling_before, denoised.nfe, probe)
        if denoised.nfe < len(self.timesteps):
            self.stats["stopped_early"] += 1
        return self.inner.to_chunk(denoised, "anytime", {"steps": denoised.nfe, "budget_ms": budget})
