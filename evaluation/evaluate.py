"""Closed-loop evaluation of a checkpoint on its task (`rtdp eval`).

The orchestrator builds the policy once through deploy.runtime (a bad combination of settings is refused there,
before any worker starts; RTI's k0 "auto" is calibrated first), then runs the episodes in worker processes, two
at most on this machine's cores, each with one torch thread. A worker is started as
`python -m evaluation.evaluate '<json settings>'` and sends one JSON line per episode on stdout, so nothing is
pickled across the process boundary.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from deploy.kinds import read_config
from deploy.runtime import RuntimeSettings, build_policy
from envs.tasks import discrete_action_dims
from policy.contract import PolicyFault

from .driving import expert_and_open_loop
from .episodes import episode_seeds, run_episodes
from .report import build_report, normalized_return, plot_report
from .tasks import open_env, resolve_task

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class EvalSettings:
    checkpoint: str
    episodes: int = 50
    seed: int = 0
    sampler: str | None = None  # None: the checkpoint's inference config
    steps: int | None = None
    task: str | None = None  # None: the task the checkpoint was trained on
    workers: int = 0  # 0: one per core, two at most
    video_dir: str | None = None
    video_episodes: int = 3
    plot: str | None = None  # a PNG: latency histogram and per-episode outcomes
    max_episode_steps: int | None = None
    rti: dict | None = None  # policy.rti.RTIConfig fields; k0 "auto" calibrates it first (calibrate_rti)
    rti_calibration_episodes: int = 2
    rti_calibration_steps: int = 100  # each calibration episode is cut here: it runs a full denoise per step
    rti_margin: int = 1  # safety steps added to the calibrated k0
    cache: str | None = None  # bac:S | uniform:S (transformer policies)
    backend: str = "torch"  # deploy.backends.BACKENDS; the engine ones read an export
    precision: str = "fp32"  # the network's: fp32 | fp16 | int8 (engine backends)
    export: str | None = None  # the export folder the engine backends read; None: the checkpoint's
    ort: dict | None = None  # onnxruntime session settings (deploy.backends.OrtOptions)
    open_loop: bool = True  # driving tasks: the expert on the same seeds, and the planner open-loop on its scenes
    open_loop_every: int = 5  # every k-th step of the expert's episodes is an open-loop scene
    seeds: list[int] = field(default_factory=list)  # set by the orchestrator for each worker
    target_return: float | None = None  # a return-conditioned planner's; None: the checkpoint's
    clearance: dict | None = None  # a driving planner's clearance check (planners.clearance); None: off


def runtime_settings(settings, task: str, predicted_frames: bool = False) -> RuntimeSettings:
    """What the runtime builds for these evaluation (or calibration) settings on `task`; `predicted_frames`: a
    video will show a frame-predicting model's predictions."""
    return RuntimeSettings(checkpoint=settings.checkpoint, sampler=settings.sampler, steps=settings.steps,
                           rti=settings.rti, cache=settings.cache, backend=settings.backend,
                           precision=settings.precision, export=settings.export, ort=settings.ort,
                           discrete_action_dims=discrete_action_dims(task), predicted_frames=predicted_frames,
                           target_return=getattr(settings, "target_return", None),
                           clearance=getattr(settings, "clearance", None))


def worker_episodes(settings: EvalSettings, emit) -> None:
    """A worker's share (`settings.seeds`) of the episodes, in this process."""
    import torch

    torch.set_num_threads(1)
    run_cfg = read_config(settings.checkpoint)
    task = resolve_task(settings.checkpoint, run_cfg, settings.task)
    env = open_env(settings.checkpoint, run_cfg, task, settings.max_episode_steps)
    try:
        video_seeds = set(episode_seeds(settings.seed, settings.episodes)[: settings.video_episodes]) \
            if settings.video_dir and hasattr(env, "render_frame") else set()
        shows = bool(video_seeds & set(settings.seeds))
        runtime = build_policy(runtime_settings(settings, task, predicted_frames=shows))
        run_episodes(runtime.policy, env, runtime.policy.spec.n_obs_steps, settings.seeds, task, emit,
                     settings.video_dir, video_seeds)
    finally:
        env.close()


def evaluate(settings: EvalSettings, progress: bool = True) -> dict:
    from tqdm import tqdm

    from .calibration import calibrate_rti

    if settings.episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {settings.episodes}")
    run_cfg = read_config(settings.checkpoint)
    task = resolve_task(settings.checkpoint, run_cfg, settings.task)
    calibration = None
    if settings.rti is not None and settings.rti.get("k0") == "auto":
        calibration = calibrate_rti(settings, progress)
        settings = replace(settings, rti={**settings.rti, "k0": calibration.k0})
    videos = bool(settings.video_dir) and settings.video_episodes > 0
    # validates everything before any worker starts
    runtime = build_policy(runtime_settings(settings, task, predicted_frames=videos))
    config = runtime.config
    if calibration is not None:
        config["rti"]["calibration"] = calibration.to_dict()
    spec, branches = runtime.policy.spec, runtime.branches_per_call
    driving = None
    if task.startswith("highway/") and settings.open_loop:
        driving = expert_and_open_loop(runtime, task, episode_seeds(settings.seed, settings.episodes),
                                       settings.open_loop_every, progress=progress)
    del runtime
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
        worker_episodes(replace(settings, seeds=seeds), emit)
    else:
        _run_in_workers(settings, seeds, workers, emit)
    bar.close()
    report = build_report(settings, task, results, workers, time.perf_counter() - t0, config, spec.n_action_steps,
                          branches)
    if driving is not None:
        report.update(driving)
    references = getattr(run_cfg.data, "reference_returns", None)
    if references:
        report["normalized_return"] = normalized_return(report["mean_return"], references)
        report["reference_returns"] = dict(references)
    if settings.plot:
        plot_report(report, results, Path(settings.plot))
    return report


def _run_in_workers(settings: EvalSettings, seeds: list[int], workers: int, emit) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = []
    sel = selectors.DefaultSelector()
    for w in range(workers):
        share = replace(settings, seeds=seeds[w::workers])
        p = subprocess.Popen([sys.executable, "-m", "evaluation.evaluate", json.dumps(asdict(share))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        sel.register(p.stdout, selectors.EVENT_READ, p)
        procs.append(p)
    open_streams = len(procs)
    try:
        while open_streams:
            for key, _ in sel.select():
                line = key.fileobj.readline()
                if not line:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                elif line.startswith("{"):
                    record = json.loads(line)
                    if "policy_fault" in record:
                        raise PolicyFault(record["policy_fault"])
                    emit(record)
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    for p in procs:
        err = p.stderr.read()
        if p.wait() != 0:
            last = err.strip().splitlines()[-1] if err.strip() else "no message"
            raise RuntimeError(f"evaluation worker failed (exit {p.returncode}): {last}\n{err[-3000:]}")


def _worker_main(argv: list[str]) -> int:
    settings = EvalSettings(**json.loads(argv[0]))

    def emit(record: dict) -> None:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    try:
        worker_episodes(settings, emit)
    except PolicyFault as e:  # the orchestrator names it; a traceback would only say a worker died
        emit({"policy_fault": str(e)})
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
