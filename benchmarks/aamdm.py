"""AAMDM against AMDM-200 and AMDM-5 on the DeepMimic clips (AAMDM's benchmark, section 6 of algorithms.md):

1. data: every clip and its mirror; the last 20% of each is held out (looping clips repeat their cycle, so the
   held-out frames are new frames of a known motion, not a new motion);
2. the motion autoencoder, then AAMDM, AMDM-200 and AMDM-5 in its embedding (`rtdp train`, two threads);
3. per model: frames per second at batch 1 on one thread (torch, and onnxruntime for the exported frame step),
   the Frechet distance between generated and held-out frames in the embedding (1,000 windows of 1 s, each from
   a held-out frame), diversity (mean distance between random pairs of generated windows, beside the held-out
   windows'), foot skating, and the root direction error 2 s after each turn of a 20 s steered run, with and
   without guidance.

    python benchmarks/aamdm.py          # resumable: each stage skips what is already there
    python benchmarks/aamdm.py --table

Data and checkpoints go to benchmarks/results/aamdm/runs/ (not committed); results, the plot and the steered
run's video to benchmarks/results/aamdm/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "results" / "aamdm"
RUNS = OUT / "runs"
HELD_OUT = 0.2
WINDOW = 30  # frames per generated window (1 s)
WINDOWS = 1000
CONTROL = "walk 1.2 m/s, turn left at 4 s, turn right at 9 s, turn left by 45 deg at 14 s, speed 0.8 m/s at 17 s"
QUICK: list[str] = []  # overrides of every training run (--quick)
AMDM5 = ["planner.train_timesteps=5", "planner.beta_schedule=scaled_linear", "planner.beta_start=0.001",
         "planner.beta_end=0.99"]
# Training steps: the three models the same number, all four runs within the 60 minutes on 2 cores (an
# AAMDM step trains the generator, the discriminator with R1 and the polisher's rollout: 0.37 s at batch 256;
# an AMDM step 0.13 s)
STEPS = ["train.steps=4000", "train.checkpoint_every=1000"]
# AAMDM's generator and polisher at half the width (the discriminator, which sampling never runs, as it is): a
# frame streams a quarter of the weights
NARROW = ["planner.hidden=256"]
MODELS = {  # name: (config, overrides)
    "aamdm": ("configs/planners/aamdm.yaml", STEPS),
    "amdm200": ("configs/planners/amdm.yaml", STEPS),
    "amdm5": ("configs/planners/amdm.yaml", [*STEPS, *AMDM5]),
    "aamdm_narrow": ("configs/planners/aamdm.yaml", [*STEPS, *NARROW]),
}


def datasets() -> tuple[Path, Path]:
    from envs.motion import Clip, deepmimic_clips, motion_dataset

    train, held = RUNS / "train.zarr", RUNS / "heldout.zarr"
    if not held.exists():
        clips = deepmimic_clips()
        cut = [int(len(c) * (1 - HELD_OUT)) for c in clips]
        part = [(replace(c, root_position=c.root_position[:k], rotations=c.rotations[:k]),
                 Clip(c.name, c.skeleton, c.fps, c.root_position[k:], c.rotations[k:]))
                for c, k in zip(clips, cut, strict=True)]
        for path, which in ((train, 0), (held, 1)):
            buffer = motion_dataset([p[which] for p in part])
            buffer.attrs["task"] = "motion/deepmimic"
            buffer.save(path, overwrite=True)
    return train, held


def train_run(name: str, config: str, data: Path, overrides: list[str]) -> dict:
    from rtdp.cli import main

    run = RUNS / name
    report = RUNS / f"{name}.train.json"
    if not report.exists():
        t0 = time.perf_counter()
        code = main(["train", "--config", str(ROOT / config), "--data", str(data), "--out", str(run), "--overwrite",
                     "train.threads=2", *overrides, *QUICK])
        if code:
            raise SystemExit(f"training {name} failed")
        report.write_text(json.dumps({"seconds": time.perf_counter() - t0, "overrides": overrides}))
    return json.loads(report.read_text())


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def diversity(windows: np.ndarray, pairs: int = 2000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    flat = windows.reshape(len(windows), -1)
    i, j = rng.integers(0, len(flat), pairs), rng.integers(0, len(flat), pairs)
    keep = i != j
    return float(np.linalg.norm(flat[i[keep]] - flat[j[keep]], axis=1).mean())


def generate_windows(policy, starts: np.ndarray, seed: int = 0, batch: int = 250) -> np.ndarray:
    """WINDOW frames after each start frame, unguided, batched: (N, WINDOW, D)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(starts), batch):
        prev = torch.as_tensor(starts[i:i + batch], dtype=torch.float32)[:, None]
        frames = []
        for _ in range(WINDOW):
            prev = policy.predict_chunk({"frame": prev}, generator=g).action
            frames.append(prev[:, 0].numpy())
        out.append(np.stack(frames, axis=1))
    return np.concatenate(out)


