"""Trajectory Diffuser's feasible-trajectory generator: a causal transformer over (state, return-to-go) tokens that
predicts the next state and the next return-to-go, rolled out autoregressively into a draft plan.

    net = DraftTransformer(state_dim, horizon, d_model=256, heads=4, layers=4, d_ff=512, dropout=0.1)
    next_states, next_returns = net(states, returns)       # (B, T, S), (B, T): teacher-forced, for training
    plan = net.rollout(state, target_return)               # (B, horizon, S): horizon - 1 steps

The rollout keeps each layer's keys and values, so a step reads one new token instead of the whole prefix: the
same plan as re-running the prefix every step (tested), at a fraction of the cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        """x (B, T, D). With `cache` (a list, empty at the first step), x is the newest tokens: their keys and
        values are appended to the cached ones and they attend to everything before them."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout.p if self.training else 0.0)
        else:
            first = not cache
            if not first:
                if n != 1:
                    raise ValueError(f"a cached step reads one new token, got {n}")
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
            # the first call is the prefix (causal within it); a later one is one token that may see all before it
            y = F.scaled_dot_product_attention(q, k, v, is_causal=bool(first and n > 1))
        return self.dropout(self.out(y.transpose(1, 2).reshape(b, n, d)))


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
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.ff = FeedForward(d_model, d_ff, dropout)

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        x = x + self.attn(x, cache)
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

    def step(self, states: torch.Tensor, returns: torch.Tensor, start: int = 0,
             caches: list[list] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens `start` .. `start + T - 1` (states (B, T, S), returns (B, T)) -> each one's prediction of the
        next state (B, T, S), as a change from the current one, and of the next return-to-go (B, T). `caches`
        (one list per block) hold the earlier tokens' keys and values; None attends causally within the call."""
        n = states.shape[1]
        x = self.state_in(states) + self.return_in(returns[..., None]) + self.pos[:, start:start + n]
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        h = self.norm(x)
        return states + self.state_out(h), self.return_out(h)[..., 0]

    def forward(self, states: torch.Tensor, returns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced: states (B, T, S), returns (B, T), T <= horizon."""
        return self.step(states, returns)

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
        (B, horizon, S), starting with the given states. `step_noise` (B, horizon - P, S), when given, is added to
        each drafted state."""
        states = state[:, None] if state.dim() == 2 else state
        returns = target_return[:, None].expand(-1, states.shape[1])
        caches: list[list] = [[] for _ in self.blocks]
        plan = [states]
        next_states, next_returns = self.step(states, returns, 0, caches)
        for k in range(self.horizon - states.shape[1]):
            drafted = next_states[:, -1:] if step_noise is None else next_states[:, -1:] + step_noise[:, k:k + 1]
            plan.append(drafted)
            position = states.shape[1] + k
            if position < self.horizon - 1:  # the last drafted state needs no successor
                next_states, next_returns = self.step(drafted, next_returns[:, -1:], position, caches)
        return torch.cat(plan, dim=1)
