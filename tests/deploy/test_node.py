"""The ROS 2 node over Zenoh (deploy/node.py, zenoh_graph.py, ros_messages.py, recording.py): rmw_zenoh's wire
layout, every observation fault refused and counted without changing the node's state, the inference process
restarted, the robot leaving the graph, the lifecycle over its service, and the closed loop across processes with
`rtdp robot-sim`. Everything runs on a real Zenoh router on loopback."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zenoh
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.node import ACTION_TYPE, CHANGE_STATE, GET_STATE, ControlNode, NodeSettings, observation_topic
from deploy.ros_messages import (
    MessageError,
    change_state_request,
    decode,
    encode,
    get_state_request,
    observation_message,
    type_hash,
)
from deploy.runtime import RuntimeSettings
from deploy.zenoh_graph import (
    Attachment,
    RosNode,
    TransportError,
    ZenohSettings,
    free_endpoint,
    open_session,
    router,
    topic_key,
)
from tests.deploy.test_export import saved_policy

ROOT = Path(__file__).resolve().parents[2]
STATE = "std_msgs/msg/Float32MultiArray"


@pytest.fixture(scope="module")
def bus():
    endpoint = free_endpoint()
    session = router(ZenohSettings(router=None, listen=[endpoint]))
    yield ZenohSettings(router=endpoint)
    session.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_policy(tmp_path_factory.mktemp("node") / "policy")  # point_mass/reach: state (4,), action (2,)


def wait_for(condition, timeout=10.0):
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.02)
    return True


def test_type_hashes_and_key_expressions_are_ros2_jazzy_s():
    # The hash Jazzy's sensor_msgs publishes for JointState (ros2 topic info --verbose shows it).
    assert type_hash("sensor_msgs/msg/JointState") == \
        "RIHS01_a13ee3a330e346c9d87b5aa18d24e11690752bd33a0350f11c5882bc9179260e"
    assert topic_key(0, "/joint_states", "sensor_msgs/msg/JointState") == \
        "0/joint_states/sensor_msgs::msg::dds_::JointState_/" \
        "RIHS01_a13ee3a330e346c9d87b5aa18d24e11690752bd33a0350f11c5882bc9179260e"


def test_attachment_is_rmw_zenoh_s_keyed_serialisation():
    gid = bytes(range(16))
    raw = Attachment(7, 1_700_000_000_123_456_789, gid).encode()
    # zenoh-ext: a string is its LEB128 length then UTF-8; an int64 is 8 little-endian bytes; a buffer is
    # its length then the bytes.
    expected = (b"\x0fsequence_number" + (7).to_bytes(8, "little") + b"\x10source_timestamp" +
                (1_700_000_000_123_456_789).to_bytes(8, "little") + b"\x0asource_gid" + b"\x10" + gid)
    assert raw == expected
    assert Attachment.decode(raw) == Attachment(7, 1_700_000_000_123_456_789, gid)
    with pytest.raises(MessageError, match="gid of 5 bytes"):
        Attachment.decode(Attachment(7, 1, b"short").encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_escapes_the_decoders_as_anything_but_message_error(data):
    for msgtype in ("std_msgs/msg/Float32MultiArray", "sensor_msgs/msg/JointState", "sensor_msgs/msg/Image",
                    "lifecycle_msgs/srv/ChangeState_Request"):
        try:
            decode(data, msgtype)
        except MessageError:
            pass
    try:
        Attachment.decode(data)
    except MessageError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.binary(min_size=1, max_size=8), st.integers(0, 3))
def test_cut_or_corrupted_real_payloads_are_refused_or_decoded_never_crash(cut, noise, where):
    payload = bytearray(encode(observation_message(np.arange(4.0), "sensor_msgs/msg/JointState", 5, list("abcd"))))
    if where == 0:
        payload = payload[: cut % len(payload)]
    else:
        at = (cut * where) % len(payload)
        payload[at : at + len(noise)] = noise
    try:
        msg = decode(bytes(payload), "sensor_msgs/msg/JointState")
    except MessageError:
        return
    assert msg.__msgtype__ == "sensor_msgs/msg/JointState"


def test_an_unreachable_router_is_a_clear_error():
    with pytest.raises(TransportError, match="could not reach the router at tcp/127.0.0.1:9.*rtdp router"):
        open_session(ZenohSettings(router="tcp/127.0.0.1:9", connect_timeout_ms=500))


class Injector:
    """The test's side of the bus: publishes observations with whatever attachment a fault needs."""

    def __init__(self, bus: ZenohSettings):
        self.session = open_session(bus)
        self.ros = RosNode(self.session, "injector")
        self.key = topic_key(0, observation_topic("state"), STATE)
        self.gid = bytes(range(16))

    def send(self, value, seq: int, stamp_ns: int | None = None, key: str | None = None, payload=None,
             msgtype: str = STATE):
        payload = payload if payload is not None else encode(observation_message(np.asarray(value), msgtype, 0))
        attachment = Attachment(seq, stamp_ns or time.time_ns(), self.gid).encode()
        self.session.put(key or self.key, payload, attachment=attachment)

    def close(self):
        self.ros.close()
        self.session.close()


