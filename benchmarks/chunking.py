"""Real-time chunking under injected inference delay: `rtdp control` (inference in its own process, 50 Hz) for each
way a new chunk joins the one being executed (naive splice, ACT's temporal ensembling, replacement inpainting,
RTC guidance) and each added delay, success per setting, one plot.

    python benchmarks/chunking.py --checkpoint /work/node_bench/push [--episodes 20] [--delays 0,2,4]
        [--methods naive,ensemble,inpaint,guidance]

Delays are in control periods (20 ms at 50 Hz) added to every decision on top of its own inference time. Reports
go to benchmarks/results/chunking/<task>_<method>_<delay>.json; a run whose report is there is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "chunking"
RATE = 50.0


def report_path(task: str, method: str, delay: int) -> Path:
    return OUT / f"{task.split('/')[-1]}_{method}_{delay}.json"


def run(checkpoint: str, task: str, method: str, delay: int, episodes: int) -> dict:
    path = report_path(task, method, delay)
    if not path.exists():
        extra = ["--anytime", "--chunking", "naive"] if method == "anytime" else ["--chunking", method]
        env = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "rtdp", "control", "--checkpoint", checkpoint,
                        "--rate", str(RATE), "--episodes", str(episodes), "--inference-delay-ms",
                        str(delay * 1000 / RATE), "--report", str(path), "--no-progress", *extra],
                       cwd=ROOT, env=env, check=True)
    return json.loads(path.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--task", default="metaworld/push-v3", help="the checkpoint's task (names the reports)")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--delays", default="0,2,4", help="added delay in control periods")
    ap.add_argument("--methods", default="naive,ensemble,inpaint,guidance")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    delays, methods = [int(d) for d in args.delays.split(",")], args.methods.split(",")
    results = {m: {d: run(args.checkpoint, args.task, m, d, args.episodes) for d in delays} for m in methods}

    rows = ["| chunking | " + " | ".join(f"+{d} periods" for d in delays) + " |", "|---|" + "---|" * len(delays)]
    for m in methods:
        cells = []
        for d in delays:
            r = results[m][d]
            lo, hi = r["success_ci95"]
            cells.append(f"{r['success_rate']:.2f} [{lo:.2f}, {hi:.2f}], inf. p50 {r['inference_ms']['p50']:.0f} ms")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    print(table)
    (OUT / "summary.json").write_text(json.dumps({"task": args.task, "episodes": args.episodes, "rate_hz": RATE,
                                                  "table": table}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in methods:
        rates = [results[m][d]["success_rate"] for d in delays]
        lo = [results[m][d]["success_rate"] - results[m][d]["success_ci95"][0] for d in delays]
        hi = [results[m][d]["success_ci95"][1] - results[m][d]["success_rate"] for d in delays]
        ax.errorbar(delays, rates, yerr=[lo, hi], marker="o", capsize=3, label=m)
    ax.set_xlabel("injected delay (control periods of 20 ms), on top of inference")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{args.task} @ 50 Hz, {args.episodes} episodes per point")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / f"{args.task.split('/')[-1]}_success_vs_delay.png", dpi=110)
    plt.close(fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
