"""The driving tasks: the scene in the ego's frame, plans tracked on highway-env's continuous action, the IDM
expert and its lane-branch labels, and `rtdp collect` on a driving task."""

import numpy as np
import pytest

from envs.collect import append_demos
from envs.datasets import ReplayBuffer
from envs.datasets.plan_dataset import PlanDataset
from envs.driving import DrivingTask, SceneConfig, TrackerConfig, from_ego, future_plan, to_ego, track
from envs.driving_expert import (
    BRANCHES,
    DriverStyle,
    branch_futures,
    collect_drives,
    collect_relabelled,
    drive_episode,
    expert_future,
    hand_to_idm,
    relabelled_episode,
)
from envs.tasks import make_env
from rtdp.cli import main


def straight_plan(speed: float, cfg: SceneConfig, lateral: float = 0.0) -> np.ndarray:
    t = cfg.dt * np.arange(1, cfg.points + 1)
    return np.stack([speed * t, np.full_like(t, lateral), np.zeros_like(t)], -1).reshape(-1).astype(np.float32)


def test_the_scene_is_in_the_egos_frame():
    env = make_env("highway/highway-v0")
    obs, _ = env.reset(seed=3)
    assert {k: v.shape for k, v in obs.items()} == {"ego": (4,), "agents": (8, 7), "bev": (40, 16, 4)}
    ego = env.ego
    others = [v for v in env.env.road.vehicles if v is not ego]
    nearest = min(others, key=lambda v: np.linalg.norm(v.position - ego.position))
    rel = to_ego(nearest.position, ego.position, ego.heading)
    np.testing.assert_allclose(obs["agents"][0, 1:3], rel, atol=1e-4)  # tokens sorted by distance
    assert obs["agents"][0, 0] == 1.0
    cfg = env.scene
    ix, iy = int(-cfg.bev_x[0] / cfg.bev_cell[0]), int(-cfg.bev_y[0] / cfg.bev_cell[1])
    assert obs["bev"][ix, iy, 3] == 1.0  # the ego stands on the road
    assert obs["bev"][ix, 0, 3] == 0.0 and obs["bev"][ix, -1, 3] == 0.0  # 16 m to either side is off a 3-lane road
    assert obs["ego"][0] == pytest.approx(ego.speed)


def test_a_zero_plan_brakes_straight_and_a_straight_plan_keeps_speed():
    cfg = SceneConfig()
    acc, steer = track(np.zeros((cfg.points, 3)), 25.0, 5.0, cfg, TrackerConfig())
    assert acc < 0 and steer == 0.0
    acc, steer = track(straight_plan(25.0, cfg).reshape(-1, 3), 25.0, 5.0, cfg, TrackerConfig())
    assert acc == pytest.approx(0.0, abs=1e-6) and steer == pytest.approx(0.0, abs=1e-9)
    _, left = track(straight_plan(25.0, cfg, lateral=3.0).reshape(-1, 3), 25.0, 5.0, cfg, TrackerConfig())
    assert left > 0  # a point at +y steers toward +y


def test_the_loop_safe_action_stops_the_car_on_the_road():
    env = make_env("highway/highway-v0")
    env.reset(seed=1)
    start = env.ego.speed
    for _ in range(30):
        _, _, terminated, _, info = env.step(np.zeros(24, dtype=np.float32))
        if terminated:
            break
    assert env.ego.speed < start - 10 and not info["offroad"]
    with pytest.raises(ValueError, match="24 finite numbers"):
        env.step(np.full(24, np.nan, dtype=np.float32))


def drive_on(task: DrivingTask, steering: float, speed: float, seconds: float) -> np.ndarray:
    """The ego's own path, as a plan in its frame, when it holds `steering` at `speed` for `seconds` from where it
    stands (highway-env's bicycle model, stepped at the simulation rate; the ego is put back afterwards)."""
    ego, cfg = task.ego, task.scene
    saved = (ego.position.copy(), ego.heading, ego.speed)
    ego.speed, dt = speed, 1.0 / cfg.simulation_frequency
    poses = []
    for k in range(round(seconds * cfg.simulation_frequency)):
        ego.action = {"acceleration": 0.0, "steering": steering}
        ego.step(dt)
        if (k + 1) % round(cfg.dt * cfg.simulation_frequency) == 0:
            poses.append([*to_ego(ego.position, saved[0], saved[1]), ego.heading - saved[1]])
    ego.position, ego.heading, ego.speed = saved
    return np.array(poses[: cfg.points])


