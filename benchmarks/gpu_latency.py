"""Decision latency on a GPU: the three denoisers (the 4.7M CPU-sized U-Net, Chi et al.'s 66M U-Net, the 8 x 256
transformer) through `rtdp profile`'s machinery on torch CUDA, for DDPM-100, DDIM-10 and the RTI warm decision
(k0 = 3, 4 calls), batch 1. Weights are random: latency does not depend on them.

    python benchmarks/gpu_latency.py --out DIR [--backends torch-cuda torch-compile-cuda] [--precision fp16]
                                     [--runs ddim-10 rti-k0=3]     # writes DIR/gpu_latency[-fp16].json

Runs where torch sees a CUDA device (on this project's lent GPU machine); the card is recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "unet 4.7M (unet_lowdim)": ("configs/policy/unet_lowdim.yaml", []),
    "unet 66M (Chi size)": ("configs/policy/unet_lowdim.yaml", ["policy.unet.down_dims=[256,512,1024]",
                                                                "policy.unet.diffusion_step_embed_dim=256"]),
    "transformer 8x256": ("configs/policy/transformer_lowdim.yaml", []),
}
RUNS = [("ddpm-100", dict(sampler="ddpm", steps=100, iters=50)),
        ("ddim-10", dict(sampler="ddim", steps=10, iters=200)),
        ("rti-k0=3", dict(sampler="ddpm", rti_k0=3, iters=300))]


def build(directory: Path, config: str, overrides: list[str]) -> Path:
    import numpy as np

    from policy.checkpoint import save_checkpoint
    from policy.config import load_config
    from policy.diffusion_policy import DiffusionPolicy
    from policy.normalizer import FieldNormalizer, Normalizer

    cfg = load_config(ROOT / config, [*overrides, "policy.state_dim=39", "policy.action_dim=4"])
    rng = np.random.default_rng(0)
    norm = Normalizer({"state": FieldNormalizer.fit_minmax(rng.uniform(-1, 1, (64, 39))),
                       "action": FieldNormalizer.fit_minmax(rng.uniform(-1, 1, (64, 4)))})
    save_checkpoint(directory, cfg, DiffusionPolicy(cfg.policy, norm))
    return directory


def main() -> None:
    import torch

    from deploy.profile import ProfileSettings, profile

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backends", nargs="*", default=["torch-cuda"])
    ap.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="the network's precision")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--runs", nargs="*", default=[r for r, _ in RUNS], choices=[r for r, _ in RUNS])
    ap.add_argument("--iters-scale", type=float, default=1.0, help="e.g. 0.05 for a quick dry run on a CPU")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "torch": torch.__version__, "precision": args.precision, "runs": []}
    suffix = "" if args.precision == "fp32" else f"-{args.precision}"
    for label, (config, overrides) in MODELS.items():
        if label not in args.models:
            continue
        ckpt = build(args.out / "ckpt" / label.split()[0] / str(len(results["runs"])), config, overrides)
        for run, kw in RUNS:
            if run not in args.runs:
                continue
            kw = {**kw, "iters": max(2, int(kw["iters"] * args.iters_scale))}
            r = profile(ProfileSettings(checkpoint=str(ckpt), backends=args.backends, warmup=min(10, kw["iters"]),
                                        threads=4, precision=args.precision, **kw), progress=False)
            for b in r["backends"]:
                results["runs"].append({"model": label, "run": run, "precision": args.precision, **b})
                print(f"{label:<26}{run:<10}{b['backend']:<20}{args.precision:<6}p50 {b['latency_ms']['p50']:8.2f} ms"
                      f"  p99 {b['latency_ms']['p99']:8.2f} ms  call p50 {b['forward_ms']['p50']:.3f} ms", flush=True)
            # written after every run: a run cut short by the machine's time limit keeps what it measured
            (args.out / f"gpu_latency{suffix}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
