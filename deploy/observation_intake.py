"""The node's observation intake: every sample on an observation topic checked before it can change anything, each
refusal counted by its reason, drops told apart from reorderings by sequence number, and the newest accepted
observation per policy field handed to the loop with its stamp."""

from __future__ import annotations

import threading

import numpy as np

from .ros_messages import MessageError, decode, message_stamp_ns, observation_value
from .zenoh_graph import Attachment, Received

# These ride in the loop's observation dict beside the policy's fields and are never sent to the policy: the
# observation's stamp, and how long its slowest field took over the transport.
STAMP_KEY, TRANSPORT_KEY = "stamp_ns", "transport_ms"
GAP_MEMORY = 1000  # sequence numbers remembered per stream to tell a drop from a reordering
REFUSALS = ("garbage", "wrong_type", "wrong_shape", "non_finite", "duplicate", "out_of_order", "late")


class ObservationIntake:
    """The newest accepted observation per policy field, and a counter for every sample refused."""

    def __init__(self, fields, max_age_ms: float, record=None):
        self.fields = {f.name: f for f in fields}
        self.max_age_ns = int(max_age_ms * 1e6)
        self.record = record
        self.counts = {k: 0 for k in ("received", "accepted", "dropped", *REFUSALS)}
        self.latest: dict[str, tuple[np.ndarray, int, float]] = {}  # field -> (value, stamp ns, transport ms)
        self.transport_ms: list[float] = []  # source timestamp -> received, accepted samples
        # per (field, publisher gid): the last accepted sequence number, the numbers skipped by it that have not
        # shown up since (drops, unless a reordered sample fills one later), and numbers that came but were refused
        self._last_seq: dict[tuple[str, bytes], int] = {}
        self._missing: dict[tuple[str, bytes], set[int]] = {}
        self._refused_seqs: dict[tuple[str, bytes], set[int]] = {}
        self._keys: dict[str, tuple[str, str, str]] = {}  # field -> (key, topic, type)
        self._lock = threading.Lock()

    def expect(self, name: str, key: str, topic: str, msgtype: str) -> None:
        self._keys[name] = (key, topic, msgtype)

    def refuse(self, reason: str) -> str:
        self.counts[reason] += 1
        return reason

    def on_sample(self, name: str, sample: Received) -> str:
        """Checks one sample of field `name`; returns "accepted" or the reason it was refused. A sample that
        decodes is recorded, after the lock is let go: the loop's tick reads the intake under it."""
        with self._lock:
            outcome, recordable = self._check(name, sample)
        if recordable is not None and self.record is not None:
            self.record.write(*recordable)
        return outcome

    def _check(self, name: str, sample: Received) -> tuple[str, tuple | None]:
        """(outcome, what to record or None); called under the lock."""
        key, topic, msgtype = self._keys[name]
        self.counts["received"] += 1
        if sample.key != key:
            return self.refuse("wrong_type"), None
        try:
            att = Attachment.decode(sample.attachment)
        except MessageError:
            return self.refuse("garbage"), None
        stream = (name, att.source_gid)
        try:
            msg = decode(sample.payload, msgtype)
        except MessageError:
            self._note_refused(stream, att.sequence_number)
            return self.refuse("garbage"), None
        recordable = (topic, msgtype, sample.payload, att.source_timestamp)
        try:
            value = observation_value(msg, self.fields[name].step_shape, self.fields[name].dtype)
        except MessageError as e:
            self._note_refused(stream, att.sequence_number)
            return self.refuse("non_finite" if "NaN" in str(e) else "wrong_shape"), recordable
        last = self._last_seq.get(stream)
        if last is not None and att.sequence_number == last:
            return self.refuse("duplicate"), recordable
        if last is not None and att.sequence_number < last:
            self._arrived(stream, att.sequence_number)
            return self.refuse("out_of_order"), recordable
        stamp = message_stamp_ns(msg) or att.source_timestamp
        if sample.received_ns - stamp > self.max_age_ns:
            self._note_refused(stream, att.sequence_number)
            return self.refuse("late"), recordable
        if last is not None:
            self._count_gap(stream, last, att.sequence_number)
        self._last_seq[stream] = att.sequence_number
        transport_ms = (sample.received_ns - att.source_timestamp) / 1e6
        self.latest[name] = (value, stamp, transport_ms)
        self.transport_ms.append(transport_ms)
        self.counts["accepted"] += 1
        return "accepted", recordable

    def _count_gap(self, stream, last: int, seq: int) -> None:
        refused, missing = self._refused_seqs.get(stream, set()), self._missing.setdefault(stream, set())
        gap = [n for n in range(last + 1, min(seq, last + 1 + GAP_MEMORY)) if n not in refused]
        self.counts["dropped"] += len(gap) + max(0, seq - last - 1 - GAP_MEMORY)
        missing.update(gap)
        for numbers in (missing, refused):  # only the recent past can still show up
            numbers.difference_update([n for n in numbers if n < seq - GAP_MEMORY])

    def _note_refused(self, stream, seq: int) -> None:
        """A sample that came but was refused is not a drop. Kept only for streams with an accepted sample, and
        only the most recent: garbage with made-up publisher ids cannot grow this."""
        if stream not in self._last_seq:
            return
        refused = self._refused_seqs.setdefault(stream, set())
        refused.add(seq)
        if len(refused) > GAP_MEMORY:
            refused.difference_update(sorted(refused)[: len(refused) - GAP_MEMORY])

    def _arrived(self, stream, seq: int) -> None:
        """A late sample fills a gap: it was reordered, not dropped."""
        missing = self._missing.get(stream, set())
        if seq in missing:
            missing.discard(seq)
            self.counts["dropped"] -= 1

    def observation(self, now_ns: int) -> dict:
        """The newest observation of every field with its stamp (the oldest field's), or {} when a field has none
        younger than the age limit: the loop then holds."""
        with self._lock:
            if len(self.latest) < len(self.fields):
                return {}
            stamp = min(s for _, s, _ in self.latest.values())
            if now_ns - stamp > self.max_age_ns:
                return {}
            return {**{k: v for k, (v, _, _) in self.latest.items()}, STAMP_KEY: stamp,
                    TRANSPORT_KEY: max(t for _, _, t in self.latest.values())}
