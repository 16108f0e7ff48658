"""Windows of consecutive frames for autoregressive motion models (AAMDM and its baselines).

A sample starting at frame n of a clip is `frames` (rollout + 1, D): the frame the model conditions on and the
`rollout` frames it generates one after another. Windows never cross a clip boundary. With `extra_keys`, each
extra per-frame key comes along over the same window (a motion autoencoder reads `pose` and `control`).
"""

from __future__ import annotations

import numpy as np

from .replay_buffer import DatasetError, ReplayBuffer


class MotionDataset:
    def __init__(self, buffer: ReplayBuffer, rollout: int, key: str = "frame", extra_keys: tuple[str, ...] = ()):
        if rollout < 1:
            raise ValueError(f"rollout must be >= 1 (one frame generated from the one before), got {rollout}")
        if key not in buffer.data:
            raise DatasetError(f"{buffer.source}: a motion dataset needs {key!r} (per-frame features); it has "
                               f"{sorted(buffer.data)}")
        self.frames = np.asarray(buffer[key], np.float32)
        if self.frames.ndim != 2:
            raise DatasetError(f"{buffer.source}: {key!r} must be (frames, D), got shape {self.frames.shape}")
        if not np.isfinite(self.frames).all():
            raise DatasetError(f"{buffer.source}: {key!r} holds NaN or Inf")
        self.rollout, self.key = rollout, key
        self.attrs = dict(buffer.attrs)
        self.extras = {}
        for extra in extra_keys:
            if extra not in buffer.data:
                raise DatasetError(f"{buffer.source}: missing per-frame key {extra!r}; it has {sorted(buffer.data)}")
            self.extras[extra] = np.asarray(buffer[extra], np.float32)
            if len(self.extras[extra]) != len(self.frames) or not np.isfinite(self.extras[extra]).all():
                raise DatasetError(f"{buffer.source}: {extra!r} must be finite with one row per frame")
        starts = np.concatenate([[0], buffer.episode_ends[:-1]]).astype(np.int64)
        self.starts = np.concatenate([np.arange(s, e - rollout) for s, e in
                                      zip(starts, buffer.episode_ends, strict=True) if e - s > rollout])
        if len(self.starts) == 0:
            raise DatasetError(f"{buffer.source}: no clip is longer than rollout + 1 = {rollout + 1} frames")
        self.frame_dim = self.frames.shape[1]

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = self.starts[np.asarray(indices)][:, None] + np.arange(self.rollout + 1)[None]
        return {"frames": self.frames[idx], **{k: v[idx] for k, v in self.extras.items()}}

    def all_frames(self) -> np.ndarray:
        return self.frames
