"""The closed-loop quality baseline: per metaworld task, expert demos -> the default low-dim U-Net policy ->
DDPM-100 and DDIM-10 on 50 held-out episodes, on the same checkpoint.

    python benchmarks/closed_loop.py --out benchmarks/results/closed_loop [--tasks reach-v3 ...] [--steps 4000]

Each task's result is a JSON file in --out (a finished task is skipped on a rerun, so the run can be resumed);
`--table` prints the Markdown table for BENCHMARKS.md from whatever is there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ["reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3", "window-open-v3"]
CONFIG = ROOT / "configs" / "policy" / "unet_lowdim.yaml"


def run_task(name: str, out: Path, demos: int, steps: int, episodes: int, seed: int) -> dict:
    from envs.collect import collect_demos
    from envs.datasets import PolicyDataset
    from evaluation.evaluate import EvalSettings, evaluate
    from policy.config import load_config
    from policy.train import train

    task = f"metaworld/{name}"
    run_dir = out / "runs" / name
    t0 = time.perf_counter()
    buffer = collect_demos(task, demos, seed=seed)
    collect_s = time.perf_counter() - t0
    cfg = load_config(CONFIG, [f"train.steps={steps}", f"train.checkpoint_every={steps}", f"data.task={task}",
                               f"train.seed={seed}"])
    p = cfg.policy
    data = PolicyDataset(buffer, p.horizon, p.n_obs_steps, p.n_action_steps, cfg.data.state_keys,
                         cfg.data.action_key)
    summary = train(cfg, data, run_dir)
    evals = {}
    for sampler, k in (("ddpm", 100), ("ddim", 10)):
        r = evaluate(EvalSettings(checkpoint=str(run_dir), episodes=episodes, seed=seed, sampler=sampler, steps=k))
        evals[f"{sampler}-{k}"] = {key: r[key] for key in ("success_rate", "success_ci95", "mean_return",
                                                           "nfe_per_decision", "latency_ms", "seconds")}
        print(f"  {name} {sampler}-{k}: success {r['success_rate']:.2f}", flush=True)
    return {"task": task, "demos": demos, "expert_success_rate": buffer.attrs["expert_success_rate"],
            "demo_steps": buffer.n_steps, "collect_seconds": collect_s, "train_steps": steps,
            "train_seconds": summary.seconds, "loss_last": summary.losses[-1][1], "eval_episodes": episodes,
            "eval": evals, "date": datetime.date.today().isoformat(), "machine": platform.node()}


def table(out: Path) -> str:
    rows = ["| task | expert | DDPM-100 success [95% CI] | DDIM-10 success [95% CI] | DDPM-100 p50 / p99 ms "
            "| DDIM-10 p50 / p99 ms | training |", "|---|---|---|---|---|---|---|"]
    for name in TASKS:
        path = out / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())

        def cell(e):
            lo, hi = e["success_ci95"]
            return f"{e['success_rate']:.2f} [{lo:.2f}, {hi:.2f}]"

        def lat(e):
            return f"{e['latency_ms']['p50']:.0f} / {e['latency_ms']['p99']:.0f}"

        ddpm, ddim = r["eval"]["ddpm-100"], r["eval"]["ddim-10"]
        rows.append(f"| {name} | {r['expert_success_rate']:.2f} | {cell(ddpm)} | {cell(ddim)} | {lat(ddpm)} "
                    f"| {lat(ddim)} | {r['train_steps']} steps, {r['train_seconds'] / 60:.1f} min |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "closed_loop")
    ap.add_argument("--tasks", nargs="*", default=TASKS)
    ap.add_argument("--demos", type=int, default=50)
    ap.add_argument("--steps", type=int, default=4000, help="training steps (the config's default is 4000)")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="only print the table from existing results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for name in args.tasks:
            path = args.out / f"{name}.json"
            if path.is_file():
                print(f"{name}: done already ({path})")
                continue
            print(f"{name}: collect, train {args.steps} steps, evaluate", flush=True)
            path.write_text(json.dumps(run_task(name, args.out, args.demos, args.steps, args.episodes, args.seed),
                                       indent=2))
    print(table(args.out))


if __name__ == "__main__":
    main()
