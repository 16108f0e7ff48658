"""The forward noising process: beta schedule, precomputed tables, and the prediction-type conversions."""

from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _betas(kind: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    n = num_train_timesteps
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        # Nichol & Dhariwal's cosine alpha_bar with s=0.008, each beta capped at 0.999.
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float64
        )
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {kind!r}")


class NoiseSchedule:
    """Discrete-time DDPM noise schedule with all tables precomputed as tensors.

    Tables live on the host; `to(device, dtype)` returns a copy the sampler indexes with tensor
    timesteps, so the sampling loop never turns a timestep into a Python scalar.
    """

    def __init__(
        self,
        num_train_timesteps: int = 100,
        beta_schedule: str = "squaredcos_cap_v2",
        prediction_type: str = "epsilon",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)

        # The tables are built in float32, as diffusers builds them, so that a model trained against diffusers'
        # schedulers sees the same noise levels here; everything derived from them is float64.
        betas = _betas(beta_schedule, self.num_train_timesteps, beta_start, beta_end).float()
        self.betas = betas.double()
        self.alphas = (1.0 - betas).double()
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).double()
        # Index -1 of the padded tables is the clean sample (alpha_bar = 1): "after the last timestep".
        self.alpha_bar_padded = torch.cat([self.alphas_cumprod, torch.ones(1, dtype=torch.float64)])
        self.sqrt_alpha_bar = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alphas_cumprod).sqrt()

    def config(self) -> dict:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"NoiseSchedule({args})"

    def timesteps(self, num_steps: int, spacing: str = "leading") -> torch.Tensor:
        """A descending timestep list of `num_steps` entries, spaced as diffusers names it."""
        n, T = int(num_steps), self.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"num_steps must be in [1, {T}] for a {T}-step schedule, got {num_steps}")
        if spacing == "leading":
            ts = torch.arange(n) * (T // n)
        elif spacing == "trailing":
            ts = torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)).long() - 1
            return ts
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, n + 1, dtype=torch.float64).round().long().flip(0)[:-1]
            return ts
        else:
            raise ValueError(f"spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
        return ts.flip(0).long()

    # -- forward process and prediction-type conversions (all broadcast over a trailing action shape) --

    def _gather(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = table.to(device=like.device)[t].to(like.dtype)
        return out.reshape(out.shape + (1,) * (like.dim() - out.dim()))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self._gather(self.sqrt_alpha_bar, t, x0)
        return a * x0 + self._gather(self.sqrt_one_minus_alpha_bar, t, x0) * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        a = self._gather(self.sqrt_alpha_bar, t, x0)
        s = self._gather(self.sqrt_one_minus_alpha_bar, t, x0)
        return a * noise - s * x0

    def to_x0_eps(
        self, prediction: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, epsilon) implied by a model prediction at the noise level with sqrt(alpha_bar) = a and
        sqrt(1 - alpha_bar) = s, both gathered by the caller once per timestep list."""
        if self.prediction_type == "epsilon":
            return (x_t - s * prediction) / a, prediction
        if self.prediction_type == "sample":
            return prediction, (x_t - a * prediction) / s
        return a * x_t - s * prediction, a * prediction + s * x_t
