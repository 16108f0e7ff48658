"""Offline-RL datasets in the layouts their users already have, as one ReplayBuffer (`obs`, `action`, `reward`,
`terminal`, `next_obs` where the source has next observations, episode ends at terminals and timeouts,
`attrs["reference_returns"]` for D4RL's normalised score):

    load_offline("data/umaze.hdf5")                 # D4RL's HDF5 layout (rtdp's metadata in the file's attrs)
    load_offline("data/umaze.zarr")                 # rtdp's own replay buffer
    load_offline("minari:D4RL/pointmaze/umaze-v2")  # a Minari dataset by id, from MINARI_DATASETS_PATH
    load_offline("data/minari/rtdp/umaze-v0")       # ... or by its folder

    save_offline(buffer, "data/umaze.hdf5" | ".zarr" | "minari:<id>" [, minari_root])

Goal-conditioned Minari observations (PointMaze's `observation`, `achieved_goal`, `desired_goal`) become one
state vector (observation, desired goal), the same one `pointmaze/*` tasks observe. Every source is checked before
use: a reward that is NaN or Inf, fields of different lengths, or no terminal and no timeout anywhere is refused with
the key named.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .d4rl import read_d4rl, write_d4rl
from .replay_buffer import DatasetError, ReplayBuffer

FIELDS = ("obs", "action", "reward", "terminal")
MINARI_PREFIX = "minari:"
ATTRS_KEY = "rtdp"  # the HDF5 attribute holding rtdp's metadata (task, reference returns) as JSON


def check_d4rl_arrays(data: dict[str, np.ndarray], source: str) -> None:
    n = len(data["observations"])
    for key in ("actions", "rewards", "terminals", "timeouts"):
        if len(data[key]) != n:
            raise DatasetError(f"{source}: {key!r} has {len(data[key])} rows, 'observations' {n}")
    for key in ("observations", "actions", "rewards"):
        bad = ~np.isfinite(np.asarray(data[key], np.float64))
        if bad.any():
            raise DatasetError(f"{source}: {key!r} holds {int(bad.sum())} NaN or Inf values (first at row "
                               f"{int(np.argwhere(bad)[0][0])})")
    if n and not (np.asarray(data["terminals"], bool).any() or np.asarray(data["timeouts"], bool).any()):
        raise DatasetError(f"{source}: neither 'terminals' nor 'timeouts' is set on any row: the episode ends "
                           f"cannot be recovered")


def d4rl_buffer(data: dict[str, np.ndarray], source: str, attrs: dict | None = None) -> ReplayBuffer:
    check_d4rl_arrays(data, source)
    done = np.asarray(data["terminals"], bool) | np.asarray(data["timeouts"], bool)
    ends = np.flatnonzero(done) + 1
    n = len(done)
    if len(ends) == 0 or ends[-1] != n:
        ends = np.append(ends, n)
    fields = {"obs": np.asarray(data["observations"], np.float32), "action": np.asarray(data["actions"], np.float32),
              "reward": np.asarray(data["rewards"], np.float32), "terminal": np.asarray(data["terminals"], bool)}
    if "next_observations" in data:  # an episode's last next-observation is in no other row (a fall, a time limit)
        fields["next_obs"] = np.asarray(data["next_observations"], np.float32)
    return ReplayBuffer(fields, ends, {"source_format": "d4rl", **(attrs or {})}, source=source)


def buffer_arrays(buffer: ReplayBuffer) -> dict[str, np.ndarray]:
    """A buffer's D4RL arrays: each episode's last step a timeout unless it is terminal."""
    missing = [k for k in FIELDS if k not in buffer.data]
    if missing:
        raise DatasetError(f"{buffer.source}: an offline dataset needs {list(FIELDS)}; missing {missing}")
    terminals = np.asarray(buffer["terminal"], bool)
    timeouts = np.zeros(buffer.n_steps, bool)
    timeouts[buffer.episode_ends - 1] = True
    arrays = {"observations": buffer["obs"], "actions": buffer["action"], "rewards": buffer["reward"],
              "terminals": terminals, "timeouts": timeouts & ~terminals}
    if "next_obs" in buffer.data:
        arrays["next_observations"] = buffer["next_obs"]
    return arrays


# -- Minari -------------------------------------------------------------------------------------------------------


@contextmanager
def minari_root(root: str | Path | None):
    """Minari finds datasets under MINARI_DATASETS_PATH; point it at `root` for the duration."""
    if root is None:
        yield
        return
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(Path(root).resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH")
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _flat_observations(obs, source: str) -> np.ndarray:
    if isinstance(obs, dict):
        if {"observation", "desired_goal"} <= set(obs):
            return np.concatenate([np.asarray(obs["observation"]), np.asarray(obs["desired_goal"])], axis=-1)
        raise DatasetError(f"{source}: dict observations with keys {sorted(obs)}; rtdp reads flat observations and "
                           f"goal-conditioned ones ('observation', 'desired_goal')")
    return np.asarray(obs)


def read_minari(source: str | Path) -> ReplayBuffer:
    """A Minari dataset by id (`minari:<id>` or a bare id) or by its folder (the one holding `data/`)."""
    import minari

    text = str(source)
    try:
        if text.startswith(MINARI_PREFIX) or not Path(text).exists():
            dataset = minari.load_dataset(text.removeprefix(MINARI_PREFIX))
        else:
            folder = Path(text)
            dataset = minari.MinariDataset(folder / "data" if (folder / "data").is_dir() else folder)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise DatasetError(f"{source} is not a readable Minari dataset: {e}") from None
    obs, nxt, act, rew, term, trunc = [], [], [], [], [], []
    for episode in dataset.iterate_episodes():
        n = len(episode.actions)
        o = _flat_observations(episode.observations, text)
        if len(o) != n + 1 or len(episode.rewards) != n:
            raise DatasetError(f"{source}: episode {episode.id} has {len(o)} observations, {n} actions and "
                               f"{len(episode.rewards)} rewards; Minari stores one observation more than actions")
        obs.append(o[:n])
        nxt.append(o[1:])
        act.append(np.asarray(episode.actions))
        rew.append(np.asarray(episode.rewards))
        term.append(np.asarray(episode.terminations, bool))
        t = np.asarray(episode.truncations, bool).copy()
        t[-1] |= not term[-1][-1]  # an episode ends at its last step either way
        trunc.append(t)
    if not obs:
        raise DatasetError(f"{source}: the Minari dataset holds no episodes")
    meta = dataset.storage.metadata
    attrs = {"source": text, "minari_id": meta.get("dataset_id")}
    if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        attrs["reference_returns"] = {"random": float(meta["ref_min_score"]), "expert": float(meta["ref_max_score"])}
    description = meta.get("description") or ""
    if description.startswith("{"):  # rtdp's own datasets keep their metadata here
        attrs.update(json.loads(description))
    data = {"observations": np.concatenate(obs), "actions": np.concatenate(act), "rewards": np.concatenate(rew),
            "terminals": np.concatenate(term), "timeouts": np.concatenate(trunc),
            "next_observations": np.concatenate(nxt)}
    buffer = d4rl_buffer(data, text, attrs)
    buffer.attrs["source_format"] = "minari"
    return buffer


def write_minari(buffer: ReplayBuffer, dataset_id: str, root: str | Path | None = None, env_spec=None,
                 goal_dim: int = 0):
    """`buffer` as a Minari dataset written by minari itself, so `minari.load_dataset(dataset_id)` opens it. The
    episodes' next observations are the following steps' (a goal-segmented stream continues across episodes).
    `goal_dim` > 0 writes goal-conditioned dict observations (the last `goal_dim` state entries are the goal), as
    gymnasium-robotics' mazes observe; `env_spec` the environment that produced it (reference scores need it)."""
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    arrays = buffer_arrays(buffer)
    obs = arrays["observations"]
    starts = np.concatenate([[0], buffer.episode_ends[:-1]])

    def observation(rows: np.ndarray):
        o = obs[rows]
        if not goal_dim:
            return o
        pos = o[:, :2]
        return {"achieved_goal": pos.astype(np.float64), "desired_goal": o[:, -goal_dim:].astype(np.float64),
                "observation": o[:, :-goal_dim].astype(np.float64)}

    episodes = []
    for i, (s, e) in enumerate(zip(starts, buffer.episode_ends, strict=True)):
        if "next_observations" in arrays and not goal_dim:  # ends with the observation its last step led to
            observations = np.concatenate([obs[s:e], arrays["next_observations"][e - 1 : e]])
        else:  # a goal-segmented stream: the next episode's first step follows
            observations = observation(np.append(np.arange(s, e), min(e, len(obs) - 1)))
        episodes.append(EpisodeBuffer(id=i, observations=observations, actions=arrays["actions"][s:e],
                                      rewards=arrays["rewards"][s:e], terminations=arrays["terminals"][s:e],
                                      truncations=arrays["timeouts"][s:e]))
    dim = obs.shape[1]
    if goal_dim:
        box = gym.spaces.Box(-np.inf, np.inf, (goal_dim,), np.float64)
        obs_space = gym.spaces.Dict({"achieved_goal": box, "desired_goal": box, "observation": gym.spaces.Box(
            -np.inf, np.inf, (dim - goal_dim,), np.float64)})
    else:
        obs_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (arrays["actions"].shape[1],), np.float32)
    refs = buffer.attrs.get("reference_returns") or {}
    meta = {k: v for k, v in buffer.attrs.items() if k in ("task", "steps", "seed", "action_noise", "expert",
                                                          "reference_returns", "created")}
    with minari_root(root):
        return minari.create_dataset_from_buffers(
            dataset_id, episodes, env=env_spec, eval_env=env_spec, observation_space=obs_space,
            action_space=act_space, algorithm_name=buffer.attrs.get("expert", "rtdp"), author="rtdp",
            author_email="rtdp@localhost", code_permalink="https://github.com/rtdp/rtdp",
            ref_min_score=refs.get("random") if env_spec is not None else None,
            ref_max_score=refs.get("expert") if env_spec is not None else None,
            description=json.dumps(meta))


