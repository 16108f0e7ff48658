"""The parts AAMDM and its AMDM baselines share: a per-frame denoiser that predicts the clean frame x0 from a noisy
frame, the previous frame and the step (Shi et al.'s AMDM), the DDPM posterior q(x_{t-1} | x_t, x0) that turns an
x0 prediction into the next sample, and gradient guidance of the x0 prediction toward a user's target.

    net = FrameDenoiser(frame_dim=64, hidden=512, layers=4, time_embed_dim=64, train_timesteps=5, latent_dim=0)
    x0 = net(x_t, prev, t)                  # latent_dim > 0 (a DD-GAN generator): net(x_t, prev, t, r)

`FrameModel` is the decision contract both kinds share: observe the previous frame (and optionally a control
target), return the next frame as a one-action chunk, export the frame step as one graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from policy.contract import Chunk, GraphSpec, ObservationField, PolicySpec
from policy.diffusion import NoiseSchedule
from policy.normalizer import Normalizer


class StepEmbedding(nn.Module):
    """Sinusoidal features of the step scaled to [0, 1000) whatever the schedule's length, then an MLP."""

    def __init__(self, dim: int, train_timesteps: int):
        super().__init__()
        self.dim, self.scale = dim, 1000.0 / train_timesteps
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        arg = (t.float() * self.scale)[:, None] * freqs[None]
        return self.mlp(torch.cat([arg.sin(), arg.cos()], dim=-1))


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden + cond_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(torch.cat([self.norm(h), cond], dim=-1))))


