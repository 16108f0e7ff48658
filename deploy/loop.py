"""A fixed-rate control loop around a chunking policy.

Every tick k has an absolute deadline t0 + k * period on the monotonic clock; the loop sleeps until shortly
before it and spins the rest, so oversleeping does not accumulate. On each tick it reads the robot, sends one
action, and goes on. Inference runs on a worker thread and computes the next chunk while the current one
executes (`rtdp control` gives that thread an InferenceProcess, deploy/inference_process.py, so it only waits on
a pipe and the loop never waits for the GIL):

- every chunk is time-stamped with the tick of the observation it was computed from; its action i belongs to
  tick obs_tick + i, so when a chunk arrives late its actions for ticks already past are skipped (latency
  compensation);
- the deadline-miss policy: while no new chunk is ready, keep executing the current one; when it runs out, hold
  a safe action (no motion, discrete dims such as a gripper kept) and count the tick as held;
- a NaN / Inf observation, or one of the wrong shape, is not sent to the policy: the loop holds a safe action
  for that tick, counts it and carries on;
- a watchdog counts inferences that run longer than `watchdog_s` (the loop keeps ticking meanwhile), and a
  decision the policy raises on is counted and reported while the loop holds;
- a chunk with a NaN or Inf action, or one the policy's own guard refused (policy.guard), is a policy fault: none
  of it is executed, the loop holds and counts it apart from the other inference errors;
- with RTI the warm start comes from the chunk actually being executed: the worker tells the policy how many
  ticks passed since the previous decision's observation (so does prefix-conditioned chunking, policy/chunking.py);
- `chunking="ensemble"`: ACT's temporal ensembling, the classical baseline. Each tick's action is the average of
  every recent chunk's action for that tick, weighted exp(-m i) with i = 0 the oldest; discrete dims (a gripper)
  take the newest chunk's command, since an average of two commands is neither;
- an anytime decider that had no time for a single step returns no actions: the loop keeps the chunk it has and
  counts the decision as skipped.

The robot is anything with `observe() -> dict` and `act(action) -> bool (done)` (evaluation.control's SimRobot
steps a simulated task at the control rate).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from policy.contract import PolicyFault

from .timing import percentiles

SPIN_S = 0.0015  # the last stretch before a deadline is busy-waited: sleep() can overshoot by about a millisecond
# An inference thread that runs the policy itself holds the GIL between torch kernels; with CPython's default 5 ms
# switch interval the loop thread can wait that long to run after its deadline. The loop shortens it while it runs
# (RTI at 50 Hz on a thread: p99 period error 1.6 ms with the default, 0.18 ms with this).
SWITCH_INTERVAL_S = 0.0002
CHUNKING = ("naive", "ensemble")


@dataclass
class LoopSettings:
    rate_hz: float = 50.0
    max_ticks: int = 10_000
    replan_every: int | None = None  # ticks between decisions; None: the policy's actions per decision
    miss_tolerance_ms: float | None = None  # a tick later than this is a deadline miss; None: half a period
    watchdog_s: float = 1.0
    chunking: str = "naive"  # naive: the newest chunk replaces the last | ensemble: ACT's temporal ensembling
    ensemble_m: float = 0.01  # ACT's exp(-m i) weights, i = 0 the oldest prediction


@dataclass
class LoopStats:
    ticks: int = 0
    deadline_misses: int = 0
    held_ticks: int = 0  # no chunk action for the tick: a safe action went out
    stale_skipped: int = 0  # chunk actions dropped because their tick had passed when the chunk arrived
    bad_observations: int = 0
    watchdog_trips: int = 0
    inference_errors: int = 0  # decisions the policy raised on: the loop held and carried on
    policy_faults: int = 0  # chunks refused before execution: non-finite or out-of-bounds actions
    skipped_decisions: int = 0  # anytime decisions whose budget did not cover one step: the chunk was kept
    last_error: str | None = None
    decisions: int = 0
    period_error_ms: list[float] = field(default_factory=list)
    inference_ms: list[float] = field(default_factory=list)
    denoiser_calls: list[int] = field(default_factory=list)  # per decision, where the decider says (anytime: steps)
    # From reading an observation to sending the first action computed from it (each adopted chunk's first
    # executed action): what the robot experiences, decision latency plus the wait for the tick that adopts it.
    reaction_ms: list[float] = field(default_factory=list)
    # |a_t - a_t-1| over the continuous dims between consecutive chunk actions: on the tick a new chunk takes over
    # (where a naive splice jumps) and on every other tick (the chunk's own smoothness)
    boundary_jumps: list[float] = field(default_factory=list)
    within_jumps: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        out = {k: getattr(self, k) for k in ("ticks", "deadline_misses", "held_ticks", "stale_skipped",
                                             "bad_observations", "watchdog_trips", "inference_errors",
                                             "policy_faults", "skipped_decisions", "last_error", "decisions")}
        out["period_error_ms"] = percentiles(self.period_error_ms or [0.0], ("p50", "p99"))
        # Decisions that never finished have no latency: no number is reported, rather than a 0 that looks fast.
        out["inference_ms"] = percentiles(self.inference_ms, ("p50", "p99")) or {"p50": None, "p99": None,
                                                                                 "max": None}
        out["reaction_ms"] = percentiles(self.reaction_ms, ("p50", "p99")) or {"p50": None, "p99": None,
                                                                               "max": None}
        out["denoiser_calls"] = ({"mean": float(np.mean(self.denoiser_calls)), "min": min(self.denoiser_calls),
                                  "max": max(self.denoiser_calls),
                                  "decisions_by_calls": {str(k): v for k, v in
                                                         sorted(Counter(self.denoiser_calls).items())}}
                                 if self.denoiser_calls else None)
        out["action_jump"] = {
            "at_chunk_boundary": float(np.mean(self.boundary_jumps)) if self.boundary_jumps else None,
            "within_chunk": float(np.mean(self.within_jumps)) if self.within_jumps else None}
        return out

    def record_error(self, error: BaseException) -> None:
        if isinstance(error, PolicyFault):
            self.policy_faults += 1
        else:
            self.inference_errors += 1
        self.last_error = f"{type(error).__name__}: {error}"

    def faults(self) -> dict[str, int]:
        """Every fault class that occurred, with its count."""
        names = {"policy_faults": "policy faults", "inference_errors": "inference errors",
                 "watchdog_trips": "watchdog trips", "bad_observations": "bad observations",
                 "deadline_misses": "deadline misses"}
        return {label: getattr(self, k) for k, label in names.items() if getattr(self, k)}


class _Chunk:
    def __init__(self, actions: np.ndarray, obs_tick: int, nfe: int | None = None):
        self.actions, self.obs_tick, self.nfe = actions, obs_tick, nfe

    def action_for(self, tick: int) -> np.ndarray | None:
        i = tick - self.obs_tick
        return self.actions[i] if 0 <= i < len(self.actions) else None


class _Ensemble:
    """The recent chunks that still cover a tick, averaged as ACT's temporal ensembling does."""

    def __init__(self, m: float, discrete_dims: list[int]):
        self.m, self.discrete_dims = m, discrete_dims
        self.chunks: deque[_Chunk] = deque()
        self.obs_tick = 0
        self.actions: list = []  # the newest chunk's, for the loop's `remaining` arithmetic

    def add(self, chunk: _Chunk) -> None:
        self.chunks.append(chunk)
        self.obs_tick, self.actions = chunk.obs_tick, chunk.actions

    def action_for(self, tick: int) -> np.ndarray | None:
        while self.chunks and self.chunks[0].action_for(tick) is None and \
                tick >= self.chunks[0].obs_tick + len(self.chunks[0].actions):
            self.chunks.popleft()  # it covers no tick from here on
        votes = [a for a in (c.action_for(tick) for c in self.chunks) if a is not None]
        if not votes:
            return None
        w = np.exp(-self.m * np.arange(len(votes)))
        action = (np.stack(votes) * (w / w.sum())[:, None]).sum(0).astype(np.float32)
        if self.discrete_dims:
            action[self.discrete_dims] = votes[-1][self.discrete_dims]
        return action


