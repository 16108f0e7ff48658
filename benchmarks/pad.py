"""PAD on the five metaworld benchmark tasks: one multi-task policy each for PAD, PAD without image prediction
(the same network on the pose loss only) and the image Diffusion Policy (the U-Net with the image encoder, on the
same inputs: the frame, the pose and the task as a one-hot), closed-loop success per task, future-frame MSE
against copy-last-frame on held-out episodes, and decision latency (DDIM-10 and RTI; torch and onnxruntime).

    python benchmarks/pad.py [--episodes 50] [--steps 6000] [--stage all|data|train|eval|frames|latency|table]
        [--models pad,pad_no_img,dp_image] [--rti-steps 4 ...] [--work DIR] [--out DIR]

Every stage skips what is already there (the dataset, a trained run, an evaluation report), so the script resumes.
Data and runs go to --work (default /work/pad_bench); JSON, plots and videos to --out (default
benchmarks/results/pad/). The evaluation runs PAD with RTI once per `--rti-steps` tail (calls per warm decision,
entered at k0 = 27), as the column "PAD + RTI-n".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "pad"
TASKS = ["metaworld/reach-v3", "metaworld/push-v3", "metaworld/pick-place-v3", "metaworld/drawer-open-v3",
         "metaworld/window-open-v3"]
IMAGE = 64
# The network sizes the 2-core CPU trains in the time given (configs/policy/pad.yaml is the DiT-S-like default).
PAD_SIZE: list[str] = []
MODELS = {
    "pad": ["--config", "configs/policy/pad.yaml", *PAD_SIZE],
    "pad_no_img": ["--config", "configs/policy/pad.yaml", *PAD_SIZE, "policy.predict_images=false"],
    "dp_image": ["--config", "configs/policy/unet_image.yaml", "data.state_keys=[pose,task_onehot]",
                 "data.image_key=image", "train.batch_size=64", "train.steps=2000"],
}
RTI_K0 = "27"
# ddpm50: the paper's sampler; "_frames": the predicted frames also decoded each decision, as a video shows them
LATENCY_SETTINGS = {"ddim10": [], "ddpm50": ["--sampler", "ddpm", "--steps", "50"],
                    **{f"rti{n}": ["--rti", RTI_K0, "--rti-steps", str(n)] for n in (4, 2, 1)},
                    "ddim10_frames": ["--predicted-frames"],
                    "rti2_frames": ["--rti", RTI_K0, "--rti-steps", "2", "--predicted-frames"]}


def rtdp(*args: str, threads: int = 2) -> None:
    env = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": str(threads)}
    print("+ rtdp", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "rtdp", *args], check=True, cwd=ROOT, env=env)


def stage_data(work: Path, episodes: int) -> None:
    for name, seed, n in (("train", 0, episodes), ("held_out", 5000, 5)):
        path = work / f"{name}.zarr"
        if not path.exists():
            rtdp("collect", "--task", ",".join(TASKS), "--episodes", str(n), "--seed", str(seed), "--image",
                 "--image-size", str(IMAGE), "--out", str(path), "--report", str(OUT / f"collect_{name}.json"))


def stage_train(work: Path, steps: int, models: list[str], threads: int) -> None:
    for name in models:
        run = work / name
        if (run / "train_report.json").exists():
            continue
        own_steps = any(a.startswith("train.steps=") for a in MODELS[name])
        rtdp("train", *MODELS[name][:2], "--data", str(work / "train.zarr"), "--out", str(run), "--overwrite",
             "--report", str(OUT / f"train_{name}.json"), *MODELS[name][2:],
             *([] if own_steps else [f"train.steps={steps}"]), "train.checkpoint_every=1000",
             f"train.threads={threads}", threads=threads)


def stage_eval(work: Path, episodes: int, models: list[str], rti_steps: list[int]) -> None:
    runs = [(m, m, []) for m in models] + [("pad", f"pad_rti{n}", ["--rti", RTI_K0, "--rti-exec", "4",
                                                                  "--rti-steps", str(n)]) for n in rti_steps]
    for model, label, extra in runs:
        for task in TASKS:
            report = OUT / "eval" / f"{label}_{task.split('/')[1]}.json"
            if report.exists():
                continue
            video = ["--video", str(OUT / "videos" / label), "--video-episodes", "1"] if label == "pad" else []
            rtdp("eval", "--checkpoint", str(work / model), "--task", task, "--episodes", str(episodes),
                 "--report", str(report), "--no-progress", *video, *extra, threads=1)


def stage_frames(work: Path, samples: int = 400) -> dict:
    """Predicted future frames against the true ones and against copy-last-frame, on held-out episodes."""
    import torch

    from envs.datasets import ReplayBuffer
    from envs.datasets.future_frames import FutureFrameDataset
    from policy.pad import load_pad

    torch.set_num_threads(2)
    model, cfg = load_pad(work / "pad")
    p = cfg.policy
    data = FutureFrameDataset(ReplayBuffer.load(work / "held_out.zarr"), p.frames, p.skip, p.position_dims,
                              p.gripper_action_dim)
    idx = np.random.default_rng(0).choice(len(data), size=min(samples, len(data)), replace=False)
    per_task: dict[str, list] = {t: [] for t in p.tasks}
    for start in range(0, len(idx), 50):
        b = data.batch(idx[start : start + 50])
        obs = {"image": torch.from_numpy(b["image"])[:, None], "pose": torch.from_numpy(b["pose"])[:, None],
               "task": torch.from_numpy(b["task"])[:, None]}
        chunk = model.predict_chunk(obs, generator=torch.Generator().manual_seed(start))
        truth = b["future_images"].astype(np.float64) / 255
        pred = chunk.extras["frames"].numpy().astype(np.float64) / 255
        copy = np.repeat(b["image"][:, None].astype(np.float64) / 255, p.frames, axis=1)
        for task, e_pred, e_copy in zip(b["task"], ((pred - truth) ** 2).mean(axis=(1, 2, 3, 4)),
                                        ((copy - truth) ** 2).mean(axis=(1, 2, 3, 4)), strict=True):
            per_task[p.tasks[task]].append((e_pred, e_copy))
        if start == 0:
            save_frame_strip(b["image"][:6], b["future_images"][:6], chunk.extras["frames"][:6].numpy())
    everything = [x for v in per_task.values() for x in v]
    result = {"samples": len(everything), "sampler": f"{model.method}-{len(model.timesteps)}",
              "mse_pad": float(np.mean([a for a, _ in everything])),
              "mse_copy_last": float(np.mean([b for _, b in everything])),
              "per_task": {t: {"mse_pad": float(np.mean([a for a, _ in v])),
                               "mse_copy_last": float(np.mean([b for _, b in v]))} for t, v in per_task.items() if v}}
    result["reduction"] = 1 - result["mse_pad"] / result["mse_copy_last"]
    (OUT / "frames.json").write_text(json.dumps(result, indent=2))
    return result


def save_frame_strip(current: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, frames = len(current), truth.shape[1]
    fig, axes = plt.subplots(n, 1 + 2 * frames, figsize=(1.3 * (1 + 2 * frames), 1.3 * n))
    for i in range(n):
        row = [("now", current[i])] + [(f"true +{4 * (k + 1)}", truth[i, k]) for k in range(frames)] + \
              [(f"PAD +{4 * (k + 1)}", predicted[i, k]) for k in range(frames)]
        for ax, (title, img) in zip(axes[i], row, strict=True):
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "frames.png", dpi=110)
    plt.close(fig)


def stage_latency(work: Path) -> None:
    for backend in ("torch", "onnxruntime"):
        if backend == "onnxruntime" and not (work / "pad" / "onnx").exists():
            rtdp("export", "--checkpoint", str(work / "pad"), "--check")
        for label, extra in LATENCY_SETTINGS.items():
            report = OUT / "latency" / f"pad_{label}_{backend}.json"
            if not report.exists():
                rtdp("profile", "--checkpoint", str(work / "pad"), "--backend", backend, "--iters", "100",
                     "--report", str(report), *extra, threads=1)


def table() -> str:
    def load(path: Path):
        return json.loads(path.read_text()) if path.exists() else None

    labels = model_labels()
    rows = ["| task | " + " | ".join(labels.values()) + " |", "|---" * (len(labels) + 1) + "|"]
    means: dict[str, list] = {m: [] for m in labels}
    for task in TASKS:
        cells = []
        for m in means:
            r = load(OUT / "eval" / f"{m}_{task.split('/')[1]}.json")
            cells.append(f"{r['success_rate']:.2f}" if r else "-")
            if r:
                means[m].append(r["success_rate"])
        rows.append(f"| {task.split('/')[1]} | " + " | ".join(cells) + " |")
    rows.append("| **mean** | " + " | ".join(f"**{np.mean(v):.2f}**" if len(v) == len(TASKS) else "-"
                                              for v in means.values()) + " |")
    pooled = [pooled_success(m) for m in labels]
    rows.append("| all episodes [95% CI] | " + " | ".join(
        f"{k}/{n} [{lo:.2f}, {hi:.2f}]" if n else "-" for k, n, (lo, hi) in pooled) + " |")
    for other in list(labels)[1:]:
        c = paired_comparison("pad", other)
        if c:
            rows.append(f"\nPAD vs {labels[other]} on the same {c['episodes']} seeds: PAD alone succeeded in "
                        f"{c['only_first']}, {labels[other]} alone in {c['only_second']} (McNemar exact p = "
                        f"{c['p_value']:.3f})")
    return "\n".join(rows)


def _episodes(model: str) -> dict[tuple[str, int], bool] | None:
    """(task, seed) -> success over the five tasks' reports, or None while one is missing."""
    out = {}
    for task in TASKS:
        path = OUT / "eval" / f"{model}_{task.split('/')[1]}.json"
        if not path.exists():
            return None
        out.update({(task, e["seed"]): bool(e["success"]) for e in json.loads(path.read_text())["per_episode"]})
    return out


