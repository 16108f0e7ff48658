"""The hopper tasks (mujoco/hopper-medium|hopper-medium-replay): gymnasium's Hopper-v5 behind the task contract, a
behaviour policy (PPO or SAC) that stops at its target return, saved without pickle and reloaded exactly, its
samples (medium) and its training stream (medium-replay) as D4RL-layout datasets that round-trip and load in
Minari."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from envs.behaviour_policy import (
    META_FILE,
    POLICY_FILE,
    REPLAY_FILE,
    BehaviourPolicy,
    BehaviourSettings,
    train_behaviour,
)
from envs.datasets.offline import load_offline, save_offline
from envs.hopper import D4RL_EXPERT_RETURN, ENV_ID, STATE_DIM, _make_raw_env, collect_hopper
from envs.tasks import known_tasks, make_env


@pytest.fixture(scope="module")
def behaviour(tmp_path_factory):
    """A SAC behaviour policy trained for 400 steps (tiny; far from "medium", which is not what is tested here)."""
    folder = tmp_path_factory.mktemp("hopper") / "behaviour"
    torch.manual_seed(0)
    record = train_behaviour(_make_raw_env, BehaviourSettings(target_return=1e9, algorithm="sac", max_steps=400,
                                                              learning_starts=100, eval_every=200, eval_episodes=1,
                                                              net_arch=[32, 32]),
                             folder, progress=False)
    return folder, record


def test_hopper_task_observes_state_and_counts_staying_up_as_success():
    assert {"mujoco/hopper-medium", "mujoco/hopper-medium-replay"} <= set(known_tasks())
    env = make_env("mujoco/hopper-medium", max_episode_steps=30)
    obs, _ = env.reset(seed=0)
    assert obs["state"].shape == (STATE_DIM,) and obs["state"].dtype == np.float32
    steps, done = 0, False
    while not done:  # standing still (zero torque) for 30 steps does not topple it
        obs, _, terminated, truncated, info = env.step(np.zeros(3, np.float32))
        steps, done = steps + 1, terminated or truncated
    assert (steps, terminated, info["success"]) == (30, False, True)
    env.reset(seed=0)
    for _ in range(1000):  # full torque on every joint throws it over
        _, _, terminated, _, info = env.step(np.ones(3, np.float32))
        if terminated:
            break
    assert terminated and not info["success"]
    with pytest.raises(ValueError, match="hopper-medium-replay"):
        make_env("mujoco/hopper-expert")
    with pytest.raises(ValueError, match="not camera images"):
        make_env("mujoco/hopper-medium", image=True)


def test_behaviour_policy_is_saved_without_pickle_and_reloads_exactly(behaviour):
    folder, record = behaviour
    assert sorted(p.name for p in folder.iterdir()) == sorted([POLICY_FILE, META_FILE, REPLAY_FILE])
    assert json.loads((folder / META_FILE).read_text())["steps"] == record["steps"] == 400
    assert not record["reached"] and record["evaluations"][0]["step"] == 200
    policy = BehaviourPolicy(folder, _make_raw_env, deterministic=True)
    saved = load_file(str(folder / POLICY_FILE))
    loaded = policy.model.policy.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    obs = np.linspace(-1, 1, STATE_DIM).astype(np.float32)
    with torch.no_grad():
        mode = policy.model.actor(torch.from_numpy(obs[None]), deterministic=True)[0].numpy()
    assert np.allclose(policy(obs), mode, atol=1e-6)  # the deterministic action: the squashed Gaussian's mode
    assert np.all(np.abs(mode) < 1)
    with pytest.raises(FileNotFoundError, match="holds no behaviour policy"):
        BehaviourPolicy(folder.parent / "missing", _make_raw_env)


def test_ppo_behaviour_stops_at_its_target_and_reloads(tmp_path):
    folder = tmp_path / "ppo"
    torch.manual_seed(0)
    # a target any policy meets: training stops at the first evaluation, mid-rollout
    record = train_behaviour(_make_raw_env, BehaviourSettings(target_return=-1e9, max_steps=5000, eval_every=300,
                                                              eval_episodes=1, net_arch=[16, 16]),
                             folder, progress=False)
    assert record["reached"] and record["steps"] == 300 and record["replay_transitions"] == 300
    policy = BehaviourPolicy(folder, _make_raw_env, deterministic=True)
    obs = np.linspace(-1, 1, STATE_DIM).astype(np.float32)
    with torch.no_grad():
        mean = policy.model.policy.get_distribution(torch.from_numpy(obs[None])).mode()[0].numpy()
    assert np.allclose(policy(obs), np.clip(mean, -1, 1), atol=1e-6)  # the Gaussian's mean, clipped to the box
    with pytest.raises(ValueError, match="ppo"):
        BehaviourSettings(target_return=1.0, algorithm="td3")


def test_medium_replay_is_the_training_stream_in_order(behaviour):
    folder, _ = behaviour
    replay = collect_hopper("mujoco/hopper-medium-replay", 1, folder, progress=False)
    assert replay.n_steps == 400
    from envs.datasets.d4rl import read_d4rl

    raw = read_d4rl(folder / REPLAY_FILE)
    ends = set((replay.episode_ends - 1).tolist())
    inside = np.array([i for i in range(replay.n_steps - 1) if i not in ends])
    # within an episode each transition's next observation is the following row's observation
    assert np.array_equal(raw["next_observations"][inside], raw["observations"][inside + 1])
    # a random-action hopper falls within a few dozen steps: the stream holds many terminal episodes
    assert replay["terminal"].sum() >= 3 and replay.n_episodes == replay["terminal"].sum() + 1


def test_medium_samples_the_policy_and_round_trips_in_d4rl_and_minari(behaviour, tmp_path, monkeypatch):
    import gymnasium as gym
    import minari

    folder, _ = behaviour
    medium = collect_hopper("mujoco/hopper-medium", 600, folder, seed=5, progress=False)
    assert medium.n_steps == 600 and medium.attrs["task"] == "mujoco/hopper-medium"
    refs = medium.attrs["reference_returns"]
    assert refs["expert"] == D4RL_EXPERT_RETURN and "not measured" in refs["expert_source"]
    assert refs["random"] < 0.1 * D4RL_EXPERT_RETURN
    # the first episode replays: the same seed, the recorded actions, the recorded rewards
    env = gym.make(ENV_ID)
    obs, _ = env.reset(seed=5)
    first = medium.episode_ends[0]
    assert np.allclose(obs, medium["obs"][0], atol=1e-6)
    for i in range(first):
        obs, reward, terminated, _, _ = env.step(medium["action"][i])
        assert reward == pytest.approx(medium["reward"][i], abs=1e-4)
    assert terminated == bool(medium["terminal"][first - 1])
    path = tmp_path / "hopper-medium.hdf5"
    save_offline(medium, path)
    back = load_offline(path)
    assert np.array_equal(back["obs"], medium["obs"]) and np.array_equal(back.episode_ends, medium.episode_ends)
    assert back.attrs["reference_returns"] == refs
    save_offline(medium, "minari:rtdp/hopper-medium-test-v0", minari_dir=tmp_path, env_spec=gym.spec(ENV_ID))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    dataset = minari.load_dataset("rtdp/hopper-medium-test-v0")
    assert dataset.total_steps == 600 and dataset.total_episodes == medium.n_episodes
    assert dataset.storage.metadata["ref_max_score"] == D4RL_EXPERT_RETURN
    episode = next(dataset.iterate_episodes())  # it ends with the observation its last step led to (the fall)
    assert np.allclose(episode.observations[-1], medium["next_obs"][first - 1])
    assert not np.allclose(episode.observations[-1], medium["obs"][first])  # not the next episode's start
    back = load_offline("minari:rtdp/hopper-medium-test-v0")
    assert np.allclose(back["next_obs"], medium["next_obs"], atol=1e-6)


def test_collect_cli_makes_a_hopper_dataset_with_an_existing_behaviour_policy(behaviour, tmp_path, capsys):
    from rtdp.cli import main

    folder, _ = behaviour
    out = tmp_path / "medium.hdf5"
    args = ["collect", "--task", "mujoco/hopper-medium", "--steps", "300", "--behaviour", str(folder), "--out",
            str(out), "--no-progress"]
    assert main(args) == 0
    assert load_offline(out).n_steps == 300
    capsys.readouterr()
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main([*args, "--append"]) == 2 and "--append" in capsys.readouterr().err
    expert = ["collect", "--task", "mujoco/hopper-expert", "--out", str(tmp_path / "expert.hdf5"), "--no-progress"]
    assert main(expert) == 2 and "not a hopper task" in capsys.readouterr().err