def node_settings(checkpoint, bus, **kw) -> NodeSettings:
    return NodeSettings(runtime=RuntimeSettings(checkpoint=str(checkpoint), sampler="ddim", steps=4), zenoh=bus, **kw)


def test_every_observation_fault_is_refused_counted_and_changes_nothing(checkpoint, bus):
    with ControlNode(node_settings(checkpoint, bus)) as node:
        assert node.transition("configure") and node.state == "inactive"
        inject = Injector(bus)
        time.sleep(0.3)
        good = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
        joint_key = topic_key(0, observation_topic("state"), "sensor_msgs/msg/JointState")
        faults = [  # (value, seq, extra, the counter it must land in)
            (good, 1, {}, "accepted"),
            (good + 1, 1, {}, "duplicate"),
            (good + 1, 0, {}, "out_of_order"),
            (good + 1, 2, {"payload": b"\x00\x01\x00\x00garbage"}, "garbage"),
            (good + 1, 2, {"key": joint_key, "msgtype": "sensor_msgs/msg/JointState"}, "wrong_type"),
            (np.ones(5, np.float32), 2, {}, "wrong_shape"),
            (np.array([0, np.nan, 0, 0], np.float32), 2, {}, "non_finite"),
            (good + 1, 2, {"stamp_ns": time.time_ns() - 2_000_000_000}, "late"),
            (good + 2, 5, {}, "accepted"),  # 2 came (refused), 3 and 4 never did: two drops
            (good + 3, 7, {}, "accepted"),
            (good + 3, 6, {}, "out_of_order"),  # 6 was reordered, not dropped
        ]
        for i, (value, seq, extra, counter) in enumerate(faults):
            before = dict(node.intake.counts)
            latest = node.intake.latest.get("state")
            inject.send(value, seq, **extra)
            assert wait_for(lambda b=before: node.intake.counts["received"] == b["received"] + 1), i
            assert node.intake.counts[counter] == before[counter] + 1, (i, counter, node.intake.counts)
            if counter != "accepted":  # a refused sample leaves the observation as it was
                assert np.array_equal(node.intake.latest["state"][0], latest[0])
        assert np.array_equal(node.intake.latest["state"][0], good + 3)
        counts = node.counters()
        assert counts["observations_dropped"] == 2 and counts["observations_out_of_order"] == 2
        assert all(counts[f"observations_{k}"] == 1 for k in ("duplicate", "garbage", "wrong_type", "wrong_shape",
                                                               "non_finite", "late"))
        inject.close()


def feed(inject: Injector, stop: threading.Event, rate_hz: float = 50.0):
    seq = 0
    while not stop.is_set():
        seq += 1
        inject.send(np.full(4, 0.1 * np.sin(seq / 10), np.float32), seq)
        time.sleep(1 / rate_hz)


def test_a_killed_inference_process_is_restarted_while_the_loop_holds(checkpoint, bus):
    with ControlNode(node_settings(checkpoint, bus)) as node:
        inject, stop = Injector(bus), threading.Event()
        threading.Thread(target=feed, args=(inject, stop), daemon=True).start()
        assert node.transition("configure") and node.transition("activate")
        assert wait_for(lambda: node.loop.stats.decisions >= 5)
        first_pid = node.decider.process.pid
        os.kill(first_pid, signal.SIGKILL)
        assert wait_for(lambda: node.decider.restarts == 1, timeout=30)
        decisions = node.loop.stats.decisions
        assert wait_for(lambda: node.loop.stats.decisions >= decisions + 5, timeout=30)  # deciding again
        stats = node.loop.stats
        assert node.decider.process.pid != first_pid and node.state == "active"
        assert stats.inference_errors >= 1 and stats.held_ticks >= 1  # the loop held meanwhile, and said so
        ticks = stats.ticks
        assert wait_for(lambda: node.loop.stats.ticks > ticks + 10)  # and never stopped ticking
        stop.set()
        inject.close()


