"""`rtdp node`: a policy as a ROS 2 managed node over Zenoh (deploy/zenoh_graph.py speaks rmw_zenoh's layout).

    node = ControlNode(NodeSettings(runtime=RuntimeSettings(checkpoint="runs/push"), rate_hz=50))
    node.transition("configure"); node.transition("activate")   # or over the `change_state` service

Lifecycle as ROS 2 managed nodes have it: unconfigured -> (configure: the inference process started, the model
loaded, one warm-up decision) -> inactive -> (activate: the fixed-rate loop of deploy/loop.py runs) -> active ->
(deactivate: the loop stops, a safe action is held) -> inactive -> ... -> finalized. Transitions come by the
`~/change_state` service (`lifecycle_msgs/srv/ChangeState`), `~/get_state` answers the state.

Observations arrive on one topic per policy field. Each sample is checked before it can change anything: the key
(another type or type hash on the same topic name), the rmw_zenoh attachment, the CDR payload, the sequence number
per publisher (duplicates and out-of-order samples are refused, gaps counted as drops), the age of its stamp
(late samples refused), the array's length and finiteness. A refused sample changes no state; every refusal is
counted and published in the diagnostics at 1 Hz. On each tick the loop reads the newest accepted observation, or
holds a safe action when it is older than `max_observation_age_ms`. The inference process is restarted when it
dies (the loop holds meanwhile); when the robot's node leaves the graph (its liveliness token goes) the node
deactivates and holds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .inference_process import InferenceError, InferenceProcess
from .loop import ControlLoop, LoopSettings
from .observation_intake import REFUSALS, STAMP_KEY, TRANSPORT_KEY, ObservationIntake
from .recording import McapRecorder
from .ros_messages import (
    IMAGE_TYPES,
    LOW_DIM_TYPES,
    TRANSITIONS,
    MessageError,
    change_state_response,
    decode,
    diagnostics,
    encode,
    get_state_response,
    joint_state_action,
    trajectory,
)
from .runtime import RuntimeSettings, validate
from .timing import percentiles
from .zenoh_graph import RosNode, ZenohSettings, open_session, topic_key

ACTION_TYPE = "sensor_msgs/msg/JointState"
CHUNK_TYPE = "trajectory_msgs/msg/JointTrajectory"
DIAGNOSTICS_TYPE = "diagnostic_msgs/msg/DiagnosticArray"
CHANGE_STATE = "lifecycle_msgs/srv/ChangeState"
GET_STATE = "lifecycle_msgs/srv/GetState"
TRANSITION_NAMES = {v: k for k, v in TRANSITIONS.items()}  # lifecycle_msgs/Transition id -> name
# (from, transition) -> to; shutdown is allowed from every state but finalized
LIFECYCLE = {("unconfigured", "configure"): "inactive", ("inactive", "cleanup"): "unconfigured",
             ("inactive", "activate"): "active", ("active", "deactivate"): "inactive",
             ("unconfigured", "shutdown"): "finalized", ("inactive", "shutdown"): "finalized",
             ("active", "shutdown"): "finalized"}


def observation_topic(name: str) -> str:
    return f"/rtdp/observation/{name}"


@dataclass
class TopicSettings:
    # policy field -> {"topic": ..., "type": ...}; a field left out gets observation_topic(field) and
    # Float32MultiArray (low-dim) or Image (a uint8 field of 3 dims)
    observations: dict[str, dict] = field(default_factory=dict)
    action: str = "/rtdp/action"  # the current action at the loop rate (JointState positions)
    chunk: str = "/rtdp/action_chunk"  # each new chunk (JointTrajectory)
    diagnostics: str = "/diagnostics"
    joint_names: list[str] | None = None  # the action dims' names; None: a0, a1, ...

    def observation(self, f) -> tuple[str, str]:
        """(topic, message type) of a policy observation field (policy.contract.ObservationField)."""
        image = f.dtype == "uint8" and len(f.step_shape) == 3
        topic, msgtype = self.field_topic(f.name, image)
        if msgtype not in (IMAGE_TYPES if image else LOW_DIM_TYPES):
            raise ValueError(f"observation {f.name!r} (shape {list(f.step_shape)}, {f.dtype}) cannot come as "
                             f"{msgtype}; use one of {', '.join(IMAGE_TYPES if image else LOW_DIM_TYPES)}")
        return topic, msgtype

    def field_topic(self, name: str, image: bool) -> tuple[str, str]:
        """(topic, message type) a field is published on, as configured or by default: what the node subscribes
        to and the robot publishes."""
        given = self.observations.get(name, {})
        return (given.get("topic", observation_topic(name)),
                given.get("type", IMAGE_TYPES[0] if image else LOW_DIM_TYPES[0]))


@dataclass
class NodeSettings:
    runtime: RuntimeSettings
    rate_hz: float = 50.0
    name: str = "rtdp_policy"
    namespace: str = ""
    zenoh: ZenohSettings = field(default_factory=ZenohSettings)
    topics: TopicSettings = field(default_factory=TopicSettings)
    robot_node: str | None = None  # the robot's node: when its liveliness token goes, deactivate and hold
    max_observation_age_ms: float = 100.0  # an observation stamped earlier than this is late
    inference_delay_ms: float = 0.0
    threads: int = 1  # the inference process's intra-op threads
    inference_nice: int = 0  # the inference process's priority increment below the loop's (InferenceProcess)
    inference_cpus: tuple[int, ...] | None = None  # the CPUs the inference process is pinned to; None: any
    record: str | None = None  # an MCAP file of every message in and out
    diagnostics_hz: float = 1.0


class RestartingDecider:
    """An InferenceProcess that is started again when it dies: the decision in flight fails (the loop counts it
    and holds), the next one goes to the new process."""

    def __init__(self, start):
        self._start = start
        self.process: InferenceProcess = start()
        self.spec, self.config = self.process.spec, self.process.config
        self.restarts = 0
        self._lock = threading.Lock()

    def _restart_if_dead(self) -> None:
        with self._lock:
            if not self.process.alive():
                self.process.close()
                self.process = self._start()
                self.restarts += 1

    def __call__(self, history, executed):
        try:
            return self.process(history, executed)
        except InferenceError:
            self._restart_if_dead()
            raise

    def reset(self, seed: int) -> None:
        try:
            self.process.reset(seed)
        except InferenceError:
            self._restart_if_dead()
            self.process.reset(seed)

    def close(self) -> None:
        self.process.close()


class NodeRobot:
    """The robot as the fixed-rate loop sees it: the intake's newest observation in, the action out on the bus."""

    def __init__(self, node: ControlNode):
        self.node = node
        self.stop = threading.Event()
        self.stamp = 0
        self.read_ns = 0
        self.stale_ticks = 0
        self.transport_ms = 0.0
        self.tick_ms: list[float] = []  # observation read -> action published, per tick
        # the observation's transport plus the tick's work: what the bus and the node add to an action beyond the
        # wait for the tick and the inference (which ran earlier, on the worker)
        self.in_to_out_ms: list[float] = []

    def observe(self) -> dict:
        self.read_ns = time.time_ns()
        obs = self.node.intake.observation(self.read_ns)
        if obs:
            self.stamp, self.transport_ms = obs[STAMP_KEY], obs[TRANSPORT_KEY]
        else:
            self.stale_ticks += 1
        return obs

    def act(self, action: np.ndarray) -> bool:
        self.node.publish_action(action, self.stamp)
        self.tick_ms.append((time.time_ns() - self.read_ns) / 1e6)
        self.in_to_out_ms.append(self.transport_ms + self.tick_ms[-1])
        return self.stop.is_set()


