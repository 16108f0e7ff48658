"""Maze success by route length: which start/goal pairs a maze planner loses, from `rtdp eval` reports.

Each episode's start and goal are recovered by resetting the report's task with the episode's seed; the route
length is the number of cells on the shortest path over the maze grid (the waypoint expert's), 0 when the ball
starts in the goal's cell. Episodes are pooled by seed over the reports of one label (a glob, or the label given
twice), so a model evaluated in several runs (`--seed 0`, `--seed 20`, ...) counts once per seed; a seed that two
of a label's reports both hold is refused (two settings under one label, e.g. another target return).

    D=benchmarks/results/trajectory_diffuser/2026-12-07
    python benchmarks/maze_routes.py --report "TD=$D/medium-inverse8-trajectory_diffuser.json" \
        --report "TD=$D/medium-inverse8-trajectory_diffuser-seed*.json" \
        --report "draft=$D/medium-inverse8-draft_alone*.json" --bins 0-2 3-5 6-100 --out $D/medium-routes

writes OUT.json (per bin and label: episodes, successes, rate, Wilson interval) and OUT.png (the rates as bars).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def route_cells(env, seed: int) -> int:
    """Cells on the shortest path from where `seed` starts the ball to the goal's cell."""
    obs, _ = env.reset(seed=seed)
    state = obs["state"]
    expert = env.expert()
    here, goal = expert.cell(state[:2]), expert.cell(state[4:6])
    cells = 0
    while here != goal:
        here = expert.next_cell(here, goal)
        cells += 1
    return cells


def parse_bin(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.isdigit() or not hi.isdigit() or int(lo) > int(hi):
        raise argparse.ArgumentTypeError(f"a bin is LO-HI in cells, e.g. 3-5; got {text!r}")
    return int(lo), int(hi)


def load_label(spec: str) -> tuple[str, set[str], dict[str, dict[int, bool]]]:
    """`LABEL=GLOB` -> (label, the reports' tasks, {report path: {seed: success}}) for every report the glob
    matches."""
    label, sep, pattern = spec.partition("=")
    if not sep or not label:
        raise SystemExit(f"--report takes LABEL=GLOB, got {spec!r}")
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SystemExit(f"--report {label}: no file matches {pattern!r}")
    tasks, outcomes = set(), {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        if "per_episode" not in report or "task" not in report:
            raise SystemExit(f"{path}: not an `rtdp eval` report (no `per_episode` or `task`)")
        tasks.add(report["task"])
        outcomes[path] = {int(e["seed"]): bool(e["success"]) for e in report["per_episode"]}
    return label, tasks, outcomes


def main() -> None:
    from envs.pointmaze import PointMazeTask, maze_name
    from evaluation.report import wilson_interval

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="append", required=True, metavar="LABEL=GLOB",
                    help="`rtdp eval` reports of one model on a pointmaze task; repeatable")
    ap.add_argument("--bins", nargs="+", type=parse_bin, default=[(0, 2), (3, 5), (6, 100)],
                    help="route lengths in cells, LO-HI inclusive")
    ap.add_argument("--out", required=True, help="writes OUT.json and OUT.png")
    args = ap.parse_args()

    loaded = [load_label(spec) for spec in args.report]
    tasks = set().union(*(tasks for _, tasks, _ in loaded))
    if len(tasks) != 1:
        raise SystemExit(f"the reports are on several tasks: {sorted(tasks)}; one task per run")
    labelled: dict[str, dict[int, bool]] = {}
    for label, _, reports in loaded:  # a label given twice pools its reports
        for path, outcomes in reports.items():
            pooled = labelled.setdefault(label, {})
            if pooled.keys() & outcomes.keys():
                raise SystemExit(f"--report {label}: {path} repeats seeds another of its reports holds "
                                 f"({sorted(pooled.keys() & outcomes.keys())[:3]}...): one run per seed")
            pooled.update(outcomes)
    env = PointMazeTask(maze_name(tasks.pop()))
    seeds = sorted(set().union(*labelled.values()))
    cells = {seed: route_cells(env, seed) for seed in seeds}
    env.close()

    table = []
    for lo, hi in args.bins:
        row = {"cells": [lo, hi]}
        for label, outcomes in labelled.items():
            hits = [outcomes[s] for s in outcomes if lo <= cells[s] <= hi]
            row[label] = {"episodes": len(hits), "successes": sum(hits),
                          "rate": sum(hits) / len(hits) if hits else None,
                          "ci95": list(wilson_interval(sum(hits), len(hits))) if hits else None}
        table.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"route_cells": {str(s): c for s, c in cells.items()},
                                                    "bins": table}, indent=2))
    for row in table:
        lo, hi = row["cells"]
        print(f"{_span(lo, hi)} cells: " + ", ".join(f"{label} {row[label]['successes']}/{row[label]['episodes']}"
                                               for label in labelled))
    _plot(table, list(labelled), out.with_suffix(".png"))


def _span(lo: int, hi: int) -> str:
    return f"{lo}+" if hi >= 100 else f"{lo}-{hi}"


def _plot(table: list[dict], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [j + i * width for j in range(len(table))]
        cells = [row[label] for row in table]
        rates = [cell["rate"] or 0.0 for cell in cells]
        # max(0, ...): Wilson's bound at a rate of 1 is 1 less a rounding error
        lows = [max(0.0, cell["rate"] - cell["ci95"][0]) if cell["ci95"] else 0.0 for cell in cells]
        highs = [max(0.0, cell["ci95"][1] - cell["rate"]) if cell["ci95"] else 0.0 for cell in cells]
        ax.bar(xs, rates, width, yerr=[lows, highs], capsize=3, label=label)
        for x, cell in zip(xs, cells, strict=True):
            ax.annotate(f"{cell['successes']}/{cell['episodes']}", (x, 0.01), ha="center", fontsize=7)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(table))])
    ax.set_xticklabels([f"{_span(*row['cells'])} cells" for row in table])
    ax.set_xlabel("route from start to goal (cells on the shortest path)")
    ax.set_ylabel("success rate (95% Wilson)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
