"""Backends on this CPU, one run per table (issue 6):

1. denoiser call and full decision (DDIM-10, batch 1, one thread) for the 4.7M and Chi-size (66M) U-Nets and the
   8 x 256 transformer: torch eager vs torch.compile vs onnxruntime;
2. the RTI decision (k0 = 3: 4 calls) as the step-by-step loop vs one fused-graph call: latency and p99/p50.

    python benchmarks/deploy_latency.py [--iters 200] [--out benchmarks/results/deploy]

Weights are random (latency does not depend on them); the graphs come from `rtdp export`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_latency import MODELS, build  # noqa: E402


def table(path: Path) -> str:
    r = json.loads(path.read_text())
    rows = ["| model | run | backend | engine calls | call p50 ms | decision p50 ms | decision p99 ms | p99/p50 "
            "| vs torch eager |", "|---|---|---|---|---|---|---|---|---|"]
    for label, row in r["models"].items():
        for run in ("ddim-10", "rti-k0=3"):
            eager = next(b for b in row[run] if b["backend"] == "torch")["latency_ms"]["p50"]
            for b in row[run]:
                lat = b["latency_ms"]
                rows.append(f"| {label} | {run} | {b['backend']} | {b['engine_calls_per_decision']} | "
                            f"{b['forward_ms']['p50']:.2f} | {lat['p50']:.2f} | {lat['p99']:.2f} | "
                            f"{b['p99_over_p50']:.2f} | {eager / lat['p50']:.2f}x |")
    worst = max(max(v for v in row["parity_max_abs_error"].values()) for row in r["models"].values())
    return "\n".join(rows) + f"\n\nParity of every graph with torch (max abs error, all models): {worst:.1e}."


def main() -> None:
    from deploy.export import ExportSettings, check_export, export_policy
    from deploy.profile import ProfileSettings, profile

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--backends", nargs="*", default=["torch", "torch-compile", "onnxruntime"])
    ap.add_argument("--table", action="store_true", help="only print the table from the last run")
    args = ap.parse_args()
    if args.table:
        print(table(args.out / "deploy_latency.json"))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "ckpt"
    results = {"date": datetime.date.today().isoformat(), "machine": platform.node(),
               "cpu": platform.processor() or platform.machine(), "threads": 1, "models": {}}
    for label, (config, overrides) in MODELS.items():
        ckpt = build(work / label.split()[0] / label.split()[1], config, overrides)
        export_policy(ExportSettings(checkpoint=str(ckpt), sampler="ddpm", rti_k0=3))
        parity = check_export(ckpt, ckpt / "onnx")
        row = {"parity_max_abs_error": parity}
        for run, kw in (("ddim-10", dict(sampler="ddim", steps=10)), ("rti-k0=3", dict(sampler="ddpm", rti_k0=3))):
            backends = args.backends if run == "ddim-10" else ["torch", "onnxruntime"]
            r = profile(ProfileSettings(checkpoint=str(ckpt), backends=backends, iters=args.iters, warmup=20,
                                        threads=1, **kw), progress=False)
            row[run] = r["backends"]
            for b in r["backends"]:
                print(f"{label:<26}{run:<10}{b['backend']:<20}decision p50 {b['latency_ms']['p50']:8.2f} p99 "
                      f"{b['latency_ms']['p99']:8.2f} ms (p99/p50 {b['p99_over_p50']:.2f})  call p50 "
                      f"{b['forward_ms']['p50']:.3f} ms", flush=True)
        results["models"][label] = row
    (args.out / "deploy_latency.json").write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
