"""Episodes of robot data in diffusion_policy's zarr layout: `data/<key>` arrays of shape (N, ...) holding every
step of every episode back to back, and `meta/episode_ends` (the exclusive end index of each episode).

Writes zarr format 3; reads format 3 and the format-2 stores (folders or .zip) that diffusion_policy's
published datasets use. A store whose arrays disagree with `episode_ends`, that lacks a key, or that has lost
chunks is refused with the file and key named: zarr would otherwise fill a lost chunk with zeros silently.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import ZstdCodec


class DatasetError(ValueError):
    pass


class ReplayBuffer:
    def __init__(self, data: dict[str, np.ndarray] | None = None, episode_ends: Iterable[int] = (),
                 attrs: dict | None = None, source: str = "<memory>"):
        self._data = dict(data or {})
        self._pending: dict[str, list[np.ndarray]] = {}  # episodes added since the arrays were last joined
        self.episode_ends = np.asarray(list(episode_ends), dtype=np.int64)
        self.attrs = dict(attrs or {})
        self.source = source
        self._validate()

    @property
    def data(self) -> dict[str, np.ndarray]:
        if self._pending:
            for k, parts in self._pending.items():
                self._data[k] = np.concatenate(([self._data[k]] if k in self._data else []) + parts)
            self._pending = {}
        return self._data

    # -- shape of the data --

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def n_steps(self) -> int:
        return int(self.episode_ends[-1]) if len(self.episode_ends) else 0

    @property
    def keys(self) -> list[str]:
        return sorted(self.data)

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(np.concatenate([[0], self.episode_ends]))

    def episode(self, i: int) -> dict[str, np.ndarray]:
        start = int(self.episode_ends[i - 1]) if i > 0 else 0
        end = int(self.episode_ends[i])
        return {k: v[start:end] for k, v in self.data.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.data:
            raise DatasetError(f"{self.source}: no data/{key}; it has {self.keys}")
        return self.data[key]

    def _validate(self) -> None:
        ends = self.episode_ends
        if ends.ndim != 1:
            raise DatasetError(f"{self.source}: meta/episode_ends must be 1-D, got shape {ends.shape}")
        if len(ends) and (ends[0] <= 0 or (np.diff(ends) <= 0).any()):
            raise DatasetError(f"{self.source}: meta/episode_ends must be positive and strictly increasing, "
                               f"got {ends[:10].tolist()}{' ...' if len(ends) > 10 else ''}")
        for key, arr in self._data.items():
            if len(arr) != self.n_steps:
                raise DatasetError(
                    f"{self.source}: data/{key} has {len(arr)} steps but meta/episode_ends says {self.n_steps} "
                    f"({self.n_episodes} episodes)"
                )

    # -- building --

    def add_episode(self, episode: dict[str, np.ndarray]) -> None:
        lengths = {k: len(v) for k, v in episode.items()}
        if not lengths or len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise DatasetError(f"an episode needs every key with the same, non-zero length; got {lengths}")
        known = {k: (self._pending[k][0] if self._pending.get(k) else self._data[k])
                 for k in set(self._data) | set(self._pending)}
        if known and set(episode) != set(known):
            raise DatasetError(f"episode keys {sorted(episode)} differ from the buffer's {sorted(known)}")
        arrays = {k: np.array(v) for k, v in episode.items()}
        for k, v in arrays.items():
            if k in known and (v.shape[1:], v.dtype) != (known[k].shape[1:], known[k].dtype):
                raise DatasetError(f"episode {k!r} has per-step shape {v.shape[1:]} and dtype {v.dtype}, the "
                                   f"buffer has {known[k].shape[1:]} and {known[k].dtype}")
        for k, v in arrays.items():
            self._pending.setdefault(k, []).append(v)
        n = next(iter(lengths.values()))
        self.episode_ends = np.append(self.episode_ends, self.n_steps + n)

    # -- zarr I/O --

    def save(self, path: str | Path, zarr_format: int = 3, chunk_steps: int = 4096, overwrite: bool = False) -> Path:
        """Write the store into a temporary sibling and rename it into place when complete, so an interrupted
        save never leaves a half-written dataset that looks whole. An existing `path` is refused unless
        `overwrite`; then it is replaced only once the new store is complete."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise DatasetError(f"{path} already exists; nothing was written (choose another --out, or pass "
                               f"--overwrite to replace it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        root = zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format)
        # Every chunk on disk, so a lost chunk can be told from a zero one; zstd with its content checksum, so a
        # flipped byte in a chunk is an error on reading, not a silently wrong value.
        cfg = {"write_empty_chunks": True}
        compressors = (ZstdCodec(level=3, checksum=True),) if zarr_format == 3 else (Zstd(level=3, checksum=True),)
        for key, arr in self.data.items():
            chunks = (min(chunk_steps, max(len(arr), 1)),) + arr.shape[1:]
            z = root.create_array(f"data/{key}", shape=arr.shape, chunks=chunks, dtype=arr.dtype, config=cfg,
                                  compressors=compressors)
            z[...] = arr
        ends = root.create_array("meta/episode_ends", shape=self.episode_ends.shape,
                                 chunks=(max(len(self.episode_ends), 1),), dtype=np.int64, config=cfg,
                                 compressors=compressors)
        ends[...] = self.episode_ends
        root.attrs.update(json.loads(json.dumps(self.attrs)))
        if path.exists():
            old = path.with_name(f".{path.name}.replaced-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, keys: Iterable[str] | None = None) -> ReplayBuffer:
        """Read a store into memory. `keys` limits which `data/` arrays are read (all by default)."""
        path = Path(path)
        if not path.exists():
            raise DatasetError(f"dataset {path} does not exist")
        try:
            if path.suffix == ".zip":
                root = zarr.open_group(zarr.storage.ZipStore(str(path), mode="r"), mode="r")
            else:
                root = zarr.open_group(str(path), mode="r")
        except Exception as e:  # zarr raises several kinds for a folder that is not a group
            raise DatasetError(f"{path} is not a zarr group: {e}") from None
        src = str(path)
        for group in ("data", "meta"):
            if group not in root:
                raise DatasetError(f"{src}: missing group {group!r} (diffusion_policy layout: data/<key>, "
                                   "meta/episode_ends)")
        if "episode_ends" not in root["meta"]:
            raise DatasetError(f"{src}: missing meta/episode_ends")
        available = sorted(root["data"].array_keys())
        wanted = list(keys) if keys is not None else available
        for k in wanted:
            if k not in available:
                raise DatasetError(f"{src}: missing data/{k}; it has {available}")
        arrays = {"meta/episode_ends": root["meta/episode_ends"], **{f"data/{k}": root[f"data/{k}"] for k in wanted}}
        loaded = {}
        for name, arr in arrays.items():
            stored, total = arr.nchunks_initialized, arr.nchunks
            if stored < total:
                raise DatasetError(f"{src}: {name} is truncated: {stored} of {total} chunks are on disk")
            try:
                loaded[name] = arr[...]
            except Exception as e:
                raise DatasetError(f"{src}: {name} cannot be read (damaged chunk?): {e}") from None
        ends = loaded.pop("meta/episode_ends")
        data = {name.split("/", 1)[1]: v for name, v in loaded.items()}
        return cls(data, ends, dict(root.attrs), source=src)
