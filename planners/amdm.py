"""AMDM (Shi et al. 2024), AAMDM's baseline: plain autoregressive per-frame diffusion, one x0-predicting denoiser
for every step of a `train_timesteps`-step chain. AMDM-200 is `train_timesteps: 200`, AMDM-5 the same at 5
(configs/planners/amdm.yaml and its overrides); `--steps K` samples K of them (leading spacing).

    model = AMDM(cfg, normalizer)
    chunk = model.predict_chunk({"frame": prev})     # (B, 1, D) -> the next frame, chunk.nfe denoiser calls
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from policy.checkpoint import load_planner_checkpoint, load_run_config
from policy.config import TrainConfig
from policy.diffusion import NoiseSchedule, sample
from policy.normalizer import Normalizer

from .aamdm import MotionDataConfig, frame_normalizer
from .frame_diffusion import FrameDenoiser, FrameModel, guided, rollout_loss

KIND = "amdm"


@dataclass
class AMDMConfig:
    frame_dim: int = 0
    control_dims: list[int] = field(default_factory=list)
    hidden: int = 512
    layers: int = 4
    time_embed_dim: int = 64
    train_timesteps: int = 200
    steps: int = 0  # sampled per frame; 0: every training step
    beta_schedule: str = "squaredcos_cap_v2"  # AMDM-5 takes AAMDM's 5-step schedule (its config says which)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    rollout: int = 4
    value_weight: float = 1.0
    velocity_weight: float = 1.0
    # DeepMimic, AAMDM: 0.5 barely steers (57 deg off 2 s after a turn), 2.0 halves that (BENCHMARKS.md)
    guidance_scale: float = 2.0


@dataclass
class AMDMRunConfig:
    kind: str = KIND
    planner: AMDMConfig = field(default_factory=AMDMConfig)
    data: MotionDataConfig = field(default_factory=MotionDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=6000, batch_size=256, lr=2e-4,
                                                                   warmup_steps=100, ema=True))


class AMDM(FrameModel, nn.Module):
    kind = KIND
    method = "ddpm"

    def __init__(self, cfg: AMDMConfig, normalizer: Normalizer):
        super().__init__()
        if cfg.frame_dim <= 0:
            raise ValueError(f"planner.frame_dim is filled from the dataset; got {cfg.frame_dim}")
        self.cfg, self.normalizer = cfg, normalizer
        self.denoiser = FrameDenoiser(cfg.frame_dim, cfg.hidden, cfg.layers, cfg.time_embed_dim,
                                      cfg.train_timesteps)
        self.schedule = NoiseSchedule(cfg.train_timesteps, cfg.beta_schedule, "sample", cfg.beta_start,
                                      cfg.beta_end)
        self.configure_inference()

    def configure_inference(self, sampler: str | None = None, steps: int | None = None) -> AMDM:
        if sampler not in (None, "ddpm", "ddim", "dpmpp_2m"):
            raise ValueError(f"sampler must be ddpm, ddim or dpmpp_2m, got {sampler!r}")
        if sampler is not None:
            self.method = sampler
        if steps is not None:
            self.cfg.steps = steps
        n = self.cfg.steps or self.cfg.train_timesteps
        self.timesteps = self.schedule.timesteps(n).tolist()
        return self

    def inference_config(self) -> dict:
        return {"sampler": self.method, "steps": len(self.timesteps), "timesteps": self.timesteps,
                "guidance_scale": self.cfg.guidance_scale}

    def next_frame(self, prev, noise, chain_noise, target=None) -> torch.Tensor:
        fn = lambda x, t: self.denoiser(x, prev, t)  # noqa: E731
        if target is not None:
            fn = guided(fn, self.schedule, self.cfg.control_dims, target, self.cfg.guidance_scale)
        return sample(fn, noise, self.schedule, self.timesteps, self.method, step_noise=chain_noise.transpose(0, 1))

    def noise_inputs(self, batch: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        d = self.cfg.frame_dim
        return {"noise": torch.randn((batch, d), generator=generator),
                "chain_noise": torch.randn((batch, len(self.timesteps), d), generator=generator)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg
        frames = self.normalizer["frame"].normalize(batch["frames"].float())
        return rollout_loss(self.denoiser, self.schedule, frames, cfg.train_timesteps, cfg.value_weight,
                            cfg.velocity_weight)


def build_for_training(run_cfg: AMDMRunConfig, data) -> AMDM:
    run_cfg.planner.frame_dim = int(data.frame_dim)
    return AMDM(run_cfg.planner, frame_normalizer(data.all_frames()))


def read_config(directory) -> AMDMRunConfig:
    return load_run_config(directory, AMDMRunConfig)


def load_planner(directory, planner_class: type = AMDM):
    return load_planner_checkpoint(directory, AMDMRunConfig, planner_class)
