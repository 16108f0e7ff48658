"""Driving tasks on highway-env, as a planner sees them: the scene around the ego in its own frame, and a plan to
follow.

    env = make_env("highway/highway-v0")
    obs, _ = env.reset(seed=0)          # {"ego": (4,), "agents": (N, 7), "bev": (H, W, 4)}, ego frame at t
    obs, r, terminated, truncated, info = env.step(plan)   # plan: (points * 3,) = (x, y, heading) per waypoint

The scene is what DiffusionDrive's decoder attends to: agent tokens (the nearest vehicles' kinematics) and a
bird's-eye raster in highway-env's occupancy-grid channels (presence, vx, vy, on-road), both in the ego frame (x
ahead, y to the ego's left in highway-env's y-down world, i.e. +y is the world's +y rotated with the ego). The
action is a plan: `points` waypoints `dt` seconds apart, which a tracker (pure pursuit on a look-ahead point, and
a speed loop on the plan's first segment) turns into highway-env's continuous (acceleration, steering) for one
policy step; the planner replans at every step.

An episode succeeds when it reaches its duration without a collision and without leaving the road.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import gymnasium as gym
import numpy as np

# The scenarios an IDM/MOBIL ego drives, with the settings that make them a 10 Hz planning task. The traffic
# density is highway-env's "fast" variant for highway (its own recommendation for learning; 50 vehicles cost
# 34 ms a step here).
SCENARIOS = {
    "highway-v0": {"lanes_count": 3, "vehicles_count": 20, "duration": 30, "ego_spacing": 1.5},
    "roundabout-v0": {"duration": 20},
    "merge-v0": {},
}
AGENT_FEATURES = ("present", "x", "y", "vx", "vy", "cos_h", "sin_h")
EGO_FEATURES = ("speed", "cos_lane_h", "sin_lane_h", "lane_offset")
BEV_CHANNELS = ("presence", "vx", "vy", "on_road")


@dataclass
class SceneConfig:
    """What a driving observation holds; a planner's checkpoint records it and refuses another one."""

    agents: int = 8  # nearest vehicles as tokens
    agent_range: float = 80.0  # [m] vehicles farther away are left out
    bev_x: list[float] = field(default_factory=lambda: [-40.0, 120.0])  # [m] behind .. ahead
    bev_y: list[float] = field(default_factory=lambda: [-16.0, 16.0])  # [m] right .. left
    bev_cell: list[float] = field(default_factory=lambda: [4.0, 2.0])  # [m] (x, y)
    points: int = 8  # waypoints in a plan
    dt: float = 0.5  # [s] between waypoints
    policy_frequency: int = 10  # [Hz] decisions (and tracker updates)
    simulation_frequency: int = 20  # [Hz] highway-env's integration rate

    @property
    def bev_shape(self) -> tuple[int, int]:
        nx = round((self.bev_x[1] - self.bev_x[0]) / self.bev_cell[0])
        ny = round((self.bev_y[1] - self.bev_y[0]) / self.bev_cell[1])
        return nx, ny

    def observation_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"ego": (len(EGO_FEATURES),), "agents": (self.agents, len(AGENT_FEATURES)),
                "bev": (*self.bev_shape, len(BEV_CHANNELS))}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "scene") -> SceneConfig:
        """A layout from recorded or given settings (a checkpoint's, `rtdp collect --scene`'s), an unknown name or a
        raster that does not divide into whole cells refused by name."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown scene setting(s) {unknown}; known: {sorted(known)}")
        scene = cls(**values)
        for name in ("bev_x", "bev_y", "bev_cell"):
            pair = getattr(scene, name)
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(v, (int, float)) for v in pair)):
                raise ValueError(f"{source}: {name} must be two numbers, e.g. [2, 1]; got {pair!r}")
        for axis, extent, cell in (("x", scene.bev_x, scene.bev_cell[0]), ("y", scene.bev_y, scene.bev_cell[1])):
            cells = (extent[1] - extent[0]) / cell if cell > 0 else 0.0
            if cells < 1 or abs(cells - round(cells)) > 1e-6:
                raise ValueError(f"{source}: bev_{axis} {list(extent)} is not a whole number of {cell} m cells")
        return scene


# -- geometry ---------------------------------------------------------------------------------------------------


def to_ego(xy: np.ndarray, origin: np.ndarray, heading: float) -> np.ndarray:
    """World points (..., 2) -> the frame at `origin` with x along `heading`."""
    c, s = np.cos(heading), np.sin(heading)
    d = np.asarray(xy, dtype=np.float64) - origin
    return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], axis=-1)


def from_ego(xy: np.ndarray, origin: np.ndarray, heading: float) -> np.ndarray:
    c, s = np.cos(heading), np.sin(heading)
    xy = np.asarray(xy, dtype=np.float64)
    return origin + np.stack([c * xy[..., 0] - s * xy[..., 1], s * xy[..., 0] + c * xy[..., 1]], axis=-1)


def wrap_angle(a):
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def on_road(lanes, points: np.ndarray) -> np.ndarray:
    """Whether each world point (N, 2) lies on one of highway-env's lanes (its own `on_lane` test, vectorised over
    the straight, sine and circular lanes its scenarios are made of)."""
    from highway_env.road.lane import CircularLane, SineLane, StraightLane

    inside = np.zeros(len(points), dtype=bool)
    for lane in lanes:
        if isinstance(lane, StraightLane):
            d = points - lane.start
            lon = d @ lane.direction
            lat = d @ lane.direction_lateral
            if isinstance(lane, SineLane):
                lat = lat - lane.amplitude * np.sin(lane.pulsation * lon + lane.phase)
        elif isinstance(lane, CircularLane):
            d = points - lane.center
            phi = np.arctan2(d[:, 1], d[:, 0])
            phi = lane.start_phase + wrap_angle(phi - lane.start_phase)
            lon = lane.direction * (phi - lane.start_phase) * lane.radius
            lat = lane.direction * (lane.radius - np.linalg.norm(d, axis=1))
        else:  # a lane type these scenarios do not use: highway-env's own test, point by point
            inside |= np.array([lane.on_lane(p) for p in points])
            continue
        inside |= (np.abs(lat) <= lane.width / 2) & (lon >= -lane.VEHICLE_LENGTH) & (
            lon < lane.length + lane.VEHICLE_LENGTH)
    return inside


# -- the scene --------------------------------------------------------------------------------------------------


def observe(road, ego, cfg: SceneConfig, lanes=None) -> dict[str, np.ndarray]:
    """The ego's scene in its own frame: ego features, agent tokens and the BEV raster."""
    origin, heading = np.asarray(ego.position, dtype=np.float64), float(ego.heading)
    lane = road.network.get_lane(ego.lane_index)
    lon, lat = lane.local_coordinates(origin)
    dh = wrap_angle(heading - lane.heading_at(lon))
    ego_obs = np.array([ego.speed, np.cos(dh), np.sin(dh), lat], dtype=np.float32)

    others = [v for v in road.vehicles if v is not ego]
    agents = np.zeros((cfg.agents, len(AGENT_FEATURES)), dtype=np.float32)
    nx, ny = cfg.bev_shape
    bev = np.zeros((nx, ny, len(BEV_CHANNELS)), dtype=np.float32)
    if others:
        pos = to_ego(np.array([v.position for v in others]), origin, heading)
        vel = to_ego(np.array([v.velocity for v in others]), np.zeros(2), heading)
        rel_h = np.array([v.heading for v in others]) - heading
        dist = np.linalg.norm(pos, axis=1)
        order = [i for i in np.argsort(dist) if dist[i] <= cfg.agent_range][: cfg.agents]
        for row, i in enumerate(order):
            agents[row] = (1.0, pos[i, 0], pos[i, 1], vel[i, 0], vel[i, 1], np.cos(rel_h[i]), np.sin(rel_h[i]))
        ix = np.floor((pos[:, 0] - cfg.bev_x[0]) / cfg.bev_cell[0]).astype(int)
        iy = np.floor((pos[:, 1] - cfg.bev_y[0]) / cfg.bev_cell[1]).astype(int)
        keep = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        bev[ix[keep], iy[keep], 0] = 1.0
        bev[ix[keep], iy[keep], 1] = vel[keep, 0]
        bev[ix[keep], iy[keep], 2] = vel[keep, 1]
    centres = cell_centres(cfg)
    lanes = lanes if lanes is not None else road.network.lanes_list()
    bev[..., 3] = on_road(lanes, from_ego(centres.reshape(-1, 2), origin, heading)).reshape(nx, ny)
    return {"ego": ego_obs, "agents": agents, "bev": bev}


