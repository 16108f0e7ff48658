"""BAC block caching on the transformer policy: per metaworld task, expert demos -> the default transformer
policy -> BAC schedules (`rtdp cache`) -> closed-loop success, branch evaluations and decision latency for
uncached / Uniform / BAC at several budgets, on DDPM-100, DDIM-10 and an RTI tail.

    python benchmarks/bac.py [--tasks push-v3 ...] [--episodes 20] [--train-steps 3000]   # resumable
    python benchmarks/bac.py --table
    python benchmarks/bac.py --fidelity          # open-loop chunk error vs uncached, same noise

Results are JSON files in benchmarks/results/bac (checkpoints under runs/, gitignored).
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

from policy.rti import PAPER_TAIL  # noqa: E402  (the repository root is on the path from here)

TASKS = ["push-v3", "drawer-open-v3", "reach-v3", "pick-place-v3", "window-open-v3"]
CONFIG = ROOT / "configs" / "policy" / "transformer_lowdim.yaml"
# The config's 8 x 256 transformer trains at about 2-4 s per step at batch 256 on this 2-core CPU (16 tokens per
# sample): 3,000 steps would take hours per task. The benchmark trains a 4 x 128 one at batch 128 instead.
SIZE = ["policy.transformer.n_layer=4", "policy.transformer.n_emb=128", "train.batch_size=128", "train.lr=2e-4"]
# (label, sampler, steps, cache, rti)
RUNS = [
    ("ddpm-100", "ddpm", 100, None, None),
    ("ddpm-100 uniform:10", "ddpm", 100, "uniform:10", None),
    ("ddpm-100 bac:10", "ddpm", 100, "bac:10", None),
    ("ddpm-100 bac:5", "ddpm", 100, "bac:5", None),
    ("ddpm-100 uniform:5", "ddpm", 100, "uniform:5", None),
    ("ddpm-100 bac:20", "ddpm", 100, "bac:20", None),
    ("ddpm-100 uniform:20", "ddpm", 100, "uniform:20", None),
    ("ddim-10", "ddim", 10, None, None),
    ("ddim-10 bac:5", "ddim", 10, "bac:5", None),
    ("ddim-10 uniform:5", "ddim", 10, "uniform:5", None),
    ("rti-k0=3", None, None, None, PAPER_TAIL),
    ("rti-k0=3 bac:2", None, None, "bac:2", PAPER_TAIL),
]
KEYS = ("success_rate", "success_ci95", "nfe_per_decision", "block_evals_per_decision", "latency_ms", "decisions",
        "seconds", "rti")


def train_task(name: str, run_dir: Path, steps: int, seed: int) -> dict:
    from envs.collect import collect_demos
    from envs.datasets import PolicyDataset
    from policy.config import load_config
    from policy.train import train

    task = f"metaworld/{name}"
    buffer = collect_demos(task, 50, seed=seed)
    cfg = load_config(CONFIG, [f"train.steps={steps}", f"train.checkpoint_every={steps}", f"data.task={task}",
                               f"train.seed={seed}", "policy.discrete_action_dims=[3]", *SIZE])
    p = cfg.policy
    data = PolicyDataset(buffer, p.horizon, p.n_obs_steps, p.n_action_steps, cfg.data.state_keys, cfg.data.action_key)
    summary = train(cfg, data, run_dir)
    return {"train_steps": steps, "train_seconds": summary.seconds, "loss_last": summary.losses[-1][1]}


def make_schedules(run_dir: Path) -> dict:
    from evaluation.calibration import CacheSettings, calibrate_cache, result_dict

    out = {}
    for label, sampler, steps, budgets, rti in (("ddpm-100", "ddpm", 100, [5, 10, 20], None),
                                                 ("ddim-10", "ddim", 10, [5], None),
                                                 ("rti-k0=3", None, None, [2], PAPER_TAIL)):
        t0 = time.perf_counter()
        r = calibrate_cache(CacheSettings(checkpoint=str(run_dir), budgets=budgets, sampler=sampler, steps=steps,
                                          rti=rti))
        out[label] = {**result_dict(r), "seconds": time.perf_counter() - t0}
    return out


def run_task(name: str, out: Path, episodes: int, train_steps: int, seed: int) -> None:
    from evaluation.evaluate import EvalSettings, evaluate

    path = out / f"{name}.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    run_dir = out / "runs" / name
    if "train" not in done:
        done["train"] = train_task(name, run_dir, train_steps, seed)
        path.write_text(json.dumps(done, indent=2))
    if "schedules" not in done:
        done["schedules"] = make_schedules(run_dir)
        path.write_text(json.dumps(done, indent=2))
    evals = done.setdefault("eval", {})
    for label, sampler, steps, cache, rti in RUNS:
        if label in evals:
            continue
        print(f"{name}: {label}", flush=True)
        r = evaluate(EvalSettings(checkpoint=str(run_dir), episodes=episodes, seed=seed, sampler=sampler,
                                  steps=steps, cache=cache, rti=rti))
        evals[label] = {k: r[k] for k in KEYS if k in r} | {"cache": r["config"].get("cache")}
        evals[label].update(date=datetime.date.today().isoformat(), machine=platform.node())
        path.write_text(json.dumps(done, indent=2))
        print(f"  success {r['success_rate']:.2f}, {r['block_evals_per_decision']:.0f} branch evaluations, "
              f"p50 {r['latency_ms']['p50']:.0f} ms", flush=True)


def _histories(run_dir: Path, seeds: list[int]) -> dict:
    """Observation histories from episodes of the policy itself (DDIM-10, cheap), one per decision."""
    import numpy as np
    import torch

    from deploy.runtime import RuntimeSettings, build_policy
    from envs.rollout import run_episode
    from evaluation.episodes import TimedPolicy
    from evaluation.tasks import open_env, resolve_task

    runtime = build_policy(RuntimeSettings(checkpoint=str(run_dir), sampler="ddim", steps=10))
    run_cfg = runtime.run_cfg
    env = open_env(str(run_dir), run_cfg, resolve_task(str(run_dir), run_cfg), max_episode_steps=150)
    act = TimedPolicy(runtime.policy)
    histories = []

    def record(history):
        histories.append(history["state"].copy())
        return act(history)

    for seed in seeds:
        act.reset(seed)
        run_episode(env, record, run_cfg.policy.n_obs_steps, seed)
    env.close()
    return {"state": torch.from_numpy(np.stack(histories))}


def fidelity(name: str, out: Path) -> dict:
    """Open-loop error of the final DDPM-100 chunk against the uncached one (same noise, same DDPM noise), for
    BAC with and without the bubbling union (and with n = 5), with the L1 metric, and for the two Uniform schedules
    whose evaluation counts bracket BAC's."""
    import torch

    from policy.cache import CachedDenoiser, calibrate, make_schedule
    from policy.checkpoint import load_policy

    run_dir = out / "runs" / name
    policy, _ = load_policy(run_dir)
    blocks = list(policy.denoiser.residual_branches())
    ts = list(range(99, -1, -1))
    with torch.no_grad():
        cal_cond = policy.condition(_histories(run_dir, [200_000, 200_001]))
        test_cond = policy.condition(_histories(run_dir, [200_100, 200_101, 200_102]))
    cal = calibrate(policy, cal_cond, torch.randn(policy.chunk_shape(cal_cond.shape[0]),
                                                  generator=torch.Generator().manual_seed(0)), ts, "ddpm",
                    torch.Generator().manual_seed(0))
    noise = torch.randn(policy.chunk_shape(test_cond.shape[0]), generator=torch.Generator().manual_seed(1))
    ref = policy.sample_normalized(test_cond, noise, ts, "ddpm", torch.Generator().manual_seed(2)).x0

    def error(schedule) -> dict:
        cached = CachedDenoiser(policy, schedule)
        x = policy.sample_normalized(test_cond, noise, ts, "ddpm", torch.Generator().manual_seed(2), cached).x0
        return {"rel_error": float((x - ref).norm() / ref.norm()), "block_evals": cached.block_evals}

    rows = {"observations": {"calibration": int(cal_cond.shape[0]), "test": int(test_cond.shape[0])},
            "uncached_block_evals": len(blocks) * len(ts)}
    for S in (5, 10, 20):
        bac = make_schedule("bac", S, "ddpm", ts, blocks, "", cal)
        # Uniform schedules bracketing BAC's evaluation count: the largest at or below it, the smallest at or above
        uniform_evals = {b: make_schedule("uniform", b, "ddpm", ts, blocks, "").block_evals for b in range(1, 101)}
        below = max(b for b, n in uniform_evals.items() if n <= bac.block_evals)
        above = min(b for b, n in uniform_evals.items() if n >= bac.block_evals)
        rows[f"S={S}"] = {
            "bac": error(bac), "bac_without_bubbling": error(make_schedule("bac", S, "ddpm", ts, blocks, "", cal,
                                                                          bubble_n=0)),
            "bac_l1": error(make_schedule("bac", S, "ddpm", ts, blocks, "", cal, metric="l1")),
            # the paper's simulation setting; 3 (the default) is its real-robot one
            "bac_bubble5": error(make_schedule("bac", S, "ddpm", ts, blocks, "", cal, bubble_n=5)),
            "uniform_below": {"budget": below, **error(make_schedule("uniform", below, "ddpm", ts, blocks, ""))},
            "uniform_above": {"budget": above, **error(make_schedule("uniform", above, "ddpm", ts, blocks, ""))},
            "selected": bac.selected}
        print(name, S, json.dumps(rows[f"S={S}"]), flush=True)
    return rows


