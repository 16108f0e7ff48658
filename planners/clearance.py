"""A clearance check over a driving planner's candidates, as a wrapper: each candidate plan is swept against every
observed vehicle carried on at its current velocity and against the road in the scene's raster, and the decision
executes the best-ranked candidate that stays clear and on the road over the whole plan (if none does, the one that
does so longest). The planner itself is unchanged: its candidates and their ranking (DiffusionDrive's scores; the
vanilla planner's sample order) come out of the same graph on any backend, and the check runs after it, outside the
graph.

    checked = ClearanceCheck(policy, model, ClearanceConfig())
    chunk = checked.predict_chunk(obs)    # extras: "clear_s" (B, K) seconds each candidate stays clear and
                                          # on the road, "recipe_best" (B,) what the planner alone would have executed

The forecast is the simplest one a scene supports (constant velocity, no reaction), so the check is conservative
toward vehicles that will brake and blind to ones that will swerve. A vehicle behind the ego in its own lane is left
out: it is the follower's to keep its distance, and a forecast that does not brake for the ego would otherwise veto
every plan that slows down. The road is the raster's on-road channel sampled bilinearly at the ego's centre (the
cells' centres carry highway-env's own test), so an edge is placed to within a cell.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from policy.contract import Chunk, PolicyWrapper

# The agent token's fields (envs.driving.AGENT_FEATURES) and the raster's on-road channel (envs.driving.BEV_CHANNELS),
# by position; planners do not import envs.
PRESENT, X, Y, VX, VY = 0, 1, 2, 3, 4
ON_ROAD = 3


@dataclass
class ClearanceConfig:
    length: float = 5.0  # [m] a vehicle's length (highway-env's Vehicle.LENGTH) ...
    width: float = 2.0  # [m] ... and width; the ego and the others alike
    margin_long: float = 1.0  # [m] kept clear ahead and behind, beyond touching
    margin_lat: float = 0.3  # [m] kept clear to the sides
    substeps: int = 5  # checks between two waypoints (a waypoint every 0.5 s is 2.5 m at 5 m/s closing speed)
    follower_half_width: float = 2.0  # [m] a vehicle behind the ego within this of its centre line is a follower
    keep_on_road: bool = True  # a plan is also no longer clear once the ego's centre leaves the road
    road_threshold: float = 0.5  # the sampled on-road value below which a point is off the road

    def __post_init__(self):
        for name in ("length", "width"):
            if not getattr(self, name) > 0:
                raise ValueError(f"clearance {name} must be > 0 m, got {getattr(self, name)}")
        for name in ("margin_long", "margin_lat", "follower_half_width"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"clearance {name} must be >= 0 m, got {getattr(self, name)}")
        if not 0.0 < self.road_threshold < 1.0:
            raise ValueError(f"clearance road_threshold must be in (0, 1), got {self.road_threshold}")
        if self.substeps < 1:
            raise ValueError(f"clearance substeps must be >= 1, got {self.substeps}")

    def to_dict(self) -> dict:
        return asdict(self)


def sweep(plans: torch.Tensor, dt: float, substeps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The poses (B, K, P * substeps, 3) at every substep after t = 0, linearly interpolated between the waypoints
    of `plans` (B, K, P, 3) (x, y, heading dt apart in the ego frame, the ego at the origin at t = 0), and their
    times (P * substeps,)."""
    b, k, p, _ = plans.shape
    poses = torch.cat([plans.new_zeros(b, k, 1, 3), plans], dim=2)  # (B, K, P + 1, 3) at 0, dt, ..., P dt
    frac = torch.arange(1, substeps + 1, dtype=plans.dtype) / substeps
    swept = (poses[:, :, :-1, None] + frac[:, None] * (poses[:, :, 1:, None] - poses[:, :, :-1, None])).flatten(2, 3)
    return swept, dt * (torch.arange(p * substeps, dtype=plans.dtype) + 1) / substeps


def seconds_until(bad: torch.Tensor, dt: float, substeps: int) -> torch.Tensor:
    """(B, K) the time of the last substep before the first `bad` one (B, K, T); the horizon where none is."""
    t = bad.shape[-1]
    first = torch.where(bad.any(-1), bad.float().argmax(-1), torch.full_like(bad[..., 0], t, dtype=torch.long))
    return first.to(torch.float32) * dt / substeps