def frame_rate(policy, start: np.ndarray, frames: int = 200) -> dict:
    """Frames per second generating one character, batch 1, on the thread count set by the caller."""
    import torch

    prev = torch.as_tensor(start, dtype=torch.float32).reshape(1, 1, -1)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(frames):
        t0 = time.perf_counter()
        prev = policy.predict_chunk({"frame": prev}, generator=g).action
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times[10:]) * 1e3
    return {"fps": float(1e3 / ms.mean()), "frame_ms_p50": float(np.percentile(ms, 50)),
            "frame_ms_p99": float(np.percentile(ms, 99))}


def evaluate(name: str, held: Path) -> dict:
    import torch

    from deploy.export import ExportSettings, check_export, export_policy
    from deploy.kinds import kind_of
    from deploy.runtime import RuntimeSettings, build_policy
    from envs.datasets import ReplayBuffer
    from evaluation.motion import (
        foot_skating,
        integrate,
        motion_report,
        open_motion_session,
        parse_control,
        synthesize,
        write_motion_video,
    )
    from planners.motion_autoencoder import embed_frames, load_autoencoder

    path = OUT / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    run = RUNS / name
    torch.set_num_threads(1)
    session = open_motion_session(str(run), str(held))
    policy = session.policy
    buffer = ReplayBuffer.load(held)
    ae, _ = load_autoencoder(kind_of(run).read_config(run).data.autoencoder)
    real = embed_frames(ae, buffer["pose"], buffer["control"])
    result: dict = {"model": name, "config": session.config, "threads": 1}

    result["torch"] = frame_rate(policy, session.start_frame)
    export_policy(ExportSettings(str(run)))
    result["onnx_parity"] = check_export(str(run), run / "onnx")
    onnx = build_policy(RuntimeSettings(str(run), backend="onnxruntime", threads=1)).policy
    result["onnxruntime"] = frame_rate(onnx, session.start_frame)

    # 1,000 windows of 1 s from held-out frames (each start at least WINDOW frames before its clip's end)
    rng = np.random.default_rng(0)
    starts_ok = np.concatenate([np.arange(s, e - WINDOW) for s, e in
                                zip(np.r_[0, buffer.episode_ends[:-1]], buffer.episode_ends, strict=True)])
    starts = rng.choice(starts_ok, WINDOWS, replace=len(starts_ok) < WINDOWS)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    windows = generate_windows(policy, real[starts])
    real_windows = real[starts[:, None] + np.arange(1, WINDOW + 1)[None]]
    result["windows_seconds"] = time.perf_counter() - t0
    result["fid_embedding"] = frechet(windows.reshape(-1, windows.shape[-1]), real)
    result["fid_embedding_heldout_windows"] = frechet(real_windows.reshape(-1, real.shape[-1]), real)
    result["diversity"] = diversity(windows)
    result["diversity_heldout"] = diversity(real_windows)
    torch.set_num_threads(1)

    commands = parse_control(CONTROL)
    j = len(session.skeleton.names)
    for guided in (True, False):
        run_ = synthesize(policy, session.decode, session.start_frame, session.skeleton, 20.0, commands,
                          guided=guided, seed=0)
        report = motion_report(run_, commands, session.skeleton, session.contact_height)
        result["guided" if guided else "unguided"] = {k: report[k] for k in
                                                      ("fps", "nfe_per_frame", "guidance_error",
                                                       "foot_skating_m_s", "distance_m")}
        if guided and name == "aamdm":
            write_motion_video(run_, session.skeleton, str(OUT / "aamdm_steered.mp4"))
    # the data's own foot skating, measured the same way (the decoded held-out poses through the autoencoder)
    skating = []
    for s, e in zip(np.r_[0, buffer.episode_ends[:-1]], buffer.episode_ends, strict=True):
        _, _, joints = integrate(buffer["pose"][int(s):int(e)], j)
        skating.append(foot_skating(joints, session.skeleton.feet(), session.contact_height))
    result["foot_skating_heldout_m_s"] = float(np.mean(skating))
    result["machine"] = f"{platform.processor() or platform.machine()}, {platform.system()}"
    result["date"] = datetime.date.today().isoformat()
    path.write_text(json.dumps(result, indent=1))
    return result


