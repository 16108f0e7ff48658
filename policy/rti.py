"""RTI warm-starting (Duan, Yin, Kragic, "Real-Time Iteration Scheme for Diffusion Policy", IROS 2025).

The first decision of an episode is a full denoise from noise. Every later decision starts from the previous
clean chunk, shifted by the actions executed since and padded by repeating its last action, enters the
schedule at step k0 and runs a short tail down to 0: `steps` denoiser calls instead of 100, on k0 .. 0 evenly
strided (the paper's [k0, k0-1, ..., 0], k0 + 1 calls, is `steps=None`). The mode chosen by the first full denoise
is kept, because the warm start already sits in it.

The default enters at k0 = 27 through a forward-noised guess (`renoise`) and runs DDIM on [27, 18, 9, 0]: 4 calls.
On metaworld the paper's DDPM tail [3, 2, 1, 0] from the clean guess falls 16 points below DDPM-100 on push,
because consecutive full-denoise chunks there differ by more than noise at k = 3 covers: the k0 rule below finds
the guess indistinguishable from a forward-noised chunk only from k = 26. A tail that short cannot follow a
conditional distribution that moves that much between steps; entered where the rule says, a 4-step strided DDIM
tail can (BENCHMARKS.md, "RTI that holds").

    rti = RTIPolicy(policy, RTIConfig())           # or RTIConfig(k0=3, steps=None, sampler="ddpm", mode="direct")
    rti.reset()                        # new episode: the next decision is a full denoise
    chunk = rti.predict_chunk(obs)     # chunk.action: (B, n_exec, A), raw units; chunk.kind: "full" | "warm"

Entry modes: `direct` feeds the shifted clean chunk as x_k0 (what the released code does); `renoise` forward-
noises it to k0 first. Discrete action dims (a gripper) are binarised in the stored guess to +-1/factor in
normalised space so a few low-noise steps can still flip them: `scale` is for policies trained with those dims
divided by the factor (`policy.discrete_action_scale`), `clip` sets the guess to +-1/factor for policies trained
without it. The executed discrete actions are snapped to the two levels the dim takes in the training data.

Prefix conditioning (real-time chunking, policy/chunking.py): with `prefix` (a ChunkingConfig), each warm tail is
denoised with the actions that run while the decision is computed held to the warm guess's (inpainting or RTC's
guidance), the delay measured from the warm decisions' own latency. The guess is the chunk being executed, so this
keeps the executed prefix where the tail would otherwise move it a little; full denoises are left free.

Anytime decisions (policy.chunking.AnytimePolicy) cap a decision's calls through `predict_chunk_within`: the warm
tail respaced from k0 to the calls that fit (`respace`; one call is the clean prediction at k0) or stopped early
(`truncate`), and a full denoise respaced or stopped the same way.

A reset, a gap in observations longer than the chunk covers, or a NaN in the warm start falls back to a full
denoise; the chunk's `extras["fallback"]` names the gap or NaN one, and `stats` counts each since the reset.

Refreshes: a warm decision whose warm start looks stale is redone as a full denoise from fresh noise
(`refresh_sampler`, `refresh_steps`), in the same decision. The signals (`refresh`):
- `discrete`: the executed discrete action (the gripper command) changes. That is where the task switches phase,
  and a plan shifted from before the switch no longer fits.
- `drift`: the tail moved the continuous dims of its guess by more than `refresh_drift` times the noise level it
  entered at (RMS, normalised units, against sqrt(1 - alpha_bar_k0)). A guess that is a plausible x_k0 moves by
  about that noise level; one that has left the policy's distribution (a chain run away to saturated actions after
  a lost contact) is pulled back harder, though never far enough by a short tail.
- `age`: `refresh_every` warm decisions in a row have passed since the last full denoise. This bounds how long a
  warm chain can sit in a plan it cannot leave.
A refreshed decision has kind `refresh`, `extras["refresh"]` names its signal, and its `nfe` counts both the tail
and the full denoise.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch

from .chunking import ChunkingConfig, DelayEstimate, prefix_conditioned_sample
from .contract import Chunk, PolicySpec
from .denoising import DenoisingWrapper
from .diffusion import NoiseSchedule
from .diffusion.samplers import METHODS, as_timesteps
from .normalizer import RANGE_EPS

ENTRY_MODES = ("direct", "renoise")
DISCRETE_HANDLING = ("auto", "scale", "clip", "none")
REFRESH_SIGNALS = ("discrete", "drift", "age")
# No refresh by default: on push none of them closed the gap the k = 3 tail left (BENCHMARKS.md), and each costs a
# full denoise. `discrete` is dropped where no discrete dim moves.
DEFAULT_REFRESH: list[str] = []
# The released code's tail, [k0, k0 - 1, ..., 0] with DDPM from the shifted clean chunk: what the benchmarks before
# the default changed measured as "rti-k0=3" (RTIConfig(**{**PAPER_TAIL, "k0": k}) for another entry step).
PAPER_TAIL = {"k0": 3, "steps": None, "sampler": "ddpm", "mode": "direct", "refresh": []}


@dataclass
class RTIConfig:
    k0: int = 27
    steps: int | None = 4  # the tail's calls at most, k0 .. 0 evenly strided; None: every step k0, k0 - 1, ..., 0
    tail: list[int] | None = None  # an explicit descending step list ending at 0 (overrides k0 and steps)
    sampler: str = "ddim"  # the tail's sampler
    mode: str = "renoise"  # direct | renoise
    n_exec: int = 1  # actions executed per decision
    discrete: str = "auto"  # auto | scale | clip | none; auto: scale if trained scaled, clip if dims exist
    factor: float = 10.0  # clip: the guess's discrete dims are set to +-1/factor
    discrete_dims: list[int] | None = None  # None: the policy config's discrete_action_dims
    binarize_executed: bool = True
    full_sampler: str = "ddpm"  # the full denoise at an episode start or a fallback
    full_steps: int | None = None  # None: every training timestep
    refresh: list[str] | None = None  # signals that redo a warm decision as a full denoise; None: DEFAULT_REFRESH
    refresh_drift: float = 1.5  # drift: the tail's correction, in units of the entry noise level, that refreshes
    refresh_every: int | None = None  # age: warm decisions in a row after which to refresh
    refresh_sampler: str | None = None  # None: full_sampler
    refresh_steps: int | None = None  # None: full_steps


def rti_tail(k0: int, schedule: NoiseSchedule, steps: int | None = None) -> list[int]:
    """[k0, ..., 0] in `steps` evenly strided steps; every one of the k0 + 1 when None or when there are no more.
    One step is [k0] alone: a single call whose clean-sample prediction is the chunk (the sampler's last step lands
    on the clean sample), Real-Time Iteration's one iteration per control step."""
    if not 0 <= k0 < schedule.num_train_timesteps:
        raise ValueError(f"RTI k0={k0} is outside the schedule's steps [0, {schedule.num_train_timesteps - 1}]")
    if steps is None or steps >= k0 + 1:
        return list(range(k0, -1, -1))
    if steps < 1:
        raise ValueError(f"an RTI tail needs at least one call, got steps={steps}")
    if steps == 1:
        return [k0]
    return [round(k0 * (steps - 1 - i) / (steps - 1)) for i in range(steps)]


