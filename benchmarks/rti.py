"""RTI warm-starting on the closed-loop benchmark's checkpoints: RTI (one action per decision, k0 = 3 and k0
calibrated by `--rti auto`) against DDPM-100 (from the closed-loop table, 8 actions per decision) and against
DDIM and DPM-Solver++ at RTI's call count without a warm start, on the same 50 held-out episodes.

    python benchmarks/rti.py [--tasks reach-v3 ...] [--methods rti-k0=3 ...]   # resumable
    python benchmarks/rti.py --table
    python benchmarks/rti.py --latency     # decision latency alone, one thread, back to back: DDPM-100 vs RTI

Needs benchmarks/results/closed_loop/runs/<task> (python benchmarks/closed_loop.py makes them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policy.rti import PAPER_TAIL  # noqa: E402  (the repository root is on the path from here)

TASKS = ["reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3", "window-open-v3"]
BASELINE = ROOT / "benchmarks" / "results" / "closed_loop"
CALIBRATION_SEED = 200_000
METHODS = {
    "rti-k0=3": dict(rti=PAPER_TAIL),
    "ddim-4": dict(sampler="ddim", steps=4),
    "dpmpp_2m-4": dict(sampler="dpmpp_2m", steps=4),
    "rti-auto": dict(rti={**PAPER_TAIL, "k0": "auto"}),
    # not run by default: where k0 = 3 falls short, how success grows with the entry step
    "rti-k0=6": dict(rti={**PAPER_TAIL, "k0": 6}),
    "rti-k0=10": dict(rti={**PAPER_TAIL, "k0": 10}),
}
DEFAULT_METHODS = ["rti-k0=3", "ddim-4", "dpmpp_2m-4", "rti-auto"]
KEYS = ("success_rate", "success_ci95", "mean_return", "nfe_per_decision", "actions_per_decision", "latency_ms",
        "decisions", "seconds", "rti")


def run(name: str, method: str, episodes: int, seed: int) -> dict:
    from evaluation.evaluate import EvalSettings, evaluate

    settings = EvalSettings(checkpoint=str(BASELINE / "runs" / name), episodes=episodes, seed=seed,
                            **METHODS[method])
    report = evaluate(settings)
    out = {k: report[k] for k in KEYS if k in report}
    if "rti" in report["config"]:
        out["config_rti"] = report["config"]["rti"]
    out.update(date=datetime.date.today().isoformat(), machine=platform.node())
    return out


def expert_observations(task: str, decisions: int, seed: int = CALIBRATION_SEED) -> list[dict]:
    """Observation histories (To = 2) along an expert rollout: the same inputs for every method that is timed."""
    import numpy as np
    import torch

    from envs.tasks import make_env

    env = make_env(task)
    expert = env.expert()
    obs, _ = env.reset(seed=seed)
    states = [obs["state"]]
    for _ in range(decisions):
        obs, *_ = env.step(np.clip(expert(obs["state"]), -1, 1))
        states.append(obs["state"])
    env.close()
    return [{"state": torch.from_numpy(np.stack(states[i : i + 2]))[None]} for i in range(decisions)]


def latency(name: str, decisions: int = 200, full: int = 30) -> dict:
    """Decision latency on one thread, DDPM-100 and the RTI warm decision timed back to back on the same
    observations (from an expert rollout), so the ratio does not depend on what else the machine runs."""
    import time

    import numpy as np
    import torch

    from policy.checkpoint import load_policy
    from policy.rti import RTIConfig, RTIPolicy

    torch.set_num_threads(1)
    policy, cfg = load_policy(BASELINE / "runs" / name)
    history = expert_observations(f"metaworld/{name}", decisions)
    g = torch.Generator().manual_seed(0)

    def timed(fn, items):
        out = []
        for o in items:
            t0 = time.perf_counter()
            fn(o)
            out.append((time.perf_counter() - t0) * 1e3)
        return np.array(out)

    rti = RTIPolicy(policy, RTIConfig(**PAPER_TAIL))
    rti.reset()
    rti.predict_chunk(history[0], generator=g)
    policy.configure_inference("ddpm", 100)
    ddpm = timed(lambda o: policy.predict_chunk(o, generator=g), history[:full])
    warm = timed(lambda o: rti.predict_chunk(o, generator=g), history[1:])
    policy.configure_inference("ddim", 4)
    ddim4 = timed(lambda o: policy.predict_chunk(o, generator=g), history[1:])

    def pct(a):
        return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}

    return {"ddpm-100": pct(ddpm), "rti-k0=3": pct(warm), "ddim-4": pct(ddim4), "threads": 1,
            "ratio_p50": float(np.percentile(ddpm, 50) / np.percentile(warm, 50)),
            "date": datetime.date.today().isoformat(), "machine": platform.node(), "cpu": platform.processor()}


def table(out: Path) -> str:
    head = ["| task | DDPM-100 (8 actions/decision) | RTI k0=3 (1 action/decision) | RTI auto | DDIM-4 "
            "(8 actions/decision) | DPM-Solver++-4 (8 actions/decision) | decision p50 alone, 1 thread: DDPM-100 / "
            "RTI k0=3 |", "|---|---|---|---|---|---|---|"]
    rows = []
    latency_path = out / "latency.json"  # `--latency`: measured alone, back to back, not inside the episodes
    latency = json.loads(latency_path.read_text()) if latency_path.is_file() else {}
    for name in TASKS:
        path = out / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        base = json.loads((BASELINE / f"{name}.json").read_text())["eval"]["ddpm-100"]

        def cell(e, calls=None):
            if e is None:
                return "-"
            lo, hi = e["success_ci95"]
            calls = calls if calls is not None else e["nfe_per_decision"]
            return f"{e['success_rate']:.2f} [{lo:.2f}, {hi:.2f}], {calls:.0f} calls, {e['latency_ms']['p50']:.1f} ms"

        def rti_cell(e):
            if e is None:
                return "-"
            k0 = e["config_rti"]["k0"]
            warm = e["rti"]
            lo, hi = e["success_ci95"]
            return (f"{e['success_rate']:.2f} [{lo:.2f}, {hi:.2f}], k0={k0}: {warm['nfe_per_warm_decision']:.0f} "
                    f"calls, {warm['latency_warm_ms']['p50']:.1f} ms")

        lat = latency.get(name)
        speed = (f"{lat['ddpm-100']['p50']:.0f} / {lat['rti-k0=3']['p50']:.1f} ms ({lat['ratio_p50']:.0f}x)"
                 if lat else "-")
        rows.append(f"| {name} | {cell(base)} | {rti_cell(r.get('rti-k0=3'))} | {rti_cell(r.get('rti-auto'))} "
                    f"| {cell(r.get('ddim-4'))} | {cell(r.get('dpmpp_2m-4'))} | {speed} |")
    return "\n".join(head + rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rti")
    ap.add_argument("--tasks", nargs="*", default=TASKS)
    ap.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=list(METHODS))
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="only print the table from existing results")
    ap.add_argument("--latency", action="store_true", help="only the back-to-back decision latency measurement")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.latency:
        result = {name: latency(name) for name in args.tasks}
        (args.out / "latency.json").write_text(json.dumps(result, indent=2))
        for name, r in result.items():
            print(f"{name}: DDPM-100 p50 {r['ddpm-100']['p50']:.1f} ms, RTI k0=3 p50 {r['rti-k0=3']['p50']:.2f} ms "
                  f"({r['ratio_p50']:.0f}x), DDIM-4 p50 {r['ddim-4']['p50']:.2f} ms")
        return
    if not args.table:
        for method in args.methods:  # method-major: the headline rows fill first
            for name in args.tasks:
                path = args.out / f"{name}.json"
                done = json.loads(path.read_text()) if path.is_file() else {}
                if method in done:
                    continue
                print(f"{name}: {method}", flush=True)
                done[method] = run(name, method, args.episodes, args.seed)
                path.write_text(json.dumps(done, indent=2))
                print(f"  success {done[method]['success_rate']:.2f}", flush=True)
    print(table(args.out))


if __name__ == "__main__":
    main()
