"""The error-aware block-cache schedule (policy/cache_error.py) against BAC's ACS and Uniform at equal branch
evaluations, on the BAC benchmark's transformer (4 x 128, 50 expert demos, 3,000 steps; trained here if missing):

1. open loop: the relative L2 error of the final DDPM-100 chunk against the uncached one, same initial and DDPM
   noise, on observations from the policy's own rollouts (calibration and test episodes apart), at S = 5, 10, 20.
   The error-aware schedule is made twice: with Uniform:S's evaluations, and with BAC:S's (ACS plus the union);
2. closed loop: success on held-out seeds of Uniform:10, BAC:10 and error:10 (Uniform's evaluations).

    python benchmarks/cache_error.py [--tasks push-v3] [--episodes 20]      # resumable
    python benchmarks/cache_error.py --table

JSON: benchmarks/results/cache_error/<task>.json (checkpoints under runs/, gitignored).
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

from benchmarks.bac import _histories, train_task  # noqa: E402

BUDGETS = (5, 10, 20)


def fidelity(run_dir: Path) -> dict:
    import torch

    from policy.cache import CachedDenoiser, calibrate, make_schedule
    from policy.checkpoint import load_policy

    policy, _ = load_policy(run_dir)
    blocks = list(policy.denoiser.residual_branches())
    ts = list(range(99, -1, -1))
    with torch.no_grad():
        cal_cond = policy.condition(_histories(run_dir, [200_000, 200_001]))
        test_cond = policy.condition(_histories(run_dir, [200_100, 200_101, 200_102]))
    t0 = time.perf_counter()
    cal = calibrate(policy, cal_cond, torch.randn(policy.chunk_shape(cal_cond.shape[0]),
                                                  generator=torch.Generator().manual_seed(0)), ts, "ddpm",
                    torch.Generator().manual_seed(0), costs=True)
    calibration_s = time.perf_counter() - t0
    noise = torch.randn(policy.chunk_shape(test_cond.shape[0]), generator=torch.Generator().manual_seed(1))
    ref = policy.sample_normalized(test_cond, noise, ts, "ddpm", torch.Generator().manual_seed(2)).x0

    def error(schedule) -> dict:
        cached = CachedDenoiser(policy, schedule)
        x = policy.sample_normalized(test_cond, noise, ts, "ddpm", torch.Generator().manual_seed(2), cached).x0
        return {"rel_error": float((x - ref).norm() / ref.norm()), "block_evals": cached.block_evals}

    rows = {"observations": {"calibration": int(cal_cond.shape[0]), "test": int(test_cond.shape[0])},
            "calibration_seconds": calibration_s, "uncached_block_evals": len(blocks) * len(ts)}
    for S in BUDGETS:
        uniform = make_schedule("uniform", S, "ddpm", ts, blocks, "")
        acs = make_schedule("bac", S, "ddpm", ts, blocks, "", cal, bubble_n=0)
        bac = make_schedule("bac", S, "ddpm", ts, blocks, "", cal)
        rows[f"S={S}"] = {
            "uniform": error(uniform), "acs": error(acs), "bac": error(bac),
            "error_at_uniform": error(make_schedule("error", S, "ddpm", ts, blocks, "", cal)),
            "error_at_bac": error(make_schedule("error", S, "ddpm", ts, blocks, "", cal,
                                                evaluations=bac.block_evals)),
        }
        print(run_dir.name, S, json.dumps(rows[f"S={S}"]), flush=True)
    return rows


def closed_loop(run_dir: Path, episodes: int) -> dict:
    from evaluation.calibration import CacheSettings, calibrate_cache
    from evaluation.evaluate import EvalSettings, evaluate

    for kind in ("bac", "error"):
        calibrate_cache(CacheSettings(checkpoint=str(run_dir), budgets=[10], sampler="ddpm", steps=100, kind=kind),
                        progress=False)
    out = {}
    for cache in ("uniform:10", "bac:10", "error:10"):
        r = evaluate(EvalSettings(checkpoint=str(run_dir), episodes=episodes, sampler="ddpm", steps=100, cache=cache,
                                  workers=2), progress=False)
        out[cache] = {k: r[k] for k in ("success_rate", "success_ci95", "block_evals_per_decision", "latency_ms")}
        print(run_dir.name, cache, json.dumps(out[cache]), flush=True)
    return out


def table(out: Path) -> str:
    rows = ["| task | S | Uniform:S | ACS (BAC without union) | error-aware at Uniform's evals | BAC (ACS + union) | "
            "error-aware at BAC's evals |", "|---|---|---|---|---|---|---|"]
    loops = ["| task | schedule | success [95% CI] | branch evals / decision | decision p50 ms |",
             "|---|---|---|---|---|"]
    for path in sorted(out.glob("*.json")):
        r = json.loads(path.read_text())
        task = path.stem
        for S in BUDGETS:
            f = r.get("fidelity", {}).get(f"S={S}")
            if f:
                cells = [f"{f[k]['rel_error']:.3f} ({f[k]['block_evals']})"
                         for k in ("uniform", "acs", "error_at_uniform", "bac", "error_at_bac")]
                rows.append(f"| {task} | {S} | " + " | ".join(cells) + " |")
        for cache, e in r.get("closed_loop", {}).items():
            lo, hi = e["success_ci95"]
            loops.append(f"| {task} | ddpm-100 {cache} | {e['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] | "
                         f"{e['block_evals_per_decision']:.0f} | {e['latency_ms']['p50']:.0f} |")
    return "\n".join(rows) + "\n\n" + "\n".join(loops)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cache_error")
    ap.add_argument("--tasks", nargs="*", default=["push-v3"])
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if not args.table:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in args.tasks:
            path = args.out / f"{name}.json"
            done = json.loads(path.read_text()) if path.is_file() else {}
            run_dir = args.out / "runs" / name
            if not (run_dir / "model.safetensors").is_file():
                done["train"] = train_task(name, run_dir, args.train_steps, 0)
            done.update(date=datetime.date.today().isoformat(), machine=platform.node())
            if "fidelity" not in done:
                done["fidelity"] = fidelity(run_dir)
                path.write_text(json.dumps(done, indent=2))
            if "closed_loop" not in done:
                done["closed_loop"] = closed_loop(run_dir, args.episodes)
                path.write_text(json.dumps(done, indent=2))
    print(table(args.out))


if __name__ == "__main__":
    main()
