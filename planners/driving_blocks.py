"""The parts the driving planners share: the scene encoder (BEV raster and agent tokens), the trajectory query
embedding, and DiffusionDrive's decoder layer (BEV sampled at the trajectory points, cross-attention to the
agents, FFN, time modulation). All of it runs on normalised tensors; the planners hold the geometry that maps a
normalised plan back to metres.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sine_embed(x: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(..., C) coordinates in about [-1, 1] -> (..., C * dim) sine/cosine features (DETR's positional embedding,
    as DiffusionDrive's gen_sineembed_for_position applies it per coordinate)."""
    half = dim // 2
    freqs = temperature ** (-torch.arange(half, dtype=x.dtype, device=x.device) / half)
    angles = x.unsqueeze(-1) * (2 * math.pi) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def fourier_features(x: torch.Tensor, octaves: int) -> torch.Tensor:
    """(..., C) values in about [-1, 1] -> (..., C * 2 * octaves) sines and cosines at periods 2, 1, 1/2, ... (in
    normalised units): fine position differences that a min-max scale squeezes (5 m of 160) become visible."""
    freqs = math.pi * 2.0 ** torch.arange(octaves, dtype=x.dtype, device=x.device)
    angles = x.unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class TimestepEmbedding(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model * 2), nn.Mish(), nn.Linear(d_model * 2, d_model))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.d_model // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
        angles = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


class SceneEncoder(nn.Module):
    """Normalised scene -> (BEV feature map (B, d, nx, ny), tokens (B, 1 + N, d), token mask (B, 1 + N)).

    The ego is always the first token, so attention never meets a scene with no key (an empty road is a scene).
    An agent token is present where its raw `present` flag (feature 0, left unnormalised) is set.

    `agent_octaves` > 0 adds Fourier features of the agent features to each token's input; `agents_see_ego` adds
    the ego's features, so a token can carry what depends on both (the closing speed, the gap at the ego's speed)
    rather than leaving that to the decoder's attention."""

    def __init__(self, ego_dim: int, agent_dim: int, bev_channels: int, d_model: int, bev_channels_hidden: int,
                 agent_octaves: int = 0, agents_see_ego: bool = False):
        super().__init__()
        self.agent_octaves, self.agents_see_ego = agent_octaves, agents_see_ego
        h = bev_channels_hidden
        self.bev = nn.Sequential(
            nn.Conv2d(bev_channels, h, 3, padding=1), nn.GroupNorm(8, h), nn.Mish(),
            nn.Conv2d(h, h, 3, padding=1), nn.GroupNorm(8, h), nn.Mish(),
            nn.Conv2d(h, d_model, 3, padding=1),
        )
        self.ego = nn.Sequential(nn.Linear(ego_dim, d_model), nn.Mish(), nn.Linear(d_model, d_model))
        agent_in = agent_dim * (1 + 2 * agent_octaves) + (ego_dim if agents_see_ego else 0)
        self.agent = nn.Sequential(nn.Linear(agent_in, d_model), nn.Mish(), nn.Linear(d_model, d_model))

    def forward(self, ego: torch.Tensor, agents: torch.Tensor, bev: torch.Tensor):
        """ego (B, E), agents (B, N, F), bev (B, nx, ny, C) channels last, as observed."""
        bev_feat = self.bev(bev.permute(0, 3, 1, 2))
        agent_in = [agents]
        if self.agent_octaves:
            agent_in.append(fourier_features(agents, self.agent_octaves))
        if self.agents_see_ego:
            agent_in.append(ego[:, None].expand(-1, agents.shape[1], -1))
        tokens = torch.cat([self.ego(ego)[:, None], self.agent(torch.cat(agent_in, dim=-1))], dim=1)
        present = torch.cat([torch.ones_like(agents[:, :1, 0], dtype=torch.bool), agents[..., 0] > 0.5], dim=1)
        return bev_feat, tokens, present


class TrajectoryQuery(nn.Module):
    """One query per trajectory from its sine-embedded points (DiffusionDrive's per-anchor query)."""

    def __init__(self, points: int, coords: int, embed_dim: int, d_model: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.mlp = nn.Sequential(nn.Linear(points * coords * embed_dim, d_model), nn.Mish(),
                                 nn.Linear(d_model, d_model))

    def forward(self, traj: torch.Tensor) -> torch.Tensor:
        """traj (B, K, P, C) normalised -> (B, K, d)."""
        return self.mlp(sine_embed(traj, self.embed_dim).flatten(-2))


class BEVPointAttention(nn.Module):
    """Cross-attention to the BEV by bilinear sampling at a trajectory's points: each query weighs the features
    under its own points (DiffusionDrive's GridSampleCrossBEVAttention with one sampling point per waypoint)."""

    def __init__(self, d_model: int, points: int):
        super().__init__()
        self.weights = nn.Linear(d_model, points)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, query: torch.Tensor, grid_xy: torch.Tensor, bev_feat: torch.Tensor) -> torch.Tensor:
        """query (B, K, d); grid_xy (B, K, P, 2) in grid_sample's [-1, 1] coordinates, (along ny, along nx);
        bev_feat (B, d, nx, ny) -> (B, K, d)."""
        sampled = F.grid_sample(bev_feat, grid_xy, mode="bilinear", padding_mode="zeros", align_corners=False)
        w = self.weights(query).softmax(dim=-1)  # (B, K, P)
        return self.out(torch.einsum("bdkp,bkp->bkd", sampled, w))


class CascadeLayer(nn.Module):
    """One DiffusionDrive decoder layer: BEV sampled at the points, cross-attention to the agents, then to the ego
    (one key, so the attention is the ego token's value projection), FFN (each with a residual and LayerNorm), time
    modulation, then the two heads: one score per trajectory and an offset to its input points."""

    def __init__(self, d_model: int, heads: int, d_ffn: int, points: int, coords: int, dropout: float = 0.0):
        super().__init__()
        self.bev_attn = BEVPointAttention(d_model, points)
        self.agent_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ffn), nn.ReLU(), nn.Linear(d_ffn, d_model))
        self.ego_value = nn.Linear(d_model, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(4))
        self.time_mod = nn.Sequential(nn.Mish(), nn.Linear(d_model, d_model * 2))
        self.cls_head = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, 1))
        self.reg_head = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, points * coords))
        self.points, self.coords = points, coords

    def forward(self, query, points, grid_xy, bev_feat, tokens, present, time_emb):
        """-> (features (B, K, d), scores (B, K), refined points (B, K, P, C) = input points + offset)."""
        q = self.norms[0](query + self.bev_attn(query, grid_xy, bev_feat))
        attended, _ = self.agent_attn(q, tokens, tokens, key_padding_mask=~present, need_weights=False)
        q = self.norms[1](q + attended)
        q = self.norms[2](q + self.ego_value(tokens[:, :1]))
        q = self.norms[3](q + self.ffn(q))
        scale, shift = self.time_mod(time_emb)[:, None].chunk(2, dim=-1)
        q = q * (1 + scale) + shift
        scores = self.cls_head(q).squeeze(-1)
        offset = self.reg_head(q).reshape(*q.shape[:2], self.points, self.coords)
        return q, scores, points + offset
