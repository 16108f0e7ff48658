import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from envs.datasets import (
    DatasetError,
    PolicyDataset,
    ReplayBuffer,
    SequenceSampler,
    d4rl_to_replay_buffer,
    read_d4rl,
    replay_buffer_to_d4rl,
    write_d4rl,
)


def make_buffer(lengths=(5, 3, 7), obs_dim=3) -> ReplayBuffer:
    buf = ReplayBuffer()
    start = 0
    for n in lengths:
        steps = np.arange(start, start + n, dtype=np.float32)
        buf.add_episode({"obs": np.repeat(steps[:, None], obs_dim, 1), "action": np.stack([steps, -steps], 1)})
        start += n
    return buf


def test_zarr3_roundtrip(tmp_path):
    buf = make_buffer()
    buf.attrs["task"] = "unit"
    buf.save(tmp_path / "d.zarr")
    assert zarr.open_group(str(tmp_path / "d.zarr"), mode="r").metadata.zarr_format == 3
    back = ReplayBuffer.load(tmp_path / "d.zarr")
    assert back.episode_ends.tolist() == [5, 8, 15] and back.keys == ["action", "obs"]
    assert np.array_equal(back["obs"], buf["obs"]) and back.attrs["task"] == "unit"
    assert np.array_equal(back.episode(1)["action"][:, 0], [5, 6, 7])


def write_zarr2_like_diffusion_policy(path: Path, buf: ReplayBuffer):
    """The layout and codec of diffusion_policy's published stores: zarr format 2, Blosc-compressed chunks."""
    from numcodecs import Blosc

    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    for k, v in buf.data.items():
        a = root.create_array(f"data/{k}", shape=v.shape, chunks=(4,) + v.shape[1:], dtype=v.dtype,
                              compressors=Blosc(cname="lz4", clevel=5))
        a[...] = v
    e = root.create_array("meta/episode_ends", shape=buf.episode_ends.shape, chunks=buf.episode_ends.shape,
                          dtype=np.int64)
    e[...] = buf.episode_ends


def test_reads_diffusion_policy_zarr2_stores_folder_and_zip(tmp_path):
    buf = make_buffer()
    write_zarr2_like_diffusion_policy(tmp_path / "v2.zarr", buf)
    assert (tmp_path / "v2.zarr" / "data" / "obs" / ".zarray").is_file()
    back = ReplayBuffer.load(tmp_path / "v2.zarr")
    assert np.array_equal(back["action"], buf["action"]) and back.n_episodes == 3
    import shutil
    shutil.make_archive(str(tmp_path / "v2.zarr"), "zip", tmp_path / "v2.zarr")
    zipped = ReplayBuffer.load(tmp_path / "v2.zarr.zip")
    assert np.array_equal(zipped["obs"], buf["obs"])


def test_missing_key_names_the_store_and_the_keys_it_has(tmp_path):
    make_buffer().save(tmp_path / "d.zarr")
    with pytest.raises(DatasetError, match=r"d.zarr: missing data/state; it has \['action', 'obs'\]"):
        ReplayBuffer.load(tmp_path / "d.zarr", keys=["state"])


def test_missing_episode_ends(tmp_path):
    root = zarr.open_group(str(tmp_path / "d.zarr"), mode="w")
    root.create_array("data/obs", shape=(4, 2), dtype="f4")
    root.create_group("meta")
    with pytest.raises(DatasetError, match="missing meta/episode_ends"):
        ReplayBuffer.load(tmp_path / "d.zarr")


def test_inconsistent_lengths_are_named(tmp_path):
    buf = make_buffer()
    buf.data["action"] = buf.data["action"][:-2]
    with pytest.raises(DatasetError, match=r"data/action has 13 steps but meta/episode_ends says 15"):
        ReplayBuffer(buf.data, buf.episode_ends)
    with pytest.raises(DatasetError, match="strictly increasing"):
        ReplayBuffer({"obs": np.zeros((4, 1))}, [3, 2])
    with pytest.raises(DatasetError, match="same, non-zero length"):
        ReplayBuffer().add_episode({"obs": np.zeros((4, 1)), "action": np.zeros((3, 1))})


def test_truncated_store_is_refused_not_zero_filled(tmp_path):
    buf = make_buffer(lengths=(5000, 4000))
    buf.save(tmp_path / "d.zarr", chunk_steps=2048)
    chunk_dir = tmp_path / "d.zarr" / "data" / "obs" / "c"
    chunks = sorted(p for p in chunk_dir.rglob("*") if p.is_file())
    assert len(chunks) == 5
    os.remove(chunks[-1])
    with pytest.raises(DatasetError, match=r"data/obs is truncated: 4 of 5 chunks are on disk"):
        ReplayBuffer.load(tmp_path / "d.zarr")


def test_damaged_chunk_is_named(tmp_path):
    make_buffer(lengths=(50,)).save(tmp_path / "d.zarr")
    chunk = next(p for p in (tmp_path / "d.zarr" / "data" / "action" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:7])
    with pytest.raises(DatasetError, match="data/action cannot be read"):
        ReplayBuffer.load(tmp_path / "d.zarr")


