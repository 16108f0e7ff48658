"""`rtdp control`: a checkpoint driving a simulated robot under the fixed-rate loop (deploy/loop.py), with the
simulator stepped once per tick, and the loop's timing report. The policy is built by deploy.runtime (any kind,
any sampler, RTI, block cache, backend), in its own process by default."""

from __future__ import annotations

import datetime
import platform
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from deploy.decider import ChunkDecider
from deploy.inference_process import InferenceProcess
from deploy.kinds import read_config
from deploy.loop import ControlLoop, LoopSettings
from deploy.runtime import RuntimeSettings, validate
from envs.tasks import discrete_action_dims

from .report import wilson_interval
from .tasks import open_env, resolve_task

WORKERS = ("process", "thread")
CHUNKING = ("naive", "ensemble", "inpaint", "guidance")
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
    cache: str | None = None
    backend: str = "torch"
    precision: str = "fp32"
    export: str | None = None
    ort: dict | None = None  # onnxruntime session settings (deploy.backends.OrtOptions)
    replan_every: int | None = None  # ticks between decisions; None: the policy's actions per decision
    inference_delay_ms: float = 0.0  # added to every decision: how the loop copes with a slow policy
    bad_obs_every: int = 0  # corrupt every n-th observation with NaN (tests the hold-and-report path)
    max_episode_steps: int | None = None
    task: str | None = None
    # "process": inference in its own process, so the loop never waits for the GIL; "thread": in this one.
    worker: str = "process"
    target_return: float | None = None  # a return-conditioned planner's; None: the checkpoint's
    clearance: dict | None = None  # a driving planner's clearance check (planners.clearance); None: off
    inference_nice: int = 0  # the inference process's priority increment below the loop's (InferenceProcess)
    inference_cpus: tuple[int, ...] | None = None  # the CPUs the inference process is pinned to; None: any
    # naive: the newest chunk replaces the last; ensemble: ACT's temporal ensembling in the loop; inpaint |
    # guidance: each chunk denoised with the actions that run during its decision held (policy/chunking.py)
    chunking: str = "naive"
    anytime: bool = False  # each decision gets the steps that fit before the actions it has run out
    anytime_mode: str = "truncate"  # truncate: the chain stopped early | respace: a shorter chain, chosen up front
    anytime_budget_ms: float | None = None  # a cap on every decision's budget

    def runtime(self, task: str) -> RuntimeSettings:
        if self.chunking not in CHUNKING:
            raise ValueError(f"chunking must be one of {CHUNKING}, got {self.chunking!r}")
        period_ms = 1e3 / self.rate_hz
        chunking = ({"method": self.chunking, "period_ms": period_ms, "added_latency_ms": self.inference_delay_ms}
                    if self.chunking in ("inpaint", "guidance") else None)
        return RuntimeSettings(checkpoint=self.checkpoint, sampler=self.sampler, steps=self.steps, rti=self.rti,
                               cache=self.cache, backend=self.backend, precision=self.precision, export=self.export,
                               ort=self.ort, discrete_action_dims=discrete_action_dims(task), chunking=chunking,
                               anytime=self.anytime_settings(period_ms), target_return=self.target_return,
                               clearance=self.clearance)

    def anytime_settings(self, period_ms: float) -> dict | None:
        if not self.anytime:
            return None
        out = {"period_ms": period_ms, "mode": self.anytime_mode}
        if self.anytime_budget_ms is not None:
            out["max_budget_ms"] = self.anytime_budget_ms
        return out


class SimRobot:
    """A gymnasium task as the robot: `act` steps the simulator once per tick."""

    def __init__(self, env, seed: int):
        self.env = env
        self.obs, _ = env.reset(seed=seed)
        self.success = False
        self.steps = 0

    def observe(self) -> dict:
        return self.obs

    def act(self, action: np.ndarray) -> bool:
        self.obs, _, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        self.success = self.success or bool(info.get("success", False))
        return self.success or terminated or truncated


class CorruptingRobot(SimRobot):
    """A SimRobot whose every n-th observation is NaN: the loop must hold and count it, never pass it on."""

    def __init__(self, env, seed: int, every: int):
        super().__init__(env, seed)
        self.every, self.calls = every, 0

    def observe(self) -> dict:
        self.calls += 1
        if self.every and self.calls % self.every == 0:
            return {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in self.obs.items()}
        return self.obs


