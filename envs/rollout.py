"""Closed-loop episodes with receding-horizon action chunking, for any policy given as a function.

`act(history) -> actions` takes the last n_obs_steps observations as a dict of stacked arrays
({"state": (n_obs_steps, state_dim), ...}; the first observation is repeated at the episode start) and returns
a chunk (k, action_dim), all of which is executed before the next decision. An episode ends at its first
success or at the task's step limit; a task whose `stops_at_success` is False (a maze scored by its return) runs
to the limit, its success being that it succeeded at some step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    total_return: float
    steps: int
    decisions: int
    frames: list[np.ndarray] = field(default_factory=list, repr=False)
    metrics: dict = field(default_factory=dict)  # the task's own per-episode figures (a driving task's collisions)


def run_episode(env: gym.Env, act: Callable[[dict[str, np.ndarray]], np.ndarray], n_obs_steps: int, seed: int,
                record_frames: bool = False, frame_size: int = 240) -> EpisodeResult:
    obs, _ = env.reset(seed=seed)
    history = deque([obs] * n_obs_steps, maxlen=n_obs_steps)
    result = EpisodeResult(seed, False, 0.0, 0, 0)
    if record_frames:
        result.frames.append(env.render_frame(frame_size))
    stops_at_success = getattr(env, "stops_at_success", True)
    done = False
    while not done:
        chunk = np.asarray(act({k: np.stack([o[k] for o in history]) for k in obs}))
        result.decisions += 1
        for action in chunk:
            obs, reward, terminated, truncated, info = env.step(action)
            history.append(obs)
            result.total_return += float(reward)
            result.steps += 1
            if record_frames:
                result.frames.append(env.render_frame(frame_size))
            if info.get("success", False):
                result.success = True
            done = (result.success and stops_at_success) or terminated or truncated
            if done:
                break
    if hasattr(env, "episode_metrics"):
        result.metrics = env.episode_metrics()
    return result
