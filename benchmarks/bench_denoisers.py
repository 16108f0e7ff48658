"""Denoiser call latency at batch 1 (torch eager, CPU) and one training step of the small U-Net policy.

    python benchmarks/bench_denoisers.py --out benchmarks/results/denoisers.json

Writes JSON with the machine, date and settings, and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policy.config import RunConfig  # noqa: E402
from policy.diffusion_policy import DiffusionPolicy  # noqa: E402
from policy.nets import ConditionalUnet1D, TransformerForDiffusion  # noqa: E402
from policy.normalizer import FieldNormalizer, Normalizer  # noqa: E402

# Metaworld's layout: a 39-d state, a 4-d action, 2 observation steps, a 16-step chunk.
STATE_DIM, ACTION_DIM, TO, HORIZON = 39, 4, 2, 16


def timed(fn, warmup: int, iters: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.asarray(times)
    return {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)), "max_ms": float(t.max()), "iters": iters}


def denoisers() -> dict[str, torch.nn.Module]:
    return {
        "unet_chi (256/512/1024)": ConditionalUnet1D(ACTION_DIM, STATE_DIM * TO),
        "unet_small (64/128/256)": ConditionalUnet1D(ACTION_DIM, STATE_DIM * TO, diffusion_step_embed_dim=128,
                                                     down_dims=(64, 128, 256)),
        "transformer (8 x 256)": TransformerForDiffusion(ACTION_DIM, STATE_DIM, HORIZON, TO, n_layer=8, n_head=4,
                                                         n_emb=256),
    }


def bench_forward(threads: int, iters: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for name, model in denoisers().items():
        model.eval()
        x, t = torch.randn(1, HORIZON, ACTION_DIM), torch.tensor([50])
        cond = torch.randn(1, TO, STATE_DIM) if isinstance(model, TransformerForDiffusion) else torch.randn(
            1, TO * STATE_DIM)
        with torch.inference_mode():
            stats = timed(lambda m=model, c=cond, x=x, t=t: m(x, t, c), warmup=10, iters=iters)
        params = sum(p.numel() for p in model.parameters())
        rows.append({"model": name, "params_m": round(params / 1e6, 2), "threads": threads, **stats})
        print(f"  {name}: {stats['p50_ms']:.2f} ms p50 ({threads} thread(s))", flush=True)
    return rows


def bench_train_step(threads: int, batch: int, iters: int) -> dict:
    torch.set_num_threads(threads)
    cfg = RunConfig()
    p = cfg.policy
    p.state_dim, p.action_dim = STATE_DIM, ACTION_DIM
    p.unet.down_dims, p.unet.diffusion_step_embed_dim = [64, 128, 256], 128
    rng = np.random.default_rng(0)
    norm = Normalizer({"state": FieldNormalizer.fit_minmax(rng.normal(size=(100, STATE_DIM))),
                       "action": FieldNormalizer.fit_minmax(rng.normal(size=(100, ACTION_DIM)))})
    policy = DiffusionPolicy(p, norm).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    batch_data = {"state": torch.randn(batch, TO, STATE_DIM), "action": torch.randn(batch, HORIZON, ACTION_DIM)}

    def step():
        loss = policy.compute_loss(batch_data)
        opt.zero_grad()
        loss.backward()
        opt.step()

    stats = timed(step, warmup=3, iters=iters)
    return {"model": "unet_small policy train step", "batch": batch, "threads": threads, **stats}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/denoisers.json")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--train-iters", type=int, default=20)
    args = ap.parse_args()
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads available",
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "forward_batch1": [],
        "train_step": [],
    }
    for threads in (1, 2):
        print(f"denoiser forward, batch 1, {threads} thread(s)")
        result["forward_batch1"] += bench_forward(threads, args.iters)
        print(f"training step, batch 256, {threads} thread(s)")
        result["train_step"].append(bench_train_step(threads, 256, args.train_iters))
        print(f"  {result['train_step'][-1]['p50_ms']:.0f} ms p50")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| model | params | threads | p50 ms | p90 ms | p99 ms |\n|---|---|---|---|---|---|")
    for r in result["forward_batch1"]:
        print(f"| {r['model']} | {r['params_m']}M | {r['threads']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} "
              f"| {r['p99_ms']:.2f} |")
    for r in result["train_step"]:
        print(f"| {r['model']} (batch {r['batch']}) | | {r['threads']} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} "
              f"| {r['p99_ms']:.0f} |")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
