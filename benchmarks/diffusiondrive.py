"""DiffusionDrive against its baselines on highway-env, per scenario: IDM expert drives -> DiffusionDrive, the vanilla
diffusion planner (20 DDIM steps, 20 samples) and the regression head, trained on the same data with the same
decoder sizes -> `rtdp eval` on the same 50 held-out seeds (closed loop, the expert on the same seeds, open loop
on the expert's scenes) -> decision latency on one thread in torch and onnxruntime.

    python benchmarks/diffusiondrive.py --scenarios highway-v0 roundabout-v0        # resumable per stage
    python benchmarks/diffusiondrive.py --table
    python benchmarks/diffusiondrive.py --scenarios roundabout-v0 --dagger-rounds 1   # then DAgger rounds
    python benchmarks/diffusiondrive.py --scenarios highway-v0 --dagger-rounds 1 --clearance   # with the check
    python benchmarks/diffusiondrive.py --scenarios roundabout-v0 --variant fine --scene "bev_cell=[2,1]"

Data and checkpoints go to benchmarks/results/diffusiondrive/runs/ (not committed); results to
benchmarks/results/diffusiondrive/<scenario>[-variant].json, the `rtdp eval` plot of each planner beside it
and closed_loop.png over all of them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "results" / "diffusiondrive"
CONFIGS = {"diffusiondrive": "diffusiondrive.yaml", "diffusion_planner": "diffusion_planner.yaml",
           "regression_planner": "regression_planner.yaml"}
KEYS = ("success_rate", "success_ci95", "collision_rate", "offroad_rate", "progress_m", "mean_abs_jerk", "ade",
        "fde", "anchor_accuracy", "anchor_accuracy_top3", "diversity", "nfe_per_decision", "latency_ms", "expert",
        "open_loop", "clearance", "seconds")


def dataset(scenario: str, episodes: int, scene: dict | None = None, variant: str = "") -> Path:
    """The expert's drives; with `scene` (SceneConfig fields) observed in that layout and kept apart by `variant`."""
    from envs.driving import SceneConfig
    from envs.driving_expert import collect_drives

    if scene and not variant:
        raise SystemExit("--scene needs a --variant, so that its data and runs are kept apart from the default's")
    path = OUT / "runs" / f"{scenario}{variant if scene else ''}.zarr"
    if not path.exists():
        t0 = time.perf_counter()
        buffer = collect_drives(f"highway/{scenario}", episodes, seed=0,
                                scene=SceneConfig.from_dict(scene, "--scene") if scene else None)
        buffer.attrs["collect_seconds"] = time.perf_counter() - t0
        buffer.save(path)
    return path


def checkpoint(scenario: str, kind: str, data: Path, steps: int | None, overrides: list[str] = (),
               variant: str = "") -> tuple[Path, dict]:
    from deploy.kinds import kind_named
    from envs.datasets import ReplayBuffer
    from envs.datasets.plan_dataset import PlanDataset
    from policy.config import load_config
    from policy.train import train

    run = OUT / "runs" / f"{scenario}-{kind}{variant}"
    if (run / "model.safetensors").is_file():
        return run, json.loads((run / "train_report.json").read_text())
    k = kind_named(kind)
    cfg = load_config(ROOT / "configs" / "planners" / CONFIGS[kind],
                      [*overrides, *([f"train.steps={steps}", f"train.checkpoint_every={steps}"] if steps else [])],
                      k.config_class)
    buffer = ReplayBuffer.load(data)
    cfg.data.task = buffer.attrs["task"]
    train_data = PlanDataset(buffer, cfg.data.branch_labels, cfg.data.val_ratio, cfg.train.seed)
    summary = train(cfg, train_data, run, build=k.build_for_training)
    return run, summary.to_dict()


def dagger(scenario: str, kind: str, data: Path, run: Path, rounds: int, episodes: int, label_every: int,
           steps: int | None, overrides: list[str], variant: str) -> tuple[Path, list[dict]]:
    """DAgger rounds (`rtdp collect --relabel`): the planner drives `episodes` new training seeds, the expert labels
    every `label_every`-th state, the labels join that planner's data and it is trained again from scratch.
    Returns the last round's checkpoint and a record per round."""
    from envs.collect import append_demos, next_seed
    from envs.datasets import ReplayBuffer
    from evaluation.driving import relabel_drives

    records = []
    for r in range(1, rounds + 1):
        aggregated = OUT / "runs" / f"{scenario}-{kind}{variant}-dagger{r}.zarr"
        if not aggregated.exists():
            before = ReplayBuffer.load(data)
            t0 = time.perf_counter()
            new = relabel_drives(str(run), episodes, next_seed(before), label_every)
            seconds = time.perf_counter() - t0
            merged = append_demos(before, new)
            merged.attrs["relabelled"][-1]["seconds"] = seconds
            merged.save(aggregated)
        data = aggregated
        run, report = checkpoint(scenario, kind, data, steps, overrides, f"{variant}-dagger{r}")
        relabelled = ReplayBuffer.load(data).attrs["relabelled"][-1]
        records.append({"round": r, "train_seconds": report["seconds"],
                        **{k: v for k, v in relabelled.items() if k != "seeds"}})
    return run, records