@pytest.mark.parametrize("steering", [0.02, 0.1, 0.3])
def test_the_tracker_asks_for_the_steering_that_drew_the_plan(steering):
    # highway-env's car slips: its centre moves at atan(tan(steering) / 2) off its heading. The textbook pure
    # pursuit that ignores it asks for twice the steering and cuts every bend (the roundabout's entry by 2 m).
    task = DrivingTask("highway-v0")
    task.reset(seed=0)
    plan = drive_on(task, steering, 10.0, 4.0)
    _, steer = track(plan, 10.0, task.ego.LENGTH, task.scene, TrackerConfig())
    assert steer == pytest.approx(steering, rel=0.05)


def test_the_tracker_changes_lane_without_overshooting():
    task = DrivingTask("highway-v0")
    task.reset(seed=0)
    task.env.road.vehicles = [task.ego]  # alone: only the tracking is tested
    ego, network = task.ego, task.env.road.network
    _from, _to, lane_id = ego.lane_index
    target = network.get_lane((_from, _to, lane_id + 1 if lane_id == 0 else lane_id - 1))
    offsets = []
    for _ in range(40):
        lon, _ = target.local_coordinates(ego.position)
        t = task.scene.dt * np.arange(1, task.scene.points + 1)
        world = np.array([target.position(lon + 25.0 * s, 0.0) for s in t])
        plan = np.concatenate([to_ego(world, ego.position, ego.heading), -np.full((len(t), 1), ego.heading)], 1)
        _, _, terminated, _, info = task.step(plan.reshape(-1).astype(np.float32))
        assert not terminated, info
        offsets.append(target.local_coordinates(ego.position)[1])
    offsets = np.array(offsets) * np.sign(offsets[0])
    assert offsets[0] > 3.0  # it started a lane (4 m) away
    assert -offsets.min() < 0.3  # overshoots the new lane's centre by less than a tenth of the change
    assert np.abs(offsets[-5:]).max() < 0.05 and ego.speed == pytest.approx(25.0, abs=0.5)


def test_lane_branches_follow_their_lanes():
    task = DrivingTask("highway-v0")
    task.reset(seed=2)
    ego = hand_to_idm(task, DriverStyle(25.0, 0.0, 0.2, 1.5))
    _from, _to, lane = ego.lane_index
    positions, headings = branch_futures(task, 40)
    exists = {b: np.isfinite(positions[i]).all() for i, b in enumerate(BRANCHES)}
    assert exists["keep"] and exists["left"] == (lane > 0) and exists["right"] == (lane < 2)
    plans = {b: future_plan(positions[i], headings[i], 0, task.scene) for i, b in enumerate(BRANCHES) if exists[b]}
    for side, sign in (("left", -1), ("right", 1)):  # highway-env's lane ids grow to the right, its y downward
        if side in plans:
            assert sign * (plans[side][-1, 1] - plans["keep"][-1, 1]) == pytest.approx(4.0, abs=1.0)


def test_collect_writes_a_driving_dataset_with_branch_labels(tmp_path, capsys):
    out = tmp_path / "drive.zarr"
    assert main(["collect", "--task", "highway/roundabout-v0", "--episodes", "2", "--out", str(out),
                 "--branch-every", "20", "--no-progress"]) == 0
    buffer = ReplayBuffer.load(out)
    assert buffer.attrs["scene"] == SceneConfig().to_dict() and buffer.n_episodes == 2
    assert {"ego", "agents", "bev", "plan", "branch_plans"} <= set(buffer.keys)
    data = PlanDataset(buffer, branch_labels=True)
    plain = PlanDataset(buffer)
    assert len(data) > len(plain) > 0
    batch = data.batch(np.arange(len(data) - 3, len(data)))  # branch rows come last
    assert batch["bev"].shape == (3, 1, 40, 16, 4) and np.isfinite(batch["plan"]).all()
    assert main(["collect", "--task", "highway/highway-v0", "--episodes", "1", "--out", str(tmp_path / "x"),
                 "--image", "--no-progress"]) == 2
    assert "not camera images" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_recorded_expert_wobbles_and_recovers_the_evaluated_one_does_not():
    from envs.driving_expert import collect_drives

    clean = collect_drives("highway/highway-v0", 1, seed=7, branch_every=0, progress=False, noise=0.0)
    noisy = collect_drives("highway/highway-v0", 1, seed=7, branch_every=0, progress=False)
    heading_error = {k: np.abs(b["ego"][:, 2]).mean() for k, b in (("clean", clean), ("noisy", noisy))}
    assert heading_error["noisy"] > 3 * heading_error["clean"], heading_error
    assert noisy.attrs["steering_noise"] > 0 == clean.attrs["steering_noise"]
    assert noisy.attrs["expert_collision_rate"] == 0.0


