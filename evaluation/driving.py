"""What a driving evaluation adds to closed-loop success: the IDM expert driven on the same held-out seeds (its
collisions, progress and comfort, the figures a planner is held to), and the planner open-loop on the expert's
scenes: top-1 ADE / FDE against the future that happened, anchor accuracy (the chosen anchor is the one nearest the
future that happened; and among its 3 nearest, as anchors spaced a few metres apart along the speed axis are
near-ties), and the mode diversity D of DiffusionDrive's Eq. 3 over its candidates.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from deploy.kinds import read_config
from deploy.runtime import RuntimeSettings, build_policy
from envs.driving import DrivingTask, SceneConfig
from envs.driving_expert import collect_relabelled, drive_episode

from .episodes import TimedPolicy

DIVERSITY_WIDTH = 2.0  # [m] a trajectory rasterised as a polyline this wide (a car's width)
DIVERSITY_CELL = 0.5  # [m]


def polyline_mask(cells: np.ndarray, polyline: np.ndarray, width: float) -> np.ndarray:
    """Which cell centres (M, 2) lie within width / 2 of the polyline (P, 2)."""
    a, b = polyline[:-1], polyline[1:]
    ab = b - a
    ap = cells[:, None] - a[None]
    u = np.clip((ap * ab[None]).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9)[None], 0.0, 1.0)
    nearest = a[None] + u[..., None] * ab[None]
    return (np.linalg.norm(cells[:, None] - nearest, axis=-1) <= width / 2).any(axis=1)


def mode_diversity(trajectories: np.ndarray, width: float = DIVERSITY_WIDTH, cell: float = DIVERSITY_CELL) -> float:
    """D = 1 - mean_i IoU(tau_i, union_j tau_j) over trajectories (K, P, 2) that start at the ego (the origin),
    each rasterised as a polyline `width` wide. 0 when all coincide; 1 - 1/K when none overlap."""
    paths = np.concatenate([np.zeros((len(trajectories), 1, 2)), trajectories], axis=1)
    lo, hi = paths.reshape(-1, 2).min(0) - width, paths.reshape(-1, 2).max(0) + width
    xs, ys = np.arange(lo[0], hi[0], cell), np.arange(lo[1], hi[1], cell)
    cells = np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)
    masks = np.stack([polyline_mask(cells, p, width) for p in paths])
    union = masks.any(axis=0).sum()
    return float(1.0 - masks.sum(axis=1).mean() / max(union, 1))


def expert_and_open_loop(runtime, task: str, seeds: list[int], every: int = 5, diversity_every: int = 4,
                         progress: bool = True) -> dict:
    """The expert's closed-loop figures on `seeds`, and the planner open-loop on every `every`-th of the expert's
    scenes that has a complete future (diversity on every `diversity_every`-th of those)."""
    policy, model = runtime.policy, runtime.model
    layout = getattr(model.cfg, "layout", None)
    env = DrivingTask(task.partition("/")[2], SceneConfig.from_dict(layout.scene) if layout is not None else None)
    generator = torch.Generator()
    expert, ade, fde, hits, top3, diversity = [], [], [], [], [], []
    points = model.cfg.layout.points if hasattr(model.cfg, "layout") else env.scene.points
    for seed in tqdm(seeds, desc=f"expert + open loop {task}", disable=not progress, dynamic_ncols=True):
        ep = drive_episode(env, seed, branch_every=0)
        expert.append({k: ep[k] for k in ("crashed", "success", "progress_m", "jerk")})
        data = ep["data"]
        steps = [t for t in range(0, ep["steps"], every) if np.isfinite(data["plan"][t]).all()]
        if not steps:
            continue
        generator.manual_seed(seed)
        obs = {k: torch.from_numpy(data[k][steps][:, None]) for k in ("ego", "agents", "bev")}
        chunk = policy.predict_chunk(obs, generator=generator)
        plan = chunk.action[:, 0].reshape(len(steps), points, 3)[..., :2].numpy()
        truth = data["plan"][steps].reshape(len(steps), points, 3)[..., :2]
        err = np.linalg.norm(plan - truth, axis=-1)
        ade.extend(err.mean(1))
        fde.extend(err[:, -1])
        extras = chunk.extras
        if "best" in extras and getattr(model, "scores_anchors", False):
            target = model.normalizer["action"].normalize(torch.from_numpy(data["plan"][steps]))
            rank = model.anchor_rank(target.reshape(len(steps), points, 3), extras["best"])
            hits.extend((rank == 0).numpy().tolist())
            top3.extend((rank < 3).numpy().tolist())
        if "candidates" in extras:
            cands = extras["candidates"].reshape(len(steps), -1, points, 3)[..., :2].numpy()
            diversity.extend(mode_diversity(c) for c in cands[::diversity_every])
    env.close()
    out = {
        "expert": {"collision_rate": float(np.mean([e["crashed"] for e in expert])),
                   "success_rate": float(np.mean([e["success"] for e in expert])),
                   "progress_m": float(np.mean([e["progress_m"] for e in expert])),
                   "mean_abs_jerk": float(np.mean([e["jerk"] for e in expert])), "episodes": len(expert)},
        "open_loop": {"scenes": len(ade), "every": every},
        "ade": float(np.mean(ade)) if ade else None,
        "fde": float(np.mean(fde)) if fde else None,
    }
    if hits:
        out["anchor_accuracy"] = float(np.mean(hits))
        out["anchor_accuracy_top3"] = float(np.mean(top3))
    if diversity:
        out["diversity"] = float(np.mean(diversity))
        out["open_loop"]["diversity_scenes"] = len(diversity)
    return out


def closed_loop_figures(results: list[dict]) -> dict:
    """Collision rate, progress and comfort over a driving evaluation's episodes."""
    m = [r["metrics"] for r in results]
    return {"collision_rate": float(np.mean([e["collided"] for e in m])),
            "offroad_rate": float(np.mean([e["offroad"] for e in m])),
            "progress_m": float(np.mean([e["progress_m"] for e in m])),
            "mean_abs_jerk": float(np.mean([e["mean_abs_jerk"] for e in m]))}


def relabel_drives(checkpoint: str, episodes: int, seed: int, label_every: int = 1, progress: bool = True,
                   max_episode_steps: int | None = None):
    """A DAgger round (envs.driving_expert): the checkpoint's planner drives `episodes` episodes of its task on
    seeds seed, seed + 1, ... (one torch thread, sampler noise seeded per episode as `rtdp eval` does), labelled by
    the expert; returns the dataset to append to the one the planner was trained on."""
    task = read_config(checkpoint).data.task
    if not task or not task.startswith("highway/"):
        raise ValueError(f"checkpoint {checkpoint} drives task {task!r}: relabelled drives are for highway/ tasks")
    torch.set_num_threads(1)
    runtime = build_policy(RuntimeSettings(checkpoint))
    act = TimedPolicy(runtime.policy)

    def act_for_episode(episode_seed: int):
        act.reset(episode_seed)
        return act

    layout = getattr(runtime.model.cfg, "layout", None)
    return collect_relabelled(task, episodes, act_for_episode, runtime.policy.spec.n_obs_steps, seed, label_every,
                              planner=str(checkpoint), progress=progress, max_episode_steps=max_episode_steps,
                              scene=SceneConfig.from_dict(layout.scene) if layout is not None else None)
