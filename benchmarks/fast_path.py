"""The CPU fast path (issue 21): fp32 / fp16 / int8 onnxruntime graphs of the small (4.7M) and Chi-size (66M)
U-Nets, RTI k0=3 warm decisions at 1 and 2 threads, each call against the memory-bandwidth floor of its weights,
peak resident memory, and onnxruntime's session settings swept to choose their defaults.

    python benchmarks/fast_path.py [--data DATA.zarr] [--iters 200] [--out benchmarks/results/fast_path]
    python benchmarks/fast_path.py --table

Weights are random (latency does not depend on them); int8 is calibrated on a metaworld push-v3 dataset whose
state and action sizes the models are built for (`--data`, else 10 expert demos collected into the output folder).
Nothing else may run meanwhile: two jobs on two cores ruin every timing.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_latency import MODELS, build  # noqa: E402

SIZES = {"unet 4.7M": MODELS["unet 4.7M (unet_lowdim)"], "unet 66M (Chi size)": MODELS["unet 66M (Chi size)"]}
PRECISIONS = ("fp32", "fp16", "int8")
DIFFUSION_POLICY_DDIM10_MS = 490.0  # diffusion_policy's predict_action, DDIM-10, Chi-size U-Net, this CPU (issue 21)


def bandwidth_gbs(threads: int, mb: int = 265, repeats: int = 15) -> float:
    """Read bandwidth of one pass over an array the size of the Chi-size weights (best of `repeats`)."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    a = torch.from_numpy(np.ones(mb * 2**20 // 4, dtype=np.float32))
    a.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.numel() * 4 / best / 1e9


def weight_bytes(graph: Path) -> int:
    """Bytes of the initializers a call reads (the quantised weights as stored, int8 or not)."""
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(i).nbytes for i in onnx.load(str(graph)).graph.initializer)


def dataset(out: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    path = out / "push.zarr"
    if not path.exists():
        from envs.collect import collect_demos

        collect_demos("metaworld/push-v3", 10, seed=0, progress=False).save(path)
    return path


def checkpoints(out: Path, data: Path) -> dict[str, Path]:
    from deploy.export import ExportSettings, export_policy
    from evaluation.quantisation_data import export_int8

    made = {}
    for label, (config, overrides) in SIZES.items():
        ckpt = out / "ckpt" / label.split()[1]
        if not (ckpt / "onnx-int8" / "manifest.json").is_file():
            build(ckpt, config, overrides)
            (ckpt / "train_report.json").write_text(json.dumps({"data": str(data)}))
            for precision in PRECISIONS:
                settings = ExportSettings(checkpoint=str(ckpt), precision=precision, sampler="ddpm", rti_k0=3)
                export_int8(settings) if precision == "int8" else export_policy(settings)
        made[label] = ckpt
    return made


def latency(ckpts: dict[str, Path], iters: int) -> list[dict]:
    from deploy.artifacts import export_dir
    from deploy.profile import ProfileSettings, profile

    rows = []
    for (label, ckpt), threads in itertools.product(ckpts.items(), (1, 2)):
        for precision in ("torch", *PRECISIONS):
            backend = "torch" if precision == "torch" else "onnxruntime"
            r = profile(ProfileSettings(checkpoint=str(ckpt), backends=[backend], iters=iters, warmup=20,
                                        sampler="ddpm", rti_k0=3, threads=threads,
                                        precision="fp32" if precision == "torch" else precision), progress=False)
            graph = export_dir(ckpt, "fp32" if precision == "torch" else precision) / "denoiser.onnx"
            for b in r["backends"]:
                rows.append({"model": label, "threads": threads, "precision": b["precision"], "backend": b["backend"],
                             "decision_ms": b["latency_ms"], "call_ms": b["forward_ms"], "memory": b["memory"],
                             "weight_bytes": weight_bytes(graph)})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "memory"}), flush=True)
    return rows