def test_the_tracker_brakes_as_hard_as_a_slowing_plan_says():
    cfg = SceneConfig()
    t = cfg.dt * np.arange(1, cfg.points + 1)
    for decel in (0.0, -2.0, -4.0):
        s = 25.0 * t + 0.5 * decel * t**2
        plan = np.stack([s, np.zeros_like(t), np.zeros_like(t)], -1)
        acc, _ = track(plan, 25.0, 5.0, cfg, TrackerConfig())
        assert acc == pytest.approx(decel, abs=1e-6)


def drifting_planner(task: DrivingTask, lateral_speed: float = 0.4):
    """Plans straight ahead at the ego's speed, sliding `lateral_speed` m/s to the right: a planner with a bias."""
    t = task.scene.dt * np.arange(1, task.scene.points + 1)

    def act(_history):
        plan = np.stack([task.ego.speed * t, lateral_speed * t, np.zeros_like(t)], -1)
        return plan.reshape(1, -1).astype(np.float32)

    return act


def test_the_expert_labels_a_drifted_car_with_its_way_back_to_the_lane():
    task = DrivingTask("highway-v0")
    task.reset(seed=3)
    act = drifting_planner(task)
    for _ in range(12):
        task.step(act(None)[0])
    lane = task.env.road.network.get_lane(task.ego.lane_index)
    assert lane.local_coordinates(task.ego.position)[1] > 0.6  # the planner has taken the car off the centre
    keeps_lane = DriverStyle(25.0, 0.0, 1e6, 1.5)  # no lane change is worth it: the label is the way back
    label = expert_future(task, keeps_lane, 40)
    end = from_ego(label[-1, :2], np.asarray(task.ego.position), task.ego.heading)
    assert abs(lane.local_coordinates(end)[1]) < 0.2


def test_a_relabelled_drive_is_the_planners_states_with_the_experts_futures():
    task = DrivingTask("highway-v0", max_episode_steps=12)
    ep = relabelled_episode(task, 3, drifting_planner(task), 1, label_every=3)
    plans = ep["data"]["plan"]
    assert ep["steps"] == len(plans) == 12 and ep["labels"] == 4
    assert np.flatnonzero(np.isfinite(plans).all(axis=1)).tolist() == [0, 3, 6, 9]
    assert np.isnan(ep["data"]["branch_plans"]).all()
    # Step 0 is the state the expert starts from too: the label is the expert's own recorded future.
    own = drive_episode(DrivingTask("highway-v0"), 3, branch_every=0, max_steps=45)["data"]["plan"][0]
    assert np.abs(plans[0] - own).max() < 0.5
    # Later states are the planner's (it drifts right); the labels bend back left, more the further it drifted.
    final_y = plans[[3, 6, 9]].reshape(3, -1, 3)[:, -1, 1]
    assert (np.diff(final_y) < 0).all() and final_y[-1] < -1.0


def test_relabelled_drives_append_to_the_experts_dataset_and_train_as_plans():
    expert = collect_drives("highway/highway-v0", 1, seed=0, branch_every=0, progress=False, max_episode_steps=50)
    task = DrivingTask("highway-v0")
    relabelled = collect_relabelled("highway/highway-v0", 2, lambda seed: drifting_planner(task), 1, seed=1,
                                    label_every=5, planner="drift", progress=False, max_episode_steps=10)
    # steps 0 and 5 of each 10-step drive
    assert relabelled.attrs["relabelled"]["labels"] == 4 and relabelled.attrs["seeds"] == [1, 2]
    merged = append_demos(expert, relabelled)
    assert merged.attrs["relabelled"][0]["planner"] == "drift"
    assert merged.attrs["expert_collision_rate"] == expert.attrs["expert_collision_rate"]
    assert len(PlanDataset(merged)) == len(PlanDataset(expert)) + 4