def evaluate_kind(run: Path, episodes: int, plot: Path, clearance: dict | None = None) -> dict:
    from evaluation.evaluate import EvalSettings, evaluate

    report = evaluate(EvalSettings(checkpoint=str(run), episodes=episodes, plot=str(plot), clearance=clearance))
    return {k: report[k] for k in KEYS if k in report}


def latency(run: Path, decisions: int = 200, clearance: dict | None = None) -> dict:
    """One thread, back to back on the expert's scenes of one held-out episode: torch and onnxruntime."""
    import numpy as np
    import torch

    from deploy.export import ExportSettings, export_policy
    from deploy.kinds import read_config
    from deploy.runtime import RuntimeSettings, build_policy
    from envs.driving import DrivingTask, SceneConfig
    from envs.driving_expert import drive_episode

    torch.set_num_threads(1)
    export_policy(ExportSettings(str(run)))
    run_cfg = read_config(run)
    scene = SceneConfig.from_dict(run_cfg.planner.layout.scene)  # the layout the planner was trained on
    scenes = drive_episode(DrivingTask(run_cfg.data.task.partition("/")[2], scene), 100_000, branch_every=0)["data"]
    out = {}
    for backend in ("torch", "onnxruntime"):
        policy = build_policy(RuntimeSettings(str(run), backend=backend, threads=1, clearance=clearance)).policy
        g = torch.Generator().manual_seed(0)
        times = []
        for i in range(min(decisions, len(scenes["ego"]))):
            obs = {k: torch.from_numpy(scenes[k][i : i + 1, None]) for k in ("ego", "agents", "bev")}
            t0 = time.perf_counter()
            policy.predict_chunk(obs, generator=g)
            times.append((time.perf_counter() - t0) * 1e3)
        a = np.array(times[5:])
        out[backend] = {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
                        "mean": float(a.mean())}
    return out


