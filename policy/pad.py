"""PAD (Guo et al., "Prediction with Action", NeurIPS 2024): one DiT denoises the future frames and the future
poses together, under the current frame, the current pose and the task.

The denoised state is one tensor x (B, frames, target_dim + C*H*W): row k holds the k-th future pose target
(effector position and gripper command, `skip` env steps after the previous row) and that step's frame, so the
shared samplers, RTI's warm start (shifted by whole rows) and the block cache run on it unchanged. Both parts take
the same t, and one network call predicts the noise of both (epsilon prediction, MSE only: the released code's
learned variance and VB term are left out).

The poses are absolute targets, not actions: as in the released code, a small controller tracks them, moving the
effector toward the next target at the constant velocity that reaches it in `skip` steps and commanding the
target's gripper. So a decision's chunk holds `frames * skip` env actions, of which `n_action_steps` run before
the next decision (the replanning interval). The predicted frames are in `chunk.extras["frames"]`.

`predict_images: false` is the paper's "PAD w/o img" ablation in the same network: the future-frame channels are
held at zero in training and sampling, and only the pose loss trains it.

    model = PAD(cfg, normalizer)
    chunk = model.predict_chunk({"image": (B, 1, H, W, 3) uint8, "pose": (B, 1, P) float, "task": (B, 1) int64})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import WEIGHTS, load_run_config, load_weights, open_checkpoint
from .config import InferenceConfig, ScheduleConfig, TrainConfig
from .contract import Chunk, GraphSpec, ObservationField, PolicySpec
from .denoising import Denoised, DenoisingPolicy
from .diffusion import NoiseSchedule
from .nets.dit import DiT
from .nets.frame_autoencoder import FrameAutoencoder
from .normalizer import FieldNormalizer, Normalizer

KIND = "pad"
CHANNELS = 3
LATENTS = ("pixels", "autoencoder")


class PixelFrames(nn.Module):
    """Frames denoised as they are: normalised pixels (C, H, W)."""

    def __init__(self, size: int):
        super().__init__()
        self.shape = (CHANNELS, size, size)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return frames

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return latent


class LatentFrames(nn.Module):
    """Frames denoised in a frozen autoencoder's latent, each channel min-max mapped to [-1, 1] over the training
    frames (so the sampler's clipping to [-1, 1] keeps them whole)."""

    def __init__(self, cfg: FrameLatentConfig, size: int):
        super().__init__()
        self.autoencoder = FrameAutoencoder(cfg.channels, cfg.latent_channels)
        self.register_buffer("low", torch.full((cfg.latent_channels,), -1.0))
        self.register_buffer("high", torch.full((cfg.latent_channels,), 1.0))
        side = size // self.autoencoder.factor
        self.shape = (cfg.latent_channels, side, side)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        z = self.autoencoder.encode(frames)
        return 2 * (z - self.low[:, None, None]) / (self.high - self.low)[:, None, None] - 1

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        z = (latent + 1) / 2 * (self.high - self.low)[:, None, None] + self.low[:, None, None]
        return self.autoencoder.decode(z).clamp(-1, 1)


@dataclass
class DiTConfig:
    patch: int = 8
    hidden: int = 192
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class FrameLatentConfig:
    """What the DiT denoises frames in: raw pixels, or the latent of a small convolutional autoencoder trained on the
    dataset's frames first (by reconstruction, `steps` steps) and then frozen, as the paper's SD-VAE is."""

    kind: str = "autoencoder"  # pixels | autoencoder
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])  # one stride-2 stage each
    latent_channels: int = 8
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3


@dataclass
class ControllerConfig:
    """How the predicted targets become env actions: a position action moves the effector this far per unit
    (metaworld: 0.01 m, its mocap's action scale), and `gain` scales the commanded velocity."""

    units_per_action: float = 0.01
    gain: float = 1.0
    action_limit: float = 1.0  # env actions are clipped to [-limit, limit]


