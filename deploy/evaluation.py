"""Closed-loop evaluation of a checkpoint on its task: success with a Wilson interval, return, and the latency and
denoiser calls of every decision.

Episodes run in worker processes, one per core, each with one torch thread. A worker is started as
`python -m deploy.evaluation '<json settings>'` and sends one JSON line per episode on stdout, so nothing is
pickled across the process boundary. Episode i always runs on seed EVAL_SEED_OFFSET + seed + i, with sampler
noise seeded from the same number: results do not depend on how episodes were split among workers.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

EVAL_SEED_OFFSET = 100_000  # evaluation never reuses a demonstration seed (demos start at 0)
CALIBRATION_SEED_OFFSET = 200_000  # RTI's k0 calibration runs on episodes neither demos nor evaluation use
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class EvalSettings:
    checkpoint: str
    episodes: int = 50
    seed: int = 0
    sampler: str | None = None  # None: the checkpoint's inference config
    steps: int | None = None
    task: str | None = None  # None: the task the checkpoint was trained on
    workers: int = 0  # 0: one per core
    video_dir: str | None = None
    video_episodes: int = 3
    plot: str | None = None  # a PNG: latency histogram and per-episode outcomes
    max_episode_steps: int | None = None
    rti: dict | None = None  # policy.rti.RTIConfig fields; k0 "auto" calibrates it first (calibrate_rti)
    rti_calibration_episodes: int = 2
    rti_calibration_steps: int = 100  # each calibration episode is cut here: it runs a full denoise per step
    rti_margin: int = 1  # safety steps added to the calibrated k0
    cache: str | None = None  # bac:S | uniform:S (transformer policies; see deploy/caching.py)
    backend: str = "torch"  # deploy.backends.BACKENDS; onnxruntime ones need `rtdp export` first
    precision: str = "fp32"  # the network's: fp32 | fp16 (engines read the matching export)
    seeds: list[int] = field(default_factory=list)  # set by the orchestrator for each worker


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (sound at 0 and n successes, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def episode_seeds(seed: int, episodes: int) -> list[int]:
    return [EVAL_SEED_OFFSET + seed + i for i in range(episodes)]


def check_compatible(policy_cfg, env, checkpoint: str, task: str) -> None:
    state_dim = env.observation_space["state"].shape[0]
    action_dim = env.action_space.shape[0]
    want_image = policy_cfg.image_shape is not None
    has_image = "image" in env.observation_space.spaces
    if (policy_cfg.state_dim, policy_cfg.action_dim, want_image) != (state_dim, action_dim, has_image):
        raise ValueError(
            f"checkpoint {checkpoint} expects a {policy_cfg.state_dim}-d state, a {policy_cfg.action_dim}-d action"
            f"{' and images' if want_image else ''}; task {task} gives a {state_dim}-d state, a {action_dim}-d "
            f"action{' and images' if has_image else ''}"
        )


def resolve_task(settings: EvalSettings, run_cfg) -> str:
    task = settings.task or run_cfg.data.task
    if not task:
        raise ValueError(f"checkpoint {settings.checkpoint} does not record its task: pass --task")
    return task


# -- worker: runs its share of the episodes in this process --

class TimedPolicy:
    """Observation history (numpy) -> action chunk (numpy), recording each decision's inference time and
    denoiser calls. Sampler noise is reseeded per episode, so an episode's rollout depends on its seed alone."""

    def __init__(self, policy, sampler: str | None = None, steps: int | None = None):
        import torch

        self.policy = policy
        # A warm-starting wrapper carries its own sampler settings.
        self.overrides = {} if getattr(policy, "owns_sampler", False) else {"sampler": sampler, "steps": steps}
        self.generator = torch.Generator()
        self.latencies_ms: list[float] = []
        self.nfes: list[int] = []
        self.kinds: list[str] = []  # "full" or "warm" per decision
        self.block_evals: list[int | None] = []  # residual-branch evaluations, where a block cache counts them

    def reset(self, seed: int) -> None:
        self.generator.manual_seed(seed)
        self.latencies_ms, self.nfes, self.kinds, self.block_evals = [], [], [], []
        self.policy.reset()

    def __call__(self, history: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        obs = {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in history.items()}
        t0 = time.perf_counter()
        out = self.policy.predict_chunk(obs, generator=self.generator, **self.overrides)
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        self.nfes.append(self.policy.last_nfe)
        self.kinds.append(getattr(self.policy, "last_kind", "full"))
        self.block_evals.append(getattr(self.policy, "last_block_evals", None))
        return out["action"][0].numpy()


def _with_task(settings: EvalSettings, run_cfg) -> str:
    """The task the settings run, with the run config's discrete action dims filled in from it when missing."""
    from envs.tasks import discrete_action_dims

    task = resolve_task(settings, run_cfg)
    if run_cfg.policy.discrete_action_dims is None:  # a checkpoint from before the field existed
        run_cfg.policy.discrete_action_dims = discrete_action_dims(task)
    return task


def load_policy_for(settings: EvalSettings):
    """(policy, run config, task) without building the environment: what an inference process needs."""
    from policy.checkpoint import load_policy

    policy, run_cfg = load_policy(settings.checkpoint)
    return policy, run_cfg, _with_task(settings, run_cfg)


def load_env_for(settings: EvalSettings, max_episode_steps: int | None = None):
    """(run config, task, environment) without loading the weights: what a loop whose inference runs elsewhere
    needs. The checkpoint's shapes are checked against the environment's."""
    from policy.checkpoint import load_config_file

    run_cfg = load_config_file(settings.checkpoint)
    task = _with_task(settings, run_cfg)
    return run_cfg, task, _make_env(settings, run_cfg, task, max_episode_steps)


def _make_env(settings: EvalSettings, run_cfg, task: str, max_episode_steps: int | None):
    from envs.tasks import make_env

    image_size = run_cfg.policy.image_shape[0] if run_cfg.policy.image_shape else 96
    env = make_env(task, image=run_cfg.policy.image_shape is not None, image_size=image_size,
                   max_episode_steps=max_episode_steps or settings.max_episode_steps)
    check_compatible(run_cfg.policy, env, settings.checkpoint, task)
    return env


def _load_for_eval(settings: EvalSettings, max_episode_steps: int | None = None):
    policy, run_cfg, task = load_policy_for(settings)
    return policy, run_cfg, task, _make_env(settings, run_cfg, task, max_episode_steps)


def run_episodes(settings: EvalSettings, emit) -> None:
    import torch

    from envs.rollout import run_episode

    from .accelerations import wrap_policy

    torch.set_num_threads(1)
    policy, run_cfg, task, env = _load_for_eval(settings)
    policy = wrap_policy(policy, settings)
    video_seeds = set(episode_seeds(settings.seed, settings.episodes)[: settings.video_episodes]) \
        if settings.video_dir and hasattr(env, "render_frame") else set()
    act = TimedPolicy(policy, settings.sampler, settings.steps)
    for seed in settings.seeds:
        act.reset(seed)
        result = run_episode(env, act, run_cfg.policy.n_obs_steps, seed, record_frames=seed in video_seeds)
        video = write_video(result.frames, Path(settings.video_dir), task, seed) if result.frames else None
        emit({"seed": seed, "success": result.success, "return": result.total_return, "steps": result.steps,
              "decisions": result.decisions, "latency_ms": act.latencies_ms, "nfe": act.nfes, "kind": act.kinds,
              "block_evals": act.block_evals,
              "fallbacks": dict(getattr(act.policy, "stats", {})), "video": video})
    env.close()


def write_video(frames: list[np.ndarray], directory: Path, task: str, seed: int, fps: int = 30) -> str:
    import imageio.v2 as imageio

    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{task.replace('/', '_')}_seed{seed}"
    try:
        path = directory / f"{stem}.mp4"
        imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)
    except (ImportError, ValueError, RuntimeError):  # no ffmpeg backend: fall back to a GIF
        path = directory / f"{stem}.gif"
        imageio.mimwrite(path, frames, duration=1.0 / fps)
    return str(path)


