"""Chi et al.'s TransformerForDiffusion, written so that every residual branch is a named module.

Action tokens (B, T, action_dim) are decoded with causal self-attention and cross-attention to the condition
tokens [time, obs_1 .. obs_To]. Each pre-norm decoder layer is three residual branches,

    x = x + self_attn(x);  x = x + cross_attn(x, memory);  x = x + feed_forward(x)

and `residual_branches()` names them `layers.{i}.{self_attn|cross_attn|feed_forward}` so that a cache
(BAC) can wrap or replace any of them without touching the residual stream.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet1d import SinusoidalPosEmb

BRANCH_KINDS = ("self_attn", "cross_attn", "feed_forward")


def compute_branch(_name: str, compute):
    """The default `branch` hook: every residual branch is computed."""
    return compute()


class SelfAttentionBranch(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.dropout(self.attn(h, h, h, attn_mask=mask, need_weights=False)[0])


class CrossAttentionBranch(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.attn(self.norm(x), memory, memory, attn_mask=mask, need_weights=False)[0])


class FeedForwardBranch(nn.Module):
    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.net = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d_model, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.net(self.norm(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.self_attn = SelfAttentionBranch(d_model, n_head, dropout)
        self.cross_attn = CrossAttentionBranch(d_model, n_head, dropout)
        self.feed_forward = FeedForwardBranch(d_model, dropout)

    def forward(self, x, memory, self_mask, memory_mask, name: str = "", branch=None):
        """`branch(name, compute) -> output`, when given, decides per residual branch whether it is computed (a
        block cache reuses an earlier step's output instead)."""
        branch = branch or compute_branch
        x = x + branch(f"{name}.self_attn", lambda: self.self_attn(x, self_mask))
        x = x + branch(f"{name}.cross_attn", lambda: self.cross_attn(x, memory, memory_mask))
        return x + branch(f"{name}.feed_forward", lambda: self.feed_forward(x))


class TransformerForDiffusion(nn.Module):
    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        horizon: int,
        n_obs_steps: int,
        n_layer: int = 8,
        n_head: int = 4,
        n_emb: int = 256,
        p_drop_emb: float = 0.0,
        p_drop_attn: float = 0.1,
        causal_attn: bool = True,
    ):
        super().__init__()
        if n_emb % n_head:
            raise ValueError(f"n_emb={n_emb} must be divisible by n_head={n_head}")
        self.horizon, self.n_obs_steps = horizon, n_obs_steps
        n_cond_tokens = 1 + n_obs_steps
        self.input_emb = nn.Linear(action_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, horizon, n_emb))
        self.time_emb = SinusoidalPosEmb(n_emb)
        self.cond_obs_emb = nn.Linear(cond_dim, n_emb)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, n_cond_tokens, n_emb))
        self.drop = nn.Dropout(p_drop_emb)
        self.cond_encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb))
        self.layers = nn.ModuleList([DecoderLayer(n_emb, n_head, p_drop_attn) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, action_dim)

        # Boolean masks, True = may not attend. Action token t sees action tokens <= t and condition tokens
        # s with t >= s - 1 (the time token and the observations up to its own step), as in Chi et al.
        t = torch.arange(horizon)
        s = torch.arange(n_cond_tokens)
        self_mask = (t[None, :] > t[:, None]) if causal_attn else torch.zeros(horizon, horizon, dtype=torch.bool)
        memory_mask = ~(t[:, None] >= s[None, :] - 1) if causal_attn else torch.zeros(
            horizon, n_cond_tokens, dtype=torch.bool)
        self.register_buffer("self_mask", self_mask, persistent=False)
        self.register_buffer("memory_mask", memory_mask, persistent=False)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_emb, mean=0.0, std=0.02)
        nn.init.normal_(self.cond_pos_emb, mean=0.0, std=0.02)

    def residual_branches(self) -> dict[str, nn.Module]:
        return {f"layers.{i}.{kind}": getattr(layer, kind) for i, layer in enumerate(self.layers)
                for kind in BRANCH_KINDS}

    def encode_condition(self, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.time_emb(timestep).unsqueeze(1), self.cond_obs_emb(cond)], dim=1)
        return self.cond_encoder(self.drop(tokens + self.cond_pos_emb))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor, branch=None) -> torch.Tensor:
        """sample (B, T, action_dim), timestep (B,), cond (B, n_obs_steps, cond_dim) -> (B, T, action_dim).
        `branch`: see DecoderLayer.forward."""
        if sample.shape[1] != self.horizon or cond.shape[1] != self.n_obs_steps:
            raise ValueError(
                f"TransformerForDiffusion was built for horizon {self.horizon} and {self.n_obs_steps} observation"
                f" steps, got sample {tuple(sample.shape)} and cond {tuple(cond.shape)}"
            )
        memory = self.encode_condition(timestep, cond)
        x = self.drop(self.input_emb(sample) + self.pos_emb)
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, self.self_mask, self.memory_mask, f"layers.{i}", branch)
        return self.head(self.ln_f(x))
