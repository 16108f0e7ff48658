"""`--record run.mcap`: every message in and out of the node, as ROS 2 messages in an MCAP file (the `ros2`
profile: ros2msg schemas, CDR payloads, the offered QoS in each channel's metadata), which Foxglove and
`ros2 bag` (rosbag2's MCAP storage) open."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from mcap.writer import CompressionType, Writer

from .ros_messages import definition

# rosbag2 reads a channel's QoS from its metadata: reliable, volatile, keep-last 10.
OFFERED_QOS = ("- history: 1\n  depth: 10\n  reliability: 1\n  durability: 2\n  deadline:\n    sec: 0\n    nsec: 0\n"
               "  lifespan:\n    sec: 0\n    nsec: 0\n  liveliness: 1\n  liveliness_lease_duration:\n    sec: 0\n"
               "    nsec: 0\n  avoid_ros_namespace_conventions: false\n")


class McapRecorder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")  # noqa: SIM115  closed by close()
        self._writer = Writer(self._file, compression=CompressionType.ZSTD)
        self._writer.start(profile="ros2", library="rtdp")
        self._schemas: dict[str, int] = {}
        self._channels: dict[tuple[str, str], int] = {}
        self._sequence = 0
        self._lock = threading.Lock()
        self.messages = 0

    def write(self, topic: str, msgtype: str, payload: bytes, publish_ns: int | None = None) -> None:
        """One CDR payload on `topic`; thread-safe (subscription callbacks, the loop and the inference thread all
        record)."""
        now = time.time_ns()
        with self._lock:
            if self._file.closed:
                return
            if msgtype not in self._schemas:
                self._schemas[msgtype] = self._writer.register_schema(msgtype, "ros2msg",
                                                                      definition(msgtype).encode())
            channel = self._channels.get((topic, msgtype))
            if channel is None:
                channel = self._writer.register_channel(topic, "cdr", self._schemas[msgtype],
                                                        {"offered_qos_profiles": OFFERED_QOS})
                self._channels[(topic, msgtype)] = channel
            self._sequence += 1
            self._writer.add_message(channel, log_time=now, data=payload, publish_time=publish_ns or now,
                                     sequence=self._sequence)
            self.messages += 1

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._writer.finish()
                self._file.close()
