"""The decision contract: what every model kind and every wrapper (RTI, block cache, a backend) offers, so nothing
downstream (evaluation, export, profile, the control loop, the node) knows which one it holds.

    spec: PolicySpec                 # what the policy observes and what it returns
    reset() -> None                  # a new episode
    predict_chunk(obs, *, executed=None, generator=None, noise=None) -> Chunk

The sampler and its steps are fixed when the policy is built (deploy.runtime builds it from a checkpoint and the
settings); no call passes sampler flags. This module depends on nothing else of ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class ObservationField:
    """One observation input, per decision: `shape` covers the history (n_obs_steps first), without the batch."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" | "uint8" | "int64" (an index: a task)

    @property
    def step_shape(self) -> tuple[int, ...]:
        """The shape of one observation of this field, as a robot or simulator delivers it."""
        return self.shape[1:]


@dataclass(frozen=True)
class PolicySpec:
    kind: str  # the checkpoint's model kind, e.g. "diffusion_policy"
    observations: tuple[ObservationField, ...]
    n_obs_steps: int
    action_dim: int
    horizon: int  # steps in the whole predicted chunk
    exec_start: int  # index in the predicted chunk of the current step's action
    n_action_steps: int  # actions executed per decision
    discrete_action_dims: tuple[int, ...] = ()  # binary commands (a gripper) among the action dims

    def observation(self, name: str) -> ObservationField:
        for f in self.observations:
            if f.name == name:
                return f
        raise KeyError(f"the policy observes no {name!r}; it observes {[f.name for f in self.observations]}")

    @classmethod
    def from_dict(cls, d: dict) -> PolicySpec:
        fields = tuple(ObservationField(f["name"], tuple(f["shape"]), f["dtype"]) for f in d["observations"])
        return cls(d["kind"], fields, d["n_obs_steps"], d["action_dim"], d["horizon"], d["exec_start"],
                   d["n_action_steps"], tuple(d["discrete_action_dims"]))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "n_obs_steps": self.n_obs_steps, "action_dim": self.action_dim,
                "horizon": self.horizon, "exec_start": self.exec_start, "n_action_steps": self.n_action_steps,
                "discrete_action_dims": list(self.discrete_action_dims),
                "observations": [{"name": f.name, "shape": list(f.shape), "dtype": f.dtype}
                                 for f in self.observations]}


@dataclass
class Chunk:
    """One decision's result, in raw (unnormalised) units."""

    action: torch.Tensor  # (B, n_action_steps, A): what to execute, from the current step on
    action_pred: torch.Tensor  # (B, horizon, A): the whole predicted chunk
    # (B, horizon - exec_start, A): every predicted action from the current step on, processed as `action` is (a
    # gripper snapped to its levels); `action` is its first n_action_steps. A control loop whose next decision is
    # late keeps executing from here.
    action_ahead: torch.Tensor
    nfe: int  # denoiser calls this decision took
    kind: str = "full"  # "full" | "warm" | ...
    block_evals: int | None = None  # transformer residual-branch evaluations, where a block cache counted them
    extras: dict = field(default_factory=dict)  # a planner's candidates and scores, a fallback's reason, ...


@runtime_checkable
class Policy(Protocol):
    spec: PolicySpec

    def reset(self) -> None: ...

    def predict_chunk(self, obs: dict[str, torch.Tensor], *, executed: int | None = None,
                      generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Chunk: ...


class PolicyWrapper:
    """A decision made around `inner`'s: forwards the contract's surface (its spec, sampler name and steps, reset);
    a subclass changes `predict_chunk`."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def spec(self) -> PolicySpec:
        return self.inner.spec

    @property
    def method(self) -> str:
        return self.inner.method

    @property
    def timesteps(self) -> list[int]:
        return self.inner.timesteps

    def reset(self) -> None:
        self.inner.reset()


@dataclass
class GraphSpec:
    """A graph a model kind exports: `fn(*inputs)` on normalised tensors, example inputs by name (batch first; every
    input and output has a dynamic batch axis 0) and its output names. Export and the backends read only this."""

    fn: object  # Callable[..., torch.Tensor]
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]


class PolicyFault(ValueError):
    """A chunk that must not reach the robot (a NaN or Inf action, an action outside the bounds the checkpoint
    knows): the policy's fault, not the observation's. A control loop holds its safe action and counts it."""
