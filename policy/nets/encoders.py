"""Observation encoders: per time step, normalised observations in, one feature vector out.

Every encoder maps (B, To, ...) to (B, To, feature_dim). The U-Net flattens that into its global condition;
the transformer reads it as To condition tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class LowDimEncoder(nn.Module):
    """Identity (hidden_dims empty) or an MLP over a state vector."""

    def __init__(self, obs_dim: int, hidden_dims: Sequence[int] = ()):
        super().__init__()
        layers: list[nn.Module] = []
        d = obs_dim
        for h in hidden_dims:
            layers += [nn.Linear(d, h), nn.Mish()]
            d = h
        self.net = nn.Sequential(*layers) if layers else nn.Identity()
        self.feature_dim = d

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class SpatialSoftmax(nn.Module):
    """Expected 2-D image coordinates of each feature map's softmax: num_kp keypoints -> (num_kp * 2) features."""

    def __init__(self, in_channels: int, num_kp: int):
        super().__init__()
        self.keypoints = nn.Conv2d(in_channels, num_kp, 1)
        self.num_kp = num_kp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.keypoints(x)
        b, k, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
        attn = torch.softmax(x.reshape(b, k, h * w), dim=-1).reshape(b, k, h, w)
        ex = (attn.sum(dim=2) * xs).sum(dim=-1)
        ey = (attn.sum(dim=3) * ys).sum(dim=-1)
        return torch.stack([ex, ey], dim=-1).reshape(b, k * 2)


def _conv_gn(in_ch: int, out_ch: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.GroupNorm(groups, out_ch), nn.ReLU())


class ResidualConvBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.GroupNorm(groups, ch), nn.ReLU(),
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.GroupNorm(groups, ch),
        )

    def forward(self, x):
        return torch.relu(x + self.body(x))


class ImageEncoder(nn.Module):
    """A compact ResNet-style encoder for 84-96 px RGB frames: GroupNorm (not BatchNorm, which EMA and small
    batches handle badly, as Chi et al. found) and a spatial-softmax keypoint head, written in torch alone.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128), num_kp: int = 32, feature_dim: int = 64,
                 groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [_conv_gn(c_in, c, 2, groups), ResidualConvBlock(c, groups)]
            c_in = c
        self.backbone = nn.Sequential(*layers)
        self.pool = SpatialSoftmax(c_in, num_kp)
        self.proj = nn.Sequential(nn.Linear(num_kp * 2, feature_dim), nn.ReLU())
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, To, 3, H, W), normalised to [-1, 1] -> (B, To, feature_dim)."""
        b, to = images.shape[:2]
        feats = self.proj(self.pool(self.backbone(images.flatten(0, 1))))
        return feats.reshape(b, to, -1)


class ObservationEncoder(nn.Module):
    """Concatenates the features of a state encoder and, when present, an image encoder."""

    def __init__(self, state: LowDimEncoder, image: ImageEncoder | None = None):
        super().__init__()
        self.state = state
        self.image = image
        self.feature_dim = state.feature_dim + (image.feature_dim if image is not None else 0)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = [self.state(obs["state"])]
        if self.image is not None:
            feats.append(self.image(obs["image"]))
        return torch.cat(feats, dim=-1)