def pooled_success(model: str) -> tuple[int, int, tuple[float, float]]:
    from evaluation.report import wilson_interval

    episodes = _episodes(model) or {}
    k = sum(episodes.values())
    return k, len(episodes), wilson_interval(k, len(episodes)) if episodes else (np.nan, np.nan)


def paired_comparison(first: str, second: str) -> dict | None:
    """Two models on the same (task, seed) episodes: McNemar's exact test, i.e. a binomial test on the episodes
    only one of the two succeeded in (the pairing removes the spread between seeds that both find easy or hard)."""
    from scipy.stats import binomtest

    a, b = _episodes(first), _episodes(second)
    if a is None or b is None:
        return None
    shared = a.keys() & b.keys()
    only_first = sum(a[e] and not b[e] for e in shared)
    only_second = sum(b[e] and not a[e] for e in shared)
    discordant = only_first + only_second
    return {"episodes": len(shared), "only_first": only_first, "only_second": only_second,
            "p_value": binomtest(only_first, discordant, 0.5).pvalue if discordant else 1.0}


def model_labels() -> dict[str, str]:
    """Each column of the success table: the three models, then PAD with every RTI tail evaluated in OUT."""
    tails = sorted({int(p.name.split("_")[1][3:]) for p in (OUT / "eval").glob("pad_rti*_*.json")}, reverse=True)
    return {"pad": "PAD", "pad_no_img": "PAD w/o img", "dp_image": "image DP",
            **{f"pad_rti{n}": f"PAD + RTI-{n}" for n in tails}}


