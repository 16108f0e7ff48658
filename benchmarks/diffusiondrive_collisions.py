"""What a driving planner's own choice does in the seconds before each of its highway collisions: the planner drives
the held-out seeds as `rtdp eval` does (sampler noise seeded per episode); for the last `--window` decisions of each
episode that ends in a collision, the leader's gap, the 4-s reach of the executed plan and of the top-scored
candidates, and the expert's plan from a copy of the same state (IDM/MOBIL with a mid-range driver style), with the
score rank of the candidate nearest to it.

    python benchmarks/diffusiondrive_collisions.py CHECKPOINT --episodes 50 --out collisions.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The expert's style for the label: the middle of DriverStyle.draw's ranges on the highway.
MID_STYLE = {"target_speed": 26.0, "politeness": 0.25, "lane_change_gain": 0.3, "time_headway": 1.5}


class FrozenState:
    """A saved highway-env state, as expert_future reads a task (its name, scene and a copy of the simulation)."""

    def __init__(self, task, env):
        self.name, self.scene, self.env = task.name, task.scene, env

    def snapshot(self):
        return copy.deepcopy(self.env)


def leader(agents: np.ndarray, lane_half_width: float = 2.0):
    """The nearest present agent ahead within the ego's lane: (gap between centres m, its vx m/s) or None."""
    ahead = [a for a in agents if a[0] > 0 and a[1] > 0 and abs(a[2]) < lane_half_width]
    if not ahead:
        return None
    a = min(ahead, key=lambda a: a[1])
    return float(a[1]), float(a[3])


def main() -> None:
    import torch

    from deploy.kinds import read_config
    from deploy.runtime import RuntimeSettings, build_policy
    from envs.driving import DrivingTask
    from envs.driving_expert import DriverStyle, expert_future
    from evaluation.episodes import episode_seeds

    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--window", type=int, default=25, help="decisions before the collision to look at")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    torch.set_num_threads(1)
    policy = build_policy(RuntimeSettings(args.checkpoint)).policy
    task = DrivingTask(read_config(args.checkpoint).data.task.partition("/")[2])
    style = DriverStyle(**MID_STYLE)
    horizon = round(task.scene.dt * task.scene.policy_frequency) * task.scene.points
    generator = torch.Generator()
    episodes = []
    for seed in episode_seeds(0, args.episodes):
        obs, _ = task.reset(seed=seed)
        generator.manual_seed(seed)
        recent, done = deque(maxlen=args.window), False
        while not done:
            chunk = policy.predict_chunk({k: torch.from_numpy(v)[None, None] for k, v in obs.items()},
                                         generator=generator)
            reach = chunk.extras["candidates"][0].reshape(-1, task.scene.points, 3)[:, -1, 0].numpy()
            recent.append(({"step": task.steps, "speed": float(obs["ego"][0]), "leader": leader(obs["agents"]),
                            "best": int(chunk.extras["best"][0]), "reach_m": reach.tolist(),
                            "scores": chunk.extras["scores"][0].tolist()}, copy.deepcopy(task.env)))
            obs, _, terminated, truncated, _ = task.step(chunk.action[0, 0].numpy())
            done = terminated or truncated
        entry = {"seed": seed, "crashed": bool(task.crashed), "steps": task.steps, "progress_m": task.travelled}
        if task.crashed:
            for record, env in recent:
                plan = expert_future(FrozenState(task, env), style, horizon)
                record["expert_reach_m"] = None if plan is None else float(plan[-1, 0])
                if plan is not None:
                    order = np.argsort(-np.asarray(record["scores"]))
                    nearest = int(np.argmin(np.abs(np.asarray(record["reach_m"]) - record["expert_reach_m"])))
                    record["expert_nearest_rank"] = int(np.flatnonzero(order == nearest)[0])
            entry["before"] = [r for r, _ in recent]
        episodes.append(entry)
        print(seed, "collision" if task.crashed else "", task.steps, flush=True)
    crashes = [e for e in episodes if e["crashed"]]
    ranks = [r["expert_nearest_rank"] for e in crashes for r in e["before"] if "expert_nearest_rank" in r]
    summary = {"checkpoint": args.checkpoint, "episodes": len(episodes), "collisions": len(crashes),
               "expert_style": MID_STYLE, "expert_nearest_rank_counts": np.bincount(ranks).tolist() if ranks else [],
               "executed_reach_m": [min(r["reach_m"][r["best"]] for r in e["before"]) for e in crashes],
               "expert_reach_m": [[min(x), max(x)] for e in crashes
                                  if (x := [r["expert_reach_m"] for r in e["before"] if r["expert_reach_m"]])]}
    args.out.write_text(json.dumps({"summary": summary, "episodes": episodes}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