def test_the_robot_leaving_the_graph_deactivates_the_node_which_holds(checkpoint, bus):
    robot_session = open_session(bus)
    robot = RosNode(robot_session, "fake_robot")
    actions = []
    robot.subscription("/rtdp/action", ACTION_TYPE,
                       lambda s: actions.append(np.asarray(decode(s.payload, ACTION_TYPE).position)))
    with ControlNode(node_settings(checkpoint, bus, robot_node="fake_robot")) as node:
        inject, stop = Injector(bus), threading.Event()
        threading.Thread(target=feed, args=(inject, stop), daemon=True).start()
        assert node.transition("configure") and node.transition("activate")
        assert wait_for(lambda: len(actions) > 20)
        robot.close()
        robot_session.close()
        assert wait_for(lambda: node.state == "inactive")
        assert node.counts["robot_disconnects"] == 1
        ticks = node.loop.stats.ticks
        time.sleep(0.3)
        assert node.loop.stats.ticks == ticks  # the loop stopped; the node holds
        stop.set()
        inject.close()


def test_lifecycle_over_its_service_refuses_what_a_managed_node_refuses(checkpoint, bus):
    with ControlNode(node_settings(checkpoint, bus)) as node:
        session = open_session(bus)
        client = RosNode(session, "operator")
        time.sleep(0.3)

        def change(transition):
            reply = client.call("/rtdp_policy/change_state", CHANGE_STATE, encode(change_state_request(transition)))
            return decode(reply, f"{CHANGE_STATE}_Response").success

        def state():
            reply = client.call("/rtdp_policy/get_state", GET_STATE, encode(get_state_request()))
            return decode(reply, f"{GET_STATE}_Response").current_state.label

        assert state() == "unconfigured"
        assert not change("activate")  # not from unconfigured
        assert change("configure") and state() == "inactive"
        assert not change("configure")
        reply = client.call("/rtdp_policy/change_state", CHANGE_STATE, b"garbage")
        assert not decode(reply, f"{CHANGE_STATE}_Response").success
        assert change("cleanup") and state() == "unconfigured" and change("configure")
        inject = Injector(bus)
        time.sleep(0.3)
        inject.send(np.zeros(4, np.float32), 1)
        assert wait_for(lambda: node.intake.counts["accepted"] == 1)
        time.sleep(0.2)
        assert node.intake.counts["received"] == 1  # cleanup took the first configure's subscription off the bus
        inject.close()
        assert change("shutdown") and state() == "finalized"
        assert node.counts["rejected_transitions"] == 3 and node.counts["transitions"] == 4
        client.close()
        session.close()


def test_the_node_announces_itself_as_rmw_zenoh_does(checkpoint, bus):
    session = open_session(bus)
    seen = set()  # tokens put (the history query and the live stream can both report one)
    session.liveliness().declare_subscriber(
        "@ros2_lv/0/**", lambda s: seen.add(str(s.key_expr)) if s.kind == zenoh.SampleKind.PUT else None,
        history=True)
    with ControlNode(node_settings(checkpoint, bus, name="announced")) as node:
        node.transition("configure")
        zid = str(node.session.zid())
        assert wait_for(lambda: sum(zid in k for k in seen) >= 7)
    mine = [k.split("/") for k in seen if zid in k]
    kinds = sorted(p[5] for p in mine)
    assert kinds == ["MP", "MP", "MP", "MS", "NN", "SS", "SS"]  # diagnostics, action, chunk; state; 2 services
    node_token = next(p for p in mine if p[5] == "NN")
    assert node_token[:3] == ["@ros2_lv", "0", zid] and node_token[6:] == ["%", "%", "announced"]
    action = next(p for p in mine if p[5] == "MP" and p[9] == "rtdp%action")
    assert action[10] == "sensor_msgs::msg::dds_::JointState_" and action[11] == type_hash(ACTION_TYPE)
    assert action[12] == "1:2:1,10:0,0:0,0:1,0,0"
    session.close()


