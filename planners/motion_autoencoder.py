"""AAMDM's embedding: an autoencoder from a pose y to a latent z, decoded from [x; z] where x are the frame's 12
hand features (the root's path and facing ahead). AAMDM generates xz = [x; z] frame after frame; the decoder turns
them back into poses.

    ae = MotionAutoencoder(cfg, normalizer)
    xz = ae.embed(pose, control)      # raw pose (N, P) and control features (N, 12) -> (N, 12 + latent_dim)
    pose = ae.decode(xz)              # -> raw pose (N, P)

The pose layout is envs/motion.pose_features': root height, planar velocity (2), yaw rate, J 6-D local rotations,
J positions, J velocities, J the skeleton's joints. The loss (AAMDM's L_val plus its regularisers): the decoded
pose against the pose (normalised), forward kinematics of the decoded rotations against that of the true ones
(metres), the velocity of those joint positions over consecutive frames, and |z|^2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from policy.checkpoint import load_planner_checkpoint, load_run_config
from policy.config import TrainConfig
from policy.normalizer import FieldNormalizer, Normalizer

KIND = "motion_autoencoder"


@dataclass
class MotionAutoencoderConfig:
    pose_dim: int = 0  # filled from the dataset
    control_dim: int = 0
    latent_dim: int = 52
    hidden: int = 512
    layers: int = 3
    # the skeleton the poses belong to (names, parents, offsets, forward), from the dataset's attributes
    skeleton: dict = field(default_factory=dict)
    fps: float = 30.0
    value_weight: float = 1.0
    fk_weight: float = 10.0
    velocity_weight: float = 0.1  # on joint speeds in m/s
    latent_weight: float = 1e-3


@dataclass
class MotionAEDataConfig:
    task: str | None = None
    pose_key: str = "pose"
    control_key: str = "control"


@dataclass
class MotionAutoencoderRunConfig:
    kind: str = KIND
    planner: MotionAutoencoderConfig = field(default_factory=MotionAutoencoderConfig)
    data: MotionAEDataConfig = field(default_factory=MotionAEDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, batch_size=256, lr=1e-3,
                                                                   warmup_steps=100, ema=False))


def mlp(d_in: int, hidden: int, layers: int, d_out: int) -> nn.Sequential:
    dims = [d_in] + [hidden] * layers
    body = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        body += [nn.Linear(a, b), nn.ELU()]
    return nn.Sequential(*body, nn.Linear(hidden, d_out))


def rotation_from_6d(six: torch.Tensor) -> torch.Tensor:
    """(..., 6) -> (..., 3, 3): Gram-Schmidt on the two stored columns (row-major [m00 m01 m10 m11 m20 m21])."""
    m = six.reshape(*six.shape[:-1], 3, 2)
    b1 = F.normalize(m[..., 0], dim=-1)
    b2 = F.normalize(m[..., 1] - (b1 * m[..., 1]).sum(-1, keepdim=True) * b1, dim=-1)
    return torch.stack([b1, b2, torch.linalg.cross(b1, b2)], dim=-1)


class MotionAutoencoder(nn.Module):
    kind = KIND

    def __init__(self, cfg: MotionAutoencoderConfig, normalizer: Normalizer):
        super().__init__()
        sk = cfg.skeleton
        if cfg.pose_dim <= 0 or cfg.control_dim <= 0 or not sk:
            raise ValueError("planner.pose_dim, control_dim and skeleton are filled from the motion dataset")
        self.joints = len(sk["names"])
        if cfg.pose_dim != 4 + 12 * self.joints:
            raise ValueError(f"a pose of a {self.joints}-joint skeleton has {4 + 12 * self.joints} features, the "
                             f"config says {cfg.pose_dim}")
        self.cfg, self.normalizer = cfg, normalizer
        self.encoder = mlp(cfg.pose_dim, cfg.hidden, cfg.layers, cfg.latent_dim)
        self.decoder = mlp(cfg.control_dim + cfg.latent_dim, cfg.hidden, cfg.layers, cfg.pose_dim)
        self.register_buffer("offsets", torch.tensor(sk["offsets"], dtype=torch.float32), persistent=False)
        self.parents = list(sk["parents"])

    @property
    def embedding_dim(self) -> int:
        return self.cfg.control_dim + self.cfg.latent_dim

    def check_skeleton(self, skeleton: dict) -> None:
        """Refuse poses of another skeleton, naming what differs."""
        mine = self.cfg.skeleton
        if list(skeleton.get("names", [])) != list(mine["names"]):
            raise ValueError(f"this checkpoint knows the skeleton {mine['names']}; the data's is "
                             f"{skeleton.get('names')}")
        diff = (torch.tensor(skeleton["offsets"]) - torch.tensor(mine["offsets"])).abs().max()
        if float(diff) > 1e-4:
            raise ValueError(f"the data's skeleton has the joints of this checkpoint's but other bone offsets (up to "
                             f"{float(diff):.4f} m apart)")

    # -- the map and its inverse, raw units --

    def embed(self, pose: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        z = self.encoder(self.normalizer["pose"].normalize(pose))
        return torch.cat([control, z], dim=-1)

    def decode(self, xz: torch.Tensor) -> torch.Tensor:
        x = self.normalizer["control"].normalize(xz[..., :self.cfg.control_dim])
        return self.normalizer["pose"].unnormalize(self.decoder(torch.cat([x, xz[..., self.cfg.control_dim:]], -1)))

    def joint_positions(self, pose: torch.Tensor) -> torch.Tensor:
        """Forward kinematics of a raw pose's rotations (..., P) -> (..., J, 3), from the root's ground point in the
        heading frame (the frame the pose's own positions are in)."""
        j = self.joints
        rot = rotation_from_6d(pose[..., 4:4 + 6 * j].reshape(*pose.shape[:-1], j, 6))
        zero = torch.zeros_like(pose[..., :1])
        world_r, world_p = [rot[..., 0, :, :]], [torch.cat([zero, pose[..., :1], zero], dim=-1)]
        for k in range(1, j):
            p = self.parents[k]
            world_r.append(world_r[p] @ rot[..., k, :, :])
            world_p.append(world_p[p] + (world_r[p] @ self.offsets[k]))
        return torch.stack(world_p, dim=-2)

    # -- training --

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`batch`: windows of consecutive frames, `pose` (B, W, P) and `control` (B, W, C), raw."""
        cfg = self.cfg
        pose, control = batch["pose"].float(), batch["control"].float()
        z = self.encoder(self.normalizer["pose"].normalize(pose))
        decoded_n = self.decoder(torch.cat([self.normalizer["control"].normalize(control), z], dim=-1))
        loss = cfg.value_weight * F.mse_loss(decoded_n, self.normalizer["pose"].normalize(pose))
        fk, fk_true = self.joint_positions(self.normalizer["pose"].unnormalize(decoded_n)), self.joint_positions(pose)
        loss = loss + cfg.fk_weight * F.mse_loss(fk, fk_true)
        if pose.shape[1] > 1:
            vel, vel_true = (fk[:, 1:] - fk[:, :-1]) * cfg.fps, (fk_true[:, 1:] - fk_true[:, :-1]) * cfg.fps
            loss = loss + cfg.velocity_weight * F.mse_loss(vel, vel_true)
        return loss + cfg.latent_weight * z.pow(2).mean()


@torch.no_grad()
def embed_frames(ae: MotionAutoencoder, pose: np.ndarray, control: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Raw pose (N, P) and control features (N, C) -> the embedding [x; z] (N, C + latent_dim)."""
    out = [ae.embed(torch.from_numpy(pose[i:i + batch]).float(), torch.from_numpy(control[i:i + batch]).float())
           for i in range(0, len(pose), batch)]
    return torch.cat(out).numpy()


@torch.no_grad()
def decode_frames(ae: MotionAutoencoder, xz: np.ndarray) -> np.ndarray:
    return ae.decode(torch.from_numpy(np.asarray(xz)).float()).numpy()


def build_for_training(run_cfg: MotionAutoencoderRunConfig, data) -> MotionAutoencoder:
    cfg = run_cfg.planner
    pose, control = data.extras[run_cfg.data.pose_key], data.extras[run_cfg.data.control_key]
    cfg.pose_dim, cfg.control_dim = int(pose.shape[1]), int(control.shape[1])
    cfg.skeleton = dict(data.attrs["skeleton"])
    cfg.fps = float(data.attrs.get("fps", cfg.fps))
    return MotionAutoencoder(cfg, Normalizer({"pose": FieldNormalizer.fit_standard(pose),
                                              "control": FieldNormalizer.fit_standard(control)}))


def read_config(directory) -> MotionAutoencoderRunConfig:
    return load_run_config(directory, MotionAutoencoderRunConfig)


def load_autoencoder(directory, planner_class: type = MotionAutoencoder):
    return load_planner_checkpoint(directory, MotionAutoencoderRunConfig, planner_class)
