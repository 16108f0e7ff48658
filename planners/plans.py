"""Plan geometry the driving planners share: a plan is waypoints (x, y, heading) `dt` seconds apart in the ego's
frame at the decision, the ego itself at the origin."""

from __future__ import annotations

import torch


def plans_ahead(plan: torch.Tensor, dt: float, tick: float, ticks: int) -> torch.Tensor:
    """A plan (B, P, 3) of waypoints dt apart, from the ego at the origin, as the ego sees it after following it for
    0, 1, ..., ticks - 1 ticks: (B, ticks, P, 3), each re-expressed in the frame of the pose the plan puts the ego
    in then (poses interpolated linearly between waypoints; past the plan's end its last waypoint is held, so no
    shifted plan reaches beyond what the planner said)."""
    b, p, _ = plan.shape
    poses = torch.cat([plan.new_zeros(b, 1, 3), plan], dim=1)  # pose at 0, dt, ..., P dt

    def at(q: torch.Tensor) -> torch.Tensor:
        """Poses (B, *q.shape, 3) at times q (seconds)."""
        k = (q / dt).floor().long().clamp(0, p - 1)
        frac = (q / dt - k).unsqueeze(-1)
        lo = poses[:, k.reshape(-1)].reshape(b, *q.shape, 3)
        hi = poses[:, k.reshape(-1) + 1].reshape(b, *q.shape, 3)
        return lo + frac * (hi - lo)

    shifts = torch.arange(ticks, dtype=plan.dtype) * tick
    origin = at(shifts)  # (B, ticks, 3)
    times = (shifts[:, None] + dt * torch.arange(1, p + 1, dtype=plan.dtype)[None]).clamp(max=p * dt)
    points = at(times)  # (B, ticks, P, 3)
    d = points[..., :2] - origin[:, :, None, :2]
    c, s = origin[..., 2].cos()[..., None], origin[..., 2].sin()[..., None]
    x, y = c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]
    return torch.stack([x, y, points[..., 2] - origin[:, :, None, 2]], dim=-1)
