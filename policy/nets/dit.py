"""A DiT (Peebles & Xie) with adaLN-Zero blocks, as PAD (Guo et al., NeurIPS 2024) uses it: one network that
denoises future frames and future poses together.

Tokens: the noisy future frames, concatenated channel-wise with the clean current frame and cut into patches
(`(image / patch)^2` tokens, fixed 2-D sin-cos positions), and one action token from the noisy future poses
concatenated with the current pose. The condition c = timestep embedding + task embedding drives every block's
modulation (shift, scale, gate for attention and MLP; the gates start at zero). Image tokens may not attend to the
action token; the action token attends to everything, so the frames never depend on the noisy poses but the poses
read the predicted scene.

`residual_branches()` names each block's attention and MLP `layers.{i}.self_attn` / `layers.{i}.feed_forward`
(the modules whose output, before the gate, a block cache reuses), and `forward(..., branch=fn)` lets a cache
decide, per branch, whether to compute it: `fn(name, compute) -> output`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .transformer import compute_branch
from .unet1d import SinusoidalPosEmb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """(grid * grid, dim) fixed 2-D sin-cos position embedding, rows then columns, as in MAE and DiT."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def embed(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed(rows), embed(cols)], axis=1).astype(np.float32)


class Attention(nn.Module):
    """Multi-head self-attention over the normalised, modulated tokens, with a boolean mask (True: may attend)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, allowed: torch.Tensor):
        B, N, D = x.shape
        q, k, v = self.qkv(modulate(self.norm(x), shift, scale)).reshape(B, N, 3, self.heads, D // self.heads
                                                                          ).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(D // self.heads)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(B, N, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.net(modulate(self.norm(x), shift, scale))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.feed_forward = FeedForward(dim, mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, allowed, name: str, branch=compute_branch):
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * branch(f"{name}.self_attn", lambda: self.self_attn(x, shift_a, scale_a,
                                                                                         allowed))
        return x + gate_f.unsqueeze(1) * branch(f"{name}.feed_forward", lambda: self.feed_forward(x, shift_f,
                                                                                                  scale_f))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, image_size: int, channels: int, frames: int, patch: int, pose_dim: int, current_pose_dim: int,
                 n_tasks: int, hidden: int = 192, depth: int = 6, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"DiT patch {patch} must divide the image size {image_size}")
        if hidden % heads:
            raise ValueError(f"DiT hidden {hidden} must be divisible by heads {heads}")
        self.image_size, self.channels, self.frames, self.patch = image_size, channels, frames, patch
        self.grid = image_size // patch
        self.n_image_tokens = self.grid**2
        self.pose_dim = pose_dim
        patch_in = channels * (1 + frames) * patch * patch
        self.patch_embed = nn.Linear(patch_in, hidden)
        self.register_buffer("pos_embed", torch.from_numpy(sincos_2d(hidden, self.grid))[None], persistent=False)
        self.action_embed = nn.Linear(frames * pose_dim + current_pose_dim, hidden)
        self.action_pos = nn.Parameter(torch.zeros(1, 1, hidden))
        self.time_embed = nn.Sequential(SinusoidalPosEmb(hidden), nn.Linear(hidden, hidden), nn.SiLU(),
                                        nn.Linear(hidden, hidden))
        self.task_embed = nn.Embedding(n_tasks, hidden)
        self.layers = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.image_head = FinalLayer(hidden, channels * frames * patch * patch)
        self.action_head = FinalLayer(hidden, frames * pose_dim)
        n = self.n_image_tokens + 1
        allowed = torch.ones(n, n, dtype=torch.bool)
        allowed[: self.n_image_tokens, self.n_image_tokens :] = False  # image tokens do not read the action token
        self.register_buffer("allowed", allowed, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.task_embed.weight, std=0.02)
        nn.init.normal_(self.action_pos, std=0.02)
        for layer in self.time_embed:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the heads at zero
        for block in [*self.layers, self.image_head, self.action_head]:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for head in (self.image_head, self.action_head):
            nn.init.zeros_(head.linear.weight)

    def residual_branches(self) -> dict[str, nn.Module]:
        return {f"layers.{i}.{kind}": getattr(layer, kind) for i, layer in enumerate(self.layers)
                for kind in ("self_attn", "feed_forward")}

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, (H/p)(W/p), C p p), patches in row order."""
        B, C, H, W = images.shape
        p, g = self.patch, self.grid
        return images.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)

    def unpatchify(self, tokens: torch.Tensor, channels: int) -> torch.Tensor:
        B = tokens.shape[0]
        p, g = self.patch, self.grid
        return tokens.reshape(B, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, channels, g * p, g * p)

    def forward(self, frames: torch.Tensor, poses: torch.Tensor, t: torch.Tensor, current_frame: torch.Tensor,
                current_pose: torch.Tensor, task_vector: torch.Tensor, branch=compute_branch
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (B, frames * C, H, W) noisy; poses (B, frames * pose_dim) noisy; t (B,); current_frame
        (B, C, H, W); current_pose (B, current_pose_dim); task_vector (B, hidden) = task_embed(task) ->
        (frame prediction (B, frames * C, H, W), pose prediction (B, frames * pose_dim)), from one pass."""
        image_tokens = self.patch_embed(self.patchify(torch.cat([current_frame, frames], dim=1))) + self.pos_embed
        action_token = self.action_embed(torch.cat([poses, current_pose], dim=1)).unsqueeze(1) + self.action_pos
        x = torch.cat([image_tokens, action_token], dim=1)
        c = self.time_embed(t) + task_vector
        for i, layer in enumerate(self.layers):
            x = layer(x, c, self.allowed, f"layers.{i}", branch)
        n = self.n_image_tokens
        frame_out = self.unpatchify(self.image_head(x[:, :n], c), self.channels * self.frames)
        return frame_out, self.action_head(x[:, n:], c)[:, 0]
