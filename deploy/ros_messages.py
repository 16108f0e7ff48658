"""ROS 2 messages for the node: CDR payloads and RIHS01 type hashes from rosbags' typestore (no ROS install).

Every decode goes through `decode`, which turns whatever a malformed payload raises inside the CDR reader into a
MessageError naming the type, so the node can count and drop it. Observations come in as
`std_msgs/msg/Float32MultiArray` or `sensor_msgs/msg/JointState` (low-dim) and `sensor_msgs/msg/Image` (cameras);
chunks go out as `trajectory_msgs/msg/JointTrajectory`, the current action as `sensor_msgs/msg/JointState`, the
counters as `diagnostic_msgs/msg/DiagnosticArray`; lifecycle transitions use `lifecycle_msgs/srv/ChangeState`.
"""

from __future__ import annotations

import numpy as np
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

TYPESTORE = get_typestore(Stores.ROS2_JAZZY)
# Services are not in rosbags' store: their request and response structs, and the struct ROS 2 hashes for a
# service type (REP 2011: request, response and the service event message), are registered from their definitions.
_SERVICES = {
    "lifecycle_msgs/srv/ChangeState": ("lifecycle_msgs/msg/Transition transition", "bool success"),
    "lifecycle_msgs/srv/GetState": ("", "lifecycle_msgs/msg/State current_state"),
}


def _service_types(text: str, name: str) -> dict:
    """get_types_from_msg files a struct named pkg/srv/X under pkg/srv/msg/X: put it, and its references, back."""
    def fix(node):
        if isinstance(node, str):
            return node.replace("/srv/msg/", "/srv/")
        if isinstance(node, (tuple, list)):
            return type(node)(fix(n) for n in node)
        return node
    return {fix(k): fix(v) for k, v in get_types_from_msg(text, name).items()}


for _srv, (_request, _response) in _SERVICES.items():
    TYPESTORE.register({**_service_types(_request, f"{_srv}_Request"), **_service_types(_response, f"{_srv}_Response")})
    TYPESTORE.register(_service_types(
        f"service_msgs/msg/ServiceEventInfo info\n{_srv}_Request[<=1] request\n{_srv}_Response[<=1] response",
        f"{_srv}_Event"))
    TYPESTORE.register(_service_types(
        f"{_srv}_Request request_message\n{_srv}_Response response_message\n{_srv}_Event event_message", _srv))

LOW_DIM_TYPES = ("std_msgs/msg/Float32MultiArray", "sensor_msgs/msg/JointState")
IMAGE_TYPES = ("sensor_msgs/msg/Image",)
IMAGE_ENCODINGS = {"rgb8": 3, "mono8": 1}
TRANSITIONS = {"configure": 1, "cleanup": 2, "activate": 3, "deactivate": 4, "shutdown": 5}
STATES = {"unconfigured": 1, "inactive": 2, "active": 3, "finalized": 4}


class MessageError(ValueError):
    """A payload that is not a valid message of the expected type, or whose content the node cannot use."""


def msg_class(msgtype: str):
    if msgtype not in TYPESTORE.types:
        raise MessageError(f"unknown ROS 2 message type {msgtype!r}")
    return TYPESTORE.types[msgtype]


def type_hash(msgtype: str) -> str:
    """The RIHS01 hash ROS 2 (Iron and later) puts in a topic's key expression."""
    msg_class(msgtype)
    return TYPESTORE.hash_rihs01(msgtype)


def definition(msgtype: str) -> str:
    """The concatenated .msg definition (ros2msg), as MCAP and ros2 bag store it beside a channel."""
    return TYPESTORE.generate_msgdef(msgtype, ros_version=2)[0]


def encode(msg) -> bytes:
    return bytes(TYPESTORE.serialize_cdr(msg, msg.__msgtype__))


def decode(data: bytes, msgtype: str):
    """The message in `data`, or a MessageError: truncated, padded or garbage payloads never raise anything else."""
    cls = msg_class(msgtype)
    if len(data) < 4 or data[:2] not in (b"\x00\x01", b"\x00\x00"):
        raise MessageError(f"not a CDR payload of {msgtype}: bad encapsulation header {data[:4].hex()!r}")
    try:
        msg = TYPESTORE.deserialize_cdr(data, msgtype)
    except Exception as e:  # noqa: BLE001  the CDR reader raises struct, index, unicode and assertion errors alike
        raise MessageError(f"malformed {msgtype} payload ({len(data)} bytes): {type(e).__name__}: {e}") from None
    if not isinstance(msg, cls):
        raise MessageError(f"payload decoded to {type(msg).__name__}, not {msgtype}")
    return msg


