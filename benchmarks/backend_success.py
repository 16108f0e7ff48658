"""Closed-loop success per backend and precision (issue 6): the closed-loop benchmark's U-Net checkpoints, exported
(fp32 and fp16, each checked for parity), evaluated with DDIM-10 on the same 50 held-out episodes as torch.

    python benchmarks/backend_success.py [--tasks push-v3 ...] [--episodes 50]    # resumable
    python benchmarks/backend_success.py --table

Results: benchmarks/results/deploy/backend_success.json.
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

TASKS = ["reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3", "window-open-v3"]
RUNS = [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")]
RUNS_DIR = ROOT / "benchmarks" / "results" / "closed_loop" / "runs"


def run(tasks: list[str], episodes: int, path: Path) -> None:
    from deploy.export import ExportSettings, check_export, export_dir, export_policy
    from evaluation.evaluate import EvalSettings, evaluate

    done = json.loads(path.read_text()) if path.is_file() else {}
    for task in tasks:
        ckpt = RUNS_DIR / task
        row = done.setdefault(task, {})
        for precision in ("fp32", "fp16"):
            if f"parity_{precision}" not in row:
                export_policy(ExportSettings(checkpoint=str(ckpt), precision=precision, fused=False))
                row[f"parity_{precision}"] = check_export(ckpt, export_dir(ckpt, precision))
                path.write_text(json.dumps(done, indent=1))
        for backend, precision in RUNS:
            label = f"{backend} {precision}"
            if label in row:
                continue
            print(f"{task}: {label}", flush=True)
            r = evaluate(EvalSettings(checkpoint=str(ckpt), episodes=episodes, sampler="ddim", steps=10,
                                      backend=backend, precision=precision), progress=False)
            row[label] = {"success_rate": r["success_rate"], "success_ci95": r["success_ci95"],
                          "latency_ms": r["latency_ms"], "episodes": r["episodes"],
                          "successes": [e["success"] for e in r["per_episode"]] if "per_episode" in r else None,
                          "date": datetime.date.today().isoformat(), "machine": platform.node()}
            path.write_text(json.dumps(done, indent=1))
            print(f"  success {r['success_rate']:.2f}", flush=True)


def table(path: Path) -> str:
    done = json.loads(path.read_text())
    rows = ["| task | " + " | ".join(f"{b} {p}: success [95% CI]" for b, p in RUNS) + " | fp16 parity (max abs) |",
            "|---|" + "---|" * (len(RUNS) + 1)]
    for task in TASKS:
        row = done.get(task)
        if not row:
            continue
        cells = []
        for b, p in RUNS:
            e = row.get(f"{b} {p}")
            cells.append(f"{e['success_rate']:.2f} [{e['success_ci95'][0]:.2f}, {e['success_ci95'][1]:.2f}]" if e
                         else "-")
        parity = max(row.get("parity_fp16", {"-": 0}).values())
        rows.append(f"| {task} | " + " | ".join(cells) + f" | {parity:.1e} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="*", default=TASKS)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy" / "backend_success.json")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if not args.table:
        run(args.tasks, args.episodes, args.out)
    print(table(args.out))


if __name__ == "__main__":
    main()
