"""The D4RL HDF5 layout, read and written with h5py (the `d4rl` package itself cannot run here).

Top-level datasets `observations` (N, obs_dim), `actions` (N, act_dim), `rewards` (N,), `terminals` (N,),
`timeouts` (N,), and optionally `infos/<name>` (N, ...). An episode ends where `terminals` or `timeouts` is set.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .replay_buffer import DatasetError, ReplayBuffer

REQUIRED = ("observations", "actions", "rewards", "terminals", "timeouts")


def write_d4rl(path: str | Path, data: dict[str, np.ndarray]) -> Path:
    path = Path(path)
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise DatasetError(f"cannot write {path}: missing {missing}")
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=np.asarray(value), compression="gzip")
    return path


def read_d4rl(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"D4RL file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path} is not a readable HDF5 file: {e}") from None
    out: dict[str, np.ndarray] = {}
    with f:
        missing = [k for k in REQUIRED if k not in f]
        if missing:
            raise DatasetError(f"{path}: missing {missing}; the D4RL layout needs {list(REQUIRED)}")

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                try:
                    out[name] = obj[()]
                except OSError as e:
                    raise DatasetError(f"{path}: {name} cannot be read (truncated file?): {e}") from None

        f.visititems(visit)
    n = len(out["observations"])
    bad = {k: len(v) for k, v in out.items() if np.ndim(v) == 0 or len(v) != n}
    if bad:
        raise DatasetError(f"{path}: every dataset must have {n} rows like 'observations'; got {bad}")
    return out


def d4rl_to_replay_buffer(data: dict[str, np.ndarray], source: str = "<d4rl>") -> ReplayBuffer:
    """Episodes split at terminals | timeouts; steps after the last flag form a final, partial episode."""
    done = np.asarray(data["terminals"], bool) | np.asarray(data["timeouts"], bool)
    ends = np.flatnonzero(done) + 1
    n = len(done)
    if len(ends) == 0 or ends[-1] != n:
        ends = np.append(ends, n)
    fields = {
        "obs": np.asarray(data["observations"], np.float32),
        "action": np.asarray(data["actions"], np.float32),
        "reward": np.asarray(data["rewards"], np.float32),
        "terminal": np.asarray(data["terminals"], bool),
    }
    return ReplayBuffer(fields, ends, {"source_format": "d4rl"}, source=source)


def replay_buffer_to_d4rl(buffer: ReplayBuffer, obs_key: str = "obs", action_key: str = "action",
                          reward_key: str | None = "reward") -> dict[str, np.ndarray]:
    n = buffer.n_steps
    timeouts = np.zeros(n, bool)
    timeouts[buffer.episode_ends - 1] = True
    terminals = np.asarray(buffer["terminal"], bool) if "terminal" in buffer.data else np.zeros(n, bool)
    return {
        "observations": buffer[obs_key].astype(np.float32),
        "actions": buffer[action_key].astype(np.float32),
        "rewards": buffer[reward_key].astype(np.float32) if reward_key and reward_key in buffer.data
        else np.zeros(n, np.float32),
        "terminals": terminals,
        "timeouts": timeouts & ~terminals,
    }
