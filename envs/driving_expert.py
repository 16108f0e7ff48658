"""The driving expert and its demonstrations: the ego handed to highway-env's own IDMVehicle (IDM longitudinal,
MOBIL lane changes) with a driver style drawn per episode, recorded as (scene at t, the ego's future plan from t).

Recovery: the expert's steering carries a small zero-mean random walk (DART, Laskey et al. 2017), so the drives
visit states a little off the lane centre and the recorded futures show the expert bringing the car back. A planner
trained only on perfect lane keeping never learns to correct the small heading error its own plans leave: on
highway-v0 it drifted to the lane line in every episode and collided in 98% of them.

Multi-modal labels: every `branch_every` steps the simulation is deep-copied once per lane the ego could take
(keep, left, right, where that lane exists), the copy's ego is held to that lane, and each branch's future is
recorded beside the one that happened. A branch that crashes is not a label.

Relabelled drives (DAgger, Ross et al. 2011): a trained planner drives, and at its states the expert's future is
recorded as the label, from a copy of the simulation whose ego is handed to the expert. The recorded expert only
shows states near its own path; a planner's small errors compound into states it never saw (on roundabout-v0 every
planner drifted off the entry lane), and these labels show the expert's way back from there.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from .datasets import ReplayBuffer
from .driving import DrivingTask, SceneConfig, future_plan

BRANCHES = ("keep", "left", "right")
BRANCH_RADIUS = 150.0  # [m]


@dataclass
class DriverStyle:
    target_speed: float  # [m/s]
    politeness: float  # MOBIL's weight of the others' gain, [0, 1]
    lane_change_gain: float  # [m/s^2] MOBIL's least own gain to change lane
    time_headway: float  # [s] IDM's desired time gap

    @classmethod
    def draw(cls, rng: np.random.Generator, scenario: str) -> DriverStyle:
        speeds = (7.0, 12.0) if scenario.startswith("roundabout") else (22.0, 30.0)
        return cls(float(rng.uniform(*speeds)), float(rng.uniform(0.0, 0.5)), float(rng.uniform(0.1, 0.5)),
                   float(rng.uniform(1.0, 2.0)))


def steering_noise(ego, sigma: float, rng: np.random.Generator, pull: float = 0.025):
    """Make `ego` (an IDMVehicle) add an Ornstein-Uhlenbeck random walk (`sigma` rad per simulation frame, pulled
    back toward 0 by `pull` per frame) to the steering IDM/MOBIL command."""
    state = {"n": 0.0}
    act = ego.act

    def noisy_act(action=None):
        act(action)
        if not ego.crashed:
            state["n"] += -pull * state["n"] + sigma * rng.normal()
            ego.action["steering"] = float(ego.action["steering"]) + state["n"]

    ego.act = noisy_act


def hand_to_idm(task: DrivingTask, style: DriverStyle):
    """Replace the task's ego with an IDMVehicle in the same state, driving with `style`."""
    return hand_env_to_idm(task.env, task.name, style)


def hand_env_to_idm(env, scenario: str, style: DriverStyle):
    """Replace the ego of highway-env's `env` (of `scenario`) with an IDMVehicle in the same state."""
    from highway_env.vehicle.behavior import IDMVehicle

    ego = env.vehicle
    idm = IDMVehicle(env.road, ego.position, ego.heading, ego.speed, target_lane_index=ego.lane_index,
                     target_speed=style.target_speed, route=getattr(ego, "route", None))
    if scenario.startswith("roundabout"):
        idm.plan_route_to("nxs")  # the destination highway-env gives its roundabout ego
    idm.POLITENESS = style.politeness
    idm.LANE_CHANGE_MIN_ACC_GAIN = style.lane_change_gain
    idm.TIME_WANTED = style.time_headway
    env.road.vehicles[env.road.vehicles.index(ego)] = idm
    env.vehicle = idm
    env.controlled_vehicles = [idm]
    env.action_type.controlled_vehicle = idm
    return idm


