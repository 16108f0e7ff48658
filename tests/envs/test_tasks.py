import numpy as np
import pytest

from envs.collect import collect_demos
from envs.metaworld_env import metaworld_task_names
from envs.tasks import discrete_action_dims, known_tasks, make_env

BENCHMARK = ["reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3", "window-open-v3"]


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'metaworld/push-v9'; known tasks: .*metaworld/push-v3"):
        make_env("metaworld/push-v9")
    with pytest.raises(ValueError, match="point_mass/reach"):
        make_env("mujoco/ant")


def test_every_metaworld_mt1_task_has_the_same_layout():
    names = metaworld_task_names()
    assert len(names) == 50 and set(BENCHMARK) <= set(names)
    assert len(known_tasks()) == 60  # with point_mass/reach, point_mass/obstacle, three highway scenarios, three mazes,
    # two hopper datasets
    for name in names:
        env = make_env(f"metaworld/{name}")
        obs, info = env.reset(seed=1)
        assert set(obs) == {"state"} and obs["state"].shape == (39,) and obs["state"].dtype == np.float32
        assert env.action_space.shape == (4,) and env.max_episode_steps == 500
        _, reward, terminated, truncated, info = env.step(np.zeros(4))
        assert isinstance(info["success"], bool) and np.isfinite(reward) and not terminated and not truncated
        env.close()


def test_image_observation_is_a_rendered_uint8_frame():
    env = make_env("metaworld/push-v3", image=True, image_size=84)
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (84, 84, 3) and obs["image"].dtype == np.uint8
    assert obs["image"].std() > 10  # a scene, not a blank frame
    first = obs["image"].copy()
    expert = env.expert()
    for _ in range(15):
        obs, *_ = env.step(expert(obs["state"]))
    assert np.abs(obs["image"].astype(int) - first).mean() > 0.1  # the arm moved on screen
    env.close()


@pytest.mark.parametrize("task", ["metaworld/push-v3", "metaworld/pick-place-v3", "point_mass/reach"])
def test_same_seed_same_variation_other_seed_other_variation(task):
    env = make_env(task)
    a, _ = env.reset(seed=3)
    b, _ = env.reset(seed=4)
    c, _ = env.reset(seed=3)
    assert np.array_equal(a["state"], c["state"])
    assert not np.allclose(a["state"], b["state"])


def test_goal_is_observable_and_varies():
    env = make_env("metaworld/reach-v3")
    goals = {tuple(np.round(env.reset(seed=s)[0]["state"][36:39], 4)) for s in range(5)}
    assert len(goals) == 5 and all(any(abs(g) > 1e-3 for g in goal) for goal in goals)


@pytest.mark.parametrize("name", BENCHMARK)
def test_expert_solves_benchmark_tasks(name):
    demos = collect_demos(f"metaworld/{name}", 2, seed=0, progress=False)
    assert demos.attrs["expert_success_rate"] == 1.0 and demos.n_episodes == 2


def test_collect_records_images_and_provenance():
    buf = collect_demos("metaworld/reach-v3", 2, seed=7, image=True, image_size=64, progress=False)
    assert buf.keys == ["action", "image", "state"]
    assert buf["image"].shape[1:] == (64, 64, 3) and buf["image"].dtype == np.uint8
    assert buf.attrs["task"] == "metaworld/reach-v3" and buf.attrs["seeds"] == [7, 8]
    assert buf.attrs["image"] is True and buf.attrs["steps_after_success"] == 10


def test_failed_expert_episodes_are_not_kept():
    # With 6 steps the point mass reaches only goals that start close by: some episodes fail.
    buf = collect_demos("point_mass/reach", 3, seed=0, max_episode_steps=6, max_attempts=200, progress=False)
    a = buf.attrs
    assert buf.n_episodes == 3 and len(a["failed_seeds"]) > 0
    assert a["expert_success_rate"] == pytest.approx(3 / (3 + len(a["failed_seeds"])))
    assert not set(a["failed_seeds"]) & set(a["seeds"])
    with pytest.raises(RuntimeError, match=r"succeeded on only 0 of 4 episodes"):
        collect_demos("metaworld/push-v3", 2, max_episode_steps=3, max_attempts=4, progress=False)


def test_obstacle_task_is_bimodal_and_its_expert_closes_the_gripper_on_arrival():
    buffer = collect_demos("point_mass/obstacle", 40, seed=0, progress=False)
    assert buffer.attrs["expert_success_rate"] == 1.0
    sides = []
    for e in range(buffer.n_episodes):
        ep = buffer.episode(e)
        xs = ep["state"][:, 0]
        sides.append(np.sign(xs[np.argmax(np.abs(xs))]))
        assert np.linalg.norm(ep["state"][:, :2], axis=1).min() >= 0.3 - 1e-6  # never inside the obstacle
        grip = ep["action"][:, 2]
        flip = int(np.argmax(grip > 0))
        assert (grip[:flip] == -1).all() and (grip[flip:] == 1).all()
        assert np.linalg.norm(ep["state"][flip, :2] - ep["state"][flip, 2:4]) < 0.1
    assert 0.3 <= np.mean(np.array(sides) > 0) <= 0.7  # both routes, about equally often
    assert discrete_action_dims("point_mass/obstacle") == [2] and discrete_action_dims("metaworld/push-v3") == [3]
