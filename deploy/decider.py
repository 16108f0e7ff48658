"""The decision a control loop asks for: observation history (numpy, `n_obs_steps` deep) -> the actions to execute
from that observation's tick on. The same object runs on the loop's worker thread or inside an inference process
(deploy/inference_process.py); the policy is whatever deploy.runtime builds from the settings."""

from __future__ import annotations

import threading
import time

import numpy as np

from .runtime import RuntimeSettings, build_policy


class ChunkDecider:
    def __init__(self, settings: RuntimeSettings, inference_delay_ms: float = 0.0, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.runtime = build_policy(settings)
        self.policy = self.runtime.policy
        self.spec = self.policy.spec
        self.config = self.runtime.config
        self.inference_delay_ms = inference_delay_ms  # added to every decision: how a loop copes with a slow policy
        self.generator = torch.Generator()
        self._lock = threading.Lock()  # reset() between episodes waits for a decision still in flight

    def reset(self, seed: int) -> None:
        """A new episode: sampler noise reseeded, any warm start dropped."""
        with self._lock:
            self.generator.manual_seed(seed)
            self.policy.reset()

    def __call__(self, history: dict[str, np.ndarray], executed: int | None) -> np.ndarray:
        import torch

        with self._lock:
            obs = {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in history.items()}
            chunk = self.policy.predict_chunk(obs, executed=executed, generator=self.generator)
            if self.inference_delay_ms:
                time.sleep(self.inference_delay_ms / 1e3)
            return chunk.action_ahead[0].numpy()