# -- any source ---------------------------------------------------------------------------------------------------


def load_offline(source: str | Path) -> ReplayBuffer:
    text = str(source)
    path = Path(text)
    if text.endswith((".hdf5", ".h5")):
        data = read_d4rl(path)
        attrs = _hdf5_attrs(path)
        return d4rl_buffer(data, text, attrs)
    if text.endswith(".zarr") or (path / "zarr.json").is_file():
        buffer = ReplayBuffer.load(path)
        check_d4rl_arrays(buffer_arrays(buffer), text)
        return buffer
    return read_minari(source)


def _hdf5_attrs(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        raw = f.attrs.get(ATTRS_KEY)
    return json.loads(raw) if raw else {}


def save_offline(buffer: ReplayBuffer, out: str | Path, overwrite: bool = False, minari_dir: str | Path | None = None,
                 env_spec=None, goal_dim: int = 0) -> str:
    """Write `buffer` where `out` says (the format from its form); refused if it exists and not `overwrite`."""
    import h5py

    text = str(out)
    if text.startswith(MINARI_PREFIX):
        dataset_id = text.removeprefix(MINARI_PREFIX)
        write_minari(buffer, dataset_id, minari_dir, env_spec, goal_dim)
        return text
    path = Path(text)
    if path.exists() and not overwrite:
        raise DatasetError(f"{path} already exists; nothing was written")
    if text.endswith((".hdf5", ".h5")):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        write_d4rl(tmp, buffer_arrays(buffer))
        with h5py.File(tmp, "a") as f:
            f.attrs[ATTRS_KEY] = json.dumps(buffer.attrs)
        tmp.replace(path)  # a crash mid-write leaves the old file, never half a new one
        return text
    buffer.save(path, overwrite=overwrite)
    return text
