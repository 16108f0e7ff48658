"""Planning latency on a GPU: the decision graph of trained planners (what `rtdp export` traces and the engine
backends run: everything from the normalised observation to the scored candidates) on torch CUDA, batch 1, eager
and under torch.compile with CUDA graphs; each one's outputs against the same graph on the CPU.

    python benchmarks/gpu_planners.py --checkpoints NAME=DIR ... --out DIR    # writes DIR/gpu_planners.json

Runs where torch sees a CUDA device (the project's lent GPU machine); with `--device cpu` it is a dry run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, inputs: dict, iters: int, sync) -> dict:
    import numpy as np

    for _ in range(5):
        fn(**inputs)
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(**inputs)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    a = np.array(times)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean()),
            "iters": iters}


def measure(checkpoint: str, device: str, iters: int, compile_graph: bool) -> dict:
    import torch

    from deploy.kinds import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    model.eval()
    (name, graph), = model.export_graphs(batch=1, generator=torch.Generator().manual_seed(0)).items()
    with torch.no_grad():
        reference = graph.fn(**graph.inputs)
        model.to(device)
        inputs = {k: v.to(device) for k, v in graph.inputs.items()}
        out = graph.fn(**inputs)
        errors = {n: float((a.float().cpu() - b.float()).abs().max()) for n, a, b in
                  zip(graph.outputs, out, reference, strict=True) if a.dtype.is_floating_point}
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        result = {"kind": model.kind, "graph": name, "max_abs_error_vs_cpu": errors,
                  "eager": timed(graph.fn, inputs, iters, sync)}
        if device.startswith("cuda") and compile_graph:
            try:
                compiled = torch.compile(graph.fn, mode="reduce-overhead", dynamic=False)
                result["compiled_cuda_graphs"] = timed(compiled, inputs, iters, sync)
            except Exception as e:  # a graph torch.compile cannot capture: say why, keep the eager figure
                result["compiled_cuda_graphs"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return result


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", nargs="+", required=True, help="NAME=DIR")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--compile", nargs="*", default=[], metavar="NAME", help="also time these under torch.compile "
                    "with CUDA graphs (a long chain unrolls into a long compile)")
    args = ap.parse_args()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    card = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    results = {"device": card, "torch": torch.__version__, "planners": {}}
    for item in args.checkpoints:
        name, _, directory = item.partition("=")
        results["planners"][name] = measure(directory, args.device, args.iters, name in args.compile)
        print(name, json.dumps(results["planners"][name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_planners.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