def run_control(settings: ControlSettings, progress: bool = True) -> dict:
    if settings.worker not in WORKERS:
        raise ValueError(f"worker must be one of {WORKERS}, got {settings.worker!r}")
    run_cfg = read_config(settings.checkpoint)  # the weights are loaded by the decider alone
    task = resolve_task(settings.checkpoint, run_cfg, settings.task)
    runtime = settings.runtime(task)
    validate(runtime)
    env = open_env(settings.checkpoint, run_cfg, task, settings.max_episode_steps)
    try:
        if settings.worker == "process":
            decider = InferenceProcess(runtime, settings.inference_delay_ms, nice=settings.inference_nice,
                                       cpus=settings.inference_cpus)
        else:
            decider = ChunkDecider(runtime, settings.inference_delay_ms)
    except Exception:
        env.close()
        raise
    spec = decider.spec
    loop_chunking = "ensemble" if settings.chunking == "ensemble" else "naive"
    loop = ControlLoop.for_spec(decider, LoopSettings(rate_hz=settings.rate_hz, replan_every=settings.replan_every,
                                                      chunking=loop_chunking), spec)
    episodes = []
    bar = tqdm(desc=f"control {task} @ {settings.rate_hz:g} Hz", unit="tick", disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        i = 0
        while i < settings.episodes or loop.stats.ticks < settings.min_ticks:
            seed = CONTROL_SEED_OFFSET + settings.seed + i
            decider.reset(seed)
            robot = CorruptingRobot(env, seed, settings.bad_obs_every)
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
        **loop.stats.summary(), "faults": loop.stats.faults(),
        "success_rate": wins / len(episodes), "success_ci95": list(wilson_interval(wins, len(episodes))),
        "episodes": len(episodes),
        "config": {**decider.config, "rti": decider.config.get("rti"), "worker": settings.worker,
                   "inference_nice": settings.inference_nice if settings.worker == "process" else None,
                   "inference_cpus": list(settings.inference_cpus)
                   if settings.inference_cpus and settings.worker == "process" else None,
                   "replan_every": loop.replan_every, "inference_delay_ms": settings.inference_delay_ms,
                   "chunking": settings.chunking, "anytime": decider.config.get("anytime"),
                   "bad_obs_every": settings.bad_obs_every, "miss_tolerance_ms": loop.tolerance * 1e3},
        "per_episode": episodes, "seconds": time.perf_counter() - t0,
        "date": datetime.date.today().isoformat(), "machine": platform.node(),
    }


def control_summary(r: dict) -> str:
    pe, inf = r["period_error_ms"], r["inference_ms"]
    latency = (f"inference p50 {inf['p50']:.1f} p99 {inf['p99']:.1f} ms" if inf["p50"] is not None
               else "no decision finished")
    reaction = r.get("reaction_ms") or {}
    if reaction.get("p50") is not None:
        latency += f", reaction p50 {reaction['p50']:.1f} p99 {reaction['p99']:.1f} ms"
    jump = r.get("action_jump") or {}
    if jump.get("at_chunk_boundary") is not None and jump.get("within_chunk") is not None:
        latency += (f", action jump at chunk boundaries {jump['at_chunk_boundary']:.3f} vs "
                    f"{jump['within_chunk']:.3f} within")
    faults = ", ".join(f"{label} {n}" for label, n in r["faults"].items()) or "none"
    return (f"{r['task']} @ {r['rate_hz']:g} Hz: {r['ticks']} ticks, {r['deadline_misses']} deadline misses, "
            f"period error p50 {pe['p50']:.3f} p99 {pe['p99']:.3f} max {pe['max']:.3f} ms, {latency}, "
            f"held {r['held_ticks']}, stale skipped {r['stale_skipped']}, bad observations {r['bad_observations']}"
            + (f", skipped decisions {r['skipped_decisions']}" if r.get("skipped_decisions") else "")
            + f", success {r['success_rate']:.2f} ({r['episodes']} episodes); faults: {faults}"
            + (f" (last: {r['last_error']})" if r["last_error"] else ""))
