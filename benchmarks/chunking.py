"""Real-time chunking under injected inference delay: `rtdp control` (inference in its own process, 50 Hz) for each
way a new chunk joins the one being executed and each added delay: success, held ticks and the action jump where a
new chunk takes over, one plot.

    python benchmarks/chunking.py --checkpoint CKPT [--task metaworld/push-v3] [--episodes 50] [--delays 0,1,2,4,6]
        [--methods naive,ensemble,inpaint,guidance,rti,anytime,anytime-respace]
    python benchmarks/chunking.py --checkpoint CKPT --half-budget     # anytime at half the full decision's time

Methods: `naive` splice, `ensemble` (ACT's temporal ensembling), `inpaint` (replacement) and `guidance` (RTC) hold
the actions that run during the decision; `rti` warm-starts each decision from the executed chunk (the default RTI,
a 4-call tail, replanning every tick; `rti-ddim10` with DDIM-10 as its full denoise); `anytime` stops each DDIM
chain when the actions left would run out, and `anytime-respace` runs the shorter DDIM chain that fits instead.
`rti-anytime` is RTI whose tail is respaced to the calls the time left covers. `--half-budget` caps every anytime
decision at half the median decision time of the zero-delay run it stands in for (`-half` rows, delay 0): `anytime`
and `anytime-respace` against `naive`, `rti-anytime` against `rti`.

Delays are in control periods (20 ms at 50 Hz) added to every decision on top of its own inference time. Reports
go to benchmarks/results/chunking/<task>_<method>_<delay>.json; a run whose report is there is skipped. The tables
cover every report there for the task, from this run or earlier ones ("-" where a point was not run); the plot,
success_vs_delay.png, has a panel for every task with a summary there.
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


METHOD_FLAGS = {
    "naive": ["--chunking", "naive"],
    "ensemble": ["--chunking", "ensemble"],
    "inpaint": ["--chunking", "inpaint"],
    "guidance": ["--chunking", "guidance"],
    "rti": ["--rti"],
    # RTI whose full denoise (an episode's first, off the clock; a fallback after a gap, on it) is DDIM-10, not
    # DDPM-100: a fallback of 100 calls takes ~1 s, and the gap it leaves starts the next fallback
    "rti-ddim10": ["--rti", "--rti-full-sampler", "ddim", "--rti-full-steps", "10"],
    # RTI whose warm tails hold the actions that run during the decision to the executed chunk (replacement)
    "rti-inpaint": ["--rti", "--chunking", "inpaint"],
    "anytime": ["--anytime"],
    "anytime-respace": ["--anytime", "--anytime-mode", "respace"],
    # RTI whose decisions fit the time left: the warm tail (and a fallback's full denoise) respaced to the calls
    # that fit
    "rti-anytime": ["--rti", "--anytime", "--anytime-mode", "respace"],
}
# --half-budget: each full decision, and the anytime methods capped at half its median decision time
HALF_BUDGET = {"rti": ("rti-anytime",), "naive": ("anytime", "anytime-respace")}


def run(checkpoint: str, task: str, method: str, delay: int, episodes: int, extra: list[str] = ()) -> dict:
    path = report_path(task, method, delay)
    if not path.exists():
        extra = [*METHOD_FLAGS[method.removesuffix("-half")], *extra]
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
    ap.add_argument("--delays", default="0,1,2,4,6", help="added delay in control periods")
    ap.add_argument("--methods", default="naive,ensemble,inpaint,rti,anytime,anytime-respace",
                    help=f"comma-separated, of {sorted(METHOD_FLAGS)}")
    ap.add_argument("--half-budget", action="store_true", help="also anytime at half the full decision's time")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    delays, methods = [int(d) for d in args.delays.split(",")], args.methods.split(",")
    if unknown := set(methods) - set(METHOD_FLAGS):
        ap.error(f"unknown methods {sorted(unknown)}; choose from {sorted(METHOD_FLAGS)}")
    for m in methods:
        for d in delays:
            run(args.checkpoint, args.task, m, d, args.episodes)
    results = reports_on_disk(args.task)
    methods = [m for m in METHOD_FLAGS if m in results]
    delays = sorted({d for by_delay in results.values() for d in by_delay})
    tables = [success_table(results, methods, delays), jump_table(results, methods, delays)]
    if args.half_budget:
        for base, anytime_methods in HALF_BUDGET.items():
            full = run(args.checkpoint, args.task, base, 0, args.episodes)
            cap = full["inference_ms"]["p50"] / 2
            half = {m: run(args.checkpoint, args.task, f"{m}-half", 0, args.episodes,
                           ["--anytime-budget-ms", f"{cap:.1f}"]) for m in anytime_methods}
            tables.append(half_budget_table(base, full, half, cap))
    text = "\n\n".join(tables)
    print(text)
    name = args.task.split("/")[-1]
    (OUT / f"{name}_summary.json").write_text(json.dumps({"task": args.task, "episodes": args.episodes,
                                                          "rate_hz": RATE, "tables": text}, indent=2))

    plot_success_vs_delay()
    return 0


def plot_success_vs_delay() -> None:
    """success_vs_delay.png: one panel per task that has a summary here, each point with its Wilson interval; the
    same colour for a method on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [json.loads(p.read_text()) for p in sorted(OUT.glob("*_summary.json"))]
    fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 3.8), sharey=True, squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for ax, summary in zip(axes[0], summaries, strict=True):
        results = reports_on_disk(summary["task"])
        for m in (m for m in METHOD_FLAGS if m in results):
            ran = sorted(results[m])
            rates = [results[m][d]["success_rate"] for d in ran]
            lo = [results[m][d]["success_rate"] - results[m][d]["success_ci95"][0] for d in ran]
            hi = [results[m][d]["success_ci95"][1] - results[m][d]["success_rate"] for d in ran]
            ax.errorbar(ran, rates, yerr=[lo, hi], marker="o", capsize=3, label=m,
                        color=colours[list(METHOD_FLAGS).index(m) * 2 % len(colours)])
        ax.set_xlabel("injected delay (control periods of 20 ms), on top of inference")
        ax.set_title(f"{summary['task']} @ {summary['rate_hz']:.0f} Hz, {summary['episodes']} episodes per point")
        ax.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("success rate")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(OUT / "success_vs_delay.png", dpi=110)
    plt.close(fig)


