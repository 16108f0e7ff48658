"""The last check before anything executes a chunk: every action finite and inside the bounds the checkpoint
knows (its training range, widened by a stated margin). A wrapper like the others, put outermost by the runtime.

    guarded = ActionGuard(policy, low, high)          # margin: 10% of each dim's range on either side
    guarded.predict_chunk(obs)                        # a Chunk, or PolicyFault naming the dim and value

A corrupt weight file, a diverging warm start or a broken engine shows up here as a policy fault, instead of as a
NaN command on the robot (and, a tick later, as NaN observations blamed on the sensors).
"""

from __future__ import annotations

import torch

from .contract import Chunk, PolicyFault, PolicySpec
from .normalizer import RANGE_EPS

MARGIN = 0.1  # of each action dim's training range, on either side


class ActionGuard:
    def __init__(self, policy, low=None, high=None, margin: float = MARGIN):
        """`low`, `high`: per-dim action bounds (raw units), None for a finite check only."""
        self.inner = policy
        self.margin = margin
        if (low is None) != (high is None):
            raise ValueError("ActionGuard takes both bounds or neither")
        self.low = self.high = None
        if low is not None:
            low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
            span = high - low
            # A dim constant in the training data (a gripper that never moves) is centred by the normaliser, not
            # stretched, so the sampler's clipped output may sit up to 1 raw unit from that constant.
            pad = torch.where(span < RANGE_EPS, torch.ones_like(span), margin * span)
            self.low, self.high = low - pad, high + pad

    @property
    def spec(self) -> PolicySpec:
        return self.inner.spec

    def reset(self) -> None:
        self.inner.reset()

    def bounds(self) -> dict | None:
        """What a report records of the bounds."""
        if self.low is None:
            return None
        return {"low": self.low.tolist(), "high": self.high.tolist(), "margin": self.margin}

    def check(self, chunk: Chunk) -> Chunk:
        actions = chunk.action_ahead
        finite = torch.isfinite(actions)
        if not bool(finite.all()):
            bad = sorted({int(d) for d in torch.nonzero(~finite)[:, -1]})
            raise PolicyFault(f"policy fault: the chunk holds NaN or Inf actions (action dims {bad}); nothing of it "
                              f"was executed")
        if self.low is not None:
            low, high = self.low.to(actions), self.high.to(actions)
            outside = (actions < low) | (actions > high)
            if bool(outside.any()):
                i = torch.nonzero(outside)[0]
                d = int(i[-1])
                raise PolicyFault(f"policy fault: action dim {d} = {float(actions[tuple(i)]):.4g} is outside the "
                                  f"bounds [{float(low[d]):.4g}, {float(high[d]):.4g}] (the training range with a "
                                  f"{self.margin:.0%} margin); nothing of the chunk was executed")
        return chunk

    @torch.no_grad()
    def predict_chunk(self, obs, *, executed=None, generator=None, noise=None) -> Chunk:
        return self.check(self.inner.predict_chunk(obs, executed=executed, generator=generator, noise=noise))
