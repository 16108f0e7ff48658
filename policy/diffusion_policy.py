"""Diffusion Policy (Chi et al.): an action chunk denoised under an observation-history condition.

Observations are a dict of raw tensors: `state` (B, To, state_dim) float and, for image policies, `image`
(B, To, H, W, 3) uint8 as cameras and MuJoCo render it. Normalisation happens here, outside the network, so
an exported graph sees exactly what `denoise` sees.

Chi et al.'s step convention: the chunk covers steps [t - To + 1, t - To + 1 + horizon), and the actions to
execute start at the current step, index To - 1 of the chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import PolicyConfig
from .contract import Chunk, GraphSpec, ObservationField, PolicySpec
from .denoising import Denoised, DenoisingPolicy
from .diffusion import NoiseSchedule
from .nets import ConditionalUnet1D, ImageEncoder, LowDimEncoder, ObservationEncoder, TransformerForDiffusion
from .normalizer import Normalizer

DENOISERS = ("unet", "transformer")
KIND = "diffusion_policy"


def _check_config(cfg: PolicyConfig) -> None:
    if cfg.denoiser not in DENOISERS:
        raise ValueError(f"policy.denoiser must be one of {DENOISERS}, got {cfg.denoiser!r}")
    if cfg.state_dim <= 0 or cfg.action_dim <= 0:
        raise ValueError(f"policy.state_dim and policy.action_dim must be set (got {cfg.state_dim}, {cfg.action_dim})")
    if cfg.n_obs_steps < 1 or cfg.n_action_steps < 1:
        raise ValueError(f"n_obs_steps and n_action_steps must be >= 1, got {cfg.n_obs_steps}, {cfg.n_action_steps}")
    if cfg.n_obs_steps - 1 + cfg.n_action_steps > cfg.horizon:
        raise ValueError(
            f"horizon {cfg.horizon} cannot hold n_obs_steps - 1 + n_action_steps = "
            f"{cfg.n_obs_steps - 1 + cfg.n_action_steps} steps"
        )
    if cfg.denoiser == "unet":
        factor = 2 ** (len(cfg.unet.down_dims) - 1)
        if cfg.horizon % factor:
            raise ValueError(f"a U-Net with {len(cfg.unet.down_dims)} levels needs horizon divisible by {factor}, "
                             f"got {cfg.horizon}")


class DiffusionPolicy(nn.Module, DenoisingPolicy):
    """The model and the denoising policy at once: `predict_chunk` runs the sampler fixed at build time
    (`cfg.inference`, or `configure_inference`)."""

    def __init__(self, cfg: PolicyConfig, normalizer: Normalizer):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        self.normalizer = normalizer
        image = None
        if cfg.image_shape is not None:
            ic = cfg.image_encoder
            image = ImageEncoder(ic.channels, ic.num_kp, ic.feature_dim)
        self.obs_encoder = ObservationEncoder(LowDimEncoder(cfg.state_dim, cfg.state_encoder_hidden), image)
        feat = self.obs_encoder.feature_dim
        if cfg.denoiser == "unet":
            u = cfg.unet
            self.denoiser = ConditionalUnet1D(
                cfg.action_dim, feat * cfg.n_obs_steps, u.diffusion_step_embed_dim, u.down_dims,
                u.kernel_size, u.n_groups, u.cond_predict_scale,
            )
        else:
            t = cfg.transformer
            self.denoiser = TransformerForDiffusion(
                cfg.action_dim, feat, cfg.horizon, cfg.n_obs_steps, t.n_layer, t.n_head, t.n_emb,
                t.p_drop_emb, t.p_drop_attn, t.causal_attn,
            )
        s = cfg.schedule
        self.schedule = NoiseSchedule(s.num_train_timesteps, s.beta_schedule, s.prediction_type,
                                      clip_sample=s.clip_sample)
        self.configure_inference()

    def inference_config(self) -> dict:
        """What a report records of how this policy decides."""
        inf = self.cfg.inference
        return {"sampler": self.method, "steps": len(self.timesteps), "spacing": inf.spacing, "eta": inf.eta,
                "denoiser": self.cfg.denoiser}

    @property
    def model(self) -> DiffusionPolicy:
        return self

    @property
    def spec(self) -> PolicySpec:
        cfg = self.cfg
        fields = [ObservationField("state", (cfg.n_obs_steps, cfg.state_dim), "float32")]
        if cfg.image_shape is not None:
            fields.append(ObservationField("image", (cfg.n_obs_steps, *cfg.image_shape, 3), "uint8"))
        return PolicySpec(KIND, tuple(fields), cfg.n_obs_steps, cfg.action_dim, cfg.horizon, cfg.n_obs_steps - 1,
                          cfg.n_action_steps, tuple(cfg.discrete_action_dims or ()))

    # -- the graph: encoder and denoiser on normalised tensors --

    def encode_obs(self, nobs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised observations -> condition features (B, To, F), computed once per decision."""
        return self.obs_encoder(nobs)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, branch=None) -> torch.Tensor:
        """One denoiser call; `branch` is a block cache's per-branch hook (transformer denoisers)."""
        if self.cfg.denoiser == "unet":
            return self.denoiser(x, t, cond.flatten(1))
        return self.denoiser(x, t, cond, branch=branch)

    # -- outside the graph: validation and normalisation --

    def normalize_obs(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        expected = {f.name: f.shape for f in self.spec.observations}
        out = {}
        batch = None
        for key, shape in expected.items():
            if key not in obs:
                raise KeyError(f"observation is missing {key!r}; expected keys {sorted(expected)}")
            x = torch.as_tensor(obs[key])
            if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
                raise ValueError(f"observation {key!r} must have shape (B, {', '.join(map(str, shape))}), "
                                 f"got {tuple(x.shape)}")
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"observation {key!r} has batch {x.shape[0]}, other fields have {batch}")
            batch = x.shape[0]
            if key == "image":
                if x.dtype != torch.uint8:
                    raise TypeError(f"observation 'image' must be uint8 (H, W, 3) frames, got {x.dtype}")
                x = self.normalizer["image"].normalize(x.float()).permute(0, 1, 4, 2, 3)
            else:
                if not x.dtype.is_floating_point:
                    x = x.float()
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"observation {key!r} holds NaN or Inf")
                x = self.normalizer[key].normalize(x.float())
            out[key] = x
        return out

    def compute_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoising loss on a raw batch: obs fields (B, To, ...) and `action` (B, horizon, action_dim)."""
        nobs = self.normalize_obs({k: v for k, v in batch.items() if k != "action"})
        actions = self.normalizer["action"].normalize(batch["action"])
        cond = self.encode_obs(nobs)
        noise = torch.randn(actions.shape, generator=generator, dtype=actions.dtype)
        t = torch.randint(0, self.schedule.num_train_timesteps, (actions.shape[0],), generator=generator)
        noisy = self.schedule.add_noise(actions, noise, t)
        return F.mse_loss(self.denoise(noisy, t, cond), self.schedule.training_target(actions, noise, t))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss, so that DistributedDataParallel's hooks see the computation."""
        return self.compute_loss(batch)

    def condition(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw observations -> the denoiser's condition (validated, normalised, encoded)."""
        return self.encode_obs(self.normalize_obs(obs))

    def chunk_shape(self, batch: int) -> tuple[int, int, int]:
        return (batch, self.cfg.horizon, self.cfg.action_dim)

    def to_chunk(self, denoised: Denoised, kind: str = "full", extras: dict | None = None) -> Chunk:
        """A clean normalised chunk -> raw actions: the whole chunk, and the n_action_steps to execute from the
        current step (index n_obs_steps - 1) on."""
        action_pred = self.clamp_scaled_discrete(self.normalizer["action"].unnormalize(denoised.x0))
        ahead = action_pred[:, self.cfg.n_obs_steps - 1 :]
        return Chunk(ahead[:, : self.cfg.n_action_steps], action_pred, ahead, denoised.nfe, kind,
                     denoised.block_evals, extras or {})

    def clamp_scaled_discrete(self, raw: torch.Tensor) -> torch.Tensor:
        """A policy trained with its discrete dims divided by `discrete_action_scale` (for RTI) predicts them in a
        band that many times narrower, so an overshoot the network makes there comes back that many times larger in
        raw units (push, scale 10: -0.07 for a gripper trained on 0 / 0.6, which the action guard refuses as a
        fault). Those dims are clamped to the range they take in the training data; a policy trained unscaled is
        left as it predicts."""
        dims = list(self.cfg.discrete_action_dims or ())
        stats = self.normalizer["action"].stats
        if self.cfg.discrete_action_scale == 1.0 or not dims or "min" not in stats:
            return raw
        lo = torch.tensor([stats["min"][d] for d in dims], dtype=raw.dtype, device=raw.device)
        hi = torch.tensor([stats["max"][d] for d in dims], dtype=raw.dtype, device=raw.device)
        out = raw.clone()
        out[..., dims] = torch.maximum(torch.minimum(raw[..., dims], hi), lo)
        return out

    def export_graphs(self, batch: int = 2, generator: torch.Generator | None = None) -> dict[str, GraphSpec]:
        """The graphs this kind exports, on normalised tensors: the observation encoder (once per decision) and
        one denoiser step (once per sampler step)."""
        cfg = self.cfg
        fields = {"state": (cfg.n_obs_steps, cfg.state_dim)}
        if cfg.image_shape is not None:
            fields["image"] = (cfg.n_obs_steps, 3, *cfg.image_shape)
        keys = list(fields)
        obs = {k: torch.randn(batch, *shape, generator=generator) for k, shape in fields.items()}
        cond = torch.randn(batch, cfg.n_obs_steps, self.obs_encoder.feature_dim, generator=generator)
        x = torch.randn(batch, cfg.horizon, cfg.action_dim, generator=generator)
        t = torch.tensor([10] * batch)
        return {"encoder": GraphSpec(lambda *f: self.encode_obs(dict(zip(keys, f, strict=True))), obs, ("cond",)),
                "denoiser": GraphSpec(self.denoise, {"x": x, "t": t, "cond": cond}, ("pred",))}

    def reset(self) -> None:
        """Start of an episode. The plain policy keeps no state between decisions; warm-start wrappers do."""
