"""Chi et al.'s ConditionalUnet1D: a 1-D temporal U-Net over the action chunk with FiLM global conditioning.

Input (B, T, action_dim) noisy actions, a timestep per batch element and a global condition vector (the
flattened observation features); output (B, T, action_dim). T must be divisible by 2 ** (len(down_dims) - 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"sinusoidal embedding size must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Conv1dBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int):
        super().__init__(
            nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_ch),
            nn.Mish(),
        )


class ConditionalResidualBlock1D(nn.Module):
    """Two conv blocks with FiLM (per-channel scale and bias from the condition) between them."""

    def __init__(self, in_ch, out_ch, cond_dim, kernel_size, n_groups, cond_predict_scale):
        super().__init__()
        self.blocks = nn.ModuleList(
            [Conv1dBlock(in_ch, out_ch, kernel_size, n_groups), Conv1dBlock(out_ch, out_ch, kernel_size, n_groups)]
        )
        self.out_ch = out_ch
        self.cond_predict_scale = cond_predict_scale
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, out_ch * 2 if cond_predict_scale else out_ch))
        self.residual_conv = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.blocks[0](x)
        embed = self.cond_encoder(cond).unsqueeze(-1)
        if self.cond_predict_scale:
            scale, bias = embed[:, : self.out_ch], embed[:, self.out_ch :]
            out = scale * out + bias
        else:
            out = out + embed
        return self.blocks[1](out) + self.residual_conv(x)


class ConditionalUnet1D(nn.Module):
    def __init__(
        self,
        action_dim: int,
        global_cond_dim: int,
        diffusion_step_embed_dim: int = 256,
        down_dims: Sequence[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        cond_predict_scale: bool = True,
    ):
        super().__init__()
        down_dims = list(down_dims)
        for d in down_dims:
            if d % n_groups:
                raise ValueError(f"every down_dims entry must be divisible by n_groups={n_groups}, got {down_dims}")
        self.downsample_factor = 2 ** (len(down_dims) - 1)
        dsed = diffusion_step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, dsed * 4), nn.Mish(), nn.Linear(dsed * 4, dsed)
        )
        cond_dim = dsed + global_cond_dim
        block = dict(cond_dim=cond_dim, kernel_size=kernel_size, n_groups=n_groups,
                     cond_predict_scale=cond_predict_scale)

        dims = [action_dim] + down_dims
        in_out = list(zip(dims[:-1], dims[1:], strict=True))
        self.down_modules = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.down_modules.append(nn.ModuleList([
                ConditionalResidualBlock1D(d_in, d_out, **block),
                ConditionalResidualBlock1D(d_out, d_out, **block),
                nn.Conv1d(d_out, d_out, 3, 2, 1) if not last else nn.Identity(),
            ]))
        mid = down_dims[-1]
        self.mid_modules = nn.ModuleList(
            [ConditionalResidualBlock1D(mid, mid, **block), ConditionalResidualBlock1D(mid, mid, **block)]
        )
        self.up_modules = nn.ModuleList()
        # As in Chi et al.'s code, every up level upsamples and the finest skip is never read back.
        for d_in, d_out in reversed(in_out[1:]):
            self.up_modules.append(nn.ModuleList([
                ConditionalResidualBlock1D(d_out * 2, d_in, **block),
                ConditionalResidualBlock1D(d_in, d_in, **block),
                nn.ConvTranspose1d(d_in, d_in, 4, 2, 1),
            ]))
        self.final_conv = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups), nn.Conv1d(down_dims[0], action_dim, 1)
        )

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        if sample.shape[1] % self.downsample_factor:
            raise ValueError(
                f"ConditionalUnet1D needs a horizon divisible by {self.downsample_factor}, got {sample.shape[1]}"
            )
        x = sample.transpose(1, 2)
        cond = torch.cat([self.diffusion_step_encoder(timestep), global_cond], dim=-1)
        skips = []
        for res1, res2, down in self.down_modules:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = down(x)
        for res in self.mid_modules:
            x = res(x, cond)
        for res1, res2, up in self.up_modules:
            x = torch.cat([x, skips.pop()], dim=1)
            x = up(res2(res1(x, cond), cond))
        return self.final_conv(x).transpose(1, 2)