def table(out: Path) -> str:
    rows = ["| scenario | planner | calls | collision rate | success | progress m | jerk m/s^3 | ADE / FDE m "
            "| anchor acc. | diversity D | latency p50 ms, 1 thread: torch / onnxruntime |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    results = (json.loads(path.read_text()) for path in out.glob("*.json"))
    expert_shown = set()  # the expert drives the same seeds in every variant: one row per scenario
    for r in sorted(results, key=lambda r: (r["scenario"], r.get("variant") or "")):
        expert = None
        name = r["scenario"] + (f" ({r['variant']})" if r.get("variant") else "")
        for kind, e in r["planners"].items():
            if "eval" not in e:
                continue
            ev = e["eval"]
            expert = ev.get("expert", expert)
            lat = e.get("latency", {})
            lat_cell = " / ".join(f"{lat[b]['p50']:.1f}" for b in ("torch", "onnxruntime") if b in lat) or "-"
            acc = f"{ev['anchor_accuracy']:.2f}" if "anchor_accuracy" in ev else "-"
            div = f"{ev['diversity']:.2f}" if "diversity" in ev else "-"
            rows.append(f"| {name} | {kind} | {ev['nfe_per_decision']:.0f} | {ev['collision_rate']:.2f} | "
                        f"{ev['success_rate']:.2f} | {ev['progress_m']:.0f} | {ev['mean_abs_jerk']:.2f} | "
                        f"{ev['ade']:.2f} / {ev['fde']:.2f} | {acc} | {div} | {lat_cell} |")
        if expert and r["scenario"] not in expert_shown:
            expert_shown.add(r["scenario"])
            rows.append(f"| {name} | IDM expert | - | {expert['collision_rate']:.2f} | "
                        f"{expert['success_rate']:.2f} | {expert['progress_m']:.0f} | {expert['mean_abs_jerk']:.2f} "
                        f"| - | - | - | - |")
    return "\n".join(rows)


def plot_closed_loop(out: Path) -> None:
    """closed_loop.png: collision, success and progress (a fraction of the expert's) of every planner, one panel per
    scenario, a bar group per setting (the first training, each DAgger variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted((json.loads(p.read_text()) for p in out.glob("*.json")), key=lambda r: r.get("variant") or "")
    scenarios = sorted({r["scenario"] for r in results})
    most = max(sum(len(r["planners"]) for r in results if r["scenario"] == s) for s in scenarios) + 1
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(max(8.0, 0.5 * most), 5 * len(scenarios)), squeeze=False)
    figures = ("collision_rate", "success_rate", "progress")
    for ax, scenario in zip(axes[:, 0], scenarios, strict=True):
        bars = []
        for r in (r for r in results if r["scenario"] == scenario):
            for kind, e in r["planners"].items():
                if "eval" in e:
                    ev = e["eval"]
                    bars.append((f"{kind} {r.get('variant') or 'expert data'}", ev["collision_rate"],
                                 ev["success_rate"], ev["progress_m"] / ev["expert"]["progress_m"]))
                    expert = ev["expert"]
        bars.append(("IDM expert", expert["collision_rate"], expert["success_rate"], 1.0))
        width = 0.8 / len(figures)
        for j, name in enumerate(figures):
            ax.bar([i + j * width for i in range(len(bars))], [b[j + 1] for b in bars], width, label=name)
        ax.set_xticks([i + width for i in range(len(bars))], [b[0] for b in bars], rotation=50, ha="right",
                      rotation_mode="anchor", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, max(1.05, max(b[3] for b in bars) + 0.05))  # a planner may go farther than the expert
        ax.set_title(f"{scenario}: {expert['episodes']} held-out seeds (progress / expert's)")
    axes[0][0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out / "closed_loop.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", nargs="*", default=["highway-v0", "roundabout-v0"])
    ap.add_argument("--kinds", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--train-episodes", type=int, default=60)
    ap.add_argument("--steps", type=int, help="training steps (default: each config's)")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--override", nargs="*", default=[], help="config overrides for every planner (key=value)")
    ap.add_argument("--variant", default="", help="a name for this setting: its runs and JSON are kept apart")
    ap.add_argument("--dagger-rounds", type=int, default=0, help="DAgger rounds after the first training: the "
                    "planner drives, the expert labels its states, the planner is trained again on all labels")
    ap.add_argument("--dagger-episodes", type=int, default=30, help="planner drives per DAgger round")
    ap.add_argument("--label-every", type=int, default=1, help="DAgger: label every N-th state of a drive")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--redo", nargs="*", default=[], help="stages to run again: eval, latency")
    ap.add_argument("--clearance", nargs="*", metavar="FIELD=VALUE", help="evaluate the trained planners with the "
                    "clearance check (planners/clearance.py) between their candidates and the car, its defaults or "
                    "these ClearanceConfig fields; results as the variant with '-clearance' (and the fields) "
                    "appended, the checkpoints the same")
    ap.add_argument("--scene", nargs="*", default=[], metavar="FIELD=VALUE", help="the observation layout "
                    "(envs.driving.SceneConfig fields, e.g. bev_cell=[2,1]); needs --variant")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scene = {k: yaml.safe_load(v) for k, v in (f.split("=", 1) for f in args.scene)}
    if args.table:
        print(table(args.out))
        plot_closed_loop(args.out)
        return
    for scenario in args.scenarios:
        base_variant = f"-{args.variant}" if args.variant else ""
        clearance = None if args.clearance is None else {
            k: yaml.safe_load(v) for k, v in (f.split("=", 1) for f in args.clearance)}
        variant = base_variant + (f"-dagger{args.dagger_rounds}" if args.dagger_rounds else "") + (
            "" if clearance is None else "-".join(["-clearance", *args.clearance]))
        path = args.out / f"{scenario}{variant}.json"
        result = json.loads(path.read_text()) if path.is_file() else {"scenario": scenario, "planners": {}}
        result["variant"], result["overrides"] = variant.lstrip("-"), args.override
        data = dataset(scenario, args.train_episodes, scene, base_variant)
        from envs.datasets import ReplayBuffer

        result["data"] = {k: v for k, v in ReplayBuffer.load(data).attrs.items() if k not in ("styles", "seeds")}
        for kind in args.kinds:
            entry = result["planners"].setdefault(kind, {})
            run, train_report = checkpoint(scenario, kind, data, args.steps, args.override, base_variant)
            entry["train"] = {k: train_report[k] for k in ("steps", "seconds", "loss_first", "loss_last")}
            if args.dagger_rounds:
                run, entry["dagger"] = dagger(scenario, kind, data, run, args.dagger_rounds, args.dagger_episodes,
                                              args.label_every, args.steps, args.override, base_variant)
                entry["train"]["seconds_all_rounds"] = entry["train"]["seconds"] + sum(
                    r["train_seconds"] + r["seconds"] for r in entry["dagger"])
            if "eval" not in entry or "eval" in args.redo:
                entry["eval"] = evaluate_kind(run, args.episodes, args.out / f"{scenario}{variant}-{kind}.png",
                                              clearance)
            if "latency" not in entry or "latency" in args.redo:
                entry["latency"] = latency(run, clearance=clearance)
            entry["date"], entry["machine"] = datetime.date.today().isoformat(), platform.node()
            path.write_text(json.dumps(result, indent=1))
            print(f"{scenario} {kind}: {json.dumps(entry['eval'])[:300]}", flush=True)
    print(table(args.out))
    plot_closed_loop(args.out)


if __name__ == "__main__":
    main()