def plot_success() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = model_labels()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(labels)
    for i, (m, name) in enumerate(labels.items()):
        values = []
        for task in TASKS:
            path = OUT / "eval" / f"{m}_{task.split('/')[1]}.json"
            values.append(json.loads(path.read_text())["success_rate"] if path.exists() else np.nan)
        ax.bar(np.arange(len(TASKS)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(TASKS)) + 0.4 - width / 2, [t.split("/")[1] for t in TASKS], fontsize=8)
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("one multi-task policy each, metaworld, DDIM-10 unless RTI")
    fig.tight_layout()
    fig.savefig(OUT / "success.png", dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/work/pad_bench")
    ap.add_argument("--episodes", type=int, default=50, help="evaluation episodes per task")
    ap.add_argument("--demos", type=int, default=40, help="expert episodes per task in the training set")
    ap.add_argument("--steps", type=int, default=6000, help="PAD's training steps (the image DP trains 2,000)")
    ap.add_argument("--models", default="pad,pad_no_img,dp_image")
    ap.add_argument("--train-threads", type=int, default=1,
                    help="torch threads per training run (1 lets the runs share the cores; 2 for one run alone)")
    ap.add_argument("--stage", default="all", choices=["all", "data", "train", "eval", "frames", "latency",
                                                         "table"])
    ap.add_argument("--rti-steps", type=int, nargs="*", default=[4],
                    help="evaluate PAD with RTI at each of these tails (calls per warm decision); none: no RTI")
    ap.add_argument("--out", type=Path, default=None, help="where JSON, plots and videos go")
    args = ap.parse_args()
    global OUT
    OUT = args.out.resolve() if args.out else OUT
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    t0 = time.perf_counter()
    if args.stage in ("all", "data"):
        stage_data(work, args.demos)
    if args.stage in ("all", "train"):
        stage_train(work, args.steps, models, args.train_threads)
    if args.stage in ("all", "eval"):
        stage_eval(work, args.episodes, models, args.rti_steps)
    if args.stage in ("all", "frames"):
        print(json.dumps(stage_frames(work), indent=2))
    if args.stage in ("all", "latency"):
        stage_latency(work)
    text = table()
    print(text)
    plot_success()
    meta = {"machine": f"{platform.node()} ({os.cpu_count()} cores, CPU only)",
            "date": datetime.date.today().isoformat(), "seconds": round(time.perf_counter() - t0, 1),
            "episodes_per_task": args.episodes, "tasks": TASKS}
    (OUT / "summary.json").write_text(json.dumps({**meta, "table": text}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
