"""The decision a control loop asks for: observation history (numpy, `n_obs_steps` deep) -> the actions to execute
from that observation's tick on. The same object runs on the loop's worker thread or inside an inference process
(deploy/inference_process.py); the policy is whatever deploy.runtime builds from the settings."""

from __future__ import annotations

import threading
import time

import numpy as np

from policy.contract import PolicyFault

from .runtime import RuntimeSettings, build_policy


class ChunkDecider:
    def __init__(self, settings: RuntimeSettings, inference_delay_ms: float = 0.0, threads: int = 1,
                 period_ms: float | None = None, warm_up: bool = True):
        """`period_ms`: the loop's control period, which an anytime decision's budget is counted in (default: the
        chunking settings' period, else 20 ms). `warm_up`: run the decision path once before the first real
        decision (see warm_up())."""
        import torch

        torch.set_num_threads(threads)
        self.runtime = build_policy(settings)
        chunking = settings.chunking or {}
        self.period_ms = period_ms or (settings.anytime or {}).get("period_ms") or chunking.get("period_ms") or 20.0
        self._actions_left = None  # actions of the last chunk returned, counted from its observation's tick
        self.last_nfe: int | None = None  # denoiser calls the last decision took (an anytime decision: its steps)
        self.policy = self.runtime.policy
        self.spec = self.policy.spec
        self.config = self.runtime.config
        self.inference_delay_ms = inference_delay_ms  # added to every decision: how a loop copes with a slow policy
        self.generator = torch.Generator()
        self._lock = threading.Lock()  # reset() between episodes waits for a decision still in flight
        if warm_up:
            self.warm_up()

    def warm_up(self) -> None:
        """Two decisions on a blank observation, an episode's first and one that follows it, then a reset: the
        first decisions a loop times then do not pay for lazy initialisation (under guided chunking, autograd's
        first backward pass alone takes ~0.5 s on this CPU, 25 periods at 50 Hz)."""
        import torch

        obs = {f.name: torch.zeros((1, *f.shape), dtype=getattr(torch, f.dtype)) for f in self.spec.observations}
        g = torch.Generator().manual_seed(0)
        anytime = self.runtime.anytime_policy
        if anytime is not None:
            anytime.budget_ms = lambda: float("inf")
        with self._lock:
            for executed in (None, 1):
                try:
                    self.policy.predict_chunk(obs, executed=executed, generator=g)
                except PolicyFault:  # the whole path ran; a blank scene may well plan outside the action bounds
                    pass
        self.reset(0)

    def reset(self, seed: int) -> None:
        """A new episode: sampler noise reseeded, any warm start dropped."""
        with self._lock:
            self.generator.manual_seed(seed)
            self.policy.reset()
            self._actions_left = None

    def budget_ms(self, executed: int | None) -> float:
        """The time until the chunk being executed runs out, less the delay this decider adds: what an anytime
        decision may take. Unbounded for an episode's first decision (nothing is executing yet)."""
        if executed is None or self._actions_left is None:
            return float("inf")
        return (self._actions_left - executed) * self.period_ms - self.inference_delay_ms

    def __call__(self, history: dict[str, np.ndarray], executed: int | None) -> np.ndarray:
        import torch

        with self._lock:
            obs = {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in history.items()}
            anytime = self.runtime.anytime_policy
            if anytime is not None:
                budget = self.budget_ms(executed)
                anytime.budget_ms = lambda: budget
            chunk = self.policy.predict_chunk(obs, executed=executed, generator=self.generator)
            if self.inference_delay_ms:
                time.sleep(self.inference_delay_ms / 1e3)
            actions = chunk.action_ahead[0].numpy()
            self.last_nfe = int(chunk.nfe)
            if len(actions):  # a skipped decision leaves the loop on the chunk it has, and `executed` counts from it
                self._actions_left = len(actions)
            return actions
