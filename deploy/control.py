"""`rtdp control`: a checkpoint driving a simulated robot under the fixed-rate loop (deploy/loop.py), with the
simulator stepped once per tick, and the loop's timing report."""

from __future__ import annotations

import datetime
import platform
import threading
import time
from dataclasses import dataclass

import numpy as np

from .accelerations import rti_config
from .evaluation import EvalSettings, wilson_interval
from .loop import ControlLoop, LoopSettings, SimRobot

WORKERS = ("process", "thread")
CONTROL_SEED_OFFSET = 300_000  # control episodes use their own seeds, apart from demos, evaluation, calibration


@dataclass
class ControlSettings:
    checkpoint: str
    rate_hz: float = 50.0
    episodes: int = 5
    min_ticks: int = 0  # keep starting episodes until this many ticks ran (the 10,000-tick benchmark)
    seed: int = 0
    sampler: str | None = None
    steps: int | None = None
    rti: dict | None = None
    backend: str = "torch"
    precision: str = "fp32"
    replan_every: int | None = None
    inference_delay_ms: float = 0.0  # added to every decision: how the loop copes with a slow policy
    bad_obs_every: int = 0  # corrupt every n-th observation with NaN (tests the hold-and-report path)
    max_episode_steps: int | None = None
    # "process": inference in its own process, so the loop never waits for the GIL; "thread": in this one.
    worker: str = "process"


class _CorruptingRobot(SimRobot):
    def __init__(self, env, seed: int, every: int):
        super().__init__(env, seed)
        self.every, self.calls = every, 0

    def observe(self) -> dict:
        self.calls += 1
        if self.every and self.calls % self.every == 0:
            return {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in self.obs.items()}
        return self.obs


class ChunkDecider:
    """Observation history (numpy, `n_obs_steps` deep) -> the chunk of actions to execute from that observation's
    tick on: the settings' policy on its backend, with RTI when asked. The same object runs on the loop's worker
    thread or inside an inference process (deploy/inference_process.py)."""

    def __init__(self, settings: ControlSettings, threads: int = 1):
        import torch

        from .evaluation import load_policy_for

        torch.set_num_threads(threads)
        es = _eval_settings(settings)
        policy, run_cfg, _ = load_policy_for(es)
        if settings.backend != "torch":
            from .backends import BackendPolicy, make_backend

            policy = BackendPolicy(policy, make_backend(settings.backend, policy, settings.checkpoint,
                                                        threads=threads, precision=settings.precision))
        self.rti = None
        if settings.rti is not None:
            from policy.rti import RTIPolicy

            self.rti = RTIPolicy(policy, rti_config(es))
        self.policy, self.settings = policy, settings
        self.start = run_cfg.policy.n_obs_steps - 1
        self.generator = torch.Generator()
        self._lock = threading.Lock()  # reset() between episodes waits for a decision still in flight

    def reset(self, seed: int) -> None:
        """A new episode: sampler noise reseeded, RTI's warm start dropped."""
        with self._lock:
            self.generator.manual_seed(seed)
            if self.rti is not None:
                self.rti.reset()

    def describe(self) -> dict | None:
        return self.rti.describe() if self.rti is not None else None

    def __call__(self, history: dict[str, np.ndarray], executed: int | None) -> np.ndarray:
        with self._lock:
            return self._decide(history, executed)

    def _decide(self, history: dict[str, np.ndarray], executed: int | None) -> np.ndarray:
        import torch

        obs = {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in history.items()}
        if self.rti is not None:
            out = self.rti.predict_chunk(obs, executed=executed, generator=self.generator)
            actions = out["action_pred"][:, self.start:]
            if self.rti.discrete_dims:
                actions = self.rti.binarize(actions)
        else:
            actions = self.policy.predict_chunk(obs, sampler=self.settings.sampler, steps=self.settings.steps,
                                                generator=self.generator)["action_pred"][:, self.start:]
        if self.settings.inference_delay_ms:
            time.sleep(self.settings.inference_delay_ms / 1e3)
        return actions[0].numpy()