def speed(names: list[str], train: Path, held: Path) -> dict:
    """Frames per second of every model's architecture, back to back in one process (torch, then onnxruntime; batch
    1, one thread), on checkpoints trained 10 steps: a frame's cost does not depend on the weights' values, and
    timings taken on different days on a shared VM are not comparable."""
    import torch

    from deploy.export import ExportSettings, export_policy
    from deploy.runtime import RuntimeSettings, build_policy
    from evaluation.motion import open_motion_session

    torch.set_num_threads(1)
    (RUNS / "speed").mkdir(exist_ok=True)
    result: dict = {"threads": 1, "date": datetime.date.today().isoformat(),
                    "machine": f"{platform.processor() or platform.machine()}, {platform.system()}"}
    for name in names:
        config, overrides = MODELS[name]
        steps = ["train.steps=10", "train.checkpoint_every=10"]
        train_run(f"speed/{name}", config, train, [f"data.autoencoder={RUNS / 'motion_ae'}", *overrides, *steps])
        run = RUNS / "speed" / name
        session = open_motion_session(str(run), str(held))
        export_policy(ExportSettings(str(run)))
        onnx = build_policy(RuntimeSettings(str(run), backend="onnxruntime", threads=1)).policy
        result[name] = {"torch": frame_rate(session.policy, session.start_frame, frames=400),
                        "onnxruntime": frame_rate(onnx, session.start_frame, frames=400)}
        print(f"{name}: {result[name]['torch']['fps']:.1f} / {result[name]['onnxruntime']['fps']:.1f} frames/s "
              f"(torch / onnxruntime)", flush=True)
    (OUT / "speed.json").write_text(json.dumps(result, indent=1))
    return result


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].bar(names, [results[n]["torch"]["fps"] for n in names])
    axes[0].set_yscale("log")
    axes[0].set_title("frames/s, batch 1, one thread (torch)")
    axes[1].bar(names, [results[n]["fid_embedding"] for n in names])
    axes[1].set_title("FID in the embedding (lower is better)")
    width = 0.4
    x = np.arange(len(names))
    axes[2].bar(x - width / 2, [results[n]["guided"]["guidance_error"]["after_turn_mean_deg"] for n in names], width,
                label="guided")
    axes[2].bar(x + width / 2, [results[n]["unguided"]["guidance_error"]["after_turn_mean_deg"] for n in names],
                width, label="unguided")
    axes[2].set_xticks(x, names)
    axes[2].set_title("direction error 2 s after a turn (deg)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(OUT / "aamdm.png", dpi=100)
    plt.close(fig)


def table(results: dict) -> str:
    rows = ["| model | calls/frame | FPS torch (1 thread) | FPS onnxruntime | FID (embedding) | diversity "
            "(held-out) | foot skating m/s (held-out) | direction error 2 s after a turn, guided / unguided |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        nfe = r["guided"]["nfe_per_frame"]
        calls = (f"{nfe['generator_calls']} GAN + {nfe['polisher_calls']} polish" if "generator_calls" in nfe
                 else str(nfe["total"]))
        rows.append(f"| {name} | {calls} | {r['torch']['fps']:.0f} | {r['onnxruntime']['fps']:.0f} | "
                    f"{r['fid_embedding']:.2f} | {r['diversity']:.1f} ({r['diversity_heldout']:.1f}) | "
                    f"{r['guided']['foot_skating_m_s']:.2f} ({r['foot_skating_heldout_m_s']:.2f}) | "
                    f"{r['guided']['guidance_error']['after_turn_mean_deg']:.0f} / "
                    f"{r['unguided']['guidance_error']['after_turn_mean_deg']:.0f} deg |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", action="store_true", help="print the table from the results there")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--speed", action="store_true", help="only the frames per second of --models' architectures, "
                   "side by side in one process, to speed.json")
    p.add_argument("--quick", action="store_true", help="every stage at toy sizes into /tmp/rtdp-aamdm-quick, to "
                   "check the pipeline in minutes (the figures mean nothing)")
    args = p.parse_args()
    if args.quick:
        global OUT, RUNS, WINDOWS, QUICK
        OUT = Path("/tmp/rtdp-aamdm-quick")
        RUNS, WINDOWS = OUT / "runs", 20
        QUICK = ["train.steps=20", "train.checkpoint_every=20", "planner.hidden=64"]
    OUT.mkdir(parents=True, exist_ok=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    if not args.table:
        train, held = datasets()
        ae = train_run("motion_ae", "configs/planners/motion_autoencoder.yaml", train, ["train.steps=2000"])
        print(f"autoencoder: {ae['seconds']:.0f} s", flush=True)
        if args.speed:
            speed(args.models, train, held)
            return 0
        for name in args.models:
            config, overrides = MODELS[name]
            r = train_run(name, config, train, [f"data.autoencoder={RUNS / 'motion_ae'}", *overrides])
            print(f"{name}: trained in {r['seconds']:.0f} s", flush=True)
        for name in args.models:
            evaluate(name, held)
            print(f"{name}: evaluated", flush=True)
    results = {n: json.loads((OUT / f"{n}.json").read_text()) for n in MODELS if (OUT / f"{n}.json").exists()}
    if results:
        plot(results)
        print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
