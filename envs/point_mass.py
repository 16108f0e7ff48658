"""A planar point mass that must reach a goal: a small, exact task for fast tests.

Observation {"state": [x, y, goal_x, goal_y]}; action a desired velocity in [-1, 1]^2, applied for `dt` seconds.
Success is coming within `tolerance` of the goal. The scripted expert drives straight at the goal, saturating.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class PointMassReach(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, max_episode_steps: int = 40, dt: float = 0.1, tolerance: float = 0.05):
        self.observation_space = gym.spaces.Dict(
            {"state": gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)})
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.max_episode_steps, self.dt, self.tolerance = max_episode_steps, dt, tolerance
        self._pos = np.zeros(2)
        self._goal = np.zeros(2)
        self._t = 0

    def _obs(self) -> dict[str, np.ndarray]:
        return {"state": np.concatenate([self._pos, self._goal]).astype(np.float32)}

    def distance(self) -> float:
        return float(np.linalg.norm(self._pos - self._goal))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._pos = self.np_random.uniform(-0.8, 0.8, size=2)
        self._goal = self.np_random.uniform(-0.8, 0.8, size=2)
        self._t = 0
        return self._obs(), {"success": False}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(2)
        self._pos = np.clip(self._pos + self.dt * np.clip(action, -1.0, 1.0), -1.0, 1.0)
        self._t += 1
        success = self.distance() < self.tolerance
        return self._obs(), -self.distance(), False, self._t >= self.max_episode_steps, {"success": success}

    def expert(self, gain: float = 4.0):
        return lambda state: np.clip(gain * (state[2:4] - state[0:2]), -1.0, 1.0).astype(np.float32)
