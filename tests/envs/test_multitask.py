"""One dataset over several tasks: each episode labelled with its task's index, the pose read from the state, and
the evaluation env observed exactly as the dataset recorded it; the point-mass frame's effector can be read back
from the frame; bad task lists are refused before anything is collected."""

import numpy as np
import pytest

from envs.multitask import ConcatenatedState, MultiTaskObservation, collect_multitask, parse_tasks
from envs.point_mass import draw_scene, effector_pixel
from envs.tasks import make_env

TASKS = ["metaworld/reach-v3", "metaworld/drawer-open-v3"]


def test_multitask_dataset_labels_every_step_with_its_task_and_the_env_observes_the_same():
    buffer = collect_multitask(TASKS, episodes=1, seed=0, progress=False)
    assert buffer.attrs["tasks"] == TASKS and buffer.n_episodes == 2
    for i in range(2):
        ep = buffer.episode(i)
        assert (ep["task"] == i).all() and ep["task"].dtype == np.int64
        np.testing.assert_array_equal(ep["task_onehot"], np.eye(2, dtype=np.float32)[[i] * len(ep["action"])])
        np.testing.assert_array_equal(ep["pose"], ep["state"][:, :4])
    env = MultiTaskObservation(make_env(TASKS[1]), index=1, n_tasks=2, task=TASKS[1])
    seed = buffer.attrs["per_task"][TASKS[1]]["seeds"][0]
    obs, _ = env.reset(seed=seed)
    np.testing.assert_array_equal(obs["pose"], buffer.episode(1)["pose"][0])
    assert int(obs["task"]) == 1 and obs["task_onehot"].tolist() == [0.0, 1.0]
    flat = ConcatenatedState(env, ["pose", "task_onehot"])
    obs, _ = flat.reset(seed=seed)
    assert obs["state"].shape == (6,) == flat.observation_space["state"].shape
    np.testing.assert_array_equal(obs["state"], np.concatenate([buffer.episode(1)["pose"][0], [0.0, 1.0]]))
    assert callable(flat.expert)  # the task's own extras pass through both wrappers


def test_bad_task_lists_are_refused_before_anything_is_collected():
    with pytest.raises(ValueError, match="named twice"):
        parse_tasks("metaworld/push-v3,metaworld/push-v3")
    with pytest.raises(ValueError, match="at least two tasks"):
        collect_multitask(["metaworld/push-v3"], episodes=1, progress=False)
    with pytest.raises(ValueError, match="poses differ in size"):
        collect_multitask(["metaworld/push-v3", "point_mass/reach"], episodes=1, progress=False)
    with pytest.raises(ValueError, match="names no pose"):
        collect_multitask(["metaworld/push-v3", "highway/highway-v0"], episodes=1, progress=False)


def test_point_mass_frame_shows_the_effector_where_it_is():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos, goal = rng.uniform(-0.8, 0.8, 2), rng.uniform(-0.8, 0.8, 2)
        np.testing.assert_allclose(effector_pixel(draw_scene(pos, goal, 32)), pos, atol=0.03)
    env = make_env("point_mass/reach", image=True, image_size=32)
    obs, _ = env.reset(seed=3)
    assert obs["image"].shape == (32, 32, 3) and obs["image"].dtype == np.uint8
    np.testing.assert_allclose(effector_pixel(obs["image"]), obs["state"][:2], atol=0.03)