def stamp(ns: int):
    Time = msg_class("builtin_interfaces/msg/Time")  # noqa: N806
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def stamp_ns(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def header(ns: int, frame_id: str = ""):
    return msg_class("std_msgs/msg/Header")(stamp=stamp(ns), frame_id=frame_id)


def duration(seconds: float):
    ns = round(seconds * 1e9)
    return msg_class("builtin_interfaces/msg/Duration")(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def observation_message(value: np.ndarray, msgtype: str, ns: int, names: list[str] | None = None):
    """One observation field as the robot publishes it."""
    value = np.asarray(value)
    if msgtype == "std_msgs/msg/Float32MultiArray":
        Layout, Dim = msg_class("std_msgs/msg/MultiArrayLayout"), msg_class("std_msgs/msg/MultiArrayDimension")  # noqa: N806
        return msg_class(msgtype)(layout=Layout(dim=[Dim(label="state", size=value.size, stride=value.size)],
                                                data_offset=0),
                                  data=value.astype(np.float32).ravel())
    if msgtype == "sensor_msgs/msg/JointState":
        empty = np.zeros(0, np.float64)
        return msg_class(msgtype)(header=header(ns), name=list(names or []),
                                  position=value.astype(np.float64).ravel(), velocity=empty, effort=empty)
    if msgtype == "sensor_msgs/msg/Image":
        if value.ndim == 3 and value.shape[0] in (1, 3) and value.shape[-1] not in (1, 3):
            value = value.transpose(1, 2, 0)  # channels first, as a policy stores it; an Image is row-major HWC
        h, w, c = value.shape if value.ndim == 3 else (*value.shape, 1)
        return msg_class(msgtype)(header=header(ns), height=h, width=w, encoding="rgb8" if c == 3 else "mono8",
                                  is_bigendian=0, step=w * c, data=np.ascontiguousarray(value, np.uint8).ravel())
    raise MessageError(f"observations come as {', '.join(LOW_DIM_TYPES + IMAGE_TYPES)}, not {msgtype}")


def message_stamp_ns(msg) -> int | None:
    """The header stamp, for the types that carry one (Float32MultiArray has no header)."""
    return stamp_ns(msg.header) if hasattr(msg, "header") else None


def observation_value(msg, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The array a policy observes, from one message, or a MessageError naming what does not fit: the length, the
    image size or encoding, a NaN or Inf."""
    msgtype = msg.__msgtype__
    if msgtype in LOW_DIM_TYPES:
        values = np.asarray(msg.data if msgtype == "std_msgs/msg/Float32MultiArray" else msg.position)
        if values.size != int(np.prod(shape)):
            raise MessageError(f"{msgtype} carries {values.size} values, the policy observes {int(np.prod(shape))} "
                               f"(shape {list(shape)})")
        if not np.isfinite(values).all():
            raise MessageError(f"{msgtype} carries NaN or Inf")
        return values.astype(dtype).reshape(shape)
    if msgtype in IMAGE_TYPES:
        channels = IMAGE_ENCODINGS.get(msg.encoding)
        if channels is None:
            raise MessageError(f"image encoding {msg.encoding!r}; the node reads {', '.join(IMAGE_ENCODINGS)}")
        hwc = (msg.height, msg.width, channels)
        chw = (channels, msg.height, msg.width)
        if tuple(shape) not in (hwc, chw) or msg.step != msg.width * channels or \
                len(msg.data) != msg.height * msg.step:
            raise MessageError(f"image {msg.width}x{msg.height} {msg.encoding} ({len(msg.data)} bytes, step "
                               f"{msg.step}) does not fit the policy's {list(shape)}")
        image = np.asarray(msg.data, np.uint8).reshape(hwc)
        return np.ascontiguousarray(image.transpose(2, 0, 1)) if tuple(shape) == chw and chw != hwc else image
    raise MessageError(f"{msgtype} is not an observation type")


def joint_state_action(action: np.ndarray, ns: int, names: list[str]):
    """The current action as a command: positions carry the action's values, the stamp the observation it
    answers."""
    empty = np.zeros(0, np.float64)
    return msg_class("sensor_msgs/msg/JointState")(header=header(ns), name=names,
                                                    position=np.asarray(action, np.float64), velocity=empty,
                                                    effort=empty)


def trajectory(actions: np.ndarray, ns: int, period_s: float, names: list[str]):
    """An action chunk: one point per action, `time_from_start` at the control period, stamped with the
    observation it answers."""
    Point = msg_class("trajectory_msgs/msg/JointTrajectoryPoint")  # noqa: N806
    empty = np.zeros(0, np.float64)
    points = [Point(positions=np.asarray(a, np.float64), velocities=empty, accelerations=empty, effort=empty,
                    time_from_start=duration(i * period_s)) for i, a in enumerate(actions)]
    return msg_class("trajectory_msgs/msg/JointTrajectory")(header=header(ns), joint_names=names, points=points)


def trajectory_actions(msg) -> np.ndarray:
    return np.stack([np.asarray(p.positions) for p in msg.points]) if msg.points else np.zeros((0, 0))


def diagnostics(name: str, counters: dict, ns: int, level: int):
    """The node's counters as one DiagnosticStatus (level 0 OK, 1 WARN, 2 ERROR)."""
    Status, KeyValue = msg_class("diagnostic_msgs/msg/DiagnosticStatus"), msg_class("diagnostic_msgs/msg/KeyValue")  # noqa: N806
    values = [KeyValue(key=k, value=str(v)) for k, v in counters.items()]
    message = {0: "OK", 1: "faults counted", 2: "inference unavailable"}[level]
    status = Status(level=level, name=name, message=message, hardware_id="rtdp", values=values)
    return msg_class("diagnostic_msgs/msg/DiagnosticArray")(header=header(ns), status=[status])


def change_state_request(transition: str):
    if transition not in TRANSITIONS:
        raise MessageError(f"transition must be one of {', '.join(TRANSITIONS)}, got {transition!r}")
    Transition = msg_class("lifecycle_msgs/msg/Transition")  # noqa: N806
    return msg_class("lifecycle_msgs/srv/ChangeState_Request")(
        transition=Transition(id=TRANSITIONS[transition], label=transition))


def change_state_response(success: bool):
    return msg_class("lifecycle_msgs/srv/ChangeState_Response")(success=bool(success))


def get_state_request():
    return msg_class("lifecycle_msgs/srv/GetState_Request")(structure_needs_at_least_one_member=0)


def get_state_response(state: str):
    State = msg_class("lifecycle_msgs/msg/State")  # noqa: N806
    return msg_class("lifecycle_msgs/srv/GetState_Response")(current_state=State(id=STATES[state], label=state))
