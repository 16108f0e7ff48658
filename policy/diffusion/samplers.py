"""Samplers as plain functions: `sample(model_fn, x_init, schedule, timesteps, method)`.

Every method walks a descending timestep list t_0 > t_1 > ... > t_{K-1}, calling the denoiser once per entry,
and after the last entry lands on the clean sample (alpha_bar = 1). The starting point `x_init` is whatever the
caller gives: pure noise for a full denoise, or a warm start entered at t_0. Per-step coefficients are computed
once on the host from the timestep list, so the loop body is the same tensor arithmetic at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("ddpm", "ddim", "dpmpp_2m")


class CallCounter:
    """Wraps a denoiser and counts its calls, so callers can read the cost of a decision exactly."""

    def __init__(self, model_fn: ModelFn):
        self.model_fn = model_fn
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model_fn(x, t)

    def reset(self) -> None:
        self.calls = 0


def as_timesteps(timesteps: Sequence[int] | torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Validate a timestep list and return it as a 1-D LongTensor on the host."""
    ts = torch.as_tensor(timesteps).detach().to("cpu")
    if ts.numel() == 0:
        raise ValueError("timesteps is empty: at least one denoising step is needed")
    if ts.dtype.is_floating_point or ts.dtype == torch.bool:
        raise TypeError(f"timesteps must be integers, got dtype {ts.dtype}")
    ts = ts.long().reshape(-1)
    T = schedule.num_train_timesteps
    if int(ts.min()) < 0 or int(ts.max()) >= T:
        raise ValueError(f"timesteps must lie in [0, {T - 1}] for this schedule, got {ts.tolist()}")
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"timesteps must be strictly descending, got {ts.tolist()}")
    return ts


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the generator's device, as diffusers' randn_tensor does, so seeded runs match it bit for bit.
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _signal_noise(ab_t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar) and sqrt(1 - alpha_bar) per step, on x's device and dtype: no roots inside the loop."""
    return ab_t.sqrt().to(device=x.device, dtype=x.dtype), (1.0 - ab_t).sqrt().to(device=x.device, dtype=x.dtype)


