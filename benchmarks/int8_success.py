"""Closed-loop success of int8 graphs against fp32 ones (issue 21): each checkpoint exported at fp32 and at int8
(calibrated on the data it was trained on, `--check` on held-out windows), evaluated in onnxruntime with DDIM-10 on
the same held-out episodes.

    python benchmarks/int8_success.py --checkpoint push-v3=/path/to/ckpt [--checkpoint ...] [--episodes 50]
    python benchmarks/int8_success.py --table

Results: benchmarks/results/fast_path/int8_success.json (resumable: a finished row is not rerun).
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


def run(checkpoints: dict[str, str], episodes: int, path: Path) -> None:
    from deploy.export import ExportSettings, export_policy
    from evaluation.evaluate import EvalSettings, evaluate
    from evaluation.quantisation_data import check_int8, export_int8

    done = json.loads(path.read_text()) if path.is_file() else {}
    for task, ckpt in checkpoints.items():
        row = done.setdefault(task, {"checkpoint": ckpt})
        if "int8_check" not in row:
            export_policy(ExportSettings(checkpoint=ckpt, fused=False))
            export_int8(ExportSettings(checkpoint=ckpt, precision="int8", fused=False))
            row["int8_check"] = check_int8(ckpt)
            path.write_text(json.dumps(done, indent=1))
        for precision in ("fp32", "int8"):
            if precision in row:
                continue
            print(f"{task}: onnxruntime {precision}", flush=True)
            r = evaluate(EvalSettings(checkpoint=ckpt, episodes=episodes, sampler="ddim", steps=10,
                                      backend="onnxruntime", precision=precision), progress=False)
            row[precision] = {"success_rate": r["success_rate"], "success_ci95": r["success_ci95"],
                              "latency_ms": r["latency_ms"], "episodes": r["episodes"],
                              "date": datetime.date.today().isoformat(), "machine": platform.node()}
            path.write_text(json.dumps(done, indent=1))
            print(f"  success {r['success_rate']:.2f}, decision p50 {r['latency_ms']['p50']:.1f} ms", flush=True)


def table(path: Path) -> str:
    done = json.loads(path.read_text())
    rows = ["| task | fp32: success [95% CI] | int8: success [95% CI] | int8 inside fp32's interval | decision p50 ms "
            "fp32 / int8 | int8 chunk error, mean / max abs |", "|---|---|---|---|---|---|"]
    for task, row in done.items():
        if "fp32" not in row or "int8" not in row:
            continue
        a, b = row["fp32"], row["int8"]
        inside = a["success_ci95"][0] - 1e-9 <= b["success_rate"] <= a["success_ci95"][1] + 1e-9  # float bounds
        check = row["int8_check"]
        rows.append(f"| {task} | {a['success_rate']:.2f} [{a['success_ci95'][0]:.2f}, {a['success_ci95'][1]:.2f}] | "
                    f"{b['success_rate']:.2f} [{b['success_ci95'][0]:.2f}, {b['success_ci95'][1]:.2f}] | "
                    f"{'yes' if inside else 'no'} | {a['latency_ms']['p50']:.1f} / {b['latency_ms']['p50']:.1f} | "
                    f"{check['sampled_chunk_mean']:.3f} / {check['sampled_chunk_max']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", action="append", default=[], metavar="TASK=PATH")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fast_path" / "int8_success.json")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if not args.table:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        run(dict(c.split("=", 1) for c in args.checkpoint), args.episodes, args.out)
    print(table(args.out))


if __name__ == "__main__":
    main()
