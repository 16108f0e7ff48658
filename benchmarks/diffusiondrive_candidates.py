"""What a driving planner's candidates offer on the expert's scenes, open loop: the executed plan's ADE against the
best candidate's (is the plan to drive among the candidates, and does the ranking pick it?), and how often the
executed plan, some candidate and the expert's own future leave the road as the clearance check reads it (the
scene raster's on-road channel, `planners/clearance.road_seconds`; the expert never leaves the road, so its rate is
the check's false alarms at that raster resolution).

    python benchmarks/diffusiondrive_candidates.py \
        benchmarks/results/diffusiondrive/runs/roundabout-v0-diffusiondrive-see-ego-dagger1 \
        --episodes 15 --thresholds 0.5 0.25 --out candidates.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from deploy.kinds import read_config
    from deploy.runtime import RuntimeSettings, build_policy
    from envs.driving import DrivingTask
    from envs.driving_expert import drive_episode
    from planners.clearance import ClearanceConfig, road_seconds

    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--episodes", type=int, default=15, help="held-out seeds from 100000")
    ap.add_argument("--every", type=int, default=3, help="every N-th scene of an expert drive")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.5], help="ClearanceConfig.road_threshold")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    runtime = build_policy(RuntimeSettings(args.checkpoint))
    lay = runtime.model.cfg.layout
    env = DrivingTask(read_config(Path(args.checkpoint)).data.task.partition("/")[2])
    generator = torch.Generator().manual_seed(0)
    executed_ade, best_ade = [], []
    off = {th: {"executed": [], "some_candidate_stays_on": [], "expert": []} for th in args.thresholds}
    for seed in tqdm(range(100_000, 100_000 + args.episodes), desc="expert scenes"):
        ep = drive_episode(env, seed, branch_every=0)
        data = ep["data"]
        steps = [t for t in range(0, ep["steps"], args.every) if np.isfinite(data["plan"][t]).all()]
        if not steps:
            continue
        obs = {k: torch.from_numpy(data[k][steps][:, None]) for k in ("ego", "agents", "bev")}
        chunk = runtime.policy.predict_chunk(obs, generator=generator)
        rows = torch.arange(len(steps))
        plans = chunk.extras["candidates"].reshape(len(steps), -1, lay.points, lay.coords)
        truth = torch.from_numpy(data["plan"][steps]).reshape(len(steps), 1, lay.points, lay.coords)
        err = (plans[..., :2] - truth[..., :2]).norm(dim=-1).mean(-1)  # (B, K)
        executed_ade += err[rows, chunk.extras["best"]].tolist()
        best_ade += err.min(dim=1).values.tolist()
        on_road = obs["bev"][:, -1, ..., 3]
        for th, counts in off.items():
            cfg = ClearanceConfig(road_threshold=th)
            on_s = road_seconds(plans, on_road, lay.bev_x, lay.bev_y, lay.dt, cfg)
            horizon = lay.points * lay.dt
            counts["executed"] += (on_s[rows, chunk.extras["best"]] < horizon).tolist()
            counts["some_candidate_stays_on"] += (on_s.max(dim=1).values >= horizon).tolist()
            counts["expert"] += (road_seconds(truth, on_road, lay.bev_x, lay.bev_y, lay.dt, cfg)[:, 0]
                                 < horizon).tolist()
    env.close()
    result = {"checkpoint": args.checkpoint, "scenes": len(executed_ade), "executed_ade": float(np.mean(executed_ade)),
              "best_candidate_ade": float(np.mean(best_ade)),
              "leaves_road": {str(th): {k: float(np.mean(v)) for k, v in c.items()} for th, c in off.items()}}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