@dataclass
class PADConfig:
    frames: int = 3  # future frames (and pose targets) predicted
    skip: int = 4  # env steps between them
    n_action_steps: int = 4  # env steps executed before the next decision
    image_shape: list[int] = field(default_factory=lambda: [64, 64])
    predict_images: bool = True  # false: "PAD w/o img", the same network trained on the pose loss only
    image_loss_weight: float = 1.0
    action_loss_weight: float = 1.0
    action_loss_start: int = 0  # training steps before the pose loss is switched on
    # Filled from the data at training time.
    tasks: list[str] = field(default_factory=list)  # the task index's names
    pose_dim: int = 0  # the observed pose (metaworld: hand xyz and gripper opening)
    action_dim: int = 0
    position_dims: list[int] = field(default_factory=lambda: [0, 1, 2])  # the pose's effector position
    position_action_dims: list[int] = field(default_factory=lambda: [0, 1, 2])  # the action dims that move it
    gripper_action_dim: int | None = 3  # the action's gripper command, also predicted; None: no gripper
    discrete_action_scale: float = 1.0  # RTI reads it; PAD's gripper target is continuous
    latent: FrameLatentConfig = field(default_factory=FrameLatentConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # 100 steps, squaredcos_cap_v2
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    @property
    def target_dim(self) -> int:
        return len(self.position_dims) + (self.gripper_action_dim is not None)


@dataclass
class PADDataConfig:
    task: str | None = None  # the first task; `tasks` in the policy config lists them all
    image_key: str = "image"
    pose_key: str = "pose"
    task_key: str = "task"
    action_key: str = "action"


@dataclass
class PADRunConfig:
    kind: str = KIND
    policy: PADConfig = field(default_factory=PADConfig)
    data: PADDataConfig = field(default_factory=PADDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=6000, batch_size=64, lr=3e-4,
                                                                   warmup_steps=200, weight_decay=0.0))


