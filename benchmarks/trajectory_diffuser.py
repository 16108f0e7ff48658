"""Trajectory Diffuser against its baselines on the maze and hopper tasks, per task: the data `rtdp collect` makes
(the mazes: the noisy waypoint expert's continuing stream; hopper: a SAC behaviour policy stopped at a third of the
expert's return, its samples or its training stream) -> Trajectory Diffuser and the Decision-Diffuser-style planner
trained on the same data with the same U-Net -> `rtdp eval` on the same 50 held-out seeds for Trajectory Diffuser,
its draft alone (`--steps 0`), Decision-Diffuser-style and Diffuser-style -> planning latency per decision on one
thread, back to back, 32 candidates.

    python benchmarks/trajectory_diffuser.py --tasks pointmaze/umaze pointmaze/medium   # resumable per stage
    python benchmarks/trajectory_diffuser.py --tasks mujoco/hopper-medium mujoco/hopper-medium-replay
    python benchmarks/trajectory_diffuser.py --table

Data and checkpoints go to benchmarks/results/trajectory_diffuser/runs/ (not committed); results to
benchmarks/results/trajectory_diffuser/<maze or hopper dataset>.json.
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

OUT = ROOT / "benchmarks" / "results" / "trajectory_diffuser"
CONFIGS = {"trajectory_diffuser": "trajectory_diffuser.yaml", "decision_diffuser": "decision_diffuser.yaml",
           "diffuser": "diffuser.yaml"}
# the reference's horizons
HORIZONS = {"umaze": 32, "medium": 64, "large": 128, "hopper-medium": 16, "hopper-medium-replay": 16}
# What is evaluated: (row name, checkpoint kind, the refinement's steps (None: the config's))
ROWS = (("trajectory_diffuser", "trajectory_diffuser", None), ("draft_alone", "trajectory_diffuser", 0),
        ("decision_diffuser", "decision_diffuser", None), ("diffuser", "diffuser", None))
OVERRIDES_FILE = "benchmark_overrides.json"  # beside each run the script trains: the overrides it was trained with
KEYS = ("success_rate", "success_ci95", "mean_return", "normalized_return", "nfe_per_decision",
        "draft_steps_per_decision", "actions_per_decision", "latency_ms", "decisions", "seconds", "config")


def dataset(task: str, steps: int) -> Path:
    from envs.datasets.offline import save_offline
    from envs.hopper import collect_hopper
    from envs.pointmaze import collect_maze

    path = OUT / "runs" / f"{task.partition('/')[2]}.hdf5"
    if not path.exists():
        t0 = time.perf_counter()
        if task.startswith("mujoco/"):
            buffer = collect_hopper(task, steps, OUT / "runs" / "hopper-behaviour", seed=0)
        else:
            buffer = collect_maze(task, steps, seed=0)
        buffer.attrs["collect_seconds"] = time.perf_counter() - t0
        save_offline(buffer, path)
    return path


def _steps(data: Path) -> int:
    """The dataset's transitions (medium-replay holds its behaviour policy's training stream, not --data-steps)."""
    import h5py

    with h5py.File(data, "r") as f:
        return len(f["rewards"])


def checkpoint(task: str, kind: str, data: Path, overrides: list[str]) -> tuple[Path, dict]:
    from deploy.kinds import kind_named
    from envs.datasets.offline import load_offline
    from envs.datasets.trajectory_dataset import TrajectoryDataset
    from policy.config import load_config
    from policy.train import train

    name = task.partition("/")[2]
    run = OUT / "runs" / f"{name}-{kind}"
    k = kind_named(kind)
    requested = [f"planner.horizon={HORIZONS[name]}", *overrides]
    cfg = load_config(ROOT / "configs" / "planners" / CONFIGS[kind], requested, k.config_class)
    if (run / "model.safetensors").is_file():
        refuse_other_settings(run, requested, cfg)
        return run, json.loads((run / "train_report.json").read_text())
    buffer = load_offline(data)
    cfg.data.task = buffer.attrs["task"]
    cfg.data.reference_returns = dict(buffer.attrs["reference_returns"])
    windows = TrajectoryDataset(buffer, cfg.planner.horizon, cfg.data.discount, cfg.planner.plan_stride)
    summary = train(cfg, windows, run, build=k.build_for_training)
    (run / OVERRIDES_FILE).write_text(json.dumps(requested))
    return run, summary.to_dict()


def refuse_other_settings(run: Path, requested: list[str], cfg) -> None:
    """A kept checkpoint is reused only for the overrides it was trained with: the ones recorded beside it, or (a run
    from before the record) the fields the requested overrides name, read from its config."""
    from deploy.kinds import read_config

    record = run / OVERRIDES_FILE
    if record.is_file():
        trained = json.loads(record.read_text())
        if sorted(trained) == sorted(requested):
            return
        detail = f"it was trained with {trained}, this run asks for {requested}"
    else:
        saved = read_config(run)
        differ = []
        for item in requested:
            path = item.partition("=")[0].split(".")
            want, have = cfg, saved
            for part in path:
                want, have = getattr(want, part), getattr(have, part)
            if want != have:
                differ.append(f"{'.'.join(path)}: trained {have!r}, asked {want!r}")
        if not differ:
            return
        detail = "; ".join(differ)
    raise SystemExit(f"{run} holds a checkpoint trained with other settings ({detail}): move it away to train "
                     "anew, or pass the overrides it was trained with")


def evaluate_row(run: Path, steps: int | None, episodes: int) -> dict:
    from evaluation.evaluate import EvalSettings, evaluate

    report = evaluate(EvalSettings(checkpoint=str(run), episodes=episodes, steps=steps))
    return {k: report[k] for k in KEYS if k in report}


def latency(run: Path, steps: int | None, decisions: int, data: Path) -> dict:
    """One thread, back to back, on the states of one episode: the mazes' expert's (fixed goal), the hopper data's
    first rows."""
    import numpy as np
    import torch

    from deploy.kinds import read_config
    from deploy.runtime import RuntimeSettings, build_policy
    from envs.datasets.offline import load_offline
    from envs.pointmaze import PointMazeTask

    torch.set_num_threads(1)
    task = read_config(run).data.task
    if task.startswith("pointmaze/"):
        env = PointMazeTask(task.partition("/")[2])
        expert = env.expert()
        obs, _ = env.reset(seed=100_000)
        states = []
        for _ in range(decisions + 3):
            states.append(obs["state"])
            obs, *_ = env.step(expert(obs["state"]))
    else:
        states = list(load_offline(data)["obs"][: decisions + 3])
    policy = build_policy(RuntimeSettings(str(run), steps=steps)).policy
    g = torch.Generator().manual_seed(0)
    times = []
    for s in states:
        t0 = time.perf_counter()
        policy.predict_chunk({"state": torch.from_numpy(s[None, None])}, generator=g)
        times.append((time.perf_counter() - t0) * 1e3)
    a = np.array(times[3:])
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean()),
            "decisions": len(a)}


def table(out: Path) -> str:
    rows = ["| task | planner | denoiser calls + draft passes per decision | actions per decision | success "
            "| normalised return | latency p50 ms, 1 thread |", "|---|---|---|---|---|---|---|"]
    for path in sorted(out.glob("*.json")):
        r = json.loads(path.read_text())
        for name, e in r["rows"].items():
            if "eval" not in e:
                continue
            ev = e["eval"]
            lat = e.get("latency", {})
            lo, hi = ev["success_ci95"]
            rows.append(f"| {r['task']} | {name} | {ev['nfe_per_decision']:.0f} + "
                        f"{ev.get('draft_steps_per_decision', 0):.0f} | {ev['actions_per_decision']} | "
                        f"{ev['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] | {ev['normalized_return']:.1f} | "
                        f"{lat.get('p50', float('nan')):.1f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="*", default=["pointmaze/umaze", "pointmaze/medium"])
    ap.add_argument("--rows", nargs="*", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS])
    ap.add_argument("--data-steps", type=int, default=1_000_000, help="maze streams and hopper-medium's samples")
    ap.add_argument("--override", nargs="*", default=[], help="config overrides for every kind, e.g. train.steps=2000")
    ap.add_argument("--dd-override", nargs="*", default=[], help="config overrides for decision_diffuser only")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--latency-decisions", type=int, default=50)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--redo", nargs="*", default=[], help="stages to run again: eval, latency")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(table(OUT))
        return
    for task in args.tasks:
        path = OUT / f"{task.partition('/')[2]}.json"
        result = json.loads(path.read_text()) if path.is_file() else {"task": task, "rows": {}}
        data = dataset(task, args.data_steps)
        result["data"] = {"path": str(data.relative_to(ROOT)), "steps": _steps(data)}
        for name, kind, steps in ROWS:
            if name not in args.rows:
                continue
            overrides = args.override + (args.dd_override if kind == "decision_diffuser" else [])
            run, trained = checkpoint(task, kind, data, overrides)
            entry = result["rows"].setdefault(name, {})
            entry["train"] = {k: trained[k] for k in ("steps", "seconds", "loss_first", "loss_last") if k in trained}
            if "eval" not in entry or "eval" in args.redo:
                entry["eval"] = evaluate_row(run, steps, args.episodes)
            if "latency" not in entry or "latency" in args.redo:
                entry["latency"] = latency(run, steps, args.latency_decisions, data)
            result.update(machine=f"{platform.machine()}, {platform.processor() or 'cpu'}",
                          date=datetime.date.today().isoformat())
            path.write_text(json.dumps(result, indent=2))
            print(f"{task} {name}: success {entry['eval']['success_rate']:.2f}, normalised return "
                  f"{entry['eval']['normalized_return']:.1f}, latency p50 {entry['latency']['p50']:.1f} ms", flush=True)
    print(table(OUT))


if __name__ == "__main__":
    main()
