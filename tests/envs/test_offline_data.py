"""PointMaze tasks, the maze datasets and the offline-RL layouts (D4RL HDF5, Minari) rtdp reads and writes."""

import h5py
import numpy as np
import pytest

from envs.datasets import DatasetError, ReplayBuffer
from envs.datasets.offline import load_offline, save_offline
from envs.datasets.trajectory_dataset import TrajectoryDataset, discounted_return_to_go
from envs.pointmaze import GOAL_DIM, MAZES, PointMazeTask, collect_maze
from envs.rollout import run_episode
from envs.tasks import make_env


@pytest.fixture(scope="module")
def umaze_stream():
    return collect_maze("pointmaze/umaze", 3000, seed=0, noise=0.3, progress=False)


@pytest.mark.parametrize("maze", ["umaze", "medium"])
def test_waypoint_expert_reaches_every_goal(maze):
    env = make_env(f"pointmaze/{maze}")
    expert = env.expert()
    reached = 0
    for seed in range(10):
        result = run_episode(env, lambda h: expert(h["state"][-1])[None], 1, seed)
        assert result.steps == env.max_episode_steps  # a maze runs to its limit: the return counts time at the goal
        reached += result.success
        assert result.total_return > 0.3 * env.max_episode_steps
    assert reached == 10


def test_maze_stream_is_one_episode_per_goal(umaze_stream):
    b = umaze_stream
    assert b.n_steps == 3000 and b.attrs["goals_reached"] == b.n_episodes - 1 > 20
    goals = b["obs"][:, 4:]
    for i in range(b.n_episodes - 1):  # the goal is constant inside an episode and changes at its end
        ep = b.episode(i)
        assert np.all(ep["obs"][:, 4:] == ep["obs"][0, 4:]) and ep["reward"][-1] == 1.0
    assert not np.array_equal(goals[b.episode_ends[0] - 1], goals[b.episode_ends[0]])
    refs = b.attrs["reference_returns"]
    assert refs["expert"] > 10 * max(refs["random"], 1.0)


def test_d4rl_layout_round_trips_with_metadata(umaze_stream, tmp_path):
    path = save_offline(umaze_stream, tmp_path / "umaze.hdf5")
    with h5py.File(path) as f:
        assert sorted(k for k in f if isinstance(f[k], h5py.Dataset)) == [
            "actions", "observations", "rewards", "terminals", "timeouts"]
        assert int(f["timeouts"][()].sum()) == umaze_stream.n_episodes
    back = load_offline(path)
    assert np.array_equal(back.episode_ends, umaze_stream.episode_ends)
    for key in ("obs", "action", "reward"):
        assert np.array_equal(back[key], umaze_stream[key])
    assert back.attrs["reference_returns"] == umaze_stream.attrs["reference_returns"]
    with pytest.raises(DatasetError, match="already exists"):
        save_offline(umaze_stream, path)


def test_minari_dataset_written_by_rtdp_loads_with_minari(umaze_stream, tmp_path, monkeypatch):
    import gymnasium as gym
    import minari

    save_offline(umaze_stream, "minari:rtdp/umaze-test-v0", minari_dir=tmp_path, env_spec=gym.spec(MAZES["umaze"]),
                 goal_dim=GOAL_DIM)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    dataset = minari.load_dataset("rtdp/umaze-test-v0")
    assert dataset.total_steps == umaze_stream.n_steps and dataset.total_episodes == umaze_stream.n_episodes
    episode = next(dataset.iterate_episodes())
    # PointMaze's own observation layout, as Minari's D4RL/pointmaze datasets have it
    assert set(episode.observations) == {"observation", "achieved_goal", "desired_goal"}
    assert dataset.storage.metadata["ref_max_score"] == umaze_stream.attrs["reference_returns"]["expert"]
    for source in ("minari:rtdp/umaze-test-v0", str(tmp_path / "rtdp" / "umaze-test-v0")):
        back = load_offline(source)
        assert np.allclose(back["obs"], umaze_stream["obs"], atol=1e-6)
        assert np.array_equal(back.episode_ends, umaze_stream.episode_ends)
        assert back.attrs["task"] == "pointmaze/umaze"


