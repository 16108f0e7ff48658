"""Datasets: the zarr ReplayBuffer, windowed sequence sampling, and the D4RL HDF5 layout."""

from .d4rl import d4rl_to_replay_buffer, read_d4rl, replay_buffer_to_d4rl, write_d4rl
from .policy_dataset import PolicyDataset
from .replay_buffer import DatasetError, ReplayBuffer
from .sequence import SequenceSampler, episode_split, window_starts

__all__ = ["DatasetError", "PolicyDataset", "ReplayBuffer", "SequenceSampler", "d4rl_to_replay_buffer",
           "episode_split", "read_d4rl", "replay_buffer_to_d4rl", "window_starts", "write_d4rl"]
