"""A driving decision drawn top-down in the ego's frame: the road (the BEV's on-road channel), the other vehicles
(the agent tokens), every candidate plan shaded by its score, and the chosen one."""

from __future__ import annotations

import numpy as np


def draw_decision(scene: dict[str, np.ndarray], extras: dict, plan: np.ndarray, bev_x, bev_y,
                  size: tuple[int, int] = (640, 256)) -> np.ndarray:
    """One RGB frame (H, W, 3) of a decision: `scene` is the raw observation (one step), `extras` the chunk's
    (candidates, scores), `plan` the executed plan (points * 3,)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    w, h = size
    fig = plt.figure(figsize=(w / 100, h / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    road = scene["bev"][..., 3]
    ax.imshow(road.T, origin="lower", extent=(bev_x[0], bev_x[1], bev_y[0], bev_y[1]), cmap="Greys", vmin=0,
              vmax=3, aspect="auto")
    for a in scene["agents"]:
        if a[0] > 0.5:
            ax.add_patch(Rectangle((a[1] - 2.5, a[2] - 1.0), 5.0, 2.0, angle=float(np.degrees(np.arctan2(a[6], a[5]))),
                                   rotation_point="center", color="tab:blue"))
    ax.add_patch(Rectangle((-2.5, -1.0), 5.0, 2.0, color="tab:green"))
    if "candidates" in extras:
        cands = np.asarray(extras["candidates"]).reshape(len(extras["candidates"]), -1, 3)
        scores = np.asarray(extras["scores"], dtype=float)
        shade = (scores - scores.min()) / max(float(np.ptp(scores)), 1e-6)
        for c, s in zip(cands, shade, strict=True):
            ax.plot(np.r_[0, c[:, 0]], np.r_[0, c[:, 1]], color=plt.cm.viridis(s), alpha=0.3 + 0.7 * s, lw=1)
    p = plan.reshape(-1, 3)
    ax.plot(np.r_[0, p[:, 0]], np.r_[0, p[:, 1]], color="tab:red", lw=2.5, marker="o", ms=3)
    ax.set_xlim(bev_x)
    ax.set_ylim(bev_y)
    ax.axis("off")
    fig.canvas.draw()
    frame = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return frame
