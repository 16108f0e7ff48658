"""Training samples for a driving planner: the scene at step t and a plan from t (the future that happened, and,
with `branch_labels`, each branch future recorded from the same scene: what the expert could have done)."""

from __future__ import annotations

import numpy as np

from .replay_buffer import DatasetError, ReplayBuffer
from .sequence import episode_split

SCENE_KEYS = ("ego", "agents", "bev")


class PlanDataset:
    def __init__(self, buffer: ReplayBuffer, branch_labels: bool = False, val_ratio: float = 0.0, seed: int = 0,
                 split: str = "train"):
        for k in (*SCENE_KEYS, "plan"):
            buffer[k]  # names a missing key and the ones the store has
        if "scene" not in buffer.attrs:
            raise DatasetError(f"{buffer.source} records no scene settings: it is not a driving dataset (collect "
                               f"one with `rtdp collect --task highway/...`)")
        self.buffer = buffer
        train, val = episode_split(buffer.n_episodes, val_ratio, seed)
        episodes = np.flatnonzero({"train": train, "val": val}[split])
        starts = np.concatenate([[0], buffer.episode_ends[:-1]])
        steps = np.concatenate([np.arange(starts[e], buffer.episode_ends[e]) for e in episodes]) \
            if len(episodes) else np.zeros(0, dtype=np.int64)
        plans = buffer["plan"]
        rows = [(s, -1) for s in steps if np.isfinite(plans[s]).all()]
        if branch_labels and "branch_plans" in buffer.keys:
            branches = buffer["branch_plans"]
            rows += [(s, b) for s in steps for b in range(branches.shape[1]) if np.isfinite(branches[s, b]).all()]
        if not rows:
            raise DatasetError(f"{buffer.source}: no complete plan in the {split} episodes")
        self.rows = np.array(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def scene(self) -> dict:
        return dict(self.buffer.attrs["scene"])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(self.buffer[k].shape[1:]) for k in SCENE_KEYS}

    def plans(self) -> np.ndarray:
        """Every target plan, (len, points * 3)."""
        return self.targets(np.arange(len(self)))

    def targets(self, indices: np.ndarray) -> np.ndarray:
        steps, branch = self.rows[indices, 0], self.rows[indices, 1]
        out = self.buffer["plan"][steps].astype(np.float32)
        if (branch >= 0).any():
            sel = branch >= 0
            out[sel] = self.buffer["branch_plans"][steps[sel], branch[sel]]
        return out

    def scenes(self, indices: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Scene fields of the given samples, raw, (n, ...) without the history axis."""
        steps = self.rows[np.arange(len(self)) if indices is None else indices, 0]
        return {k: self.buffer[k][steps].astype(np.float32) for k in SCENE_KEYS}

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Scene fields (B, 1, ...) (one observation step) and `plan` (B, points * 3)."""
        out = {k: v[:, None] for k, v in self.scenes(indices).items()}
        out["plan"] = self.targets(indices)
        return out