def cell_centres(cfg: SceneConfig) -> np.ndarray:
    """(nx, ny, 2) ego-frame centres of the BEV cells."""
    nx, ny = cfg.bev_shape
    xs = cfg.bev_x[0] + (np.arange(nx) + 0.5) * cfg.bev_cell[0]
    ys = cfg.bev_y[0] + (np.arange(ny) + 0.5) * cfg.bev_cell[1]
    return np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1)


def future_plan(positions: np.ndarray, headings: np.ndarray, t: int, cfg: SceneConfig) -> np.ndarray | None:
    """The ego's recorded future from step t as a plan in the ego frame at t: (points, 3) = (x, y, heading), or
    None when the record ends first. `positions` (T, 2) and `headings` (T,) are per policy step."""
    stride = round(cfg.dt * cfg.policy_frequency)
    idx = t + stride * np.arange(1, cfg.points + 1)
    if idx[-1] >= len(positions):
        return None
    xy = to_ego(positions[idx], positions[t], headings[t])
    h = wrap_angle(headings[idx] - headings[t])
    return np.concatenate([xy, h[:, None]], axis=1).astype(np.float32)


# -- following a plan -------------------------------------------------------------------------------------------


@dataclass
class TrackerConfig:
    lookahead_time: float = 0.6  # [s] the pure-pursuit point is this far ahead at the current speed ...
    lookahead_min: float = 4.0  # [m] ... and at least this far
    speed_gain: float = 2.0  # [1/s] braking per m/s of speed on a plan that stays put
    accel_fit_points: int = 3  # the plan's acceleration: a constant-acceleration fit to its first waypoints


