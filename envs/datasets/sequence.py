"""Fixed-length windows over the episodes of a ReplayBuffer, padded at episode edges as Chi et al. pad them.

A window may start up to `pad_before` steps before its episode and end up to `pad_after` steps after it; the
steps outside the episode repeat its first or last step. No window crosses into another episode.
"""

from __future__ import annotations

import numpy as np

from .replay_buffer import DatasetError, ReplayBuffer


def window_starts(episode_ends: np.ndarray, horizon: int, pad_before: int, pad_after: int,
                  episode_mask: np.ndarray | None = None) -> np.ndarray:
    """Rows (episode_start, episode_end, window_start) for every valid window, window_start possibly < start."""
    rows = []
    start = 0
    for i, end in enumerate(episode_ends):
        end = int(end)
        if episode_mask is None or episode_mask[i]:
            length = end - start
            first, last = -pad_before, length - horizon + pad_after
            for offset in range(first, last + 1):
                rows.append((start, end, start + offset))
        start = end
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def episode_split(n_episodes: int, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, val) episode masks; at least one episode on each side when val_ratio > 0."""
    val = np.zeros(n_episodes, dtype=bool)
    if val_ratio > 0 and n_episodes > 1:
        n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
        val[np.random.default_rng(seed).choice(n_episodes, size=n_val, replace=False)] = True
    return ~val, val


class SequenceSampler:
    def __init__(self, buffer: ReplayBuffer, horizon: int, pad_before: int = 0, pad_after: int = 0,
                 key_lengths: dict[str, int] | None = None, episode_mask: np.ndarray | None = None):
        """`key_lengths` reads only the first k steps of a window for some keys (observations need To)."""
        if horizon < 1 or pad_before < 0 or pad_after < 0:
            raise ValueError(f"need horizon >= 1 and pads >= 0, got {horizon}, {pad_before}, {pad_after}")
        self.buffer = buffer
        self.horizon = horizon
        self.key_lengths = {k: min(v, horizon) for k, v in (key_lengths or {}).items()}
        self.index = window_starts(buffer.episode_ends, horizon, pad_before, pad_after, episode_mask)
        if len(self.index) == 0:
            raise DatasetError(
                f"{buffer.source}: no window of {horizon} steps fits (episode lengths "
                f"{buffer.episode_lengths[:10].tolist()}, pad_before {pad_before}, pad_after {pad_after})"
            )

    def __len__(self) -> int:
        return len(self.index)

    def gather(self, indices: np.ndarray, keys: list[str]) -> dict[str, np.ndarray]:
        """Windows for `indices` as {key: (B, L, ...)}; L is `horizon` or the key's own length."""
        rows = self.index[np.asarray(indices)]
        ep_start, ep_end, w_start = rows[:, 0:1], rows[:, 1:2], rows[:, 2:3]
        out = {}
        for key in keys:
            length = self.key_lengths.get(key, self.horizon)
            steps = np.clip(w_start + np.arange(length)[None, :], ep_start, ep_end - 1)
            out[key] = self.buffer[key][steps]
        return out