def _check_config(cfg: PADConfig) -> None:
    for name in ("frames", "skip", "n_action_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"policy.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.n_action_steps > cfg.frames * cfg.skip:
        raise ValueError(f"policy.n_action_steps {cfg.n_action_steps} exceeds the {cfg.frames * cfg.skip} env steps "
                         f"the predicted targets cover")
    if len(cfg.image_shape) != 2 or cfg.image_shape[0] != cfg.image_shape[1]:
        raise ValueError(f"policy.image_shape must be square [H, W], got {cfg.image_shape}")
    if not cfg.tasks or cfg.pose_dim < 1 or cfg.action_dim < 1:
        raise ValueError("policy.tasks, pose_dim and action_dim are filled from the data; this config has "
                         f"tasks={cfg.tasks}, pose_dim={cfg.pose_dim}, action_dim={cfg.action_dim}")
    if len(cfg.position_dims) != len(cfg.position_action_dims):
        raise ValueError(f"policy.position_dims {cfg.position_dims} and position_action_dims "
                         f"{cfg.position_action_dims} must pair up")
    if any(not 0 <= d < cfg.pose_dim for d in cfg.position_dims):
        raise ValueError(f"policy.position_dims {cfg.position_dims} are outside the {cfg.pose_dim}-d pose")
    used = [*cfg.position_action_dims, *([cfg.gripper_action_dim] if cfg.gripper_action_dim is not None else [])]
    if any(not 0 <= d < cfg.action_dim for d in used) or len(set(used)) != len(used):
        raise ValueError(f"policy.position_action_dims and gripper_action_dim {used} must be distinct dims of the "
                         f"{cfg.action_dim}-d action")
    if cfg.latent.kind not in LATENTS:
        raise ValueError(f"policy.latent.kind must be one of {LATENTS}, got {cfg.latent.kind!r}")
    if cfg.latent.kind == "autoencoder" and cfg.image_shape[0] % 2 ** len(cfg.latent.channels):
        raise ValueError(f"a {len(cfg.latent.channels)}-stage frame autoencoder needs an image size divisible by "
                         f"{2 ** len(cfg.latent.channels)}, got {cfg.image_shape}")
    if cfg.action_loss_weight <= 0:
        raise ValueError(f"policy.action_loss_weight must be > 0, got {cfg.action_loss_weight}")


def track_targets(position: torch.Tensor, targets: torch.Tensor, cfg: PADConfig) -> torch.Tensor:
    """The controller: current effector position (B, n_pos) and raw targets (B, frames, target_dim) -> env
    actions (B, frames * skip, action_dim). Each target is reached from the previous one (the first from the
    current position) at constant velocity over `skip` steps; the gripper holds each target's command."""
    c, n = cfg.controller, len(cfg.position_dims)
    waypoints = torch.cat([position[:, None], targets[..., :n]], dim=1)
    velocity = (waypoints[:, 1:] - waypoints[:, :-1]) * (c.gain / (cfg.skip * c.units_per_action))
    actions = torch.zeros(*targets.shape[:2], cfg.action_dim, dtype=targets.dtype)
    actions[..., cfg.position_action_dims] = velocity
    if cfg.gripper_action_dim is not None:
        actions[..., cfg.gripper_action_dim] = targets[..., n]
    return actions.clamp(-c.action_limit, c.action_limit).repeat_interleave(cfg.skip, dim=1)


class PAD(nn.Module, DenoisingPolicy):
    kind = KIND

    def __init__(self, cfg: PADConfig, normalizer: Normalizer):
        super().__init__()
        _check_config(cfg)
        self.cfg, self.normalizer = cfg, normalizer
        size = cfg.image_shape[0]
        self.frame_codec = LatentFrames(cfg.latent, size) if cfg.latent.kind == "autoencoder" else PixelFrames(size)
        self.frame_codec.requires_grad_(False)  # trained before the DiT (train_frame_autoencoder), then frozen
        self.frame_shape = self.frame_codec.shape
        channels, side, _ = self.frame_shape
        self.frame_size = channels * side * side
        d = cfg.dit
        self.denoiser = DiT(side, channels, cfg.frames, d.patch, cfg.target_dim, cfg.pose_dim, len(cfg.tasks),
                            d.hidden, d.depth, d.heads, d.mlp_ratio)
        # "w/o img": the future-frame part of the state is held at zero in and out of the network
        self.register_buffer("frame_gate", torch.tensor(1.0 if cfg.predict_images else 0.0), persistent=False)
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))  # for action_loss_start on resume
        s = cfg.schedule
        self.schedule = NoiseSchedule(s.num_train_timesteps, s.beta_schedule, s.prediction_type,
                                      clip_sample=s.clip_sample)
        self._decision_pose: torch.Tensor | None = None
        # Decode the predicted frames into chunk.extras["frames"] at each decision, for a viewer. Acting needs only
        # the poses, and on a CPU the decode of three frames costs 4-5 ms a decision, so the runtime turns it off
        # unless something shows them (deploy.runtime.RuntimeSettings.predicted_frames); a build-time setting like
        # the sampler's, not a training config.
        self.decode_frames = True
        self.configure_inference()

    def inference_config(self) -> dict:
        inf = self.cfg.inference
        return {"sampler": self.method, "steps": len(self.timesteps), "spacing": inf.spacing, "eta": inf.eta,
                "denoiser": "dit", "predict_images": self.cfg.predict_images,
                "decode_frames": self.cfg.predict_images and self.decode_frames}

    @property
    def model(self) -> PAD:
        return self

    @property
    def spec(self) -> PolicySpec:
        cfg = self.cfg
        fields = (ObservationField("image", (1, *cfg.image_shape, CHANNELS), "uint8"),
                  ObservationField("pose", (1, cfg.pose_dim), "float32"),
                  ObservationField("task", (1,), "int64"))
        return PolicySpec(KIND, fields, 1, cfg.action_dim, cfg.frames * cfg.skip, 0, cfg.n_action_steps, ())

    # -- outside the graph: validation and normalisation --

    def normalize_obs(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw observations -> normalised ones; the raw pose is kept for the controller of this decision."""
        cfg = self.cfg
        out, batch = {}, None
        for f in self.spec.observations:
            if f.name not in obs:
                raise KeyError(f"observation is missing {f.name!r}; a PAD policy observes "
                               f"{[g.name for g in self.spec.observations]}")
            x = torch.as_tensor(obs[f.name])
            if x.dim() != len(f.shape) + 1 or tuple(x.shape[1:]) != f.shape:
                raise ValueError(f"observation {f.name!r} must have shape (B, {', '.join(map(str, f.shape))}), "
                                 f"got {tuple(x.shape)}")
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"observation {f.name!r} has batch {x.shape[0]}, other fields have {batch}")
            batch = x.shape[0]
            out[f.name] = x
        image, pose, task = out["image"], out["pose"], out["task"]
        if image.dtype != torch.uint8:
            raise TypeError(f"observation 'image' must be uint8 (H, W, 3) frames as cameras give them, got "
                            f"{image.dtype}; a float frame in [0, 1] would be read as almost black")
        if task.dtype.is_floating_point or task.dtype == torch.bool:
            raise TypeError(f"observation 'task' must be an integer task index, got {task.dtype}")
        if bool(((task < 0) | (task >= len(cfg.tasks))).any()):
            bad = sorted({int(v) for v in task.flatten() if not 0 <= int(v) < len(cfg.tasks)})
            raise ValueError(f"task index {bad} is not one this checkpoint knows: it was trained on "
                             f"{', '.join(f'{i}: {n}' for i, n in enumerate(cfg.tasks))}")
        pose = pose.float()
        if not bool(torch.isfinite(pose).all()):
            raise ValueError("observation 'pose' holds NaN or Inf")
        self._decision_pose = pose[:, -1]
        return {"image": self.normalizer["image"].normalize(image[:, -1].float()).permute(0, 3, 1, 2),
                "pose": self.normalizer["pose"].normalize(pose[:, -1]), "task": task[:, -1].long()}

    def encode_obs(self, nobs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised observations -> the condition (B, C*H*W + pose_dim + hidden): current frame, current pose,
        task embedding, computed once per decision."""
        task_vector = self.denoiser.task_embed(nobs["task"].long())
        return torch.cat([self.frame_codec.encode(nobs["image"]).flatten(1), nobs["pose"], task_vector], dim=1)

    def condition(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode_obs(self.normalize_obs(obs))

    # -- the graph: one joint denoiser call --

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, branch=None) -> torch.Tensor:
        """x (B, frames, target_dim + C*H*W) noisy, t (B,), cond from `encode_obs` -> the noise of both parts."""
        cfg, B, (channels, side, _) = self.cfg, x.shape[0], self.frame_shape
        n_t, n_f = cfg.target_dim, self.frame_size
        frames = (x[..., n_t:] * self.frame_gate).reshape(B, cfg.frames * channels, side, side)
        current = cond[:, :n_f].reshape(B, channels, side, side)
        pose = cond[:, n_f : n_f + cfg.pose_dim]
        task_vector = cond[:, n_f + cfg.pose_dim :]
        kwargs = {} if branch is None else {"branch": branch}
        frame_eps, pose_eps = self.denoiser(frames, x[..., :n_t].flatten(1), t, current, pose, task_vector, **kwargs)
        frame_eps = frame_eps.reshape(B, cfg.frames, n_f) * self.frame_gate
        return torch.cat([pose_eps.reshape(B, cfg.frames, n_t), frame_eps], dim=-1)

    def chunk_shape(self, batch: int) -> tuple[int, int, int]:
        return (batch, self.cfg.frames, self.cfg.target_dim + self.frame_size)

    def shift_chunk(self, x0: torch.Tensor, executed: int) -> torch.Tensor:
        """RTI's warm start: the previous state advanced by the whole rows (`skip` env steps each) executed since,
        its last row repeated."""
        rows = min(round(executed / self.cfg.skip), x0.shape[1])
        if rows == 0:
            return x0.clone()
        return torch.cat([x0[:, rows:], x0[:, -1:].expand(-1, rows, -1)], dim=1)

    # -- training --

    def joint_state(self, future_images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Raw future frames (B, frames, H, W, 3) uint8 and targets (B, frames, target_dim) -> normalised x0."""
        B, n = future_images.shape[:2]
        pixels = self.normalizer["image"].normalize(future_images.float()).permute(0, 1, 4, 2, 3)
        with torch.no_grad():
            frames = self.frame_codec.encode(pixels.flatten(0, 1)).reshape(B, n, -1) * self.frame_gate
        return torch.cat([self.normalizer["target"].normalize(targets.float()), frames], dim=-1)

    def compute_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.cfg
        cond = self.condition({"image": batch["image"][:, None], "pose": batch["pose"][:, None],
                               "task": batch["task"][:, None]})
        x0 = self.joint_state(batch["future_images"], batch["targets"])
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        t = torch.randint(0, self.schedule.num_train_timesteps, (x0.shape[0],), generator=generator)
        pred = self.denoise(self.schedule.add_noise(x0, noise, t), t, cond)
        target = self.schedule.training_target(x0, noise, t)
        n_t = cfg.target_dim
        pose_loss = F.mse_loss(pred[..., :n_t], target[..., :n_t])
        loss = cfg.image_loss_weight * self.frame_gate * F.mse_loss(pred[..., n_t:], target[..., n_t:] *
                                                                    self.frame_gate)
        if self.training:
            self.train_step += 1
        if int(self.train_step) > cfg.action_loss_start or not self.training:
            loss = loss + cfg.action_loss_weight * pose_loss
        return loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.compute_loss(batch)

    # -- deciding --

    def predicted_frames(self, x0: torch.Tensor) -> torch.Tensor:
        """Normalised state -> the predicted frames (B, frames, H, W, 3) uint8."""
        B, n = x0.shape[:2]
        pixels = self.frame_codec.decode(x0[..., self.cfg.target_dim :].reshape(B * n, *self.frame_shape))
        frames = pixels.reshape(B, n, *pixels.shape[1:]).permute(0, 1, 3, 4, 2)
        return self.normalizer["image"].unnormalize(frames).round().clamp(0, 255).to(torch.uint8)

    def to_chunk(self, denoised: Denoised, kind: str = "full", extras: dict | None = None) -> Chunk:
        if self._decision_pose is None or self._decision_pose.shape[0] != denoised.x0.shape[0]:
            raise RuntimeError("PAD turns targets into actions from the pose of the decision's observation: "
                               "condition on an observation first")
        targets = self.normalizer["target"].unnormalize(denoised.x0[..., : self.cfg.target_dim])
        position = self._decision_pose[:, self.cfg.position_dims]
        actions = track_targets(position, targets, self.cfg)
        extras = {**(extras or {}), "targets": targets}
        if self.cfg.predict_images and self.decode_frames:
            extras["frames"] = self.predicted_frames(denoised.x0)
        return Chunk(actions[:, : self.cfg.n_action_steps], actions, actions, denoised.nfe, kind,
                     denoised.block_evals, extras)

    def export_graphs(self, batch: int = 2, generator: torch.Generator | None = None) -> dict[str, GraphSpec]:
        cfg = self.cfg
        size = cfg.image_shape[0]
        obs = {"image": torch.rand(batch, CHANNELS, size, size, generator=generator) * 2 - 1,
               "pose": torch.randn(batch, cfg.pose_dim, generator=generator),
               "task": torch.randint(0, len(cfg.tasks), (batch,), generator=generator)}
        keys = list(obs)
        cond = self.encode_obs(obs)
        x = torch.randn(*self.chunk_shape(batch), generator=generator)
        t = torch.tensor([10] * batch)
        return {"encoder": GraphSpec(lambda *f: self.encode_obs(dict(zip(keys, f, strict=True))), obs, ("cond",)),
                "denoiser": GraphSpec(self.denoise, {"x": x, "t": t, "cond": cond}, ("pred",))}

    def reset(self) -> None:
        self._decision_pose = None


def pad_normalizer(poses: np.ndarray, targets: np.ndarray, action_dim: int, action_limit: float) -> Normalizer:
    """Min-max for the observed pose and the targets, [0, 255] -> [-1, 1] for frames; the action field is the
    identity and records the controller's bounds, which the runtime's guard checks every chunk against."""
    bounds = FieldNormalizer("identity", np.ones(action_dim), np.zeros(action_dim),
                             {"min": [-action_limit] * action_dim, "max": [action_limit] * action_dim})
    return Normalizer({"pose": FieldNormalizer.fit_minmax(poses), "target": FieldNormalizer.fit_minmax(targets),
                       "image": FieldNormalizer.image(), "action": bounds})


def build_for_training(run_cfg: PADRunConfig, data) -> PAD:
    """A new PAD for `data` (envs.datasets.future_frames): its dimensions and tasks filled from the data."""
    p = run_cfg.policy
    for name, value in (("pose_dim", data.pose_dim), ("action_dim", data.action_dim)):
        if getattr(p, name) not in (0, value):
            raise ValueError(f"policy.{name}={getattr(p, name)} in the config, but the dataset has {value}")
        setattr(p, name, value)
    if list(p.image_shape) != list(data.image_shape):
        raise ValueError(f"policy.image_shape={p.image_shape} in the config, but the dataset's frames are "
                         f"{data.image_shape}: collect at that size or set policy.image_shape")
    if len(p.tasks) < data.n_tasks:
        raise ValueError(f"the dataset holds {data.n_tasks} tasks but policy.tasks names {p.tasks}")
    model = PAD(p, pad_normalizer(data.all_poses(), data.all_targets(), p.action_dim, p.controller.action_limit))
    if isinstance(model.frame_codec, LatentFrames):
        train_frame_autoencoder(model.frame_codec, data.images, p.latent, model.normalizer["image"])
    return model


def train_frame_autoencoder(codec: LatentFrames, images: np.ndarray, cfg: FrameLatentConfig, pixels,
                            progress: bool = True) -> list[float]:
    """Fit the autoencoder to reconstruct `images` (N, H, W, 3) uint8 (AdamW, MSE), freeze it, and set each latent
    channel's range from the encoded frames. Returns the loss every 100 steps."""
    from tqdm import tqdm

    ae = codec.autoencoder.train().requires_grad_(True)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(0)
    losses, running = [], []
    for step in tqdm(range(cfg.steps), desc="frame autoencoder", disable=not progress, dynamic_ncols=True):
        batch = torch.from_numpy(images[rng.integers(0, len(images), cfg.batch_size)])
        x = pixels.normalize(batch.float()).permute(0, 3, 1, 2)
        for g in opt.param_groups:  # cosine decay: the last steps settle the reconstruction
            g["lr"] = cfg.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        loss = F.mse_loss(ae(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            losses.append(float(np.mean(running)))
            running.clear()
    ae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([ae.encode(pixels.normalize(torch.from_numpy(images[i : i + 256]).float()).permute(0, 3, 1, 2))
                       for i in range(0, len(images), 256)])
    codec.low.copy_(z.amin(dim=(0, 2, 3)))
    codec.high.copy_(z.amax(dim=(0, 2, 3)))
    return losses


def read_config(directory) -> PADRunConfig:
    return load_run_config(directory, PADRunConfig)


def load_pad(directory) -> tuple[PAD, PADRunConfig]:
    run_cfg, normalizer = open_checkpoint(directory, PADRunConfig)
    model = PAD(run_cfg.policy, normalizer)
    load_weights(model, Path(directory) / WEIGHTS)
    return model.eval(), run_cfg