def test_not_a_store(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ReplayBuffer.load(tmp_path / "nope.zarr")


def chi_reference_windows(episode_ends, horizon, pad_before, pad_after, data):
    """diffusion_policy's create_indices + sample_sequence, written out loop by loop."""
    out = []
    start = 0
    for end in episode_ends:
        length = end - start
        for idx in range(-pad_before, length - horizon + pad_after + 1):
            buffer_start, buffer_end = max(idx, 0) + start, min(idx + horizon, length) + start
            sample_start = buffer_start - (idx + start)
            sample_end = sample_start + (buffer_end - buffer_start)
            sample = data[buffer_start:buffer_end]
            window = np.zeros((horizon,) + data.shape[1:], dtype=data.dtype)
            window[:sample_start] = sample[0]
            window[sample_end:] = sample[-1]
            window[sample_start:sample_end] = sample
            out.append(window)
        start = end
    return np.stack(out)


@pytest.mark.parametrize("horizon,pad_before,pad_after", [(4, 1, 3), (16, 1, 7), (2, 0, 0), (6, 3, 5)])
def test_sequence_windows_match_diffusion_policy_padding(horizon, pad_before, pad_after):
    buf = make_buffer(lengths=(5, 3, 7, 12))
    try:
        sampler = SequenceSampler(buf, horizon, pad_before, pad_after)
    except DatasetError:
        pytest.skip("no window fits")
    ref = chi_reference_windows(buf.episode_ends, horizon, pad_before, pad_after, buf["obs"])
    got = sampler.gather(np.arange(len(sampler)), ["obs"])["obs"]
    assert got.shape == ref.shape and np.array_equal(got, ref)


def test_windows_never_cross_episodes():
    buf = make_buffer(lengths=(5, 3, 7))
    s = SequenceSampler(buf, 6, 1, 5)
    windows = s.gather(np.arange(len(s)), ["obs"])["obs"][..., 0]
    episode_of = np.searchsorted(buf.episode_ends, windows, side="right")
    assert (episode_of == episode_of[:, :1]).all()


def test_policy_dataset_batches_obs_history_and_action_chunk():
    ds = PolicyDataset(make_buffer(lengths=(10, 10)), horizon=8, n_obs_steps=2, n_action_steps=4,
                       state_keys=["obs"], action_key="action")
    b = ds.batch(np.array([0, 5]))
    assert b["state"].shape == (2, 2, 3) and b["action"].shape == (2, 8, 2)
    assert b["state"].dtype == np.float32
    # window 0 starts one step before the episode: its first obs is the padded copy of step 0
    assert b["state"][0, :, 0].tolist() == [0.0, 0.0] and b["action"][0, :3, 0].tolist() == [0.0, 0.0, 1.0]


def test_val_split_holds_out_whole_episodes():
    buf = make_buffer(lengths=(10,) * 10)
    kw = dict(horizon=4, n_obs_steps=2, n_action_steps=2, state_keys=["obs"], action_key="action", val_ratio=0.2)
    train, val = PolicyDataset(buf, **kw, split="train"), PolicyDataset(buf, **kw, split="val")
    t_eps = set(np.searchsorted(buf.episode_ends, train.sampler.index[:, 0], side="right"))
    v_eps = set(np.searchsorted(buf.episode_ends, val.sampler.index[:, 0], side="right"))
    assert len(v_eps) == 2 and not (t_eps & v_eps)


def test_d4rl_roundtrip_and_episode_split(tmp_path):
    n = 12
    data = {"observations": np.arange(n * 3, dtype=np.float32).reshape(n, 3),
            "actions": np.ones((n, 2), np.float32), "rewards": np.arange(n, dtype=np.float32),
            "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool),
            "infos/goal": np.zeros((n, 2), np.float32)}
    data["terminals"][3] = True
    data["timeouts"][8] = True
    write_d4rl(tmp_path / "d.hdf5", data)
    back = read_d4rl(tmp_path / "d.hdf5")
    assert set(back) == set(data) and np.array_equal(back["observations"], data["observations"])
    buf = d4rl_to_replay_buffer(back)
    assert buf.episode_ends.tolist() == [4, 9, 12]
    again = replay_buffer_to_d4rl(buf)
    assert np.array_equal(again["terminals"], data["terminals"])
    assert again["timeouts"].nonzero()[0].tolist() == [8, 11]


def test_d4rl_bad_files_are_named(tmp_path):
    with h5py.File(tmp_path / "m.hdf5", "w") as f:
        f["observations"] = np.zeros((4, 2))
        f["actions"] = np.zeros((4, 2))
    with pytest.raises(DatasetError, match=r"missing \['rewards', 'terminals', 'timeouts'\]"):
        read_d4rl(tmp_path / "m.hdf5")
    n = 4
    write_d4rl(tmp_path / "l.hdf5", {"observations": np.zeros((n, 2)), "actions": np.zeros((n - 1, 2)),
                                     "rewards": np.zeros(n), "terminals": np.zeros(n), "timeouts": np.zeros(n)})
    with pytest.raises(DatasetError, match=r"4 rows like 'observations'; got \{'actions': 3\}"):
        read_d4rl(tmp_path / "l.hdf5")
    raw = (tmp_path / "l.hdf5").read_bytes()
    (tmp_path / "t.hdf5").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DatasetError, match="t.hdf5"):
        read_d4rl(tmp_path / "t.hdf5")
