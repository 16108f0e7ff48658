"""A ROS 2 graph participant over Zenoh, as rmw_zenoh (Jazzy and later) lays it out, so a ROS 2 graph running
rmw_zenoh sees this process's node, topics and services.

- Topic key expression: `<domain>/<topic without its leading slash>/<dds type name>/<RIHS01 type hash>`, e.g.
  `0/rtdp/action/sensor_msgs::msg::dds_::JointState_/RIHS01_a13e...`; a service is a queryable on the same shape.
- Liveliness tokens under `@ros2_lv/<domain>/<zid>/<node id>/<entity id>/<NN|MP|MS|SS|SC>/<enclave>/<namespace>/
  <node>[/<topic>/<type>/<hash>/<qos>]`, names mangled (`/` -> `%`), an empty namespace or enclave written `%`.
- Every sample carries the attachment rmw_zenoh reads: `sequence_number` (int64), `source_timestamp` (int64 ns)
  and `source_gid` (16 bytes), each after its key, in zenoh's own serialisation (zenoh.ext).
- CDR payloads (deploy/ros_messages.py).

Sessions are configured for a robot, not a shared laptop network: explicit endpoints (loopback by default), no
multicast scouting unless asked, and a clear error when the router cannot be reached.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field

import zenoh
import zenoh.ext as zext

from .ros_messages import MessageError, type_hash

ADMIN_SPACE = "@ros2_lv"
DEFAULT_ROUTER = "tcp/127.0.0.1:7447"  # where rmw_zenohd listens by default
# reliability RELIABLE(1) : durability VOLATILE(2) : history KEEP_LAST(1), depth : deadline : lifespan : liveliness
# AUTOMATIC(1), as rmw_zenoh's qos_to_keyexpr writes them (durations as sec,nsec; 0,0 the defaults).
QOS_KEEP_LAST = "1:2:1,{depth}:0,0:0,0:1,0,0"


class TransportError(RuntimeError):
    """The Zenoh session could not be opened or the peer it needs is not there."""


@dataclass
class ZenohSettings:
    router: str | None = DEFAULT_ROUTER  # endpoint connected to; None: connect to nothing (listen only)
    # endpoints this session accepts connections on; a peer with none gets no data routed to it, so a peer
    # listens on a loopback port of the system's choosing unless told otherwise
    listen: list[str] = field(default_factory=list)
    mode: str = "peer"  # "peer" as rmw_zenoh's sessions; "router" as rmw_zenohd; "client"
    multicast_scouting: bool = False
    domain: int = 0  # ROS_DOMAIN_ID
    connect_timeout_ms: int = 3000

    def config(self) -> zenoh.Config:
        if self.mode not in ("peer", "router", "client"):
            raise ValueError(f"zenoh mode must be peer, router or client, got {self.mode!r}")
        cfg = zenoh.Config()
        cfg.insert_json5("mode", json.dumps(self.mode))
        cfg.insert_json5("scouting/multicast/enabled", json.dumps(self.multicast_scouting))
        listen = self.listen or (["tcp/127.0.0.1:0"] if self.mode == "peer" else [])
        cfg.insert_json5("listen/endpoints", json.dumps(listen))
        if self.router:
            cfg.insert_json5("connect/endpoints", json.dumps([self.router]))
            cfg.insert_json5("connect/timeout_ms", json.dumps(self.connect_timeout_ms))
            cfg.insert_json5("connect/exit_on_failure", "true")
        return cfg


def open_session(settings: ZenohSettings) -> zenoh.Session:
    try:
        return zenoh.open(settings.config())
    except zenoh.ZError as e:
        where = f"the router at {settings.router}" if settings.router else f"listen on {settings.listen}"
        raise TransportError(f"zenoh could not {'reach' if settings.router else ''} {where}: {e}. Start a router "
                             f"(`rtdp router --listen {settings.router or DEFAULT_ROUTER}`, or ROS 2's `ros2 run "
                             f"rmw_zenoh_cpp rmw_zenohd`) or pass --router with its endpoint") from None


def mangle(name: str) -> str:
    return name.strip("/").replace("/", "%") or "%"


def dds_type_name(msgtype: str) -> str:
    """`sensor_msgs/msg/JointState` -> `sensor_msgs::msg::dds_::JointState_`, the type name rmw_zenoh keys on."""
    package, kind, name = msgtype.split("/")
    return f"{package}::{kind}::dds_::{name}_"


def topic_key(domain: int, topic: str, msgtype: str) -> str:
    return f"{domain}/{topic.strip('/')}/{dds_type_name(msgtype)}/{type_hash(msgtype)}"


def topic_prefix(domain: int, topic: str) -> str:
    """Every key on this topic name, whatever its type: how a message of another type is seen and counted."""
    return f"{domain}/{topic.strip('/')}/**"


@dataclass(frozen=True)
class Attachment:
    sequence_number: int
    source_timestamp: int  # ns, the publisher's system clock
    source_gid: bytes

    def encode(self) -> bytes:
        return zext.z_serialize(("sequence_number", zext.Int64(self.sequence_number), "source_timestamp",
                                 zext.Int64(self.source_timestamp), "source_gid", self.source_gid)).to_bytes()

    @classmethod
    def decode(cls, data: bytes | None) -> Attachment:
        """Parsed here with every length checked against the bytes that are there: zenoh-ext's deserialiser
        allocates whatever length a garbage buffer claims first, and an allocation of a terabyte aborts the process
        (found by this module's fuzz test)."""
        if data is None:
            raise MessageError("sample without an rmw_zenoh attachment")
        fields, pos = [], 0
        for key, kind in (("sequence_number", "int64"), ("source_timestamp", "int64"), ("source_gid", "buffer")):
            name, pos = _read_buffer(data, pos)
            if name != key.encode():
                raise MessageError(f"attachment field {name[:32]!r} where rmw_zenoh puts {key!r}")
            if kind == "int64":
                if len(data) - pos < 8:
                    raise MessageError(f"attachment cut short in {key}")
                fields.append(int.from_bytes(data[pos : pos + 8], "little", signed=True))
                pos += 8
            else:
                value, pos = _read_buffer(data, pos)
                fields.append(value)
        if len(fields[2]) != 16:
            raise MessageError(f"attachment gid of {len(fields[2])} bytes; rmw_zenoh's are 16")
        return cls(fields[0], fields[1], bytes(fields[2]))


def _read_buffer(data: bytes, pos: int) -> tuple[bytes, int]:
    """One zenoh-ext buffer or string at `pos`: its LEB128 length, then that many bytes."""
    length, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise MessageError("attachment cut short in a length prefix")
        byte = data[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    if length > len(data) - pos:
        raise MessageError(f"attachment claims {length} bytes where {len(data) - pos} remain")
    return data[pos : pos + length], pos + length


@dataclass
class Received:
    key: str
    payload: bytes
    attachment: bytes | None
    received_ns: int


class RosNode:
    """A ROS 2 node on a Zenoh session: its liveliness token, and publishers, subscriptions, services and service
    clients that announce themselves the way rmw_zenoh's do."""

    _ids = itertools.count(1)

    def __init__(self, session: zenoh.Session, name: str, namespace: str = "", domain: int = 0, enclave: str = ""):
        self.session, self.name, self.namespace, self.domain, self.enclave = session, name, namespace, domain, enclave
        self.zid = str(session.zid())
        self.node_id = next(self._ids)
        self._entity_ids = itertools.count(1)
        self._declared: list = []
        self.token = self._token("NN", self.node_id)

    def _token(self, kind: str, entity_id: int, topic: str | None = None, msgtype: str | None = None,
               depth: int = 10):
        key = (f"{ADMIN_SPACE}/{self.domain}/{self.zid}/{self.node_id}/{entity_id}/{kind}/{mangle(self.enclave)}/"
               f"{mangle(self.namespace)}/{mangle(self.name)}")
        if topic is not None:
            key += f"/{mangle(topic)}/{dds_type_name(msgtype)}/{type_hash(msgtype)}/{QOS_KEEP_LAST.format(depth=depth)}"
        token = self.session.liveliness().declare_token(key)
        self._declared.append(token)
        return token

    def gid(self, entity_id: int) -> bytes:
        return bytes.fromhex(self.zid.rjust(32, "0"))[:12] + entity_id.to_bytes(4, "little")

    def publisher(self, topic: str, msgtype: str, depth: int = 10) -> RosPublisher:
        entity_id = next(self._entity_ids)
        token = self._token("MP", entity_id, topic, msgtype, depth)
        publisher = RosPublisher(self.session.declare_publisher(topic_key(self.domain, topic, msgtype)),
                                 self.gid(entity_id), msgtype)
        self._declared.append(publisher.publisher)
        publisher.entities = [token, publisher.publisher]
        return publisher

    def subscription(self, topic: str, msgtype: str, callback, depth: int = 10) -> list:
        """`callback(Received)` for every sample on the topic name, whatever its type: the caller sees a sample
        of another type (its key differs) and counts it. Returns what `undeclare` takes."""
        token = self._token("MS", next(self._entity_ids), topic, msgtype, depth)
        subscriber = self.session.declare_subscriber(topic_prefix(self.domain, topic), lambda s: callback(
            Received(str(s.key_expr), s.payload.to_bytes(), s.attachment.to_bytes() if s.attachment else None,
                     time.time_ns())))
        self._declared.append(subscriber)
        return [token, subscriber]

    def undeclare(self, entities: list) -> None:
        """Takes a publisher's or subscription's entities off the graph (its liveliness token goes with it)."""
        for entity in entities:
            entity.undeclare()
            self._declared.remove(entity)

    def service(self, name: str, srvtype: str, handler) -> None:
        """`handler(request payload bytes) -> reply payload bytes` on a queryable, as rmw_zenoh's services."""
        entity_id = next(self._entity_ids)
        self._token("SS", entity_id, name, srvtype)
        gid, sequence = self.gid(entity_id), itertools.count(1)

        def answer(query):
            payload = query.payload.to_bytes() if query.payload is not None else b""
            reply = handler(payload)
            query.reply(query.key_expr, reply,
                        attachment=Attachment(next(sequence), time.time_ns(), gid).encode())

        self._declared.append(self.session.declare_queryable(topic_key(self.domain, name, srvtype), answer))

    def call(self, name: str, srvtype: str, request: bytes, timeout_s: float = 10.0) -> bytes:
        """A service call: the reply's payload, or a TransportError when nobody answers in time. A node's token
        can appear before its services do, so a call nobody serves yet is asked again until the time is up."""
        key = topic_key(self.domain, name, srvtype)
        deadline = time.monotonic() + timeout_s
        sequence = itertools.count(1)
        while True:
            attachment = Attachment(next(sequence), time.time_ns(), self.gid(0)).encode()
            for reply in self.session.get(key, payload=request, attachment=attachment,
                                          timeout=max(deadline - time.monotonic(), 0.01)):
                if reply.ok is not None:
                    return reply.ok.payload.to_bytes()
                raise TransportError(f"service {name} answered with an error: {reply.err.payload.to_bytes()!r}")
            if time.monotonic() >= deadline:
                raise TransportError(f"no answer from service {name} ({key}) within {timeout_s:g} s")
            time.sleep(0.1)

    def watch_node(self, node_name: str, on_change) -> None:
        """`on_change(alive: bool)` whenever a node of this name (any namespace) appears or goes; it is called
        at once with the current state."""
        key = f"{ADMIN_SPACE}/{self.domain}/*/*/*/NN/*/*/{mangle(node_name)}"
        self._declared.append(self.session.liveliness().declare_subscriber(
            key, lambda s: on_change(s.kind == zenoh.SampleKind.PUT), history=True))

    def close(self) -> None:
        for entity in reversed(self._declared):
            try:
                entity.undeclare()
            except zenoh.ZError:
                pass  # already gone with its session
        self._declared.clear()


class RosPublisher:
    def __init__(self, publisher, gid: bytes, msgtype: str):
        self.publisher, self.gid, self.msgtype = publisher, gid, msgtype
        self.entities: list = []  # what RosNode.undeclare takes
        self.sequence = 0
        self._lock = threading.Lock()

    def reserve(self) -> int:
        """The next sequence number, for a sample published later (a robot's fault injection reorders)."""
        with self._lock:
            self.sequence += 1
            return self.sequence

    def put(self, payload: bytes, sequence_number: int | None = None) -> int:
        """Publishes with the next sequence number, or the one given (reserved, or replayed)."""
        seq = self.reserve() if sequence_number is None else sequence_number
        self.publisher.put(payload, attachment=Attachment(seq, time.time_ns(), self.gid).encode())
        return seq


def router(settings: ZenohSettings) -> zenoh.Session:
    """A Zenoh router session (what rmw_zenohd runs), for a machine without ROS 2."""
    return open_session(ZenohSettings(router=None, listen=settings.listen or [DEFAULT_ROUTER], mode="router",
                                      multicast_scouting=settings.multicast_scouting, domain=settings.domain))


def free_endpoint(host: str = "127.0.0.1") -> str:
    """A loopback TCP endpoint on a port nobody holds now (tests and the benchmark start their own router)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp/{host}:{s.getsockname()[1]}"