class FrameDenoiser(nn.Module):
    """x0 = G(x_t, previous frame, t[, r]): an MLP of residual blocks, each one fed the step embedding (and the
    GAN's latent), as AMDM's and DD-GAN's generators condition every layer."""

    def __init__(self, frame_dim: int, hidden: int, layers: int, time_embed_dim: int, train_timesteps: int,
                 latent_dim: int = 0):
        super().__init__()
        self.latent_dim = latent_dim
        self.step = StepEmbedding(time_embed_dim, train_timesteps)
        self.inp = nn.Linear(2 * frame_dim, hidden)
        cond_dim = time_embed_dim + latent_dim
        self.blocks = nn.ModuleList(ResidualBlock(hidden, cond_dim) for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, frame_dim))

    def forward(self, x_t: torch.Tensor, prev: torch.Tensor, t: torch.Tensor,
                latent: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.step(t)
        if self.latent_dim:
            if latent is None:
                raise ValueError("this denoiser is a GAN generator: it needs its latent r")
            cond = torch.cat([cond, latent], dim=-1)
        h = self.inp(torch.cat([x_t, prev], dim=-1))
        for block in self.blocks:
            h = block(h, cond)
        return self.out(h)


def posterior_sample(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                     noise: torch.Tensor) -> torch.Tensor:
    """x_{t-1} ~ q(x_{t-1} | x_t, x0) for per-sample steps t >= 1 (the training side of a DDPM step; the sampler
    takes the same step from its precomputed tables)."""
    ab = schedule.alphas_cumprod.to(x0.device)
    ab_t, ab_prev = ab[t], ab[t - 1]
    beta_t = 1.0 - ab_t / ab_prev
    c_x0 = (ab_prev.sqrt() * beta_t / (1.0 - ab_t)).float()[:, None]
    c_xt = ((1.0 - beta_t).sqrt() * (1.0 - ab_prev) / (1.0 - ab_t)).float()[:, None]
    std = ((1.0 - ab_prev) / (1.0 - ab_t) * beta_t).sqrt().float()[:, None]
    return c_x0 * x0 + c_xt * x_t + std * noise


def one_step_forward(schedule: NoiseSchedule, x_prev: torch.Tensor, t: torch.Tensor,
                     noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_{t-1}): one step of the forward chain."""
    alpha = schedule.alphas.to(x_prev.device)[t].float()[:, None]
    return alpha.sqrt() * x_prev + (1.0 - alpha).sqrt() * noise


def guided(x0_fn, schedule: NoiseSchedule, dims: list[int], target: torch.Tensor, scale: float):
    """Gradient guidance of an x0 predictor (AAMDM, section 3.4): x0* = x0 - scale * alpha_t * grad_{x_t} J with
    J = |x0[dims] - target|^2, so the frame's control features (its future root path and heading) are pulled
    toward what the user asks for, through the network, at every step."""
    alphas = schedule.alphas.float()

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            x0 = x0_fn(x, t)
            cost = (x0[:, dims] - target).pow(2).sum()
            (grad,) = torch.autograd.grad(cost, x)
        return x0.detach() - scale * alphas.to(x_t.device)[t][:, None] * grad

    return fn


def rollout_loss(denoiser: FrameDenoiser, schedule: NoiseSchedule, frames: torch.Tensor, steps: int,
                 value_weight: float, velocity_weight: float, generator=None) -> torch.Tensor:
    """AMDM's rollout loss: frames (B, h + 1, D), normalised; the h frames after the first are predicted one after
    another at random steps t < `steps`, each conditioned on the prediction before it (the model learns to
    continue from its own output), with a value term and a velocity term on consecutive frames."""
    prev, loss = frames[:, 0], 0.0
    for n in range(1, frames.shape[1]):
        x0 = frames[:, n]
        t = torch.randint(0, steps, (x0.shape[0],), generator=generator)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=generator), t)
        pred = denoiser(x_t, prev, t)
        loss = loss + value_weight * F.mse_loss(pred, x0)
        loss = loss + velocity_weight * F.mse_loss(pred - prev, x0 - frames[:, n - 1])
        prev = pred.detach()
    return loss / (frames.shape[1] - 1)


def frame_observation(obs: dict[str, torch.Tensor], normalizer: Normalizer, frame_dim: int, control_dims: list[int],
                      kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A motion model's observation, checked and normalised: the previous frame `frame` (B, 1, D) -> (B, D), and
    the optional `control` (B, 1, C), one raw target per control dim -> (B, C) normalised, or None."""
    if "frame" not in obs:
        raise KeyError(f"observation is missing 'frame'; a {kind} model observes ['frame'] (and optionally "
                       "'control')")
    frame = torch.as_tensor(obs["frame"])
    if frame.dim() != 3 or tuple(frame.shape[1:]) != (1, frame_dim):
        raise ValueError(f"observation 'frame' must have shape (B, 1, {frame_dim}), got {tuple(frame.shape)}")
    if not frame.dtype.is_floating_point:
        raise TypeError(f"observation 'frame' must be floating point, got {frame.dtype}")
    if not bool(torch.isfinite(frame).all()):
        raise ValueError("observation 'frame' holds NaN or Inf")
    prev = normalizer["frame"].normalize(frame[:, 0].float())
    if obs.get("control") is None:
        return prev, None
    if not control_dims:
        raise ValueError("this checkpoint has no control_dims: it cannot be steered")
    target = torch.as_tensor(obs["control"]).float()
    if target.dim() != 3 or tuple(target.shape[1:]) != (1, len(control_dims)) or target.shape[0] != frame.shape[0]:
        raise ValueError(f"observation 'control' must have shape ({frame.shape[0]}, 1, {len(control_dims)}) (one "
                         f"target per control dim {control_dims}), got {tuple(target.shape)}")
    if not bool(torch.isfinite(target).all()):
        raise ValueError("observation 'control' holds NaN or Inf")
    full = torch.zeros(frame.shape[0], frame_dim)
    full[:, control_dims] = target[:, 0]
    return prev, normalizer["frame"].normalize(full)[:, control_dims]


class FrameModel:
    """The decision contract of a per-frame motion model. A subclass has `cfg` (frame_dim, control_dims),
    `normalizer`, `kind`, `timesteps`, `noise_inputs(batch, generator)` and `next_frame(prev, **noise_inputs,
    target=None)`; `chunk_extras()` adds what its chunks report."""

    decision_graph = "frame_step"

    @property
    def spec(self) -> PolicySpec:
        d = self.cfg.frame_dim
        return PolicySpec(self.kind, (ObservationField("frame", (1, d), "float32"),), 1, d, 1, 0, 1, ())

    @property
    def model(self):
        return self

    def reset(self) -> None:
        """The model keeps nothing between frames: the previous frame is the observation."""

    def normalize_obs(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return frame_observation(obs, self.normalizer, self.cfg.frame_dim, self.cfg.control_dims, self.kind)

    def graph_inputs(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                     noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        prev, target = self.normalize_obs(obs)
        if target is not None:
            raise ValueError("a guided frame differentiates through the networks: run it on torch")
        return {"prev": prev, **self.noise_inputs(prev.shape[0], generator)}

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor], *, executed: int | None = None,
                      generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Chunk:
        prev, target = self.normalize_obs(obs)
        inputs = self.noise_inputs(prev.shape[0], generator)
        if noise is not None:
            inputs["noise"] = noise.reshape(prev.shape)
        return self.chunk_from_graph(self.next_frame(prev, **inputs, target=target))

    def chunk_extras(self) -> dict:
        return {}

    def chunk_from_graph(self, frame: torch.Tensor) -> Chunk:
        raw = self.normalizer["frame"].unnormalize(frame)[:, None]
        return Chunk(raw, raw, raw, len(self.timesteps), "full", extras=self.chunk_extras())

    def export_graphs(self, batch: int = 2, generator: torch.Generator | None = None) -> dict[str, GraphSpec]:
        """One graph per frame, unguided."""
        inputs = {"prev": torch.randn(batch, self.cfg.frame_dim, generator=generator),
                  **self.noise_inputs(batch, generator)}
        return {self.decision_graph: GraphSpec(self.next_frame, inputs, ("frame",))}
