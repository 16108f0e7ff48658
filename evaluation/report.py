"""An evaluation's report: success with a Wilson interval, return, and the latency, denoiser calls and branch
evaluations of every decision; its plot and its one-line summary."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from deploy.timing import percentiles
from policy.rti import REFRESH_SIGNALS

from .driving import closed_loop_figures
from .episodes import EVAL_SEED_OFFSET


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (sound at 0 and n successes, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def build_report(settings, task: str, results: list[dict], workers: int, seconds: float, config: dict,
                 actions_per_decision: int, branches_per_call: int | None = None) -> dict:
    """`config`: what the runtime built (deploy.runtime.Runtime.config); `branches_per_call`: residual branches in
    one uncached denoiser call (transformers), so uncached decisions count their branch evaluations too."""
    results = sorted(results, key=lambda r: r["seed"])
    n, wins = len(results), sum(r["success"] for r in results)
    lat = np.concatenate([r["latency_ms"] for r in results]) if results else np.zeros(1)
    nfe = np.concatenate([r["nfe"] for r in results]) if results else np.zeros(1)
    report = {
        "task": task,
        "checkpoint": str(settings.checkpoint),
        "episodes": n,
        "success_rate": wins / n,
        "success_ci95": list(wilson_interval(wins, n)),
        "mean_return": float(np.mean([r["return"] for r in results])),
        "nfe_per_decision": float(nfe.mean()),
        "actions_per_decision": actions_per_decision,
        "decisions": int(lat.size),
        "latency_ms": percentiles(lat),
        "config": {**config, "threads_per_worker": 1, "workers": workers, "seed": settings.seed,
                   "seeds": [EVAL_SEED_OFFSET + settings.seed, EVAL_SEED_OFFSET + settings.seed + n - 1]},
        "seconds": seconds,
        "per_episode": [{k: v for k, v in r.items() if k not in ("latency_ms", "nfe", "kind", "block_evals",
                                                                  "draft_steps")}
                        for r in results],
        "videos": [r["video"] for r in results if r.get("video")],
    }
    if "rti" in config:
        kind = np.concatenate([r["kind"] for r in results]) if results else np.array([], dtype=str)
        warm = kind == "warm"
        report["rti"] = {
            "warm_decisions": int(warm.sum()), "full_decisions": int((kind == "full").sum()),
            "nfe_per_warm_decision": float(nfe[warm].mean()) if warm.any() else None,
            "latency_warm_ms": percentiles(lat[warm]), "latency_full_ms": percentiles(lat[~warm]),
            "nan_fallbacks": sum(r["fallbacks"].get("nan_fallbacks", 0) for r in results),
            "gap_fallbacks": sum(r["fallbacks"].get("gap_fallbacks", 0) for r in results),
            "refreshes": int((kind == "refresh").sum()),
            "refreshes_by_signal": {s: sum(r["fallbacks"].get(f"{s}_refreshes", 0) for r in results)
                                    for s in REFRESH_SIGNALS},
        }
    if "clearance" in config:
        overrides = sum(r["fallbacks"].get("clearance_overrides", 0) for r in results)
        report["clearance"] = {**config["clearance"], "overrides": overrides,
                               "override_rate": overrides / max(int(lat.size), 1)}
    if results and all("draft_steps" in r for r in results):
        report["draft_steps_per_decision"] = float(np.mean(np.concatenate([r["draft_steps"] for r in results])))
    if results and all("metrics" in r for r in results):
        report.update(closed_loop_figures(results))
    if branches_per_call is not None:
        evals = [be if be is not None else calls * branches_per_call for r in results
                 for be, calls in zip(r["block_evals"], r["nfe"], strict=True)]
        report["block_evals_per_decision"] = float(np.mean(evals)) if evals else 0.0
    return report


def normalized_return(mean_return: float, references: dict) -> float | None:
    """D4RL's normalised score: 100 x (return - random) / (expert - random), with the dataset's references."""
    random, expert = references.get("random"), references.get("expert")
    if random is None or expert is None or expert == random:
        return None
    return 100.0 * (mean_return - random) / (expert - random)


def plot_report(report: dict, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = np.concatenate([r["latency_ms"] for r in results])
    fig, (ax_lat, ax_ep) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_lat.hist(lat, bins=40)
    for q in ("p50", "p99"):
        ax_lat.axvline(report["latency_ms"][q], color="k", ls="--" if q == "p50" else ":", label=q)
    ax_lat.set_xlabel("decision latency (ms, inference only)")
    ax_lat.set_ylabel("decisions")
    ax_lat.legend()
    results = sorted(results, key=lambda r: r["seed"])
    ax_ep.bar(range(len(results)), [r["steps"] for r in results],
              color=["tab:green" if r["success"] else "tab:red" for r in results])
    ax_ep.set_xlabel("episode (green: success)")
    ax_ep.set_ylabel("steps")
    lo, hi = report["success_ci95"]
    fig.suptitle(f"{report['task']}  {method_label(report)}: success {report['success_rate']:.2f} "
                 f"[{lo:.2f}, {hi:.2f}], {report['nfe_per_decision']:.0f} calls per decision")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def method_label(report: dict) -> str:
    c = report["config"]
    if "rti" in c:
        r = c["rti"]
        label = f"rti-{r['mode']}-k0={r['k0']}-{r['sampler']}"
        if len(r["tail"]) != r["k0"] + 1:  # a strided tail
            label += f"-{len(r['tail'])}steps"
    else:
        label = f"{c['sampler']}-{c['steps']}"
    if "cache" in c:
        label += f"+{c['cache']['kind']}:{c['cache']['budget']}"
    return label


def summary_line(report: dict) -> str:
    c = report["config"]
    lo, hi = report["success_ci95"]
    rti = report.get("rti")
    blocks = (f"  branch evals {report['block_evals_per_decision']:.0f}" if "block_evals_per_decision" in report
              else "")
    warm = (f"  warm decisions: {rti['nfe_per_warm_decision']:.0f} calls, p50 {rti['latency_warm_ms']['p50']:.1f} ms"
            if rti and rti["warm_decisions"] else "")
    if rti and rti.get("refreshes"):
        warm += f"  refreshes {rti['refreshes']}"
    if report.get("normalized_return") is not None:
        warm += f"  normalised return {report['normalized_return']:.1f}"
    if "draft_steps_per_decision" in report:
        warm += f"  draft passes {report['draft_steps_per_decision']:.0f}"
    if "collision_rate" in report:
        warm += f"  collisions {report['collision_rate']:.2f}  progress {report['progress_m']:.0f} m"
        if report.get("ade") is not None:
            warm += f"  ADE {report['ade']:.2f} m  FDE {report['fde']:.2f} m"
        if "diversity" in report:
            warm += f"  diversity {report['diversity']:.2f}"
    return (f"{report['task']}  {method_label(report)}  success {report['success_rate']:.2f} "
            f"[{lo:.2f}, {hi:.2f}]  return {report['mean_return']:.1f}  latency p50 {report['latency_ms']['p50']:.1f}"
            f" ms p99 {report['latency_ms']['p99']:.1f} ms  calls {report['nfe_per_decision']:.0f}  "
            f"({report['episodes']} episodes, {c['workers']} workers, {report['seconds']:.0f} s){blocks}{warm}")
