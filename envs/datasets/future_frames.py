"""Samples for a policy that predicts future frames with its actions (PAD): at every step t of an episode, the
current frame, pose and task, and the `frames` future frames and pose targets `skip` steps apart (t + skip,
t + 2 skip, ...; past the episode's end, its last step repeats).

A pose target is the effector position at that future step (`position_dims` of the pose) and, with a gripper, the
gripper command executed just before it (`gripper_action_dim` of the action): what a controller that tracks the
targets must reproduce.
"""

from __future__ import annotations

import numpy as np

from .replay_buffer import DatasetError, ReplayBuffer


class FutureFrameDataset:
    def __init__(self, buffer: ReplayBuffer, frames: int, skip: int, position_dims: list[int],
                 gripper_action_dim: int | None, image_key: str = "image", pose_key: str = "pose",
                 task_key: str = "task", action_key: str = "action"):
        missing = [k for k in (image_key, pose_key, action_key) if k not in buffer.data]
        if missing:
            raise DatasetError(f"{buffer.source}: a future-frame dataset needs {missing}; it has {buffer.keys} "
                               f"(collect with --image; several tasks, comma-separated, add pose and task)")
        self.images = np.asarray(buffer[image_key])
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DatasetError(f"{buffer.source}: {image_key!r} must be (N, H, W, 3) uint8 frames, got "
                               f"{self.images.shape} {self.images.dtype}")
        self.poses = np.asarray(buffer[pose_key], np.float32)
        actions = np.asarray(buffer[action_key], np.float32)
        n = buffer.n_steps
        self.tasks = (np.asarray(buffer[task_key], np.int64) if task_key in buffer.data
                      else np.zeros(n, np.int64))
        for name, arr in ((pose_key, self.poses), (action_key, actions), (task_key, self.tasks)):
            if len(arr) != n:
                raise DatasetError(f"{buffer.source}: {name!r} has {len(arr)} rows for {n} steps")
        if not (np.isfinite(self.poses).all() and np.isfinite(actions).all()):
            raise DatasetError(f"{buffer.source}: pose or action holds NaN or Inf")
        if frames < 1 or skip < 1:
            raise ValueError(f"frames and skip must be >= 1, got {frames}, {skip}")
        self.frames, self.skip = frames, skip
        self.image_shape = list(self.images.shape[1:3])
        self.pose_dim, self.action_dim = self.poses.shape[1], actions.shape[1]
        starts = np.concatenate([[0], buffer.episode_ends[:-1]]).astype(np.int64)
        ends = buffer.episode_ends.astype(np.int64)
        self.steps = np.arange(n)
        episode_of = np.repeat(np.arange(len(ends)), ends - starts)
        offsets = skip * np.arange(1, frames + 1)
        # (N, frames): each step's future indices, clamped to its episode's last step
        self.future = np.minimum(self.steps[:, None] + offsets[None], ends[episode_of][:, None] - 1)
        targets = [self.poses[self.future][..., position_dims]]
        if gripper_action_dim is not None:
            before = np.maximum(self.future - 1, starts[episode_of][:, None])
            targets.append(actions[before][..., [gripper_action_dim]])
        self.targets = np.concatenate(targets, axis=-1).astype(np.float32)
        self.n_tasks = int(self.tasks.max()) + 1

    def __len__(self) -> int:
        return len(self.steps)

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        i = np.asarray(indices)
        return {"image": self.images[i], "pose": self.poses[i], "task": self.tasks[i],
                "future_images": self.images[self.future[i]], "targets": self.targets[i]}

    def all_poses(self) -> np.ndarray:
        return self.poses

    def all_targets(self) -> np.ndarray:
        return self.targets.reshape(-1, self.targets.shape[-1])