def branch_futures(task: DrivingTask, horizon_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The ego's poses over the next `horizon_steps` in a copy of the simulation per lane choice: positions
    (3, horizon_steps + 1, 2), headings (3, horizon_steps + 1), NaN where the lane does not exist or the branch
    crashed."""
    positions = np.full((len(BRANCHES), horizon_steps + 1, 2), np.nan)
    headings = np.full((len(BRANCHES), horizon_steps + 1), np.nan)
    lane_index = task.env.vehicle.lane_index
    _from, _to, _id = lane_index
    lanes_here = len(task.env.road.network.graph[_from][_to])
    # highway-env numbers lanes from the left: id - 1 is the lane to the left
    targets = {"keep": _id, "left": _id - 1, "right": _id + 1}
    for b, name in enumerate(BRANCHES):
        if not 0 <= targets[name] < lanes_here:
            continue
        sim = task.snapshot()
        ego = sim.vehicle
        ego.__dict__.pop("act", None)  # a steering-noise hook is a closure over the original ego: drive the copy clean
        # Vehicles too far to meet the ego within the horizon cannot change its future: leave them out of the copy.
        sim.road.vehicles = [v for v in sim.road.vehicles
                             if np.linalg.norm(v.position - ego.position) <= BRANCH_RADIUS]
        ego.target_lane_index = (_from, _to, targets[name])
        ego.enable_lane_change = False
        pos, head = [np.array(ego.position)], [ego.heading]
        for _ in range(horizon_steps):
            sim.step(np.zeros(2, dtype=np.float32))
            if ego.crashed:
                break
            pos.append(np.array(ego.position))
            head.append(ego.heading)
        if len(pos) == horizon_steps + 1:
            positions[b], headings[b] = pos, head
    return positions, headings


def expert_future(task: DrivingTask, style: DriverStyle, horizon_steps: int) -> np.ndarray | None:
    """The expert's plan from the task's current state, (points, 3) in the ego frame: a copy of the simulation
    whose ego is handed to the expert (`style`) and driven `horizon_steps`; None when that future crashes."""
    sim = task.snapshot()
    ego = hand_env_to_idm(sim, task.name, style)
    sim.road.vehicles = [v for v in sim.road.vehicles if np.linalg.norm(v.position - ego.position) <= BRANCH_RADIUS]
    pos, head = [np.array(ego.position)], [ego.heading]
    for _ in range(horizon_steps):
        sim.step(np.zeros(2, dtype=np.float32))
        if ego.crashed:
            return None
        pos.append(np.array(ego.position))
        head.append(ego.heading)
    return future_plan(np.array(pos), np.array(head), 0, task.scene)


def relabelled_episode(task: DrivingTask, seed: int, act: Callable[[dict[str, np.ndarray]], np.ndarray],
                       n_obs_steps: int, label_every: int = 1, max_steps: int | None = None) -> dict:
    """One episode driven by a planner (`act`: observation history -> plans, as envs.rollout runs it), the
    expert's future recorded as the label at every `label_every`-th step (NaN elsewhere, and where the expert's
    own future crashes). The planner's outcome is kept beside: how far the learner gets tells a DAgger round."""
    cfg = task.scene
    obs, _ = task.reset(seed=seed)
    style = DriverStyle.draw(np.random.default_rng([seed, 7]), task.name)
    horizon_steps = round(cfg.dt * cfg.policy_frequency) * cfg.points
    history = deque([obs] * n_obs_steps, maxlen=n_obs_steps)
    scenes, plans = [], []
    info, done, t = {}, False, 0
    limit = max_steps or task.max_episode_steps
    while not done and t < limit:
        chunk = act({k: np.stack([o[k] for o in history]) for k in obs})
        for plan in chunk:
            label = expert_future(task, style, horizon_steps) if t % label_every == 0 else None
            scenes.append(obs)
            plans.append(np.full(cfg.points * 3, np.nan, np.float32) if label is None else label.reshape(-1))
            obs, _, terminated, truncated, info = task.step(plan)
            history.append(obs)
            t += 1
            done = terminated or truncated or t >= limit
            if done:
                break
    data = {k: np.stack([s[k] for s in scenes]) for k in scenes[0]}
    data.update(plan=np.stack(plans).astype(np.float32),
                branch_plans=np.full((len(plans), len(BRANCHES), cfg.points * 3), np.nan, np.float32))
    return {"data": data, "style": asdict(style), "crashed": bool(task.crashed), "offroad": bool(task.offroad),
            "success": bool(info.get("success")), "progress_m": float(info.get("progress_m", 0.0)), "steps": t,
            "labels": int(np.isfinite(data["plan"]).all(axis=1).sum())}


def drive_episode(task: DrivingTask, seed: int, branch_every: int, max_steps: int | None = None,
                  noise: float = 0.0) -> dict:
    """One expert episode: per step the scene, the future plan (NaN where it runs past the end or into a
    crash), and the branch plans at every `branch_every`-th step. `noise`: the steering random walk's sigma (rad
    per simulation frame; 0 drives the expert as it is)."""
    cfg = task.scene
    obs, _ = task.reset(seed=seed)
    style = DriverStyle.draw(np.random.default_rng([seed, 7]), task.name)
    ego = hand_to_idm(task, style)
    if noise:
        steering_noise(ego, noise, np.random.default_rng([seed, 11]))
    stride = round(cfg.dt * cfg.policy_frequency)
    horizon_steps = stride * cfg.points
    scenes, positions, headings, branches = [], [], [], []
    crashed = False
    info = {}
    for t in range(max_steps or task.max_episode_steps):
        scenes.append(obs)
        positions.append(np.array(task.ego.position))
        headings.append(task.ego.heading)
        branches.append(branch_futures(task, horizon_steps) if branch_every and t % branch_every == 0 else None)
        obs, _, terminated, truncated, info = task.advance(np.zeros(2, dtype=np.float32))
        if terminated or truncated:
            crashed = info["crashed"] or info["offroad"]
            break
    positions.append(np.array(task.ego.position))
    headings.append(task.ego.heading)
    positions, headings = np.array(positions), np.array(headings)
    steps = len(scenes)
    # A future that runs into the crash is not a label: cut the record where the crash happened.
    usable_until = steps - (stride * 2 if crashed else 0)
    plans = np.full((steps, cfg.points * 3), np.nan, dtype=np.float32)
    branch_plans = np.full((steps, len(BRANCHES), cfg.points * 3), np.nan, dtype=np.float32)
    for t in range(steps):
        plan = future_plan(positions[: usable_until + 1], headings[: usable_until + 1], t, cfg)
        if plan is not None:
            plans[t] = plan.reshape(-1)
        if branches[t] is not None:
            for b in range(len(BRANCHES)):
                if np.isfinite(branches[t][0][b]).all():
                    plan = future_plan(branches[t][0][b], branches[t][1][b], 0, cfg)
                    branch_plans[t, b] = plan.reshape(-1)
    data = {k: np.stack([s[k] for s in scenes]) for k in scenes[0]}
    data.update(plan=plans, branch_plans=branch_plans)
    return {"data": data, "style": asdict(style), "crashed": crashed, "success": bool(info.get("success")),
            "progress_m": float(info.get("progress_m", 0.0)), "steps": steps, "jerk": task.mean_abs_jerk()}