def track(plan: np.ndarray, speed: float, wheelbase: float, cfg: SceneConfig, tc: TrackerConfig) -> tuple[float, float]:
    """(acceleration m/s^2, steering rad) that follow `plan` (points, 3) in the ego frame: pure pursuit toward the
    point `lookahead` metres along the polyline from the ego, and the acceleration that a constant-acceleration
    fit from the current speed through the plan's first waypoints (distances along the path) asks for, so a plan
    that slows down brakes as hard as it says."""
    path = np.concatenate([np.zeros((1, 2)), plan[:, :2]])
    seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
    along = np.concatenate([[0.0], np.cumsum(seg)])
    lookahead = max(tc.lookahead_min, tc.lookahead_time * speed)
    if along[-1] <= 1e-6:  # a plan that stays put: brake, wheels straight
        return -tc.speed_gain * speed, 0.0
    s = min(lookahead, along[-1])
    k = int(np.clip(np.searchsorted(along, s) - 1, 0, len(seg) - 1))
    frac = (s - along[k]) / max(seg[k], 1e-6)
    target = path[k] + frac * (path[k + 1] - path[k])
    alpha = np.arctan2(target[1], target[0])
    # highway-env's kinematic bicycle moves its centre along heading + slip, slip = atan(tan(steering) / 2), on a
    # circle of radius (length / 2) / sin(slip). The circle that leaves the centre along that direction and passes
    # through the target needs distance * sin(slip) = length * sin(alpha - slip). Pure pursuit's usual
    # atan(2 L sin(alpha) / distance) ignores the slip and asks for twice the steering that drew a curved plan.
    distance = max(float(np.linalg.norm(target)), 1e-3)
    slip = np.arctan2(wheelbase * np.sin(alpha), distance + wheelbase * np.cos(alpha))
    steering = float(np.arctan(2.0 * np.tan(slip)))
    n = min(tc.accel_fit_points, len(seg))
    t = cfg.dt * np.arange(1, n + 1)
    half_t2 = 0.5 * t**2
    accel = float(((along[1 : n + 1] - speed * t) * half_t2).sum() / (half_t2**2).sum())
    return accel, steering


# -- the task ---------------------------------------------------------------------------------------------------


def scenario_config(name: str, cfg: SceneConfig) -> dict:
    return {**SCENARIOS[name], "action": {"type": "ContinuousAction"}, "observation": {"type": "Kinematics"},
            "policy_frequency": cfg.policy_frequency, "simulation_frequency": cfg.simulation_frequency,
            "offroad_terminal": True}


def make_highway(name: str, cfg: SceneConfig):
    import highway_env  # noqa: F401  (registers the environments)

    config = scenario_config(name, cfg)
    if name.startswith("roundabout"):
        return continuous_roundabout()(config=config)
    return gym.make(name, config=config).unwrapped


def continuous_roundabout():
    """roundabout-v0 that accepts a continuous action: its reward compares the action with discrete indices (and
    fails on an array); rtdp reports its own metrics, so that term is given nothing to compare."""
    from highway_env.envs.roundabout_env import RoundaboutEnv

    class ContinuousRoundabout(RoundaboutEnv):
        def _rewards(self, action):
            return super()._rewards(None)

    return ContinuousRoundabout