# -- orchestrator --

def evaluate(settings: EvalSettings, progress: bool = True) -> dict:
    from tqdm import tqdm

    from policy.checkpoint import load_config_file

    from .accelerations import resolve_accelerations

    if settings.episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {settings.episodes}")
    run_cfg = load_config_file(settings.checkpoint)
    task = resolve_task(settings, run_cfg)
    settings, rti, cache = resolve_accelerations(settings, progress)
    seeds = episode_seeds(settings.seed, settings.episodes)
    workers = settings.workers or min(os.cpu_count() or 1, 2)
    workers = max(1, min(workers, settings.episodes))
    t0 = time.perf_counter()
    results: list[dict] = []
    bar = tqdm(total=settings.episodes, desc=f"eval {task}", disable=not progress, dynamic_ncols=True)

    def emit(record: dict) -> None:
        results.append(record)
        bar.update(1)
        bar.set_postfix(success=f"{np.mean([r['success'] for r in results]):.2f}")

    if workers == 1:
        run_episodes(EvalSettings(**{**asdict(settings), "seeds": seeds}), emit)
    else:
        _run_in_workers(settings, seeds, workers, emit)
    bar.close()
    report = build_report(settings, run_cfg, task, results, workers, time.perf_counter() - t0, rti, cache)
    if settings.plot:
        plot_report(report, results, Path(settings.plot))
    return report


