"""`rtdp robot-sim`: the simulator as the robot, in its own process, on the same bus as `rtdp node`.

It publishes each observation field on its topic, applies every action the node sends (one simulator step per
action, so the simulation runs at the node's rate as `rtdp control`'s SimRobot does), and drives the node's
lifecycle as an operator would: configure once, then per episode reset the scene, publish the first observation,
activate, run until success or the step limit, deactivate. Episodes use `rtdp control`'s seeds, so the success
rates of the two compare directly. While the node is gone (its liveliness token went) the robot holds; when it
comes back the robot configures and activates it again and the episode goes on.

Faults for the node's tests and benchmark are injected here, on the observations sent: drops, reordering (a
sample held back and sent after the next one), duplicates, garbage payloads, and one SIGKILL of the node's
inference process (its pid read from the node's diagnostics; same machine only).
"""

from __future__ import annotations

import datetime
import os
import platform
import queue
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from deploy.kinds import read_config
from deploy.node import ACTION_TYPE, CHANGE_STATE, DIAGNOSTICS_TYPE, GET_STATE, TopicSettings
from deploy.ros_messages import (
    MessageError,
    change_state_request,
    decode,
    encode,
    get_state_request,
    observation_message,
    stamp_ns,
)
from deploy.timing import percentiles
from deploy.zenoh_graph import Attachment, RosNode, TransportError, ZenohSettings, open_session

from .control import CONTROL_SEED_OFFSET
from .report import wilson_interval
from .tasks import open_env, resolve_task

FAULTS = ("drop", "reorder", "duplicate", "garbage")


@dataclass
class RobotSimSettings:
    checkpoint: str  # the policy the node runs: how its observations are laid out (fields, image size, task)
    task: str | None = None
    episodes: int = 5
    min_ticks: int = 0  # keep starting episodes until this many actions were applied
    seed: int = 0
    max_episode_steps: int | None = None
    node: str = "rtdp_policy"  # the policy node this robot drives
    namespace: str = ""
    name: str = "rtdp_robot_sim"
    zenoh: ZenohSettings = field(default_factory=ZenohSettings)
    topics: TopicSettings = field(default_factory=TopicSettings)
    # No usable action for this long: the robot sends its observation again, as a sensor stream would (a first
    # observation lost to a fault would otherwise leave the node nothing to answer)
    resend_after_s: float = 0.1
    action_timeout_s: float = 1.0  # no action for this long: the robot checks the node is still there
    node_wait_s: float = 120.0  # how long to wait for the node to (re)appear, or to answer a transition
    faults: dict = field(default_factory=dict)  # FAULTS -> probability per observation sent
    kill_inference_after: int | None = None  # actions applied before SIGKILL of the node's inference process
    shutdown_node: bool = False  # finalize the node when done