def bad_d4rl(tmp_path, **change):
    n = 20
    data = {"observations": np.zeros((n, 3), np.float32), "actions": np.zeros((n, 2), np.float32),
            "rewards": np.ones(n, np.float32), "terminals": np.zeros(n, bool), "timeouts": np.eye(1, n, n - 1)[0] > 0}
    data.update(change)
    path = tmp_path / "bad.hdf5"
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
    return path


@pytest.mark.parametrize("change, named", [
    ({"rewards": np.r_[np.ones(19), np.nan].astype(np.float32)}, "'rewards' holds 1 NaN"),
    ({"actions": np.zeros((19, 2), np.float32)}, "20 rows like 'observations'; got {'actions': 19}"),
    ({"timeouts": np.zeros(20, bool)}, "neither 'terminals' nor 'timeouts'"),
    ({"observations": np.full((20, 3), np.inf, np.float32)}, "'observations' holds 60 NaN or Inf"),
])
def test_bad_offline_datasets_are_refused_with_the_key_named(tmp_path, change, named):
    with pytest.raises(DatasetError, match=named):
        load_offline(bad_d4rl(tmp_path, **change))


def test_trajectory_windows_pad_past_the_episode_end():
    rewards = np.array([0, 0, 1, 0, 1], np.float32)
    b = ReplayBuffer({"obs": np.arange(5, dtype=np.float32)[:, None], "action": np.zeros((5, 1), np.float32),
                      "reward": rewards, "terminal": np.zeros(5, bool)}, [3, 5])
    data = TrajectoryDataset(b, horizon=4, discount=0.5)
    batch = data.batch(np.array([1, 3]))
    assert batch["states"][:, :, 0].tolist() == [[1, 2, 2, 2], [3, 4, 4, 4]]
    assert batch["valid"].tolist() == [[True, True, False, False], [True, True, False, False]]
    assert np.allclose(discounted_return_to_go(rewards[:3], 0.5), [0.25, 0.5, 1.0])
    assert np.allclose(data.initial_returns(), [0.25, 0.5])


def test_strided_trajectory_windows_take_every_kth_step_and_pad_past_the_end():
    rewards = np.array([0, 0, 0, 0, 0, 1, 0, 0, 1], np.float32)
    b = ReplayBuffer({"obs": np.arange(9, dtype=np.float32)[:, None], "action": np.arange(9, dtype=np.float32)[:, None],
                      "reward": rewards, "terminal": np.zeros(9, bool)}, [6, 9])
    data = TrajectoryDataset(b, horizon=3, discount=0.5, stride=2)
    batch = data.batch(np.array([0, 3, 6]))
    assert batch["states"][:, :, 0].tolist() == [[0, 2, 4], [3, 5, 5], [6, 8, 8]]
    assert batch["actions"][:, :, 0].tolist() == [[0, 2, 4], [3, 5, 5], [6, 8, 8]]
    assert batch["valid"].tolist() == [[True, True, True], [True, True, False], [True, True, False]]
    # each state's own return-to-go over every step after it, not over the strided ones
    assert np.allclose(batch["rtg"][0], [0.5 ** 5, 0.5 ** 3, 0.5])
    with pytest.raises(ValueError, match="stride must be >= 1"):
        TrajectoryDataset(b, horizon=3, discount=0.5, stride=0)


def test_maze_task_refuses_unknown_mazes_and_images():
    with pytest.raises(ValueError, match="unknown task"):
        make_env("pointmaze/tiny")
    with pytest.raises(ValueError, match="not camera images"):
        make_env("pointmaze/umaze", image=True)
    env = PointMazeTask("umaze")
    obs, _ = env.reset(seed=0)
    assert obs["state"].shape == (6,) and env.max_episode_steps == 300
