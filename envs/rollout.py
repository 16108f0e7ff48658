"""Closed-loop episodes with receding-horizon action chunking, for any policy given as a function.

`act(obs_history) -> actions` takes the last n_obs_steps observations (n_obs_steps, obs_dim), the first
repeated at the episode start, and returns a chunk (k, action_dim) of which every action is executed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np


@dataclass
class EpisodeResult:
    success: bool
    total_return: float
    steps: int
    decisions: int


def run_episode(env: gym.Env, act: Callable[[np.ndarray], np.ndarray], n_obs_steps: int, seed: int) -> EpisodeResult:
    obs, info = env.reset(seed=seed)
    history = deque([obs] * n_obs_steps, maxlen=n_obs_steps)
    total, steps, decisions, success = 0.0, 0, 0, False
    done = False
    while not done:
        chunk = np.asarray(act(np.stack(history)))
        decisions += 1
        for action in chunk:
            obs, reward, terminated, truncated, info = env.step(action)
            history.append(obs)
            total += float(reward)
            steps += 1
            success = success or bool(info.get("success", False))
            done = terminated or truncated
            if done:
                break
    return EpisodeResult(success, total, steps, decisions)
