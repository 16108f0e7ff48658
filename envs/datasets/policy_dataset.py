"""Training batches for a diffusion policy: observation history (To steps) and the action chunk (horizon)."""

from __future__ import annotations

import numpy as np

from .replay_buffer import DatasetError, ReplayBuffer
from .sequence import SequenceSampler, episode_split


class PolicyDataset:
    """Maps a ReplayBuffer's keys to the policy's fields: `state` (the state keys concatenated), `action`,
    and `image` when an image key is given. Batches are numpy arrays of the dataset's dtypes."""

    def __init__(self, buffer: ReplayBuffer, horizon: int, n_obs_steps: int, n_action_steps: int,
                 state_keys: list[str], action_key: str, image_key: str | None = None,
                 val_ratio: float = 0.0, seed: int = 0, split: str = "train"):
        for k in [*state_keys, action_key, *([image_key] if image_key else [])]:
            buffer[k]  # names the missing key and the ones the store has
        self.buffer = buffer
        self.state_keys, self.action_key, self.image_key = list(state_keys), action_key, image_key
        for k in self.state_keys + [action_key]:
            if buffer[k].ndim != 2:
                raise DatasetError(f"{buffer.source}: data/{k} must be (steps, dim), got {buffer[k].shape}")
        if image_key and (buffer[image_key].ndim != 4 or buffer[image_key].shape[-1] != 3):
            raise DatasetError(f"{buffer.source}: data/{image_key} must be (steps, H, W, 3), "
                               f"got {buffer[image_key].shape}")
        train, val = episode_split(buffer.n_episodes, val_ratio, seed)
        mask = {"train": train, "val": val}[split]
        obs_keys = self.state_keys + ([image_key] if image_key else [])
        self.sampler = SequenceSampler(buffer, horizon, pad_before=n_obs_steps - 1, pad_after=n_action_steps - 1,
                                       key_lengths={k: n_obs_steps for k in obs_keys}, episode_mask=mask)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def state_dim(self) -> int:
        return sum(self.buffer[k].shape[1] for k in self.state_keys)

    @property
    def action_dim(self) -> int:
        return self.buffer[self.action_key].shape[1]

    @property
    def image_shape(self) -> list[int] | None:
        return list(self.buffer[self.image_key].shape[1:3]) if self.image_key else None

    def all_states(self) -> np.ndarray:
        return np.concatenate([self.buffer[k] for k in self.state_keys], axis=-1).astype(np.float32)

    def all_actions(self) -> np.ndarray:
        return self.buffer[self.action_key].astype(np.float32)

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        keys = self.state_keys + [self.action_key] + ([self.image_key] if self.image_key else [])
        windows = self.sampler.gather(indices, keys)
        out = {
            "state": np.concatenate([windows[k] for k in self.state_keys], axis=-1).astype(np.float32),
            "action": windows[self.action_key].astype(np.float32),
        }
        if self.image_key:
            out["image"] = windows[self.image_key]
        return out