class RTIPolicy(DenoisingWrapper):
    """A denoising policy with RTI warm-start state; the same contract. Its decisions are `full` (a full denoise:
    the episode start, or a fallback named in the chunk's extras) or `warm` (the tail)."""

    def __init__(self, policy, cfg: RTIConfig | None = None, record_pairs: bool = False,
                 prefix: ChunkingConfig | None = None):
        """`policy`: any denoising policy (policy.denoising), e.g. a block cache whose schedule was made for this
        tail (policy.cache.CachedPolicy), which then caches the warm decisions. `prefix`: hold each warm tail's
        first actions to the guess's (see the module docstring)."""
        super().__init__(policy)
        self.cfg = cfg = cfg or RTIConfig()
        self.prefix = prefix
        self.delay = DelayEstimate(prefix) if prefix is not None else None
        p = policy.spec
        model_cfg = policy.model.cfg
        schedule = policy.schedule
        if cfg.tail is not None:
            tail = as_timesteps(cfg.tail, schedule).tolist()
            if tail[-1] != 0 and len(tail) > 1:
                raise ValueError(f"an RTI tail of several steps must end at step 0, got {tail}")
        else:
            tail = rti_tail(cfg.k0, schedule, cfg.steps)
        self.tail = tail
        self.k0 = tail[0]
        for name, method in (("sampler", cfg.sampler), ("full_sampler", cfg.full_sampler)):
            if method not in METHODS:
                raise ValueError(f"RTI {name} must be one of {METHODS}, got {method!r}")
        if cfg.mode not in ENTRY_MODES:
            raise ValueError(f"RTI mode must be one of {ENTRY_MODES}, got {cfg.mode!r}")
        self.max_shift = p.horizon - p.n_obs_steps  # the previous chunk still covers the current step
        if not 1 <= cfg.n_exec <= self.max_shift:
            raise ValueError(f"RTI n_exec={cfg.n_exec}: a horizon of {p.horizon} with {p.n_obs_steps} observation "
                             f"steps covers 1 to {self.max_shift} executed actions per decision")
        dims, self.discrete = self._discrete_handling(cfg, p, model_cfg.discrete_action_scale)
        self.constant_dims, self.discrete_dims, self._levels = self._discrete_levels(dims, policy.normalizer["action"])
        if not self.discrete_dims:
            self.discrete = "none"
        self.discrete_scale = model_cfg.discrete_action_scale
        self.full_timesteps = policy.inference_timesteps(cfg.full_steps or schedule.num_train_timesteps).tolist()
        self.refresh = self._check_refresh(cfg)
        self.refresh_method = cfg.refresh_sampler or cfg.full_sampler
        self.refresh_timesteps = (policy.inference_timesteps(cfg.refresh_steps).tolist() if cfg.refresh_steps
                                  else self.full_timesteps)
        self.continuous_dims = [d for d in range(p.action_dim) if d not in self.discrete_dims]
        self.drift_limit = cfg.refresh_drift * float((1.0 - schedule.alphas_cumprod[self.k0]).sqrt())
        self.record_pairs = record_pairs
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (warm guess, full denoise), when recording
        self.stats = self._zero_stats()  # decisions of each kind since the last reset
        self._chunk: torch.Tensor | None = None  # the previous clean chunk, normalised
        self._executed_discrete: torch.Tensor | None = None  # the last executed action's discrete dims, raw
        self._warm_run = 0  # warm decisions since the last full denoise
        self._calls_cap: tuple[int, str] | None = None  # (calls, mode) of the anytime decision being made

    def _check_refresh(self, cfg: RTIConfig) -> list[str]:
        """The refresh signals in force (the default's `discrete` only where a discrete dim moves)."""
        if cfg.refresh_sampler is not None and cfg.refresh_sampler not in METHODS:
            raise ValueError(f"RTI refresh_sampler must be one of {METHODS}, got {cfg.refresh_sampler!r}")
        if cfg.refresh_steps is not None and cfg.refresh_steps < 1:
            raise ValueError(f"RTI refresh_steps must be >= 1, got {cfg.refresh_steps}")
        if not cfg.refresh_drift > 0:
            raise ValueError(f"RTI refresh_drift must be > 0, got {cfg.refresh_drift}")
        if cfg.refresh is None:
            return [r for r in DEFAULT_REFRESH if r != "discrete" or self.discrete_dims]
        unknown = [r for r in cfg.refresh if r not in REFRESH_SIGNALS]
        if unknown:
            raise ValueError(f"RTI refresh signals must be among {REFRESH_SIGNALS}, got {unknown}")
        if "discrete" in cfg.refresh and not self.discrete_dims:
            raise ValueError("RTI refresh on 'discrete' needs a discrete action dim that moves in the training data; "
                             "this policy has none")
        if "age" in cfg.refresh and not (cfg.refresh_every is not None and cfg.refresh_every >= 1):
            raise ValueError(f"RTI refresh on 'age' needs refresh_every >= 1, got {cfg.refresh_every}")
        return list(cfg.refresh)

    @property
    def spec(self) -> PolicySpec:
        return replace(self.inner.spec, n_action_steps=self.cfg.n_exec)

    @property
    def method(self) -> str:
        return self.cfg.sampler

    @property
    def timesteps(self) -> list[int]:
        """The warm decision's step list (what a block cache for RTI is made for)."""
        return self.tail

    @staticmethod
    def _discrete_handling(cfg: RTIConfig, p: PolicySpec, trained_scale: float) -> tuple[list[int], str]:
        if cfg.discrete not in DISCRETE_HANDLING:
            raise ValueError(f"RTI discrete must be one of {DISCRETE_HANDLING}, got {cfg.discrete!r}")
        dims = cfg.discrete_dims if cfg.discrete_dims is not None else list(p.discrete_action_dims)
        bad = [d for d in dims if not -p.action_dim <= d < p.action_dim]
        if bad:
            raise ValueError(f"RTI discrete dims {bad} are outside the {p.action_dim}-d action")
        dims = sorted({d % p.action_dim for d in dims})
        mode = cfg.discrete
        if mode == "auto":
            mode = "none" if not dims else "scale" if trained_scale != 1.0 else "clip"
        if mode == "scale" and trained_scale == 1.0:
            raise ValueError("RTI discrete='scale' needs a policy trained with policy.discrete_action_scale > 1; "
                             "use 'clip' for this one")
        if mode in ("scale", "clip") and not dims:
            raise ValueError(f"RTI discrete={mode!r} needs discrete action dims; the policy and config name none")
        if mode == "clip" and cfg.factor <= 0:
            raise ValueError(f"RTI factor must be > 0, got {cfg.factor}")
        return (dims if mode != "none" else []), mode

    @staticmethod
    def _discrete_levels(dims: list[int], norm) -> tuple[list[int], list[int], tuple[torch.Tensor, torch.Tensor]]:
        """(constant dims, binary dims, their two levels): the values each discrete dim takes in the training
        data are its min and max (metaworld's gripper is 0 / 0.6 in push demos, -1 / 1 elsewhere). A dim that is
        constant in the data is not binarised at all: the policy reproduces the constant, and forcing it to a
        level it never saw derails the denoiser (reach-v3 fell from 1.00 to 0.50 success)."""
        lo = norm.stats.get("min")
        hi = norm.stats.get("max")
        if lo is None or hi is None:
            lo, hi = [-1.0] * len(norm.scale), [1.0] * len(norm.scale)
        constant = [d for d in dims if hi[d] - lo[d] < RANGE_EPS]
        binary = [d for d in dims if d not in constant]
        levels = (torch.tensor([lo[i] for i in binary], dtype=torch.float32),
                  torch.tensor([hi[i] for i in binary], dtype=torch.float32))
        return constant, binary, levels

    def binarize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw actions with the discrete dims snapped to the nearer of their two levels."""
        lo, hi = self._levels[0].to(raw), self._levels[1].to(raw)
        d = self.discrete_dims
        out = raw.clone()
        out[..., d] = torch.where(raw[..., d] > (lo + hi) / 2, hi, lo)
        return out

    def describe(self) -> dict:
        """What the report's config records."""
        factor = self.discrete_scale if self.discrete == "scale" else self.cfg.factor
        return {**asdict(self.cfg), "k0": self.k0, "tail": self.tail, "nfe_warm": len(self.tail),
                "discrete": self.discrete, "discrete_dims": self.discrete_dims,
                "discrete_levels": [self._levels[0].tolist(), self._levels[1].tolist()],
                "constant_dims": self.constant_dims,
                "factor": factor if self.discrete != "none" else None,
                "full_steps": len(self.full_timesteps),
                "refresh": self.refresh, "drift_limit": self.drift_limit if "drift" in self.refresh else None,
                "refresh_sampler": self.refresh_method if self.refresh else None,
                "refresh_steps": len(self.refresh_timesteps) if self.refresh else None,
                "prefix": self.prefix.describe() if self.prefix is not None else None}

    @staticmethod
    def _zero_stats() -> dict[str, int]:
        return {"full": 0, "warm": 0, "refresh": 0, "nan_fallbacks": 0, "gap_fallbacks": 0,
                **{f"{r}_refreshes": 0 for r in REFRESH_SIGNALS}}

    def reset(self) -> None:
        self._chunk = None
        self._executed_discrete = None
        self._warm_run = 0
        self.pairs = []
        self.stats = self._zero_stats()
        if self.delay is not None:
            self.delay.latency_ms = None
        self.inner.reset()

    def warm_guess(self, executed: int) -> torch.Tensor | None:
        """The warm start the next decision would enter the tail from (None right after a reset)."""
        return None if self._chunk is None else self.shifted_guess(executed)

    def shifted_guess(self, executed: int) -> torch.Tensor:
        """The previous chunk advanced by `executed` actions, its last action repeated to fill the horizon."""
        return self.inner.shift_chunk(self._chunk, executed)

    def predict_chunk_within(self, obs: dict[str, torch.Tensor], calls: int | None, mode: str, *,
                             executed: int | None = None, generator: torch.Generator | None = None,
                             noise: torch.Tensor | None = None) -> Chunk:
        """predict_chunk with at most `calls` denoiser calls (None: no cap), the chain respaced or truncated
        (`mode`); the chunk's extras say `capped` when the cap cut the decision short."""
        if calls is not None and calls < 1:
            raise ValueError(f"an anytime RTI decision needs at least one call, got {calls}")
        self._calls_cap = None if calls is None else (int(calls), mode)
        try:
            return self.predict_chunk(obs, executed=executed, generator=generator, noise=noise)
        finally:
            self._calls_cap = None

    def _capped(self, timesteps: list[int], method: str, full: bool, extras: dict) -> tuple[list[int], str, object]:
        """The step list, sampler and stop rule an anytime cap leaves of a full denoise's or the tail's `timesteps`.
        A full denoise respaced runs the tail's sampler: DDPM's fresh noise over a few long steps leaves the chunk
        noisy where DDIM does not."""
        if self._calls_cap is None or self._calls_cap[0] >= len(timesteps):
            return timesteps, method, None
        calls, mode = self._calls_cap
        extras["capped"] = True
        if mode == "respace" and not full:
            return rti_tail(timesteps[0], self.schedule, calls), method, None
        # one respaced call from pure noise would sit wherever the spacing puts it; stopping after the first step
        # keeps it at the top of the schedule
        if mode == "respace" and calls >= 2:
            return self.inner.inference_timesteps(calls).tolist(), self.cfg.sampler, None
        return timesteps, method, lambda n: n >= calls

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor], *, executed: int | None = None,
                      generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Chunk:
        """Raw observations -> a Chunk of n_exec actions, raw units.

        `executed`: actions executed since the previous decision (default n_exec); more than the previous chunk
        covers is a gap and gets a full denoise. `noise` fixes the initial sample of a full denoise.
        """
        policy = self.inner
        cond = policy.condition(obs)
        executed = self.cfg.n_exec if executed is None else int(executed)
        if executed < 0:
            raise ValueError(f"executed must be >= 0 actions, got {executed}")
        guess, extras = None, {}
        if self._chunk is not None:
            if self._chunk.shape[0] != cond.shape[0]:
                raise ValueError(f"observation batch {cond.shape[0]} differs from the warm start's "
                                 f"{self._chunk.shape[0]}; call reset() first")
            if executed > self.max_shift:
                extras["fallback"] = "gap"
            else:
                guess = self.shifted_guess(executed)
                if not bool(torch.isfinite(guess).all()):
                    extras["fallback"] = "nan"
                    guess = None
        if guess is None or self.record_pairs:
            x_init = policy.initial_noise(cond, generator, noise)
            timesteps, method, stop = self._capped(self.full_timesteps, self.cfg.full_sampler, True, extras)
            denoised = policy.sample_normalized(cond, x_init, timesteps, method, generator, stop=stop)
            if guess is not None:
                self.pairs.append((guess, denoised.x0.clone()))
            kind = "full"
        elif "age" in self.refresh and self._warm_run >= self.cfg.refresh_every:
            denoised = self._refreshed(cond, generator)  # due by age: no tail is run first
            kind, extras["refresh"] = "refresh", "age"
            self.stats["age_refreshes"] += 1
        else:
            denoised = self._tail(cond, guess, executed, extras, generator)
            kind = "warm"
            signal = self._stale(guess, denoised)
            if signal is not None:
                tail = denoised
                denoised = self._refreshed(cond, generator)
                denoised.nfe += tail.nfe
                if denoised.block_evals is not None and tail.block_evals is not None:
                    denoised.block_evals += tail.block_evals
                kind, extras["refresh"] = "refresh", signal
                self.stats[f"{signal}_refreshes"] += 1
        self.stats[kind] += 1
        self._warm_run = self._warm_run + 1 if kind == "warm" else 0
        if "fallback" in extras:
            self.stats[f"{extras['fallback']}_fallbacks"] += 1
        self._chunk = self._binarize_guess(denoised.x0)
        out = self._executable(denoised, kind, extras)
        if self.discrete_dims:
            self._executed_discrete = out.action[:, -1, self.discrete_dims].clone()
        return out

    def _tail(self, cond: torch.Tensor, guess: torch.Tensor, executed: int, extras: dict,
              generator: torch.Generator | None):
        x_init = self._enter(guess, generator)
        tail, method, stop = self._capped(self.tail, self.cfg.sampler, False, extras)
        if self.prefix is None:
            return self.inner.sample_normalized(cond, x_init, tail, method, generator, stop=stop)
        start = time.perf_counter()
        exec_start = self.inner.spec.exec_start
        overlap = guess.shape[1] - executed  # positions where the executed chunk still holds a prediction
        frozen = min(exec_start + self.delay.actions(), overlap)
        denoised = prefix_conditioned_sample(self.inner, self.prefix, cond, x_init, tail, method, guess, frozen,
                                             overlap, generator, stop)
        # Only warm decisions time the delay: a full denoise is an episode start or a fallback, many times longer.
        self.delay.record((time.perf_counter() - start) * 1e3)
        extras.update(frozen=frozen - exec_start, overlap=overlap - exec_start)
        return denoised

    def _refreshed(self, cond: torch.Tensor, generator: torch.Generator | None):
        x_init = self.inner.initial_noise(cond, generator, None)
        return self.inner.sample_normalized(cond, x_init, self.refresh_timesteps, self.refresh_method, generator)

    def _executable(self, denoised, kind: str, extras: dict) -> Chunk:
        out = self.inner.to_chunk(denoised, kind, extras)
        ahead = out.action_ahead
        if self.cfg.binarize_executed and self.discrete_dims:
            ahead = self.binarize(ahead)
        out.action_ahead, out.action = ahead, ahead[:, : self.cfg.n_exec]
        return out

    def _stale(self, guess: torch.Tensor, denoised) -> str | None:
        """The refresh signal a warm result raises, if any (see the module docstring)."""
        refresh = self.refresh
        if "discrete" in refresh and self._executed_discrete is not None:
            first = self.binarize(self.inner.to_chunk(denoised, "warm", {}).action_ahead[:, :1])
            if not torch.equal(first[:, 0, self.discrete_dims], self._executed_discrete):
                return "discrete"
        if "drift" in refresh:
            d = self.continuous_dims
            if float((denoised.x0[..., d] - guess[..., d]).pow(2).mean().sqrt()) > self.drift_limit:
                return "drift"
        return None

    def _enter(self, guess: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.cfg.mode == "direct":
            return guess
        ab = self.schedule.alphas_cumprod[self.k0]
        eps = torch.randn(guess.shape, generator=generator, dtype=guess.dtype)
        return (ab.sqrt() * guess + (1.0 - ab).sqrt() * eps).to(guess.dtype)

    def _binarize_guess(self, x0: torch.Tensor) -> torch.Tensor:
        """The chunk stored for the next warm start, its discrete dims set to the binary values the tail can
        still flip (see the module docstring)."""
        chunk = x0.clone()
        if not self.discrete_dims:
            return chunk
        norm = self.normalizer["action"]
        d = self.discrete_dims
        target = norm.normalize(self.binarize(norm.unnormalize(x0)))[..., d]
        chunk[..., d] = target / self.cfg.factor if self.discrete == "clip" else target
        return chunk


@dataclass
class K0Calibration:
    k0: int
    k_min: int | None  # the first step at which the guess looks like a forward-noised full-denoise chunk
    margin: int
    pairs: int
    table: list[dict]  # per step k: the guess's mean squared deviation and forward noise's variance

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_k0(pairs: list[tuple[torch.Tensor, torch.Tensor]], schedule: NoiseSchedule, margin: int = 1,
                 k_max: int | None = None) -> K0Calibration:
    """Pick k0 from (warm guess, full-denoise chunk) pairs logged in closed loop.

    The rule (algorithms.md section 1.3): the smallest k at which the guess g deviates from the scaled full-denoise
    chunk no more than forward noise would, mean over elements of (g - sqrt(ab_k) A0)^2 <= 1 - ab_k, plus `margin`
    steps of safety. If no k up to k_max qualifies, k_max is returned and k_min is None.
    """
    if not pairs:
        raise ValueError("k0 calibration needs at least one (guess, full denoise) pair; the calibration "
                         "episodes made no warm-startable decision")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    k_max = schedule.num_train_timesteps - 1 if k_max is None else k_max
    g = torch.cat([p[0] for p in pairs]).double()
    a0 = torch.cat([p[1] for p in pairs]).double()
    table, k_min = [], None
    for k in range(k_max + 1):
        ab = schedule.alphas_cumprod[k].double()
        deviation = float(((g - ab.sqrt() * a0) ** 2).mean())
        noise_var = float(1.0 - ab)
        table.append({"k": k, "deviation": deviation, "noise_var": noise_var})
        if k_min is None and deviation <= noise_var:
            k_min = k
        if k_min is not None and k >= k_min + margin:
            break
    k0 = min(k_min + margin, k_max) if k_min is not None else k_max
    return K0Calibration(k0=k0, k_min=k_min, margin=margin, pairs=len(pairs), table=table)



def rti_config(fields: dict) -> RTIConfig:
    """RTIConfig from settings (the command line's, a report's), refusing unknown fields and an uncalibrated k0."""
    if fields.get("k0") == "auto":
        raise ValueError("RTI k0 is 'auto': calibrate it first (rtdp eval --rti auto does)")
    try:
        return RTIConfig(**fields)
    except TypeError as e:
        raise ValueError(f"bad RTI settings {fields}: {e}") from None
