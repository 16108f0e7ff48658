"""The clearance check's geometry on plans and vehicles placed by hand: when a plan first comes within reach of a
constant-velocity forecast, which vehicles it watches, and which candidate it executes."""

import pytest
import torch

from planners.clearance import ClearanceConfig, clear_seconds, road_seconds, select_clear

DT = 0.5


def straight(speed: float, y: float = 0.0) -> torch.Tensor:
    """A plan (8, 3) along x at `speed` m/s, moved to lateral offset y by its first waypoint."""
    t = DT * torch.arange(1, 9, dtype=torch.float32)
    return torch.stack([speed * t, torch.full_like(t, y), torch.zeros_like(t)], dim=-1)


def vehicle(x: float, y: float, vx: float, vy: float = 0.0) -> list[float]:
    return [1.0, x, y, vx, vy, 1.0, 0.0]


def seconds(plans: list[torch.Tensor], agents: list[list[float]], **cfg) -> torch.Tensor:
    tokens = torch.tensor(agents or [[0.0] * 7], dtype=torch.float32)[None]
    return clear_seconds(torch.stack(plans)[None], tokens, DT, ClearanceConfig(**cfg))[0]


def test_a_plan_closing_on_a_slower_leader_is_clear_until_the_boxes_meet():
    # ego at 20 m/s, leader 30.5 m ahead at 10 m/s: the gap closes at 10 m/s and is inside length + margin (6 m)
    # from 2.45 s; a plan that matches the leader's speed never closes in, nor does one that closes at 5 m/s
    clear = seconds([straight(20.0), straight(10.0), straight(15.0)], [vehicle(30.5, 0.0, 10.0)])
    assert clear[0].item() == pytest.approx(2.4, abs=1e-5)  # the last check before the boxes meet, 0.1 s apart
    assert clear[1].item() == 4.0  # the plan's horizon: never within reach
    assert clear[2].item() == 4.0  # 30.5 - 5 * 4 = 10.5 m apart at the end


def test_vehicles_in_other_lanes_and_followers_in_its_own_are_not_conflicts():
    plans = [straight(20.0)]
    assert seconds(plans, [vehicle(10.0, 4.0, 20.0)])[0].item() == 4.0  # the next lane, side by side
    assert seconds(plans, [vehicle(-8.0, 0.0, 30.0)])[0].item() == 4.0  # a faster follower is the follower's to avoid
    # the same follower is watched once the ego's plan is to pull into its lane
    merge = straight(20.0, y=4.0)
    merge[0, 1] = 2.0
    assert seconds([merge], [vehicle(-8.0, 4.0, 30.0)])[0].item() < 4.0
    # a vehicle that is not present (a padding token) is never a conflict, wherever its numbers put it
    ghost = vehicle(10.0, 0.0, 0.0)
    ghost[0] = 0.0
    assert seconds(plans, [ghost])[0].item() == 4.0


def test_a_crossing_vehicle_is_caught_between_waypoints():
    # 20 m/s ego, a vehicle crossing its path at x = 25 m, passing y = 0 at t = 1.25 s, between two waypoints
    agents = [vehicle(25.0, -12.5, 0.0, 10.0)]
    assert seconds([straight(20.0)], agents)[0].item() == pytest.approx(1.0)  # in reach from 1.1 s
    assert seconds([straight(20.0)], agents, substeps=1)[0].item() == 4.0  # waypoints alone step over it


def test_a_plan_is_on_the_road_until_its_centre_crosses_the_rasters_edge():
    # the scene's raster: 4 m x 2 m cells over x in [-40, 120), y in [-16, 16); the road covers |y| <= 6 m, so its
    # edge lies halfway between the cell centres at 5 and 7 m, where bilinear sampling reads 0.5
    xs, ys = [-40.0, 120.0], [-16.0, 16.0]
    centres_y = torch.arange(-15.0, 16.0, 2.0)
    on_road = (centres_y.abs() < 6.0).float().expand(40, 16)[None]
    drift = straight(20.0)
    drift[:, 1] = 2.0 * DT * torch.arange(1, 9)  # 2 m/s to the left: past y = 6 m after 3 s
    right = straight(20.0, y=-4.0)  # one lane over to the right, inside the road
    far = straight(40.0)  # ends 160 m ahead, beyond the raster: the edge cells' value holds
    road = road_seconds(torch.stack([drift, right, far])[None], on_road, xs, ys, DT, ClearanceConfig())[0]
    assert road.tolist() == pytest.approx([3.0, 4.0, 4.0])  # off at 3.1 s (6.2 m), the last check before it 3.0 s
    # no road anywhere: every plan is off from its first check
    assert road_seconds(drift[None, None], torch.zeros(1, 40, 16), xs, ys, DT, ClearanceConfig()).item() == 0.0


def test_the_selection_is_the_best_ranked_among_the_longest_clear():
    clear = torch.tensor([[4.0, 2.0, 4.0, 4.0], [1.0, 3.0, 3.0, 0.5], [4.0, 4.0, 4.0, 4.0]])
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.9, 0.2, 0.4, 0.8], [0.0, 0.0, 0.0, 0.0]])
    assert select_clear(clear, scores).tolist() == [2, 2, 0]  # ties in rank (the vanilla planner) go to the first


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="clearance length"):
        ClearanceConfig(length=0.0)
    with pytest.raises(ValueError, match="clearance margin_lat"):
        ClearanceConfig(margin_lat=-1.0)
    with pytest.raises(ValueError, match="road_threshold"):
        ClearanceConfig(road_threshold=1.0)
    with pytest.raises(ValueError, match="substeps"):
        ClearanceConfig(substeps=0)