def table(out: Path) -> str:
    rows = ["| task | run | success [95% CI] | branch evals / decision | decision p50 / p99 ms |",
            "|---|---|---|---|---|"]
    for name in TASKS:
        path = out / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        for label, e in r.get("eval", {}).items():
            lo, hi = e["success_ci95"]
            lat = e["latency_ms"]
            if e.get("rti"):
                lat = e["rti"]["latency_warm_ms"]
                label += " (warm decisions)"
            rows.append(f"| {name} | {label} | {e['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] | "
                        f"{e['block_evals_per_decision']:.0f} | {lat['p50']:.0f} / {lat['p99']:.0f} |")
    return "\n".join(rows)


def fidelity_table(out: Path) -> str:
    rows = ["| task | S | BAC (cosine, union n=3) | BAC without union | BAC, union n=5 | BAC, L1 metric | "
            "Uniform at or below | Uniform at or above |", "|---|---|---|---|---|---|---|---|"]

    def cell(e: dict) -> str:
        return f"{e['rel_error']:.3f} ({e['block_evals']})"

    for name in TASKS:
        path = out / f"{name}.json"
        f = json.loads(path.read_text()).get("fidelity") if path.is_file() else None
        if not f or "uniform_below" not in f.get("S=10", {}):
            continue
        for S in (5, 10, 20):
            r = f[f"S={S}"]
            rows.append(f"| {name} | {S} | {cell(r['bac'])} | {cell(r['bac_without_bubbling'])} | "
                        f"{cell(r['bac_bubble5'])} | {cell(r['bac_l1'])} | uniform:{r['uniform_below']['budget']} "
                        f"{cell(r['uniform_below'])} | uniform:{r['uniform_above']['budget']} "
                        f"{cell(r['uniform_above'])} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bac")
    ap.add_argument("--tasks", nargs="*", default=TASKS)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="only print the table from existing results")
    ap.add_argument("--fidelity", action="store_true", help="only the open-loop chunk error of the schedules")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fidelity:
        for name in args.tasks:
            if (args.out / "runs" / name / "model.safetensors").is_file():
                path = args.out / f"{name}.json"
                done = json.loads(path.read_text())
                done["fidelity"] = fidelity(name, args.out)
                path.write_text(json.dumps(done, indent=2))
        return
    if not args.table:
        for name in args.tasks:
            run_task(name, args.out, args.episodes, args.train_steps, args.seed)
    print(table(args.out))
    print()
    print(fidelity_table(args.out))


if __name__ == "__main__":
    main()