class InferenceWorker:
    """One background thread: takes the latest (history, tick) request, runs `decide(history, executed)` and
    publishes (chunk, obs_tick, ms). A request that arrives while one runs replaces any queued one."""

    def __init__(self, decide):
        self.decide = decide
        self._cv = threading.Condition()
        self._request = None
        self._result = None
        self._busy_since: float | None = None
        self._stop = False
        self._prev_tick: int | None = None
        self._episode = 0  # results of a request from an earlier episode are dropped
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rtdp-inference", daemon=True)
        self._thread.start()

    def submit(self, history: dict[str, np.ndarray], tick: int) -> None:
        with self._cv:
            self._request = (history, tick)
            self._cv.notify()

    def prime(self, history: dict[str, np.ndarray], tick: int):
        """A decision made synchronously before the clock starts (the episode's first, full denoise)."""
        t0 = time.perf_counter()
        actions = checked(self.decide(history, None))
        with self._cv:
            self._prev_tick = tick
        return self._chunk(actions, tick), (time.perf_counter() - t0) * 1e3

    def _chunk(self, actions: np.ndarray, tick: int) -> _Chunk:
        """The decider's actions, with the denoiser calls it says the decision took (ChunkDecider and
        InferenceProcess keep `last_nfe`; a plain function deciding says nothing)."""
        return _Chunk(actions, tick, getattr(self.decide, "last_nfe", None))

    def busy(self) -> bool:
        with self._cv:
            return self._request is not None or self._busy_since is not None

    def busy_for(self) -> float:
        with self._cv:
            return 0.0 if self._busy_since is None else time.monotonic() - self._busy_since

    def take_error(self) -> BaseException | None:
        with self._cv:
            error, self.error = self.error, None
            return error

    def take(self):
        with self._cv:
            result, self._result = self._result, None
            return result

    def reset(self) -> None:
        with self._cv:
            self._request, self._result, self._prev_tick = None, None, None
            self._episode += 1

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._request is None and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                (history, tick), self._request = self._request, None
                self._busy_since = time.monotonic()
                executed = None if self._prev_tick is None else tick - self._prev_tick
                episode = self._episode
            t0 = time.perf_counter()
            try:
                actions = checked(self.decide(history, executed))
            except Exception as e:  # noqa: BLE001  the loop must outlive a failing policy: it holds and reports
                error, actions = e, None
            else:
                error = None
            ms = (time.perf_counter() - t0) * 1e3
            with self._cv:
                self.error = error or self.error
                self._busy_since = None
                if actions is not None and episode == self._episode:
                    self._result = (self._chunk(actions, tick), ms)
                    if len(actions):  # a skipped decision leaves the chunk being executed, and its tick, in force
                        self._prev_tick = tick