def clear_seconds(plans: torch.Tensor, agents: torch.Tensor, dt: float, cfg: ClearanceConfig) -> torch.Tensor:
    """How long each plan stays clear of every agent's constant-velocity forecast: (B, K) seconds, the plan's
    horizon (P * dt) where it never comes within the boxes' reach.

    `plans` (B, K, P, 3): waypoints (x, y, heading) dt apart in the ego frame, the ego at the origin at t = 0.
    `agents` (B, N, >= 5): tokens (present, x, y, vx, vy, ...) in the same frame."""
    swept, times = sweep(plans, dt, cfg.substeps)
    present = agents[..., PRESENT] > 0.5
    follower = (agents[..., X] < 0) & (agents[..., Y].abs() <= cfg.follower_half_width)
    watched = present & ~follower  # (B, N)
    at = agents[..., None, [X, Y]] + times[:, None] * agents[..., None, [VX, VY]]  # (B, N, T, 2)
    rel = at[:, None] - swept[:, :, None, :, :2]  # (B, K, N, T, 2)
    heading = swept[:, :, None, :, 2]
    c, s = heading.cos(), heading.sin()
    lon = c * rel[..., 0] + s * rel[..., 1]
    lat = -s * rel[..., 0] + c * rel[..., 1]
    hit = (lon.abs() < cfg.length + cfg.margin_long) & (lat.abs() < cfg.width + cfg.margin_lat)
    hit = (hit & watched[:, None, :, None]).any(dim=2)  # (B, K, T)
    return seconds_until(hit, dt, cfg.substeps).to(plans.dtype)


def road_seconds(plans: torch.Tensor, on_road: torch.Tensor, extent_x: list[float], extent_y: list[float],
                 dt: float, cfg: ClearanceConfig) -> torch.Tensor:
    """How long each plan's centre stays on the road: (B, K) seconds, the horizon where it never leaves.

    `on_road` (B, NX, NY): the raster's on-road channel, cell (i, j) centred in the ego frame at x, y within
    `extent_x` (behind, ahead) and `extent_y` (right, left); beyond the raster the edge cell's value holds."""
    swept, _ = sweep(plans, dt, cfg.substeps)
    # grid_sample's x indexes the raster's last axis (the ego's y) and its y the one before (the ego's x)
    u = 2 * (swept[..., 1] - extent_y[0]) / (extent_y[1] - extent_y[0]) - 1
    v = 2 * (swept[..., 0] - extent_x[0]) / (extent_x[1] - extent_x[0]) - 1
    road = F.grid_sample(on_road[:, None].to(plans.dtype), torch.stack([u, v], dim=-1), mode="bilinear",
                         padding_mode="border", align_corners=False)[:, 0]  # (B, K, T)
    return seconds_until(road < cfg.road_threshold, dt, cfg.substeps).to(plans.dtype)


def select_clear(clear_s: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
    """(B,) the candidate that stays clear longest, and among those the best-ranked (`ranking` (B, K), higher is
    better, in [0, 1]; ties go to the lowest index)."""
    longest = clear_s.max(dim=1, keepdim=True).values
    return torch.where(clear_s >= longest, ranking, ranking.new_full((), -1.0)).argmax(dim=1)


class ClearanceCheck(PolicyWrapper):
    """A driving planner's decision with the clearance check between its candidates and what executes. `model`:
    the planner underneath (its plan geometry, `chunk_for`), whichever backend `policy` runs it on."""

    def __init__(self, policy, model, cfg: ClearanceConfig | None = None):
        if not hasattr(model, "chunk_for"):
            raise ValueError(f"a clearance check needs a driving planner's candidates; a {model.spec.kind} "
                             f"checkpoint has none")
        super().__init__(policy)
        self.model, self.cfg = model, cfg or ClearanceConfig()

    def describe(self) -> dict:
        return self.cfg.to_dict()

    @torch.no_grad()
    def predict_chunk(self, obs, *, executed=None, generator=None, noise=None) -> Chunk:
        chunk = self.inner.predict_chunk(obs, executed=executed, generator=generator, noise=noise)
        lay = self.model.cfg.layout
        candidates, scores = chunk.extras["candidates"], chunk.extras["scores"]
        plans = candidates.reshape(*candidates.shape[:2], lay.points, lay.coords)
        agents = torch.as_tensor(obs["agents"])[:, -1].to(plans.dtype)
        clear_s = clear_seconds(plans, agents, lay.dt, self.cfg)
        if self.cfg.keep_on_road:
            on_road = torch.as_tensor(obs["bev"])[:, -1, ..., ON_ROAD]
            clear_s = torch.minimum(clear_s, road_seconds(plans, on_road, lay.bev_x, lay.bev_y, lay.dt, self.cfg))
        best = select_clear(clear_s, scores)
        checked = self.model.chunk_for(candidates, scores, best, nfe=chunk.nfe)
        checked.extras.update(clear_s=clear_s, recipe_best=chunk.extras["best"])
        return checked