def test_closed_loop_across_processes_with_faults_and_an_mcap_record(checkpoint, bus, tmp_path):
    """`rtdp node` and `rtdp robot-sim` as separate processes on the router: every injected fault is counted by the
    node, the inference process killed mid-run is restarted, the loop misses no deadline it could blame on
    them, and the MCAP file holds the run as ROS 2 messages."""
    env = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}
    mcap_path, node_report, robot_report = tmp_path / "run.mcap", tmp_path / "node.json", tmp_path / "robot.json"
    node = subprocess.Popen([sys.executable, "-m", "rtdp", "node", "--checkpoint", str(checkpoint), "--router",
                             bus.router, "--sampler", "ddim", "--steps", "4", "--record", str(mcap_path),
                             "--report", str(node_report)], cwd=ROOT, env=env)
    try:
        robot = subprocess.run([sys.executable, "-m", "rtdp", "robot-sim", "--checkpoint", str(checkpoint),
                                "--router", bus.router, "--episodes", "3", "--max-episode-steps", "80",
                                "--faults", "drop=0.1,reorder=0.05,duplicate=0.05,garbage=0.05",
                                "--kill-inference-after", "100", "--shutdown-node", "--report", str(robot_report),
                                "--no-progress"], cwd=ROOT, env=env, timeout=240)
        assert robot.returncode == 0
        assert node.wait(timeout=30) == 0
    finally:
        if node.poll() is None:
            node.kill()
    r, n = json.loads(robot_report.read_text()), json.loads(node_report.read_text())
    assert r["episodes"] == 3 and r["inference_kills"] == 1
    assert r["actions_applied"] == sum(e["steps"] for e in r["per_episode"]) > 100
    assert all(e["steps"] == 80 or e["success"] for e in r["per_episode"])
    assert n["state"] == "finalized" and n["activations"] >= 3 and n["inference_restarts"] == 1
    injected = r["faults_injected"]
    assert injected["drop"] > 0 and injected["reorder"] > 0 and injected["garbage"] > 0
    assert n["observations_garbage"] == injected["garbage"]
    assert n["observations_duplicate"] == injected["duplicate"]
    # a sample held back is sent after the next one; the run's last may still be held when it ends
    assert injected["reorder"] - 1 <= n["observations_out_of_order"] <= injected["reorder"]
    # a drop is a sequence number that never came (garbage, refused and reordered samples came); drops after the
    # run's last accepted sample are not seen
    assert injected["drop"] - 3 <= n["observations_dropped"] <= injected["drop"]

    from mcap.reader import make_reader

    with open(mcap_path, "rb") as f:
        reader = make_reader(f)
        header = reader.get_header()
        topics: dict[str, int] = {}
        for schema, channel, message in reader.iter_messages():
            assert schema.encoding == "ros2msg" and channel.message_encoding == "cdr"
            decode(message.data, schema.name)  # every recorded payload is a valid message of its schema
            topics[channel.topic] = topics.get(channel.topic, 0) + 1
    assert header.profile == "ros2"
    assert topics["/rtdp/action"] >= r["actions_applied"]
    assert topics[observation_topic("state")] == n["observations_received"] - n["observations_garbage"]
    assert topics["/rtdp/action_chunk"] >= 3 and topics["/diagnostics"] >= 1


def test_the_robot_holds_while_the_node_restarts_and_carries_on(checkpoint, bus, tmp_path):
    """The node process killed mid-episode and started again: the robot sees its liveliness go, holds, and when a
    new node appears configures and activates it and finishes its episodes."""
    env = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}
    node_cmd = [sys.executable, "-m", "rtdp", "node", "--checkpoint", str(checkpoint), "--router", bus.router,
                "--sampler", "ddim", "--steps", "4"]
    report = tmp_path / "robot.json"
    node = subprocess.Popen(node_cmd, cwd=ROOT, env=env)
    robot = subprocess.Popen([sys.executable, "-m", "rtdp", "robot-sim", "--checkpoint", str(checkpoint), "--router",
                              bus.router, "--episodes", "2", "--max-episode-steps", "300", "--shutdown-node",
                              "--report", str(report), "--no-progress"], cwd=ROOT, env=env)
    try:
        session = open_session(bus)
        actions = []
        watcher = RosNode(session, "watcher")
        watcher.subscription("/rtdp/action", ACTION_TYPE, lambda s: actions.append(1))
        assert wait_for(lambda: len(actions) > 50, timeout=60)  # the loop runs across the two processes
        node.kill()
        node.wait()
        node = subprocess.Popen(node_cmd, cwd=ROOT, env=env)
        assert robot.wait(timeout=180) == 0
        assert node.wait(timeout=30) == 0
        watcher.close()
        session.close()
    finally:
        for p in (robot, node):
            if p.poll() is None:
                p.kill()
    r = json.loads(report.read_text())
    assert r["node_returns"] == 1 and r["episodes"] == 2
    assert r["actions_applied"] == sum(e["steps"] for e in r["per_episode"])



def test_closing_while_diagnostics_publish_leaves_the_graph_cleanly(checkpoint, bus):
    # Diagnostics at 2 kHz keep their publisher busy on another thread, and a busy thread makes each put wait for
    # the GIL with the publisher borrowed: closing used to undeclare it mid-put (zenoh: "Already borrowed"),
    # leaving the session open and the process alive.
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    threading.Thread(target=spin, daemon=True).start()
    try:
        for _ in range(30):
            node = ControlNode(node_settings(checkpoint, bus, name="rtdp_closing", diagnostics_hz=2000.0))
            time.sleep(0.05)
            node.close()
            assert not node._diagnostics_thread.is_alive()
    finally:
        stop.set()