class DrivingTask(gym.Env):
    """A highway-env scenario as a planning task: scene observations, plans as actions (see the module doc)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, name: str, scene: SceneConfig | None = None, tracker: TrackerConfig | None = None,
                 max_episode_steps: int | None = None):
        if name not in SCENARIOS:
            raise ValueError(f"highway/{name} is not a driving task here; choose one of {sorted(SCENARIOS)}")
        self.name = name
        self.scene = scene or SceneConfig()
        self.tracker = tracker or TrackerConfig()
        self.env = make_highway(name, self.scene)
        self.duration_steps = int(self.env.config["duration"] * self.scene.policy_frequency)
        self.max_episode_steps = max_episode_steps or self.duration_steps
        shapes = self.scene.observation_shapes()
        self.observation_space = gym.spaces.Dict(
            {k: gym.spaces.Box(-np.inf, np.inf, s, dtype=np.float32) for k, s in shapes.items()})
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (self.scene.points * 3,), dtype=np.float32)
        self.steps = 0
        self.lanes = []

    # The ego highway-env steps with a (normalised) continuous action.
    @property
    def ego(self):
        return self.env.vehicle

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        self.env.reset(seed=seed)
        self.lanes = self.env.road.network.lanes_list()
        self.steps = 0
        self.start = np.array(self.ego.position, dtype=np.float64)
        self.travelled = 0.0
        self.crashed = self.offroad = False
        self.accelerations: list[float] = []
        return self.observe(), {}

    def observe(self) -> dict[str, np.ndarray]:
        return observe(self.env.road, self.ego, self.scene, self.lanes)

    def control(self, plan: np.ndarray) -> np.ndarray:
        """The normalised continuous action that tracks `plan` for one step."""
        plan = np.asarray(plan, dtype=np.float64).reshape(self.scene.points, 3)
        acc, steer = track(plan, self.ego.speed, self.ego.LENGTH, self.scene, self.tracker)
        at = self.env.action_type
        return np.array([np.interp(acc, at.acceleration_range, [-1, 1]),
                         np.interp(steer, at.steering_range, [-1, 1])], dtype=np.float32)

    def step(self, plan):
        plan = np.asarray(plan, dtype=np.float32)
        if plan.shape != self.action_space.shape or not np.isfinite(plan).all():
            raise ValueError(f"a plan must be {self.action_space.shape[0]} finite numbers ({self.scene.points} "
                             f"waypoints of x, y, heading), got shape {plan.shape}")
        return self.advance(self.control(plan))

    def advance(self, action: np.ndarray):
        before = np.array(self.ego.position, dtype=np.float64)
        v_before = self.ego.speed
        _, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        self.travelled += float(np.linalg.norm(np.asarray(self.ego.position) - before))
        self.accelerations.append((self.ego.speed - v_before) * self.scene.policy_frequency)
        crashed = bool(self.ego.crashed)
        offroad = not self.ego.on_road
        reached = self.steps >= self.duration_steps
        truncated = truncated or reached or self.steps >= self.max_episode_steps
        terminated = bool(terminated or crashed or offroad)
        self.crashed, self.offroad = self.crashed or crashed, self.offroad or offroad
        info = {"crashed": crashed, "offroad": offroad, "success": reached and not crashed and not offroad,
                "progress_m": self.travelled, "speed": float(self.ego.speed)}
        return self.observe(), float(reward), terminated, truncated, info

    def episode_metrics(self) -> dict:
        """What a driving evaluation reports per episode, beside success."""
        return {"collided": self.crashed, "offroad": self.offroad, "progress_m": self.travelled,
                "mean_abs_jerk": self.mean_abs_jerk()}

    def mean_abs_jerk(self) -> float:
        """Longitudinal comfort over the episode so far: the mean |d(acceleration)/dt| in m/s^3."""
        a = np.asarray(self.accelerations)
        return float(np.abs(np.diff(a)).mean() * self.scene.policy_frequency) if len(a) > 2 else 0.0

    def snapshot(self):
        """An independent copy of the simulation, to branch futures from the same state."""
        return copy.deepcopy(self.env)

    def render_frame(self, size: int = 240) -> np.ndarray:
        self.env.render_mode = "rgb_array"
        self.env.config.update({"screen_width": size * 2, "screen_height": size, "offscreen_rendering": True})
        return self.env.render()

    def close(self):
        self.env.close()
