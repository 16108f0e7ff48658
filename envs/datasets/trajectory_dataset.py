"""State-trajectory windows for offline-RL planners (Decision Diffuser's and Trajectory Diffuser's samples).

A sample starting at step t of an episode: the next `horizon` states, the actions taken there and the discounted
return-to-go at each of them, `valid` marking the steps inside the episode (past its end, the last state and
action repeat, as a robot that has stopped would). Windows start at every step of every episode. With `stride` k > 1
a window holds every k-th step (t, t + k, ...), so `horizon` states span (horizon - 1) k steps of the episode; the
action at each is the one taken there, and the return-to-go is each step's own (over every step after it).
"""

from __future__ import annotations

import numpy as np

from .replay_buffer import DatasetError, ReplayBuffer


def discounted_return_to_go(rewards: np.ndarray, discount: float) -> np.ndarray:
    out = np.empty(len(rewards), np.float64)
    acc = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        acc = rewards[i] + discount * acc
        out[i] = acc
    return out


class TrajectoryDataset:
    def __init__(self, buffer: ReplayBuffer, horizon: int, discount: float, stride: int = 1):
        if horizon < 2:
            raise ValueError(f"horizon must be >= 2 (a state and its successor), got {horizon}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1 (steps between a window's states), got {stride}")
        if not 0 < discount <= 1:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        for key in ("obs", "action", "reward"):
            if key not in buffer.data:
                raise DatasetError(f"{buffer.source}: an offline-RL dataset needs 'obs', 'action' and 'reward'; "
                                   f"missing {key!r}")
        self.buffer, self.horizon, self.discount, self.stride = buffer, horizon, discount, stride
        self.states = np.asarray(buffer["obs"], np.float32)
        self.actions = np.asarray(buffer["action"], np.float32)
        rewards = np.asarray(buffer["reward"], np.float64)
        starts = np.concatenate([[0], buffer.episode_ends[:-1]]).astype(np.int64)
        self.rtg = np.concatenate([discounted_return_to_go(rewards[s:e], discount)
                                   for s, e in zip(starts, buffer.episode_ends, strict=True)]).astype(np.float32)
        # every step's window: its index and its episode's last index (where the padding repeats from)
        lengths = buffer.episode_lengths
        self.index = np.arange(buffer.n_steps)
        self.last = np.repeat(buffer.episode_ends - 1, lengths)
        self.episode_starts = starts
        self.state_dim, self.action_dim = self.states.shape[1], self.actions.shape[1]
        self.image_shape = None

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        start = self.index[indices]
        steps = start[:, None] + self.stride * np.arange(self.horizon)[None]
        last = self.last[indices][:, None]
        rows = np.minimum(steps, last)
        return {"states": self.states[rows], "actions": self.actions[rows], "rtg": self.rtg[rows],
                "valid": steps <= last}

    def all_states(self) -> np.ndarray:
        return self.states

    def all_actions(self) -> np.ndarray:
        return self.actions

    def initial_returns(self) -> np.ndarray:
        """The return-to-go at each episode's first step."""
        return self.rtg[self.episode_starts]