def parse_faults(spec: str | None) -> dict:
    """`drop=0.1,reorder=0.05,garbage=0.01` -> {"drop": 0.1, ...}."""
    out = {}
    for item in filter(None, (spec or "").split(",")):
        name, _, value = item.partition("=")
        if name not in FAULTS:
            raise ValueError(f"fault {name!r} is not one of {', '.join(FAULTS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"fault {name} needs a probability, got {value!r}") from None
        if not 0 <= out[name] <= 1:
            raise ValueError(f"fault {name} probability must lie in [0, 1], got {out[name]}")
    return out


class ObservationSender:
    """Publishes a policy observation, one topic per field, with the faults asked for."""

    def __init__(self, ros: RosNode, obs: dict, topics: TopicSettings, faults: dict, rng: np.random.Generator):
        self.faults, self.rng = faults, rng
        self.publishers = {}
        for key, value in obs.items():
            value = np.asarray(value)
            topic, msgtype = topics.field_topic(key, image=value.dtype == np.uint8 and value.ndim == 3)
            self.publishers[key] = (ros.publisher(topic, msgtype), msgtype)
        self.held: list = []  # a sample held back to go out after the next one
        self.injected = {k: 0 for k in FAULTS}

    def send(self, obs: dict) -> None:
        now = time.time_ns()
        for key, (pub, msgtype) in self.publishers.items():
            payload = encode(observation_message(obs[key], msgtype, now))
            if self._roll("drop"):
                pub.reserve()  # the sequence number is spent: the node sees the gap
                continue
            if self._roll("garbage"):
                pub.put(self.rng.bytes(int(self.rng.integers(1, 64))))
            seq = pub.reserve()
            if self._roll("reorder"):
                self.held.append((pub, payload, seq))
                continue
            pub.put(payload, seq)
            if self._roll("duplicate"):
                pub.put(payload, seq)
            while self.held:
                late_pub, late_payload, late_seq = self.held.pop()
                late_pub.put(late_payload, late_seq)

    def _roll(self, fault: str) -> bool:
        hit = self.rng.random() < self.faults.get(fault, 0.0)
        self.injected[fault] += int(hit)
        return hit


class PolicyNodeClient:
    """The policy node as the robot sees it: its liveliness, its lifecycle services, its actions and diagnostics."""

    def __init__(self, ros: RosNode, settings: RobotSimSettings):
        self.ros, self.settings = ros, settings
        base = f"{settings.namespace.rstrip('/')}/{settings.node}"
        self.change_state_srv, self.get_state_srv = f"{base}/change_state", f"{base}/get_state"
        self.alive = threading.Event()
        self.actions: queue.Queue = queue.Queue()
        self.diagnostics: dict[str, str] = {}
        ros.watch_node(settings.node, lambda up: self.alive.set() if up else self.alive.clear())
        ros.subscription(settings.topics.action, ACTION_TYPE, self._on_action)
        ros.subscription(settings.topics.diagnostics, DIAGNOSTICS_TYPE, self._on_diagnostics)

    def _on_action(self, sample) -> None:
        try:
            att = Attachment.decode(sample.attachment)
            msg = decode(sample.payload, ACTION_TYPE)
        except MessageError:
            return
        self.actions.put((stamp_ns(msg.header), np.asarray(msg.position, np.float32), sample.received_ns,
                          att.source_timestamp))

    def _on_diagnostics(self, sample) -> None:
        try:
            msg = decode(sample.payload, DIAGNOSTICS_TYPE)
        except MessageError:
            return
        if msg.status and msg.status[0].name.startswith(self.settings.node):
            self.diagnostics = {kv.key: kv.value for kv in msg.status[0].values}

    def wait_alive(self) -> None:
        if not self.alive.wait(self.settings.node_wait_s):
            raise TransportError(f"node {self.settings.node!r} did not appear on the bus within "
                                 f"{self.settings.node_wait_s:g} s (is `rtdp node` running on the same router?)")

    def state(self) -> str:
        reply = self.ros.call(self.get_state_srv, GET_STATE, encode(get_state_request()), self.settings.node_wait_s)
        return decode(reply, f"{GET_STATE}_Response").current_state.label

    def change(self, transition: str) -> bool:
        reply = self.ros.call(self.change_state_srv, CHANGE_STATE, encode(change_state_request(transition)),
                              self.settings.node_wait_s)
        return bool(decode(reply, f"{CHANGE_STATE}_Response").success)

    def bring_up(self) -> None:
        """Configured and inactive, whatever state it was found in."""
        self.wait_alive()
        state = self.state()
        if state == "active":
            self.change("deactivate")
        elif state == "unconfigured" and not self.change("configure"):
            raise RuntimeError(f"node {self.settings.node!r} refused to configure (see its log)")


def run_robot_sim(settings: RobotSimSettings, progress: bool = True) -> dict:
    run_cfg = read_config(settings.checkpoint)
    task = resolve_task(settings.checkpoint, run_cfg, settings.task)
    env = open_env(settings.checkpoint, run_cfg, task, settings.max_episode_steps)
    session = open_session(settings.zenoh)
    ros = RosNode(session, settings.name, settings.namespace, settings.zenoh.domain)
    rng = np.random.default_rng(settings.seed)
    client = PolicyNodeClient(ros, settings)
    episodes, transport_ms, answer_ms = [], [], []
    counts = {"actions_applied": 0, "action_timeouts": 0, "node_returns": 0, "stale_actions": 0,
              "resent_observations": 0, "inference_kills": 0}
    bar = tqdm(desc=f"robot-sim {task}", unit="step", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        client.bring_up()
        obs, _ = env.reset(seed=CONTROL_SEED_OFFSET + settings.seed)
        sender = ObservationSender(ros, obs, settings.topics, settings.faults, rng)
        time.sleep(0.2)  # the node's subscriptions match the new publishers
        i = 0
        while i < settings.episodes or counts["actions_applied"] < settings.min_ticks:
            seed = CONTROL_SEED_OFFSET + settings.seed + i
            obs, _ = env.reset(seed=seed)
            start_ns = time.time_ns()
            sender.send(obs)
            if not client.change("activate"):
                raise RuntimeError(f"node {settings.node!r} refused to activate")
            success, steps, done = False, 0, False
            waiting_since = time.monotonic()
            while not done:
                try:
                    stamp, action, received_ns, sent_ns = client.actions.get(timeout=settings.resend_after_s)
                    if stamp < start_ns:  # answers an observation from before this episode (a hold at deactivation)
                        counts["stale_actions"] += 1
                        raise queue.Empty
                except queue.Empty:
                    if time.monotonic() - waiting_since > settings.action_timeout_s:
                        counts["action_timeouts"] += 1
                        waiting_since = time.monotonic()
                        if not client.alive.is_set():  # the node went: hold until it is back, then go on
                            client.bring_up()
                            counts["node_returns"] += 1
                            start_ns = time.time_ns()
                            sender.send(obs)
                            client.change("activate")
                            continue
                    counts["resent_observations"] += 1
                    sender.send(obs)
                    continue
                waiting_since = time.monotonic()
                transport_ms.append((received_ns - sent_ns) / 1e6)
                answer_ms.append((received_ns - stamp) / 1e6)
                obs, _, terminated, truncated, info = env.step(action)
                steps += 1
                counts["actions_applied"] += 1
                bar.update(1)
                success = success or bool(info.get("success", False))
                done = success or terminated or truncated
                if not done:
                    sender.send(obs)
                if settings.kill_inference_after is not None and \
                        counts["actions_applied"] == settings.kill_inference_after:
                    counts["inference_kills"] += kill_inference(client)
            client.change("deactivate")
            episodes.append({"seed": seed, "success": success, "steps": steps})
            i += 1
        time.sleep(1.2)  # one more diagnostics message, with the last episode counted
        node_counters = dict(client.diagnostics)
        if settings.shutdown_node:
            client.change("shutdown")
    finally:
        bar.close()
        ros.close()
        session.close()
        env.close()
    wins = sum(e["success"] for e in episodes)
    return {
        "task": task, "checkpoint": settings.checkpoint, "episodes": len(episodes),
        "success_rate": wins / max(len(episodes), 1), "success_ci95": list(wilson_interval(wins, len(episodes))),
        **counts, "faults_injected": sender.injected, "fault_probabilities": settings.faults,
        "action_transport_ms": percentiles(transport_ms, ("p50", "p99")),
        "observation_to_action_ms": percentiles(answer_ms, ("p50", "p99")),
        "node": node_counters, "per_episode": episodes, "seconds": time.perf_counter() - t0,
        "date": datetime.date.today().isoformat(), "machine": platform.node(),
    }


def kill_inference(client: PolicyNodeClient) -> int:
    pid = client.diagnostics.get("inference_pid")
    if pid is None:
        return 0
    try:
        os.kill(int(pid), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return 0
    return 1


def robot_sim_summary(r: dict) -> str:
    n, t = r["node"], r["action_transport_ms"]
    refused = ", ".join(f"{k[len('observations_'):]} {v}" for k, v in n.items()
                        if k.startswith("observations_") and k not in ("observations_received",
                                                                       "observations_accepted") and v != "0")
    return (f"{r['task']}: success {r['success_rate']:.2f} ({r['episodes']} episodes), {r['actions_applied']} "
            f"actions; action transport p50 {t.get('p50', float('nan')):.3f} ms p99 {t.get('p99', float('nan')):.3f}"
            f" ms; node: {n.get('ticks')} ticks, {n.get('deadline_misses')} deadline misses, inference restarts "
            f"{n.get('inference_restarts')}, refused observations: {refused or 'none'}")