def _eval_settings(settings: ControlSettings) -> EvalSettings:
    return EvalSettings(checkpoint=settings.checkpoint, sampler=settings.sampler, steps=settings.steps,
                        rti=settings.rti, max_episode_steps=settings.max_episode_steps, backend=settings.backend,
                        precision=settings.precision)


def run_control(settings: ControlSettings, progress: bool = True) -> dict:
    from tqdm import tqdm

    from .evaluation import load_env_for

    if settings.worker not in WORKERS:
        raise ValueError(f"worker must be one of {WORKERS}, got {settings.worker!r}")
    run_cfg, task, env = load_env_for(_eval_settings(settings))  # the weights are loaded by the decider alone
    try:
        if settings.worker == "process":
            from .inference_process import InferenceProcess

            decider = InferenceProcess(settings)
        else:
            decider = ChunkDecider(settings)
    except Exception:
        env.close()
        raise
    p = run_cfg.policy
    rti = decider.describe()
    shapes = {k: tuple(space.shape) for k, space in env.observation_space.spaces.items()}
    discrete = (rti["discrete_dims"] if rti is not None else p.discrete_action_dims) or []
    loop = ControlLoop(decider, LoopSettings(rate_hz=settings.rate_hz, replan_every=settings.replan_every
                                             or (1 if rti is not None else p.n_action_steps)),
                       shapes, p.n_obs_steps, p.action_dim, p.n_action_steps, discrete)
    episodes = []
    bar = tqdm(desc=f"control {task} @ {settings.rate_hz:g} Hz", unit="tick", disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        i = 0
        while i < settings.episodes or loop.stats.ticks < settings.min_ticks:
            seed = CONTROL_SEED_OFFSET + settings.seed + i
            decider.reset(seed)
            robot = _CorruptingRobot(env, seed, settings.bad_obs_every)
            before = loop.stats.ticks
            loop.settings.max_ticks = env.max_episode_steps
            loop.run(robot)
            bar.update(loop.stats.ticks - before)
            episodes.append({"seed": seed, "success": robot.success, "ticks": loop.stats.ticks - before})
            i += 1
    finally:
        loop.close()
        if settings.worker == "process":
            decider.close()
        bar.close()
        env.close()
    wins = sum(e["success"] for e in episodes)
    return {
        "task": task, "checkpoint": settings.checkpoint, "rate_hz": settings.rate_hz,
        **loop.stats.summary(),
        "success_rate": wins / len(episodes), "success_ci95": list(wilson_interval(wins, len(episodes))),
        "episodes": len(episodes),
        "config": {"sampler": settings.sampler or p.inference.sampler, "steps": settings.steps or p.inference.steps,
                   "rti": rti, "backend": settings.backend, "precision": settings.precision,
                   "worker": settings.worker,
                   "replan_every": loop.replan_every, "inference_delay_ms": settings.inference_delay_ms,
                   "bad_obs_every": settings.bad_obs_every, "miss_tolerance_ms": loop.tolerance * 1e3},
        "per_episode": episodes, "seconds": time.perf_counter() - t0,
        "date": datetime.date.today().isoformat(), "machine": platform.node(),
    }


def control_summary(r: dict) -> str:
    pe, inf = r["period_error_ms"], r["inference_ms"]
    return (f"{r['task']} @ {r['rate_hz']:g} Hz: {r['ticks']} ticks, {r['deadline_misses']} deadline misses, "
            f"period error p50 {pe['p50']:.3f} p99 {pe['p99']:.3f} max {pe['max']:.3f} ms, inference p50 "
            f"{inf['p50']:.1f} p99 {inf['p99']:.1f} ms, held {r['held_ticks']}, stale skipped {r['stale_skipped']},"
            f" bad observations {r['bad_observations']}, success {r['success_rate']:.2f} ({r['episodes']} episodes)")
