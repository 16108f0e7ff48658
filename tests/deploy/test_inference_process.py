"""Inference in its own process (deploy/inference_process.py): its message schema, decisions that equal the
in-process decider's bit for bit, and failures that come back as errors the loop can count instead of crashes."""

import io
import os

import numpy as np
import pytest

from deploy.decider import ChunkDecider
from deploy.inference_process import InferenceError, InferenceProcess, ProtocolError, read_message, write_message
from deploy.runtime import RuntimeSettings
from tests.deploy.test_export import saved_policy


def test_messages_round_trip_arrays_exactly():
    stream = io.BytesIO()
    state = np.random.default_rng(0).normal(size=(2, 39))
    write_message(stream, {"op": "decide", "executed": 3}, {"state": state, "flag": np.array([1, 0], np.uint8)})
    stream.seek(0)
    header, arrays = read_message(stream)
    assert header["op"] == "decide" and header["executed"] == 3
    assert arrays["state"].dtype == np.float64 and np.array_equal(arrays["state"], state)
    assert arrays["flag"].tolist() == [1, 0] and arrays["state"].flags.writeable
    assert read_message(stream) is None  # the end of the stream


def test_an_empty_chunk_round_trips_and_the_next_message_stays_in_step():
    # an anytime decision with no time for a step returns zero actions; the reply once broke off after its header
    stream = io.BytesIO()
    write_message(stream, {"ok": True}, {"actions": np.zeros((0, 4), np.float32)})
    write_message(stream, {"ok": True, "next": 1}, {"actions": np.ones((2, 4), np.float32)})
    stream.seek(0)
    header, arrays = read_message(stream)
    assert arrays["actions"].shape == (0, 4) and header["nbytes"] == 0
    header, arrays = read_message(stream)
    assert header["next"] == 1 and arrays["actions"].sum() == 8


@pytest.mark.parametrize("raw, complaint", [
    (b"not json\n", "not JSON"),
    (b'{"arrays": []}\n', "integer 'nbytes'"),
    (b'{"nbytes": 16, "arrays": [{"name": "a", "dtype": "float64", "shape": [2]}]}\n' + b"x" * 5,
     "cut short: 5 of 16"),
    (b'{"nbytes": 16, "arrays": []}\n', "take 0 bytes of a 16-byte"),  # refused before waiting for a payload
    (b'{"nbytes": 1073741824, "arrays": []}\n', "out of range"),
    (b'{"nbytes": 8, "arrays": [{"name": "a", "dtype": "uint8", "shape": [4294967296, 4294967296]}]}\n',
     "would take 18446744073709551616 bytes"),
    (b"[" * 30000 + b"]" * 30000 + b"\n", "nests too deeply|longer than"),
    (b'{"nbytes": 8, "arrays": [{"name": "a", "dtype": "float64", "shape": [2]}]}\n' + b"x" * 8, "runs past"),
    (b'{"nbytes": 8, "arrays": [{"name": "a", "dtype": "object", "shape": [1]}]}\n' + b"x" * 8, "bad array spec"),
    (b'{"nbytes": 8, "arrays": []}\n' + b"x" * 8, "take 0 bytes of a 8-byte"),
    (b'{"nbytes": 0, "arrays": []}', "cut short"),
])
def test_malformed_messages_are_refused_with_what_was_wrong(raw, complaint):
    with pytest.raises(ProtocolError, match=complaint):
        read_message(io.BytesIO(raw))


def test_object_arrays_are_not_sent():
    with pytest.raises(ProtocolError, match="dtype object"):
        write_message(io.BytesIO(), {"op": "decide"}, {"a": np.array([None])})


def history(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"state": rng.normal(size=(2, 4)).astype(np.float32)}


@pytest.mark.parametrize("extra", [dict(sampler="ddim", steps=5), dict(rti={"k0": 2})])
def test_the_process_decides_exactly_as_the_in_process_decider(extra, tmp_path):
    settings = RuntimeSettings(checkpoint=str(saved_policy(tmp_path / "policy")), **extra)
    local, remote = ChunkDecider(settings), InferenceProcess(settings)
    try:
        assert remote.config == local.config and remote.spec == local.spec
        for seed in (1, 2):
            local.reset(seed)
            remote.reset(seed)
            for step, executed in ((0, None), (1, 1), (3, 2)):
                a, b = local(history(step), executed), remote(history(step), executed)
                assert a.shape == (7, 2) and b.dtype == np.float32  # horizon 8 minus the To - 1 past steps
                assert np.array_equal(a, b)
    finally:
        remote.close()


def test_a_failed_request_is_an_error_and_the_process_serves_on(tmp_path):
    process = InferenceProcess(RuntimeSettings(checkpoint=str(saved_policy(tmp_path / "policy")), sampler="ddim",
                                               steps=3))
    try:
        with pytest.raises(InferenceError, match="state"):
            process({"state": np.zeros((2, 5), np.float32)}, None)  # the policy wants 4 state dims
        assert process(history(0), None).shape == (7, 2)
        process._proc.kill()
        process._proc.wait()
        with pytest.raises(InferenceError, match="exited"):
            process(history(1), None)
    finally:
        process.close()


def test_a_checkpoint_that_cannot_load_fails_at_start(tmp_path):
    with pytest.raises(InferenceError, match="inference process"):
        InferenceProcess(RuntimeSettings(checkpoint=str(tmp_path / "missing")))


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="POSIX priorities")
def test_the_inference_process_runs_nice_levels_below_its_parent(tmp_path):
    process = InferenceProcess(RuntimeSettings(checkpoint=str(saved_policy(tmp_path / "policy")), sampler="ddim",
                                               steps=3), nice=7)
    try:
        assert os.getpriority(os.PRIO_PROCESS, process.pid) == min(os.getpriority(os.PRIO_PROCESS, 0) + 7, 19)
        assert process(history(0), None).shape == (7, 2)
    finally:
        process.close()
    with pytest.raises(ValueError, match="nice"):
        InferenceProcess(RuntimeSettings(checkpoint=str(tmp_path / "policy")), nice=20)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_the_inference_process_is_pinned_to_the_cpus_asked_for(tmp_path):
    last = max(os.sched_getaffinity(0))
    process = InferenceProcess(RuntimeSettings(checkpoint=str(saved_policy(tmp_path / "policy")), sampler="ddim",
                                               steps=3), cpus=[last])
    try:
        assert process(history(0), None).shape == (7, 2)  # answered after the child pinned itself
        assert os.sched_getaffinity(process.pid) == {last}
    finally:
        process.close()
    for wrong in ([], [os.cpu_count()], [-1]):
        with pytest.raises(ValueError, match="inference CPUs"):
            InferenceProcess(RuntimeSettings(checkpoint=str(tmp_path / "policy")), cpus=wrong)