def checked(actions) -> np.ndarray:
    """The decider's actions, or a PolicyFault: whatever decides, nothing non-finite is executed."""
    actions = np.asarray(actions)
    if actions.ndim != 2:
        raise PolicyFault(f"policy fault: the decider returned actions of shape {actions.shape}, not (steps, dims)")
    if not np.isfinite(actions).all():
        raise PolicyFault("policy fault: the decider returned NaN or Inf actions; nothing of the chunk was executed")
    return actions


def valid_observation(obs: dict, shapes: dict[str, tuple]) -> bool:
    for key, shape in shapes.items():
        v = obs.get(key)
        if v is None:
            return False
        v = np.asarray(v)
        if v.shape != shape:
            return False
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            return False
    return True


class ControlLoop:
    """Runs one episode: `run(robot)` until the robot reports done or `max_ticks`."""

    def __init__(self, decide, settings: LoopSettings, obs_shapes: dict[str, tuple], n_obs_steps: int,
                 action_dim: int, actions_per_decision: int, discrete_dims: list[int] = ()):
        self.settings = settings
        self.period = 1.0 / settings.rate_hz
        self.tolerance = (settings.miss_tolerance_ms / 1e3 if settings.miss_tolerance_ms is not None
                          else self.period / 2)
        self.obs_shapes, self.n_obs_steps = obs_shapes, n_obs_steps
        self.replan_every = settings.replan_every or actions_per_decision
        self.action_dim, self.discrete_dims = action_dim, list(discrete_dims)
        if settings.chunking not in CHUNKING:
            raise ValueError(f"loop chunking must be one of {CHUNKING} (inpaint and guidance condition the policy's "
                             f"chunks, the loop splices them naively), got {settings.chunking!r}")
        self.worker = InferenceWorker(decide)
        self.stats = LoopStats()

    @classmethod
    def for_spec(cls, decide, settings: LoopSettings, spec) -> ControlLoop:
        """A loop shaped by a policy's spec (policy.contract.PolicySpec): what it observes, how deep its history
        is, its action, actions per decision and discrete dims."""
        shapes = {f.name: f.step_shape for f in spec.observations}
        return cls(decide, settings, shapes, spec.n_obs_steps, spec.action_dim, spec.n_action_steps,
                   list(spec.discrete_action_dims))

    def safe_action(self, last: np.ndarray | None) -> np.ndarray:
        """No motion; discrete dims (a gripper) keep their last command."""
        action = np.zeros(self.action_dim, dtype=np.float32)
        if last is not None and self.discrete_dims:
            action[self.discrete_dims] = last[self.discrete_dims]
        return action

    def run(self, robot, on_tick=None, on_chunk=None) -> bool:
        """`on_tick(tick, action)` after each action is sent; `on_chunk(actions, obs)` when a chunk is adopted, with
        the observation it was computed from (a node publishes the chunk stamped with it)."""
        previous = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            return self._run(robot, on_tick, on_chunk)
        finally:
            sys.setswitchinterval(previous)

    def _run(self, robot, on_tick, on_chunk) -> bool:
        s, stats = self.settings, self.stats
        self.worker.reset()
        history: deque = deque(maxlen=self.n_obs_steps)
        chunk: _Chunk | _Ensemble | None = None
        ensemble = _Ensemble(s.ensemble_m, self.discrete_dims) if s.chunking == "ensemble" else None
        last_action: np.ndarray | None = None
        last_from_chunk = False
        continuous = [d for d in range(self.action_dim) if d not in self.discrete_dims]
        last_request = -(10**9)
        asked: dict[int, dict] = {}  # the observation each pending request was made from, by its tick
        observed_at: dict[int, float] = {}  # when each pending request's observation was read
        first = robot.observe()
        if valid_observation(first, self.obs_shapes):
            # The first chunk (a full denoise, the slow one under RTI) is computed before the clock starts, as a
            # robot would before it is switched to autonomous control.
            history.extend([first] * self.n_obs_steps)
            try:
                chunk, _ = self.worker.prime({k: np.stack([o[k] for o in history]) for k in self.obs_shapes}, 0)
                if chunk.nfe is not None:
                    stats.denoiser_calls.append(chunk.nfe)
                if on_chunk is not None:
                    on_chunk(chunk.actions, first)
                if ensemble is not None:
                    ensemble.add(chunk)
                    chunk = ensemble
                stats.decisions += 1
                last_request = 0
            except Exception as e:  # noqa: BLE001  held and reported like any failed decision
                stats.record_error(e)
            history.clear()
        watchdog_armed = True
        done = False
        t0 = time.monotonic() + self.period  # the first deadline leaves a period to start the worker
        for tick in range(s.max_ticks):
            deadline = t0 + tick * self.period
            _wait_until(deadline)
            start = time.monotonic()
            late = start - deadline
            stats.period_error_ms.append(late * 1e3)
            stats.ticks += 1
            if late > self.tolerance:
                stats.deadline_misses += 1

            result = self.worker.take()
            reacting_to = None  # the observation time of a chunk adopted on this tick
            adopted = False
            if result is not None:
                new, ms = result
                stats.inference_ms.append(ms)
                if new.nfe is not None:
                    stats.denoiser_calls.append(new.nfe)
                stats.decisions += 1
                if len(new.actions) == 0:
                    stats.skipped_decisions += 1
                else:
                    adopted = True
                    reacting_to = observed_at.get(new.obs_tick)
                    stats.stale_skipped += max(0, tick - new.obs_tick)
                    if ensemble is not None:
                        ensemble.add(new)
                        new = ensemble
                    chunk = new
                    if on_chunk is not None and new.obs_tick in asked:
                        on_chunk(new.actions, asked[new.obs_tick])
                asked = {k: v for k, v in asked.items() if k > new.obs_tick}
                observed_at = {k: v for k, v in observed_at.items() if k > new.obs_tick}
                watchdog_armed = True
            error = self.worker.take_error()
            if error is not None:
                stats.record_error(error)

            obs = robot.observe()
            read_at = time.monotonic()
            good = valid_observation(obs, self.obs_shapes)
            if good:
                if not history:
                    history.extend([obs] * self.n_obs_steps)
                else:
                    history.append(obs)
            else:
                stats.bad_observations += 1

            action = chunk.action_for(tick) if chunk is not None and good else None
            action_from_chunk = action is not None
            if action is None:
                action = self.safe_action(last_action)
                stats.held_ticks += 1
            elif last_from_chunk:
                jump = float(np.abs(action[continuous] - last_action[continuous]).max()) if continuous else 0.0
                (stats.boundary_jumps if adopted else stats.within_jumps).append(jump)
            last_action, last_from_chunk = action, action_from_chunk

            remaining = (chunk.obs_tick + len(chunk.actions) - tick) if chunk is not None else 0
            if good and not self.worker.busy() and (tick - last_request >= self.replan_every or remaining <= 1):
                self.worker.submit({k: np.stack([o[k] for o in history]) for k in self.obs_shapes}, tick)
                last_request = tick
                observed_at[tick] = read_at
                if on_chunk is not None:
                    asked[tick] = obs
            if self.worker.busy_for() > s.watchdog_s and watchdog_armed:
                stats.watchdog_trips += 1
                watchdog_armed = False

            done = robot.act(action)
            if reacting_to is not None and action_from_chunk:
                stats.reaction_ms.append((time.monotonic() - reacting_to) * 1e3)
            if on_tick is not None:
                on_tick(tick, action)
            if done:
                break
        return done

    def close(self) -> None:
        self.worker.close()


def _wait_until(deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining > SPIN_S:
        time.sleep(remaining - SPIN_S)
    while time.monotonic() < deadline:
        pass