def reports_on_disk(task: str) -> dict[str, dict[int, dict]]:
    """method -> delay -> report, for every report of the task (anytime's half-budget runs excluded)."""
    name = task.split("/")[-1]
    results: dict[str, dict[int, dict]] = {}
    for method in METHOD_FLAGS:
        for path in OUT.glob(f"{name}_{method}_*.json"):
            delay = path.stem.removeprefix(f"{name}_{method}_")
            if delay.isdigit():
                results.setdefault(method, {})[int(delay)] = json.loads(path.read_text())
    return results


def success_table(results: dict, methods: list[str], delays: list[int]) -> str:
    """Success [Wilson 95%], median decision time and the share of ticks held for want of an action."""
    rows = ["| method | " + " | ".join(f"+{d} periods" for d in delays) + " |", "|---|" + "---|" * len(delays)]
    for m in methods:
        cells = []
        for d in delays:
            r = results[m].get(d)
            if r is None:
                cells.append("-")
                continue
            lo, hi = r["success_ci95"]
            cells.append(f"{r['success_rate']:.2f} [{lo:.2f}, {hi:.2f}]; {r['inference_ms']['p50']:.0f} ms, "
                         f"held {r['held_ticks'] / max(r['ticks'], 1):.0%}")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def jump_table(results: dict, methods: list[str], delays: list[int]) -> str:
    """Mean |a_t - a_t-1| (max over the continuous dims) on ticks where a new chunk takes over, and within chunks."""
    rows = ["| method: action jump at a chunk boundary (within a chunk) | " + " | ".join(f"+{d}" for d in delays)
            + " |", "|---|" + "---|" * len(delays)]
    for m in methods:
        cells = []
        for d in delays:
            j = results[m][d]["action_jump"] if d in results[m] else {"at_chunk_boundary": None}
            cells.append("-" if j["at_chunk_boundary"] is None else
                         f"{j['at_chunk_boundary']:.3f} ({j['within_chunk']:.3f})")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def half_budget_table(base: str, full: dict, half: dict, cap: float) -> str:
    """Success of the full decision and of the anytime ones capped at half its median time, with the calls a
    decision took (mean over the run, an episode's uncapped first decision included)."""
    rows = ["| decision (delay 0) | budget | calls per decision | success | decision p50 (ms) |",
            "|---|---|---|---|---|"]
    for m, r, budget in ((f"full ({base})", full, "-"), *((m, r, f"{cap:.1f} ms") for m, r in half.items())):
        lo, hi = r["success_ci95"]
        rows.append(f"| {m} | {budget} | {r['denoiser_calls']['mean']:.2f} | {r['success_rate']:.2f} "
                    f"[{lo:.2f}, {hi:.2f}] | {r['inference_ms']['p50']:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