STEERING_NOISE = 0.01  # [rad per simulation frame] the recorded drives' random walk: lane offsets of ~0.4 m


def collect_drives(task: str, episodes: int, seed: int = 0, branch_every: int = 40, scene: SceneConfig | None = None,
                   max_episode_steps: int | None = None, progress: bool = True,
                   noise: float = STEERING_NOISE) -> ReplayBuffer:
    """`episodes` expert drives on seeds seed, seed + 1, ..., steering with a small random walk (`noise`, see the
    module doc): every episode is kept (a crash is cut from its labels, not hidden from the expert's figures)."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    name = task.partition("/")[2]
    env = DrivingTask(name, scene, max_episode_steps=max_episode_steps)
    buffer = ReplayBuffer()
    records = []
    for i in tqdm(range(episodes), desc=f"collect {task}", disable=not progress, dynamic_ncols=True):
        ep = drive_episode(env, seed + i, branch_every, noise=noise)
        buffer.add_episode(ep.pop("data"))
        records.append(ep)
    env.close()
    buffer.attrs.update({
        "task": task, "episodes": episodes, "seeds": [seed + i for i in range(episodes)], "failed_seeds": [],
        "scene": env.scene.to_dict(), "branch_every": branch_every, "branches": list(BRANCHES),
        "expert": "highway-env IDMVehicle (IDM + MOBIL), driver style drawn per episode",
        "steering_noise": noise,
        "expert_collision_rate": float(np.mean([r["crashed"] for r in records])),
        "expert_success_rate": float(np.mean([r["success"] for r in records])),
        "expert_progress_m": float(np.mean([r["progress_m"] for r in records])),
        "expert_mean_abs_jerk": float(np.mean([r["jerk"] for r in records])),
        "styles": [r["style"] for r in records], "image": False, "image_size": None,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    })
    return buffer


def collect_relabelled(task: str, episodes: int, act_for_episode: Callable[[int], Callable], n_obs_steps: int,
                       seed: int, label_every: int = 1, planner: str = "", progress: bool = True,
                       scene: SceneConfig | None = None, max_episode_steps: int | None = None) -> ReplayBuffer:
    """`episodes` drives of a planner on seeds seed, seed + 1, ..., labelled by the expert (see the module doc);
    `act_for_episode(seed)` gives the planner for one episode. The dataset appends to the expert's own."""
    if episodes < 1 or label_every < 1:
        raise ValueError(f"episodes and label_every must be >= 1, got {episodes} and {label_every}")
    env = DrivingTask(task.partition("/")[2], scene, max_episode_steps=max_episode_steps)
    buffer = ReplayBuffer()
    records = []
    bar = tqdm(range(episodes), desc=f"relabel {task}", disable=not progress, dynamic_ncols=True)
    for i in bar:
        ep = relabelled_episode(env, seed + i, act_for_episode(seed + i), n_obs_steps, label_every)
        if ep["labels"]:
            buffer.add_episode(ep.pop("data"))
        records.append(ep)
        bar.set_postfix(crashed=sum(r["crashed"] for r in records), offroad=sum(r["offroad"] for r in records))
    env.close()
    kept = [seed + i for i, r in enumerate(records) if r["labels"]]
    buffer.attrs.update({
        "task": task, "episodes": len(kept), "seeds": kept,
        "failed_seeds": [seed + i for i, r in enumerate(records) if not r["labels"]],
        "scene": env.scene.to_dict(), "branch_every": 0, "branches": list(BRANCHES),
        "expert": "highway-env IDMVehicle (IDM + MOBIL), driver style drawn per episode",
        "relabelled": {"planner": planner, "label_every": label_every, "seeds": kept,
                       "planner_collision_rate": float(np.mean([r["crashed"] for r in records])),
                       "planner_offroad_rate": float(np.mean([r["offroad"] for r in records])),
                       "planner_progress_m": float(np.mean([r["progress_m"] for r in records])),
                       "labels": int(sum(r["labels"] for r in records))},
        "image": False, "image_size": None, "created": datetime.datetime.now().isoformat(timespec="seconds"),
    })
    return buffer
