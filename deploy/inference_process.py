"""Inference in its own process, so the control loop's thread never waits for the GIL.

On a worker thread, the sampler's Python (a DDIM-10 decision steps through it ten times) competes for the GIL
with the loop; CPython hands it over only every switch interval, and the loop's ticks start late (p99 3.4 ms at
50 Hz on the 2-core benchmark machine). Here the policy runs in a child process; the loop's worker thread only
waits on a pipe, which holds no GIL.

`InferenceProcess(settings)` is a drop-in for `ChunkDecider` (deploy/decider.py): `__call__(history, executed)`,
`reset(seed)`, `spec`, `config`, plus `close()`. `nice` lowers the child's scheduling priority below the loop's
(POSIX nice increment): on a machine with fewer cores than busy processes, a tick or a transport callback that
wakes while a decision computes then takes the core at once instead of waiting out the decision's time slice.
`cpus` pins the child to those CPUs (Linux), so that the loop and the transport, pinned elsewhere, never share a
core with a decision.
It talks to the child over stdin / stdout in explicit messages, never pickle:

    message = one line of JSON (the header), then header["nbytes"] bytes of payload
    arrays  = header["arrays"]: [{"name", "dtype", "shape"}], their C-order bytes concatenated in the payload

    -> {"op": "start", "settings": {...RuntimeSettings}, "inference_delay_ms": float}
                                                           <- {"ok": true, "spec": {...PolicySpec}, "config": {...}}
    -> {"op": "decide", "executed": int | null, arrays}    <- {"ok": true, "ms": float, arrays: [actions]}
    -> {"op": "reset", "seed": int}                        <- {"ok": true}
    -> {"op": "close"}                                     (the child exits)
    any failure                                            <- {"ok": false, "error": "Type: message",
                                                               "fault": "policy" | "inference"}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from policy.contract import PolicyFault, PolicySpec

from .decider import ChunkDecider
from .runtime import RuntimeSettings

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float64", "int64", "int32", "uint8", "bool")
MAX_HEADER_BYTES = 1 << 16
MAX_PAYLOAD_BYTES = 1 << 28  # 256 MiB: far above any observation history or chunk
MAX_DIMS = 8


class ProtocolError(ValueError):
    """A message that does not follow the schema above."""


class InferenceError(RuntimeError):
    """The inference process failed a request, or is gone."""


def write_message(stream, header: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
    arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    for name, a in arrays.items():
        if a.dtype.name not in DTYPES:
            raise ProtocolError(f"array {name!r} has dtype {a.dtype}; messages carry {', '.join(DTYPES)}")
    header = {**header, "arrays": [{"name": k, "dtype": a.dtype.name, "shape": list(a.shape)}
                                   for k, a in arrays.items()],
              "nbytes": sum(a.nbytes for a in arrays.values())}
    # Every byte is laid out before the first is written: a message that fails half-written would leave the stream
    # out of step, and the reader would take the next reply for this one's (an anytime decision with no steps
    # returns zero actions, which memoryview cannot cast).
    payload = [a.reshape(-1).view(np.uint8) for a in arrays.values()]
    stream.write(json.dumps(header).encode() + b"\n")
    for data in payload:
        stream.write(data)
    stream.flush()


def read_message(stream) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(header, arrays), or None at the end of the stream. Everything a header claims is checked before anything
    is allocated or read: its size and nesting, every array spec (dtype, shape, size without overflow) and the
    payload length against the arrays it declares. A bad message is a ProtocolError, never a crash."""
    line = stream.readline(MAX_HEADER_BYTES + 1)
    if not line:
        return None
    if not line.endswith(b"\n"):
        raise ProtocolError(f"header longer than {MAX_HEADER_BYTES} bytes or cut short")
    try:
        header = json.loads(line)
    except RecursionError:
        raise ProtocolError("header nests too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict) or type(header.get("nbytes")) is not int or not isinstance(
            header.get("arrays", []), list):
        raise ProtocolError(f"header needs an integer 'nbytes' and an 'arrays' list, got {str(header)[:200]}")
    nbytes = header["nbytes"]
    if not 0 <= nbytes <= MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {nbytes} bytes is out of range [0, {MAX_PAYLOAD_BYTES}]")
    specs, declared = [], 0
    for spec in header.get("arrays", []):
        specs.append(_array_spec(spec))
        declared += specs[-1][3]
        if declared > nbytes:
            raise ProtocolError(f"array {specs[-1][0]!r} runs past the {nbytes}-byte payload")
    if declared != nbytes:  # refused before a byte of the payload is awaited or allocated
        raise ProtocolError(f"arrays take {declared} bytes of a {nbytes}-byte payload")
    payload, got = bytearray(nbytes), 0  # a bytearray, so the arrays that view it are writable
    while got < nbytes:
        n = stream.readinto(memoryview(payload)[got:])
        if not n:
            raise ProtocolError(f"payload cut short: {got} of {nbytes} bytes")
        got += n
    arrays, offset = {}, 0
    for name, dtype, shape, size in specs:
        arrays[name] = np.frombuffer(payload, dtype, count=size // dtype.itemsize, offset=offset).reshape(shape)
        offset += size
    return header, arrays


def _array_spec(spec) -> tuple[str, np.dtype, tuple[int, ...], int]:
    """(name, dtype, shape, bytes) of one array spec, or a ProtocolError naming what is wrong."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or spec.get("dtype") not in DTYPES \
            or not isinstance(spec.get("shape"), list) or len(spec["shape"]) > MAX_DIMS \
            or not all(type(d) is int and d >= 0 for d in spec["shape"]):
        raise ProtocolError(f"bad array spec {str(spec)[:200]}: needs a name, a dtype among {', '.join(DTYPES)} and "
                            f"a shape of at most {MAX_DIMS} non-negative integers")
    dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
    size = dtype.itemsize
    for d in shape:  # Python integers: no overflow, however large the claim
        size *= d
    if size > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"array {spec['name']!r} of shape {list(shape)} would take {size} bytes, more than "
                            f"{MAX_PAYLOAD_BYTES}")
    return spec["name"], dtype, shape, size


def check_cpus(cpus: Sequence[int] | None) -> tuple[int, ...] | None:
    """The CPUs an inference process may be pinned to, checked: None (no pinning) or CPU numbers of this machine."""
    if cpus is None:
        return None
    cpus = tuple(int(c) for c in cpus)
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("pinning the inference process to CPUs needs sched_setaffinity (Linux)")
    count = os.cpu_count() or 1
    if not cpus or any(not 0 <= c < count for c in cpus):
        raise ValueError(f"inference CPUs must be CPU numbers from 0 to {count - 1}, got {list(cpus)}")
    return cpus


class InferenceProcess:
    """A ChunkDecider in a child process. Calls are serialised: `reset` between episodes waits for a decision
    still in flight instead of interleaving with it."""

    def __init__(self, settings: RuntimeSettings, inference_delay_ms: float = 0.0, threads: int = 1,
                 nice: int = 0, cpus: Sequence[int] | None = None):
        if not 0 <= nice <= 19:
            raise ValueError(f"nice is a POSIX priority increment from 0 to 19, got {nice}")
        cpus = check_cpus(cpus)
        settings = replace(settings, checkpoint=str(Path(settings.checkpoint).resolve()),
                           export=str(Path(settings.export).resolve()) if settings.export else None)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self._proc = subprocess.Popen([sys.executable, "-m", "deploy.inference_process", str(threads), str(nice),
                                       ",".join(map(str, cpus or ()))],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._lock = threading.Lock()
        self.last_nfe: int | None = None  # the child's denoiser calls for the last decision
        try:
            started = self._request({"op": "start", "settings": asdict(settings),
                                     "inference_delay_ms": float(inference_delay_ms)})[0]
            self.spec, self.config = PolicySpec.from_dict(started["spec"]), started["config"]
        except InferenceError:
            self.close()
            raise

    def _request(self, header: dict, arrays: dict | None = None) -> tuple[dict, dict]:
        with self._lock:
            try:
                write_message(self._proc.stdin, header, arrays)
                reply = read_message(self._proc.stdout)
            except (BrokenPipeError, OSError):
                reply = None
            if reply is None:
                code = self._proc.poll()
                raise InferenceError(f"the inference process exited (code {code}); its stderr is above")
            if not reply[0].get("ok"):
                if reply[0].get("fault") == "policy":
                    raise PolicyFault(str(reply[0].get("error")))
                raise InferenceError(f"inference process: {reply[0].get('error')}")
            return reply

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def __call__(self, history: dict[str, np.ndarray], executed: int | None) -> np.ndarray:
        header, arrays = self._request({"op": "decide", "executed": executed}, history)
        self.last_nfe = header.get("nfe")
        return arrays["actions"]

    def reset(self, seed: int) -> None:
        self._request({"op": "reset", "seed": int(seed)})

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                write_message(self._proc.stdin, {"op": "close"})
                self._proc.stdin.close()
                self._proc.wait(timeout=5.0)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()


def serve(requests, replies, threads: int) -> None:
    decider = None
    while True:
        try:
            message = read_message(requests)
        except ProtocolError as e:
            write_message(replies, {"ok": False, "error": f"ProtocolError: {e}"})
            return  # the stream is out of step: nothing after this can be trusted
        if message is None:
            return
        header, arrays = message
        op = header.get("op")
        try:
            if op == "close":
                return
            if op == "start":
                decider = ChunkDecider(RuntimeSettings(**header["settings"]), header.get("inference_delay_ms", 0.0),
                                       threads=threads)
                write_message(replies, {"ok": True, "spec": decider.spec.to_dict(), "config": decider.config})
            elif decider is None:
                raise ProtocolError(f"{op!r} before 'start'")
            elif op == "decide":
                executed = header.get("executed")
                if executed is not None and not isinstance(executed, int):
                    raise ProtocolError(f"'executed' must be an integer or null, got {executed!r}")
                t0 = time.perf_counter()
                actions = decider(arrays, executed)
                ms = (time.perf_counter() - t0) * 1e3
                write_message(replies, {"ok": True, "ms": ms, "nfe": decider.last_nfe},
                              {"actions": actions.astype(np.float32)})
            elif op == "reset":
                decider.reset(int(header["seed"]))
                write_message(replies, {"ok": True})
            else:
                raise ProtocolError(f"unknown op {op!r}")
        except Exception as e:  # noqa: BLE001  a failed request is answered, and the process serves on
            write_message(replies, {"ok": False, "error": f"{type(e).__name__}: {e}",
                                    "fault": "policy" if isinstance(e, PolicyFault) else "inference"})


def main(argv: list[str]) -> int:
    threads = int(argv[0]) if argv else 1
    if len(argv) > 1 and int(argv[1]) and hasattr(os, "nice"):  # no priority increments on Windows
        os.nice(int(argv[1]))
    if len(argv) > 2 and argv[2]:
        os.sched_setaffinity(0, {int(c) for c in argv[2].split(",")})
    # The protocol owns the real stdout; anything the libraries print goes to stderr instead.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, replies, threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
