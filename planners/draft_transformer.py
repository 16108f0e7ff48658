"""Trajectory Diffuser's feasible-trajectory generator: a causal transformer over (state, return-to-go) tokens that
predicts the next state and the next return-to-go, rolled out autoregressively into a draft plan.

    net = DraftTransformer(state_dim, horizon, d_model=256, heads=4, layers=4, d_ff=512, dropout=0.1)
    next_states, next_returns = net(states, returns)       # (B, T, S), (B, T): teacher-forced, for training
    plan = net.rollout(state, target_return)               # (B, horizon, S): horizon - 1 forward passes
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policy.nets.transformer import SelfAttentionBranch


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.net = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


class CausalBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.attn = SelfAttentionBranch(d_model, heads, dropout)
        self.ff = FeedForward(d_model, d_ff, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, mask)
        return x + self.ff(x)


class DraftTransformer(nn.Module):
    def __init__(self, state_dim: int, horizon: int, d_model: int = 256, heads: int = 4, layers: int = 4,
                 d_ff: int = 512, dropout: float = 0.1):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        self.horizon = horizon
        self.state_in = nn.Linear(state_dim, d_model)
        self.return_in = nn.Linear(1, d_model)
        self.pos = nn.Parameter(torch.randn(1, horizon, d_model) * 0.02)
        self.blocks = nn.ModuleList(CausalBlock(d_model, heads, d_ff, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.state_out = nn.Linear(d_model, state_dim)
        self.return_out = nn.Linear(d_model, 1)
        t = torch.arange(horizon)
        self.register_buffer("mask", t[None, :] > t[:, None], persistent=False)  # True: may not attend

    def forward(self, states: torch.Tensor, returns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states (B, T, S), returns (B, T), T <= horizon -> each token's prediction of the next state (B, T, S)
        and the next return-to-go (B, T). The next state is predicted as a change from the current one."""
        n = states.shape[1]
        x = self.state_in(states) + self.return_in(returns[..., None]) + self.pos[:, :n]
        mask = self.mask[:n, :n]
        for block in self.blocks:
            x = block(x, mask)
        h = self.norm(x)
        return states + self.state_out(h), self.return_out(h)[..., 0]

    def loss(self, states: torch.Tensor, returns: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Next-state plus next-return MSE, teacher-forced, over the transitions inside the episode."""
        next_states, next_returns = self(states[:, :-1], returns[:, :-1])
        keep = valid[:, 1:].float()
        per_step = F.mse_loss(next_states, states[:, 1:], reduction="none").mean(-1) \
            + F.mse_loss(next_returns, returns[:, 1:], reduction="none")
        return (per_step * keep).sum() / keep.sum().clamp(min=1.0)

    def rollout(self, state: torch.Tensor, target_return: torch.Tensor,
                step_noise: torch.Tensor | None = None) -> torch.Tensor:
        """From the current state (B, S), or the last P states (B, P, S), and a target return (B,): the draft plan
        (B, horizon, S), starting with the given states. Each step re-reads the whole prefix (static shapes, so it
        exports). `step_noise` (B, horizon - P, S), when given, is added to each drafted state."""
        states = state[:, None] if state.dim() == 2 else state
        returns = target_return[:, None].expand(-1, states.shape[1])
        for k in range(self.horizon - states.shape[1]):
            next_states, next_returns = self(states, returns)
            drafted = next_states[:, -1:] if step_noise is None else next_states[:, -1:] + step_noise[:, k:k + 1]
            states = torch.cat([states, drafted], dim=1)
            returns = torch.cat([returns, next_returns[:, -1:]], dim=1)
        return states
