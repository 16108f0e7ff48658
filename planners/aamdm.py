"""AAMDM (Li et al., CVPR 2024): autoregressive motion synthesis in a learned embedding, one short diffusion chain
per frame whose noisy steps are taken by a DD-GAN and whose last steps are polished by an x0-predicting diffusion
model (ADM).

    model = AAMDM(cfg, normalizer)
    chunk = model.predict_chunk({"frame": prev})            # prev (B, 1, D): the last frame, embedding units
    chunk = model.predict_chunk({"frame": prev, "control": target})   # guided: target (B, 1, len(control_dims))
    chunk.action                                             # (B, 1, D): the next frame
    chunk.extras["generator_calls"], chunk.extras["polisher_calls"]   # 3 and 2 with the default split

One frame, over the `train_timesteps`-step schedule (x0 prediction, 0-based steps, "after step 0" is clean):
1. x_{T-1} ~ N(0, I);
2. for t = T-1 .. polish_steps the generator predicts x0 = G(x_t, previous frame, t, r), r ~ N(0, I), and the
   DDPM posterior q(x_{t-1} | x_t, x0) gives the next sample (the shared sampler's DDPM step, stopped with
   `until` at level polish_steps - 1);
3. for t = polish_steps - 1 .. 0 the polisher predicts x0 from the GAN's sample and the same step takes it on.
With `control`, both predictions are guided toward the target features (planners/frame_diffusion.guided).

Training (one loss, the shared trainer): each part's loss reaches only its own weights, so the three train side
by side as if apart. The discriminator D(x_{t-1}, x_t, t, previous frame) learns real pairs from fake ones with
the non-saturating loss and an R1 penalty; the generator's loss goes through a copy of D whose weights are
detached; the polisher is trained on the steps it takes with the rollout loss: `rollout` frames generated one
after another, each conditioned on the polisher's own previous prediction, value and velocity terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from policy.checkpoint import load_planner_checkpoint, load_run_config
from policy.config import TrainConfig
from policy.diffusion import NoiseSchedule, sample
from policy.normalizer import FieldNormalizer, Normalizer

from .frame_diffusion import (
    FrameDenoiser,
    FrameModel,
    StepEmbedding,
    guided,
    one_step_forward,
    posterior_sample,
    rollout_loss,
)

KIND = "aamdm"


@dataclass
class AAMDMConfig:
    frame_dim: int = 0  # filled from the dataset
    # the frame's control features (a motion embedding's future root path and heading): what guidance steers
    control_dims: list[int] = field(default_factory=list)
    hidden: int = 512
    layers: int = 4
    time_embed_dim: int = 64
    latent_dim: int = 16  # the GAN's r
    disc_hidden: int = 512
    disc_layers: int = 3
    train_timesteps: int = 5  # the one chain: T_GAN + T_ADM
    polish_steps: int = 2  # T_ADM: the last steps, taken by the polisher; the rest by the GAN
    # scaled-linear betas from 1e-3 to 0.99: alpha_bar = [0.999, 0.925, 0.68, 0.29, 0.003], so the GAN's steps
    # cross the noise levels where the modes separate and the polisher's two start where the mode is already
    # decided (on the cosine schedule, alpha_bar_1 = 0.65, the polisher has to guess the mode, and blurs)
    beta_schedule: str = "scaled_linear"
    beta_start: float = 1e-3
    beta_end: float = 0.99
    r1_gamma: float = 0.05
    rollout: int = 4  # h: frames in the polisher's rollout loss
    value_weight: float = 1.0
    velocity_weight: float = 1.0
    gan_weight: float = 1.0
    polish_weight: float = 1.0
    # DeepMimic, AAMDM: 0.5 barely steers (57 deg off 2 s after a turn), 2.0 halves that (BENCHMARKS.md)
    guidance_scale: float = 2.0


@dataclass
class MotionDataConfig:
    task: str | None = None
    key: str = "frame"  # the per-frame key trained on, when there is no autoencoder (the Squ-9 toy)
    # A motion dataset (pose + control per frame) is embedded by this autoencoder checkpoint first; its weights'
    # sha256 is recorded so that synthesis decodes with the same one.
    autoencoder: str | None = None
    autoencoder_sha256: str = ""
    path: str | None = None  # the dataset trained on (synthesis starts from its frames)


@dataclass
class AAMDMRunConfig:
    kind: str = KIND
    planner: AAMDMConfig = field(default_factory=AAMDMConfig)
    data: MotionDataConfig = field(default_factory=MotionDataConfig)
    # DD-GAN's Adam betas; the same optimiser steps all three parts
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=6000, batch_size=256, lr=2e-4,
                                                                   warmup_steps=100, betas=[0.5, 0.9], ema=True))


class Discriminator(nn.Module):
    """D(x_{t-1}, x_t, t, previous frame) -> logit: is x_{t-1} the real next sample of the chain from x_t?"""

    def __init__(self, frame_dim: int, hidden: int, layers: int, time_embed_dim: int, train_timesteps: int):
        super().__init__()
        self.step = StepEmbedding(time_embed_dim, train_timesteps)
        dims = [3 * frame_dim + time_embed_dim] + [hidden] * layers
        body = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            body += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*body, nn.Linear(hidden, 1))

    def forward(self, x_prev_level, x_t, t, prev_frame) -> torch.Tensor:
        return self.body(torch.cat([x_prev_level, x_t, self.step(t), prev_frame], dim=-1))[:, 0]


class AAMDM(FrameModel, nn.Module):
    kind = KIND
    method = "ddpm"

    def __init__(self, cfg: AAMDMConfig, normalizer: Normalizer):
        super().__init__()
        if cfg.frame_dim <= 0:
            raise ValueError(f"planner.frame_dim is filled from the dataset; got {cfg.frame_dim}")
        if not 0 <= cfg.polish_steps < cfg.train_timesteps:
            raise ValueError(f"planner.polish_steps must be in [0, {cfg.train_timesteps - 1}] (at least one GAN "
                             f"step), got {cfg.polish_steps}")
        bad = [d for d in cfg.control_dims if not 0 <= d < cfg.frame_dim]
        if bad:
            raise ValueError(f"planner.control_dims {bad} are outside the frame's {cfg.frame_dim} dims")
        self.cfg = cfg
        self.normalizer = normalizer
        d, T = cfg.frame_dim, cfg.train_timesteps
        self.generator = FrameDenoiser(d, cfg.hidden, cfg.layers, cfg.time_embed_dim, T, cfg.latent_dim)
        self.discriminator = Discriminator(d, cfg.disc_hidden, cfg.disc_layers, cfg.time_embed_dim, T)
        self.polisher = FrameDenoiser(d, cfg.hidden, cfg.layers, cfg.time_embed_dim, T)
        self.schedule = NoiseSchedule(T, cfg.beta_schedule, "sample", cfg.beta_start, cfg.beta_end)
        self.gan_timesteps = list(range(T - 1, cfg.polish_steps - 1, -1))
        self.polish_timesteps = list(range(cfg.polish_steps - 1, -1, -1))
        self.timesteps = self.gan_timesteps + self.polish_timesteps

    # -- build-time settings --

    def configure_inference(self, sampler: str | None = None, steps: int | None = None) -> AAMDM:
        if sampler not in (None, "ddpm"):
            raise ValueError(f"AAMDM's chain is DDPM posterior steps from its two x0 predictors; got sampler "
                             f"{sampler!r}")
        if steps is not None and steps != self.cfg.train_timesteps:
            raise ValueError(f"AAMDM runs its whole {self.cfg.train_timesteps}-step chain (the GAN/polisher split "
                             f"is planner.polish_steps); got steps={steps}")
        return self

    def inference_config(self) -> dict:
        return {"sampler": self.method, "steps": len(self.timesteps), "timesteps": self.timesteps,
                "generator_steps": self.gan_timesteps, "polisher_steps": self.polish_timesteps,
                "guidance_scale": self.cfg.guidance_scale}

    # -- one frame --

    def generator_fn(self, prev: torch.Tensor, latents: torch.Tensor):
        """The GAN as an x0 predictor over its steps: call i draws on latents[:, i]."""
        calls = iter(range(latents.shape[1]))
        return lambda x, t: self.generator(x, prev, t, latents[:, next(calls)])

    def polisher_fn(self, prev: torch.Tensor):
        return lambda x, t: self.polisher(x, prev, t)

    def next_frame(self, prev: torch.Tensor, noise: torch.Tensor, chain_noise: torch.Tensor,
                   latents: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised previous frame (B, D), initial noise (B, D), each step's noise (B, T, D), the GAN's latents
        (B, T_GAN, latent_dim), an optional normalised control target -> the next frame (B, D)."""
        n_gan = len(self.gan_timesteps)
        steps = chain_noise.transpose(0, 1)
        gan, polish = self.generator_fn(prev, latents), self.polisher_fn(prev)
        if target is not None:
            dims, scale = self.cfg.control_dims, self.cfg.guidance_scale
            gan, polish = (guided(fn, self.schedule, dims, target, scale) for fn in (gan, polish))
        x = sample(gan, noise, self.schedule, self.gan_timesteps, "ddpm", step_noise=steps[:n_gan],
                   until=self.cfg.polish_steps - 1)
        if self.polish_timesteps:
            x = sample(polish, x, self.schedule, self.polish_timesteps, "ddpm", step_noise=steps[n_gan:])
        return x

    def noise_inputs(self, batch: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        d = self.cfg.frame_dim
        return {"noise": torch.randn((batch, d), generator=generator),
                "chain_noise": torch.randn((batch, self.cfg.train_timesteps, d), generator=generator),
                "latents": torch.randn((batch, len(self.gan_timesteps), self.cfg.latent_dim), generator=generator)}

    def chunk_extras(self) -> dict:
        return {"generator_calls": len(self.gan_timesteps), "polisher_calls": len(self.polish_timesteps)}

    # -- training --

    def gan_losses(self, x0: torch.Tensor, prev: torch.Tensor, generator=None) -> torch.Tensor:
        """Discriminator (non-saturating, R1 on real pairs) + generator (through a weight-detached D)."""
        cfg = self.cfg
        n = x0.shape[0]
        t = torch.randint(cfg.polish_steps, cfg.train_timesteps, (n,), generator=generator)
        lower = t - 1
        # the real pair (x_{t-1}, x_t) of the forward chain; "x_{-1}" is the clean frame itself
        x_lower = torch.where((lower >= 0)[:, None],
                              self.schedule.add_noise(x0, torch.randn(x0.shape, generator=generator),
                                                      lower.clamp(min=0)), x0)
        x_t = one_step_forward(self.schedule, x_lower, t, torch.randn(x0.shape, generator=generator))
        latent = torch.randn((n, cfg.latent_dim), generator=generator)
        x0_fake = self.generator(x_t, prev, t, latent)
        fake = torch.where((lower >= 0)[:, None],
                           posterior_sample(self.schedule, x0_fake, x_t, t.clamp(min=1),
                                            torch.randn(x0.shape, generator=generator)), x0_fake)
        real = x_lower.detach().requires_grad_(True)
        d_real = self.discriminator(real, x_t, t, prev)
        d_fake = self.discriminator(fake.detach(), x_t, t, prev)
        (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
        loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean() + cfg.r1_gamma / 2 * grad.pow(2).sum(-1).mean()
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        loss_g = F.softplus(-functional_call(self.discriminator, frozen, (fake, x_t, t, prev))).mean()
        return loss_d + loss_g

    def polish_loss(self, frames: torch.Tensor, generator=None) -> torch.Tensor:
        cfg = self.cfg
        return rollout_loss(self.polisher, self.schedule, frames, cfg.polish_steps, cfg.value_weight,
                            cfg.velocity_weight, generator)

    def compute_loss(self, batch: dict[str, torch.Tensor], generator=None) -> torch.Tensor:
        frames = self.normalizer["frame"].normalize(batch["frames"].float())
        flat_prev, flat_next = frames[:, :-1].flatten(0, 1), frames[:, 1:].flatten(0, 1)
        loss = self.cfg.gan_weight * self.gan_losses(flat_next, flat_prev, generator)
        if self.polish_timesteps:
            loss = loss + self.cfg.polish_weight * self.polish_loss(frames, generator)
        return loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.compute_loss(batch)


# -- building and loading ---------------------------------------------------------------------------------------


def frame_normalizer(frames: np.ndarray) -> Normalizer:
    """Standardised frames; the same field serves as the 'action' (the next frame) the runtime's guard reads."""
    field_ = FieldNormalizer.fit_standard(frames)
    return Normalizer({"frame": field_, "action": field_})


def build_for_training(run_cfg: AAMDMRunConfig, data) -> AAMDM:
    cfg = run_cfg.planner
    cfg.frame_dim = int(data.frame_dim)
    return AAMDM(cfg, frame_normalizer(data.all_frames()))


def read_config(directory) -> AAMDMRunConfig:
    return load_run_config(directory, AAMDMRunConfig)


def load_planner(directory, planner_class: type = AAMDM):
    return load_planner_checkpoint(directory, AAMDMRunConfig, planner_class)