class ControlNode:
    def __init__(self, settings: NodeSettings):
        validate(settings.runtime)
        self.settings = settings
        self.state = "unconfigured"
        self.counts = {"transitions": 0, "rejected_transitions": 0, "robot_disconnects": 0, "activations": 0,
                       "inference_restarts": 0}  # of inference processes since cleaned up; the live one's below
        self.session = open_session(settings.zenoh)
        self.recorder = McapRecorder(settings.record) if settings.record else None
        self.ros = RosNode(self.session, settings.name, settings.namespace, settings.zenoh.domain)
        self.decider: RestartingDecider | None = None
        self.loop: ControlLoop | None = None
        self.intake: ObservationIntake | None = None
        self.robot: NodeRobot | None = None
        self._loop_thread: threading.Thread | None = None
        self._transition_lock = threading.RLock()
        self._closed = threading.Event()
        self._finalized = threading.Event()
        self._last_action: np.ndarray | None = None
        self.loop_summary: dict | None = None
        self._endpoints: list = []  # the topics configure declared, which cleanup takes off the graph
        self.last_error: str | None = None
        base = f"{settings.namespace.rstrip('/')}/{settings.name}"
        self.ros.service(f"{base}/change_state", CHANGE_STATE, self._on_change_state)
        self.ros.service(f"{base}/get_state", GET_STATE, lambda _: encode(get_state_response(self.state)))
        self.diagnostics_pub = self.ros.publisher(settings.topics.diagnostics, DIAGNOSTICS_TYPE)
        self._diagnostics_thread = threading.Thread(target=self._diagnostics_loop, name="rtdp-diagnostics",
                                                    daemon=True)
        self._diagnostics_thread.start()
        if settings.robot_node:
            self.ros.watch_node(settings.robot_node, self._on_robot_liveliness)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def transition(self, name: str) -> bool:
        """Applies a lifecycle transition; False (and counted) when it is not allowed from the current state or
        its work failed (the state is then unchanged)."""
        with self._transition_lock:
            target = LIFECYCLE.get((self.state, name))
            if target is None:
                self.counts["rejected_transitions"] += 1
                return False
            try:
                getattr(self, f"_on_{name}")()
            except Exception as e:  # noqa: BLE001  a failed transition is answered, not raised into the bus
                self.counts["rejected_transitions"] += 1
                self.last_error = f"{name}: {type(e).__name__}: {e}"
                return False
            self.state = target
            self.counts["transitions"] += 1
            if target == "finalized":
                self._finalized.set()
            return True

    def _on_configure(self) -> None:
        s = self.settings
        self.decider = RestartingDecider(lambda: InferenceProcess(s.runtime, s.inference_delay_ms, s.threads,
                                                                       s.inference_nice, s.inference_cpus))
        spec = self.decider.spec
        self.intake = ObservationIntake(spec.observations, s.max_observation_age_ms, self.recorder)
        for f in spec.observations:
            topic, msgtype = s.topics.observation(f)
            self.intake.expect(f.name, topic_key(s.zenoh.domain, topic, msgtype), topic, msgtype)
            self._endpoints += self.ros.subscription(topic, msgtype,
                                                     lambda sample, name=f.name: self.intake.on_sample(name, sample))
        self.action_names = s.topics.joint_names or [f"a{i}" for i in range(spec.action_dim)]
        if len(self.action_names) != spec.action_dim:
            raise ValueError(f"{len(self.action_names)} joint names for a {spec.action_dim}-dim action")
        self.action_pub = self.ros.publisher(s.topics.action, ACTION_TYPE)
        self.chunk_pub = self.ros.publisher(s.topics.chunk, CHUNK_TYPE)
        self._endpoints += self.action_pub.entities + self.chunk_pub.entities
        # Warm-up: the first decision pays for allocation and graph optimisation, not the robot's first tick.
        zeros = {f.name: np.zeros(f.shape, f.dtype) for f in spec.observations}
        self.decider(zeros, None)
        self.loop = ControlLoop.for_spec(self.decider, LoopSettings(rate_hz=s.rate_hz, max_ticks=10**12), spec)

    def _on_activate(self) -> None:
        self.counts["activations"] += 1
        self.decider.reset(self.counts["activations"])
        self.robot = NodeRobot(self) if self.robot is None else self.robot
        self.robot.stop.clear()
        self._loop_thread = threading.Thread(target=self._run_loop, name="rtdp-loop", daemon=True)
        self._loop_thread.start()

    def _on_deactivate(self) -> None:
        self.robot.stop.set()
        self._loop_thread.join()
        self.publish_action(self.loop.safe_action(self._last_action), self.robot.stamp)

    def _on_cleanup(self) -> None:
        self.loop_summary = self.loop.stats.summary()  # the report keeps the loop's figures past cleanup
        self.loop.close()
        self.counts["inference_restarts"] += self.decider.restarts
        self.decider.close()
        self.ros.undeclare(self._endpoints)  # configure declares them again
        self._endpoints = []
        self.decider = self.loop = None

    def _on_shutdown(self) -> None:
        if self.state == "active":
            self._on_deactivate()
        if self.state in ("active", "inactive"):
            self._on_cleanup()

    def _run_loop(self) -> None:
        self.loop.run(self.robot, on_chunk=self.publish_chunk)

    def _on_change_state(self, payload: bytes) -> bytes:
        try:
            request = decode(payload, f"{CHANGE_STATE}_Request")
            name = TRANSITION_NAMES.get(int(request.transition.id))
        except MessageError:
            name = None
        ok = name is not None and self.transition(name)
        if name is None:
            self.counts["rejected_transitions"] += 1
        return encode(change_state_response(ok))

    def _on_robot_liveliness(self, alive: bool) -> None:
        if not alive and self.state == "active":
            self.counts["robot_disconnects"] += 1
            threading.Thread(target=self.transition, args=("deactivate",), daemon=True).start()

    # -- output ----------------------------------------------------------------------------------------------
    def publish_action(self, action: np.ndarray, stamp_ns: int) -> None:
        self._last_action = action
        payload = encode(joint_state_action(action, stamp_ns, self.action_names))
        self.action_pub.put(payload)
        if self.recorder is not None:
            self.recorder.write(self.settings.topics.action, ACTION_TYPE, payload)

    def publish_chunk(self, actions: np.ndarray, obs: dict) -> None:
        payload = encode(trajectory(actions, obs.get(STAMP_KEY, 0), 1.0 / self.settings.rate_hz,
                                    self.action_names))
        self.chunk_pub.put(payload)
        if self.recorder is not None:
            self.recorder.write(self.settings.topics.chunk, CHUNK_TYPE, payload)

    def counters(self) -> dict:
        # local references: a transition on another thread may clear these while the counters are read
        intake, decider, loop, robot = self.intake, self.decider, self.loop, self.robot
        out = {"state": self.state, **self.counts}
        if intake is not None:
            out.update({f"observations_{k}": v for k, v in intake.counts.items()})
        if decider is not None:
            out.update(inference_restarts=self.counts["inference_restarts"] + decider.restarts,
                       inference_pid=decider.process.pid, inference_alive=decider.process.alive())
        if loop is not None:
            st = loop.stats
            out.update({k: getattr(st, k) for k in ("ticks", "deadline_misses", "held_ticks", "bad_observations",
                                                     "watchdog_trips", "inference_errors", "policy_faults",
                                                     "decisions")})
        if robot is not None:
            out["stale_observation_ticks"] = robot.stale_ticks
        return out

    def _diagnostics_loop(self) -> None:
        period = 1.0 / self.settings.diagnostics_hz
        while not self._closed.wait(period):
            c = self.counters()
            faults = sum(c.get(f"observations_{k}", 0) for k in (*REFUSALS, "dropped")) + c.get("inference_errors", 0)
            level = 2 if c.get("inference_alive") is False else int(faults > 0)
            payload = encode(diagnostics(f"{self.settings.name}: control loop", c, time.time_ns(), level))
            try:
                self.diagnostics_pub.put(payload)
            except Exception:  # noqa: BLE001  the session is closing under this thread
                return
            if self.recorder is not None:
                self.recorder.write(self.settings.topics.diagnostics, DIAGNOSTICS_TYPE, payload)

    def wait_finalized(self, timeout: float | None = None) -> bool:
        return self._finalized.wait(timeout)

    def report(self) -> dict:
        """What `rtdp node --report` writes: the counters, the loop's timing and the transport's latencies."""
        out = {"name": self.settings.name, "rate_hz": self.settings.rate_hz, **self.counters(),
               "last_error": self.last_error}
        summary = self.loop.stats.summary() if self.loop is not None else self.loop_summary
        if summary is not None:
            out.update(summary)
        if self.intake is not None:
            out["observation_transport_ms"] = percentiles(self.intake.transport_ms, ("p50", "p99"))
        if self.robot is not None:
            out["tick_ms"] = percentiles(self.robot.tick_ms, ("p50", "p99"))
            out["observation_in_to_action_out_ms"] = percentiles(self.robot.in_to_out_ms, ("p50", "p99"))
        out["runtime"] = asdict(self.settings.runtime)
        out["inference_nice"] = self.settings.inference_nice
        out["inference_cpus"] = list(self.settings.inference_cpus) if self.settings.inference_cpus else None
        return out

    def close(self) -> None:
        """Shuts down (holding first if active) and leaves the graph."""
        if self.state != "finalized":
            self.transition("shutdown")
        self._closed.set()
        # A publisher in use on another thread cannot be undeclared (zenoh answers "Already borrowed"), so the
        # diagnostics thread stops before its publisher leaves the graph.
        self._diagnostics_thread.join()
        try:
            self.ros.close()
        finally:
            self.session.close()
            if self.recorder is not None:
                self.recorder.close()

    def __enter__(self) -> ControlNode:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