def session_settings(ckpts: dict[str, Path], iters: int) -> list[dict]:
    from deploy.profile import ProfileSettings, profile

    rows = []
    ckpt = ckpts["unet 66M (Chi size)"]
    for precision, threads in itertools.product(("fp32", "int8"), (1, 2)):
        for optimization, spinning, memory_pattern in itertools.product(("basic", "extended", "all"), (True, False),
                                                                         (True, False)):
            ort = {"optimization": optimization, "spinning": spinning, "memory_pattern": memory_pattern}
            r = profile(ProfileSettings(checkpoint=str(ckpt), backends=["onnxruntime"], iters=iters, warmup=10,
                                        sampler="ddpm", rti_k0=3, threads=threads, precision=precision, ort=ort,
                                        fused=False), progress=False)
            b = r["backends"][0]
            rows.append({"precision": precision, "threads": threads, **ort, "decision_ms": b["latency_ms"],
                         "call_ms": b["forward_ms"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(path: Path) -> str:
    r = json.loads(path.read_text())
    bw = r["bandwidth_gbs"]
    out = [f"Read bandwidth: {bw['1']:.1f} GB/s on 1 thread, {bw['2']:.1f} GB/s on 2.", "",
           "| model | threads | backend | precision | weights MB | call p50 ms | floor ms | decision p50 / p99 ms | "
           "peak RSS MB (added) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["latency"]:
        mb = row["weight_bytes"] / 2**20
        floor = row["weight_bytes"] / (bw[str(row["threads"])] * 1e9) * 1e3
        lat, mem = row["decision_ms"], row["memory"] or {}
        call = f"{row['call_ms']['p50']:.2f}" if row["call_ms"] else "-"
        out.append(f"| {row['model']} | {row['threads']} | {row['backend']} | {row['precision']} | {mb:.0f} | {call} | "
                   f"{floor:.2f} | {lat['p50']:.2f} / {lat['p99']:.2f} | {mem.get('peak_rss_mb', 0):.0f} "
                   f"({mem.get('peak_added_mb', 0):.0f}) |")
    out += ["", "| precision | threads | optimization | spinning | memory pattern | decision p50 / p99 ms |",
            "|---|---|---|---|---|---|"]
    for row in r.get("session_settings", []):
        lat = row["decision_ms"]
        out.append(f"| {row['precision']} | {row['threads']} | {row['optimization']} | "
                   f"{'on' if row['spinning'] else 'off'} | {'on' if row['memory_pattern'] else 'off'} | "
                   f"{lat['p50']:.2f} / {lat['p99']:.2f} |")
    return "\n".join(out)


def plot(path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(path.read_text())
    bw = r["bandwidth_gbs"]
    rows = [x for x in r["latency"] if x["backend"] == "onnxruntime" and x["call_ms"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, model in zip(axes, SIZES, strict=True):
        mine = [x for x in rows if x["model"] == model]
        labels = [f"{x['precision']}\n{x['threads']} thr" for x in mine]
        calls = [x["call_ms"]["p50"] for x in mine]
        floors = [x["weight_bytes"] / (bw[str(x["threads"])] * 1e9) * 1e3 for x in mine]
        pos = range(len(mine))
        ax.bar([p - 0.2 for p in pos], calls, 0.4, label="denoiser call p50")
        ax.bar([p + 0.2 for p in pos], floors, 0.4, label="weights / read bandwidth")
        ax.set_xticks(list(pos), labels, fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(f"{model}, onnxruntime")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fast_path")
    ap.add_argument("--data", help="a push-v3 dataset to calibrate int8 on (default: 10 demos collected here)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--skip-settings", action="store_true", help="no session-settings sweep")
    args = ap.parse_args()
    path = args.out / "fast_path.json"
    if not args.table:
        args.out.mkdir(parents=True, exist_ok=True)
        ckpts = checkpoints(args.out, dataset(args.out, args.data))
        result = {"date": datetime.date.today().isoformat(), "machine": platform.node(),
                  "cpu": platform.processor() or platform.machine(),
                  "bandwidth_gbs": {"1": bandwidth_gbs(1), "2": bandwidth_gbs(2)},
                  "diffusion_policy_ddim10_ms": DIFFUSION_POLICY_DDIM10_MS}
        result["latency"] = latency(ckpts, args.iters)
        path.write_text(json.dumps(result, indent=1))
        if not args.skip_settings:
            result["session_settings"] = session_settings(ckpts, max(30, args.iters // 4))
            path.write_text(json.dumps(result, indent=1))
        plot(path, args.out / "fast_path.png")
    print(table(path))


if __name__ == "__main__":
    main()
