"""A planar point mass that must reach a goal: a small, exact task for smoke tests and the quick demo.

Observation [x, y, goal_x, goal_y]; action a desired velocity in [-1, 1]^2, applied for `dt` seconds. Success
is ending within `tolerance` of the goal. The scripted expert drives straight at the goal, saturating.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from .datasets import ReplayBuffer


class PointMassReach(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, max_episode_steps: int = 40, dt: float = 0.1, tolerance: float = 0.05):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.max_episode_steps, self.dt, self.tolerance = max_episode_steps, dt, tolerance
        self._pos = np.zeros(2)
        self._goal = np.zeros(2)
        self._t = 0

    def _obs(self) -> np.ndarray:
        return np.concatenate([self._pos, self._goal]).astype(np.float32)

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
        if not np.isfinite(action).all():
            raise ValueError(f"action must be finite, got {action}")
        self._pos = np.clip(self._pos + self.dt * np.clip(action, -1.0, 1.0), -1.0, 1.0)
        self._t += 1
        success = self.distance() < self.tolerance
        reward = -self.distance()
        return self._obs(), reward, success, self._t >= self.max_episode_steps, {"success": success}


def expert_action(obs: np.ndarray, gain: float = 4.0) -> np.ndarray:
    return np.clip(gain * (obs[2:4] - obs[0:2]), -1.0, 1.0).astype(np.float32)


def collect_point_mass(episodes: int, seed: int = 0, progress: bool = True) -> ReplayBuffer:
    """Expert episodes, each until success (plus a few steps holding still) or the step limit."""
    env = PointMassReach()
    buffer = ReplayBuffer(attrs={"task": "point_mass_reach", "seed": seed, "episodes": episodes,
                                 "expert": "saturated proportional controller"})
    for ep in tqdm(range(episodes), desc="collect", disable=not progress):
        obs, _ = env.reset(seed=seed + ep)
        states, actions = [], []
        settle = 3
        for _ in range(env.max_episode_steps):
            act = expert_action(obs)
            states.append(obs)
            actions.append(act)
            obs, _, success, truncated, _ = env.step(act)
            settle -= int(success)
            if settle == 0 or truncated:
                break
        buffer.add_episode({"obs": np.stack(states), "action": np.stack(actions)})
    return buffer
