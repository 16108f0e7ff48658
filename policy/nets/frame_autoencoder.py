"""A small convolutional autoencoder from RGB frames to a spatial latent, the CPU-sized stand-in for the SD-VAE that
PAD denoises in: 64x64x3 frames become 4x8x8 latents (three stride-2 stages), so the DiT sees few tokens whose
patches are narrower than its width. Trained first, by reconstruction, then frozen.

    ae = FrameAutoencoder(channels=[32, 64, 128], latent_channels=4)
    z = ae.encode(frames)        # (B, 3, H, W) in [-1, 1] -> (B, latent_channels, H / 8, W / 8)
    frames = ae.decode(z)        # and back
"""

from __future__ import annotations

import torch
from torch import nn


def _stage(c_in: int, c_out: int, down: bool) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, 4, stride=2, padding=1) if down else nn.ConvTranspose2d(c_in, c_out, 4, stride=2,
                                                                                         padding=1)
    return nn.Sequential(conv, nn.GroupNorm(min(8, c_out), c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU())


class FrameAutoencoder(nn.Module):
    def __init__(self, channels: list[int], latent_channels: int = 4):
        super().__init__()
        if not channels:
            raise ValueError("a frame autoencoder needs at least one stage")
        widths = [3, *channels]
        self.encoder = nn.Sequential(*[_stage(a, b, True) for a, b in zip(widths[:-1], widths[1:], strict=True)],
                                     nn.Conv2d(channels[-1], latent_channels, 1))
        back = list(reversed(channels))  # each up stage mirrors a down stage; the last keeps the first width
        ups = zip(back, [*back[1:], channels[0]], strict=True)
        self.decoder = nn.Sequential(nn.Conv2d(latent_channels, channels[-1], 1),
                                     *[_stage(a, b, False) for a, b in ups],
                                     nn.Conv2d(channels[0], 3, 3, padding=1))
        self.factor = 2 ** len(channels)
        self.latent_channels = latent_channels

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.encoder(frames)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(frames))