def _step_tables(schedule: NoiseSchedule, ts: torch.Tensor, until: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_bar at each step and at the step it moves to (after the last: `until`, 1.0 when -1)."""
    ab = schedule.alpha_bar_padded
    nxt = torch.cat([ts[1:], torch.tensor([until])])
    return ab[ts], ab[nxt]


def sample(
    model_fn: ModelFn,
    x_init: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int] | torch.Tensor,
    method: str = "ddim",
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    step_noise: torch.Tensor | None = None,
    until: int = -1,
    stop: Callable[[int], bool] | None = None,
) -> torch.Tensor:
    """Denoise `x_init`, taken to be at noise level `timesteps[0]`, down to the clean sample, or with `until` >= 0
    down to noise level `until` (below the last timestep), so that another denoiser can take the chain on.

    `step_noise` (K, *x_init.shape) supplies the noise of each stochastic step instead of drawing it, so an
    exported graph can take it as an input (ddpm, and ddim with eta > 0).

    `stop(calls)` is asked after every denoiser call; when it answers True the chain ends there and that call's
    clean-sample prediction is returned (an anytime decision). Stopped after k calls, the result equals a run on
    the first k timesteps alone, whose last step lands on exactly that prediction.

    method: "ddpm" (fixed_small variance), "ddim" (`eta` scales its noise; 0 is deterministic) or
    "dpmpp_2m" (DPM-Solver++ 2M, data prediction, first-order on the first and the last step).
    `schedule.clip_sample` clips the predicted clean sample in ddpm and ddim, as diffusers does.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not torch.is_tensor(x_init) or not x_init.dtype.is_floating_point:
        raise TypeError(f"x_init must be a floating-point tensor, got {type(x_init).__name__}")
    ts = as_timesteps(timesteps, schedule)
    if not -1 <= until < int(ts[-1]):
        raise ValueError(f"until must be -1 (the clean sample) or a noise level below the last timestep "
                         f"{int(ts[-1])}, got {until}")
    if step_noise is not None and tuple(step_noise.shape) != (len(ts), *x_init.shape):
        raise ValueError(f"step_noise must have shape {(len(ts), *x_init.shape)}, got {tuple(step_noise.shape)}")

    def noise(i: int, x: torch.Tensor) -> torch.Tensor:
        return step_noise[i] if step_noise is not None else _noise_like(x, generator)

    if method == "ddpm":
        return _ddpm(model_fn, x_init, schedule, ts, noise, until, stop)
    if method == "ddim":
        return _ddim(model_fn, x_init, schedule, ts, noise, eta, until, stop)
    return _dpmpp_2m(model_fn, x_init, schedule, ts, until, stop)


def _model_timesteps(ts: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(x.device).expand(x.shape[0]) for t in ts]


def _clip(x0: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    if schedule.clip_sample:
        return x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def _ddpm(model_fn, x, schedule, ts, noise, until, stop):
    ab_t, ab_prev = _step_tables(schedule, ts, until)
    alpha_t = ab_t / ab_prev
    beta_t = 1.0 - alpha_t
    c_x0 = ab_prev.sqrt() * beta_t / (1.0 - ab_t)
    c_xt = alpha_t.sqrt() * (1.0 - ab_prev) / (1.0 - ab_t)
    std = ((1.0 - ab_prev) / (1.0 - ab_t) * beta_t).clamp(min=1e-20).sqrt()
    add_noise = (ab_prev < 1.0).tolist()  # every step but the one that lands on the clean sample
    to = dict(device=x.device, dtype=x.dtype)
    a, s = _signal_noise(ab_t, x)
    c_x0, c_xt, std = c_x0.to(**to), c_xt.to(**to), std.to(**to)
    for i, t in enumerate(_model_timesteps(ts, x)):
        x0, _ = schedule.to_x0_eps(model_fn(x, t), x, a[i], s[i])
        if stop is not None and stop(i + 1):
            return _clip(x0, schedule)
        x = c_x0[i] * _clip(x0, schedule) + c_xt[i] * x
        if add_noise[i]:
            x = x + std[i] * noise(i, x)
    return x


def _ddim(model_fn, x, schedule, ts, noise, eta, until, stop):
    ab_t, ab_prev = _step_tables(schedule, ts, until)
    std = eta * ((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)).sqrt()
    c_eps = (1.0 - ab_prev - std**2).sqrt()
    to = dict(device=x.device, dtype=x.dtype)
    a, s = _signal_noise(ab_t, x)
    c_x0, c_eps, std = ab_prev.sqrt().to(**to), c_eps.to(**to), std.to(**to)
    for i, t in enumerate(_model_timesteps(ts, x)):
        x0, eps = schedule.to_x0_eps(model_fn(x, t), x, a[i], s[i])
        if stop is not None and stop(i + 1):
            return _clip(x0, schedule)
        x = c_x0[i] * _clip(x0, schedule) + c_eps[i] * eps
        if eta > 0:
            x = x + std[i] * noise(i, x)
    return x


def _dpmpp_2m(model_fn, x, schedule, ts, until, stop):
    ab_t, ab_next = _step_tables(schedule, ts, until)
    alpha_s, sigma_s = ab_t.sqrt(), (1.0 - ab_t).sqrt()
    alpha_t, sigma_t = ab_next.sqrt(), (1.0 - ab_next).sqrt()
    # exp(-h) with h = lambda_t - lambda_s, written without logs so the last step (sigma_t = 0) stays finite.
    exp_neg_h = (sigma_t / alpha_t) / (sigma_s / alpha_s)
    c_x = sigma_t / sigma_s
    c_d = -alpha_t * (exp_neg_h - 1.0)
    # Second-order blend D = w0 * D_i + w1 * D_{i-1}, r = h_{i-1} / h_i; first order on the first and last step.
    lam = (alpha_s / sigma_s).log()
    K = len(ts)
    w0, w1 = torch.ones(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    for i in range(1, K - 1):
        r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
        w0[i], w1[i] = 1.0 + 0.5 / r, -0.5 / r
    to = dict(device=x.device, dtype=x.dtype)
    a, s = _signal_noise(ab_t, x)
    c_x, c_d, w0, w1 = c_x.to(**to), c_d.to(**to), w0.to(**to), w1.to(**to)
    d_prev = None
    for i, t in enumerate(_model_timesteps(ts, x)):
        d, _ = schedule.to_x0_eps(model_fn(x, t), x, a[i], s[i])
        if stop is not None and stop(i + 1):
            return d
        blended = d if d_prev is None else w0[i] * d + w1[i] * d_prev
        x = c_x[i] * x + c_d[i] * blended
        d_prev = d
    return x