def _run_in_workers(settings: EvalSettings, seeds: list[int], workers: int, emit) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = []
    sel = selectors.DefaultSelector()
    for w in range(workers):
        share = EvalSettings(**{**asdict(settings), "seeds": seeds[w::workers]})
        p = subprocess.Popen([sys.executable, "-m", "deploy.evaluation", json.dumps(asdict(share))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        sel.register(p.stdout, selectors.EVENT_READ, p)
        procs.append(p)
    open_streams = len(procs)
    while open_streams:
        for key, _ in sel.select():
            line = key.fileobj.readline()
            if not line:
                sel.unregister(key.fileobj)
                open_streams -= 1
            elif line.startswith("{"):
                emit(json.loads(line))
    for p in procs:
        err = p.stderr.read()
        if p.wait() != 0:
            raise RuntimeError(f"evaluation worker failed (exit {p.returncode}):\n{err[-3000:]}")


def percentiles(values, keys: tuple[str, ...] = ("p50", "p90", "p99")) -> dict[str, float]:
    """{"p50": ..., "p99": ..., "max": ...} of a sample, as every report here gives latencies; {} when empty."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {}
    return {k: float(np.percentile(values, float(k[1:]))) for k in keys} | {"max": float(values.max())}


def build_report(settings: EvalSettings, run_cfg, task: str, results: list[dict], workers: int,
                 seconds: float, rti: dict | None = None, cache: dict | None = None) -> dict:
    results = sorted(results, key=lambda r: r["seed"])
    n, wins = len(results), sum(r["success"] for r in results)
    lat = np.concatenate([r["latency_ms"] for r in results]) if results else np.zeros(1)
    nfe = np.concatenate([r["nfe"] for r in results]) if results else np.zeros(1)
    p = run_cfg.policy
    sampler = settings.sampler or p.inference.sampler
    steps = settings.steps or p.inference.steps
    report = {
        "task": task,
        "checkpoint": str(settings.checkpoint),
        "episodes": n,
        "success_rate": wins / n,
        "success_ci95": list(wilson_interval(wins, n)),
        "mean_return": float(np.mean([r["return"] for r in results])),
        "nfe_per_decision": float(nfe.mean()),
        "actions_per_decision": p.n_action_steps,
        "decisions": int(lat.size),
        "latency_ms": percentiles(lat),
        "config": {"sampler": sampler, "steps": steps, "spacing": p.inference.spacing, "eta": p.inference.eta,
                   "denoiser": p.denoiser, "backend": settings.backend,
                   "precision": settings.precision, "threads_per_worker": 1, "workers": workers,
                   "seed": settings.seed, "seeds": [EVAL_SEED_OFFSET + settings.seed, EVAL_SEED_OFFSET
                                                    + settings.seed + n - 1]},
        "seconds": seconds,
        "per_episode": [{k: v for k, v in r.items() if k not in ("latency_ms", "nfe", "kind", "block_evals")}
                        for r in results],
        "videos": [r["video"] for r in results if r.get("video")],
    }
    if rti is not None:
        kind = np.concatenate([r["kind"] for r in results]) if results else np.array([], dtype=str)
        warm = kind == "warm"
        report["actions_per_decision"] = rti["n_exec"]
        report["config"].update(sampler=rti["sampler"], steps=len(rti["tail"]), rti=rti)
        report["rti"] = {
            "warm_decisions": int(warm.sum()), "full_decisions": int((~warm).sum()),
            "nfe_per_warm_decision": float(nfe[warm].mean()) if warm.any() else None,
            "latency_warm_ms": percentiles(lat[warm]), "latency_full_ms": percentiles(lat[~warm]),
            "nan_fallbacks": sum(r["fallbacks"].get("nan_fallbacks", 0) for r in results),
            "gap_fallbacks": sum(r["fallbacks"].get("gap_fallbacks", 0) for r in results),
        }
    if p.denoiser == "transformer":
        per_call = 3 * p.transformer.n_layer
        evals = [be if be is not None else n * per_call for r in results
                 for be, n in zip(r.get("block_evals", [None] * len(r["nfe"])), r["nfe"], strict=True)]
        report["block_evals_per_decision"] = float(np.mean(evals)) if evals else 0.0
    if cache is not None:
        report["config"]["cache"] = cache
    return report


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
    return (f"{report['task']}  {method_label(report)}  success {report['success_rate']:.2f} "
            f"[{lo:.2f}, {hi:.2f}]  return {report['mean_return']:.1f}  latency p50 {report['latency_ms']['p50']:.1f}"
            f" ms p99 {report['latency_ms']['p99']:.1f} ms  calls {report['nfe_per_decision']:.0f}  "
            f"({report['episodes']} episodes, {c['workers']} workers, {report['seconds']:.0f} s){blocks}{warm}")


def _worker_main(argv: list[str]) -> int:
    settings = EvalSettings(**json.loads(argv[0]))

    def emit(record: dict) -> None:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    run_episodes(settings, emit)
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
