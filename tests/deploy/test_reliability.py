"""Nothing unsafe reaches the robot and bad input gets a clear answer: chunks checked before execution, policy
faults counted as such, bounded decoding of inference-process messages, override parsing that never crashes."""

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.inference_process import ProtocolError, read_message
from deploy.loop import ControlLoop, LoopSettings
from policy.checkpoint import load_policy, save_checkpoint
from policy.config import ConfigError, RunConfig, config_to_yaml, load_config
from policy.contract import Chunk, PolicyFault
from policy.guard import ActionGuard
from rtdp.cli import main
from tests.deploy.test_export import saved_policy


class Fixed:
    """A policy whose every chunk is the given actions (the contract's surface, nothing else)."""

    spec = None

    def __init__(self, actions):
        self.actions = torch.as_tensor(actions, dtype=torch.float32)[None]

    def reset(self):
        pass

    def predict_chunk(self, obs, *, executed=None, generator=None, noise=None):
        return Chunk(self.actions[:, :1], self.actions, self.actions, nfe=1)


def test_a_dim_constant_in_the_data_may_move_as_far_as_its_centred_normaliser_clips():
    guard = ActionGuard(Fixed([[0.5, -0.88]]), [-1, -1], [1, -1])  # dim 1 is -1 in every demonstration
    assert guard.predict_chunk({}).nfe == 1  # drawer-open's DDPM-100 gripper at -0.88 was refused before
    with pytest.raises(PolicyFault, match="action dim 1"):
        ActionGuard(Fixed([[0.5, 0.2]]), [-1, -1], [1, -1]).predict_chunk({})


def test_the_guard_refuses_non_finite_and_out_of_bounds_chunks_naming_them():
    ok = [[0.5, -0.5], [1.0, -1.0]]
    assert ActionGuard(Fixed(ok), [-1, -1], [1, 1]).predict_chunk({}).nfe == 1
    with pytest.raises(PolicyFault, match=r"NaN or Inf actions \(action dims \[1\]\)"):
        ActionGuard(Fixed([[0.0, float("nan")]]), [-1, -1], [1, 1]).predict_chunk({})
    with pytest.raises(PolicyFault, match=r"action dim 0 = 1.5 is outside the bounds \[-1.2, 1.2\]"):
        ActionGuard(Fixed([[1.5, 0.0]]), [-1, -1], [1, 1]).predict_chunk({})
    # within the stated 10% margin of the training range: executed
    assert ActionGuard(Fixed([[1.15, 0.0]]), [-1, -1], [1, 1]).predict_chunk({}).nfe == 1


class RecordingRobot:
    def __init__(self, ticks):
        self.sent, self.ticks = [], ticks

    def observe(self):
        return {"state": np.zeros(4, np.float32)}

    def act(self, action):
        self.sent.append(np.array(action))
        return len(self.sent) >= self.ticks


def test_a_nan_chunk_never_reaches_the_robot_and_is_counted_as_a_policy_fault():
    calls = []

    def decide(history, executed):
        calls.append(executed)
        chunk = np.full((8, 2), 0.1, np.float32)
        if len(calls) % 2 == 0:
            chunk[3, 1] = np.nan
        return chunk

    loop = ControlLoop(decide, LoopSettings(rate_hz=200.0, replan_every=2), {"state": (4,)}, 2, 2, 2)
    robot = RecordingRobot(60)
    try:
        loop.run(robot)
    finally:
        loop.close()
    assert len(robot.sent) == 60 and all(np.isfinite(a).all() for a in robot.sent)
    assert loop.stats.policy_faults >= 5 and loop.stats.inference_errors == 0 and loop.stats.bad_observations == 0
    assert "PolicyFault" in loop.stats.last_error and loop.stats.faults()["policy faults"] == loop.stats.policy_faults


def test_eval_of_a_policy_that_outputs_nan_names_the_policy_not_the_observation(tmp_path, capsys):
    ckpt = saved_policy(tmp_path / "policy")
    policy, cfg = load_policy(ckpt)
    with torch.no_grad():
        for p in policy.denoiser.parameters():
            p.fill_(float("nan"))
    save_checkpoint(ckpt, cfg, policy)
    code = main(["eval", "--checkpoint", str(ckpt), "--episodes", "1", "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("rtdp eval: error: policy fault: the chunk holds NaN or Inf actions")
    assert "observation" not in err and "episode seed 100000" in err and len(err.splitlines()) == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_the_decoder_answers_any_bytes_with_a_message_or_a_protocol_error(raw):
    try:
        out = read_message(io.BytesIO(raw))
    except ProtocolError:
        return
    assert out is None or (isinstance(out[0], dict) and isinstance(out[1], dict))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_the_override_parser_answers_any_text_with_a_config_or_a_config_error(text):
    before = config_to_yaml(RunConfig())
    try:
        cfg = load_config(None, [text])
    except ConfigError:
        pass
    else:
        assert isinstance(cfg, RunConfig)
    assert config_to_yaml(RunConfig()) == before  # the defaults are never changed by a parse


def _rewrite_manifest(directory, edit, seal: bool):
    import json

    from deploy.artifacts import write_manifest

    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if seal:  # a consistent manifest that disagrees with the graph (what a buggy exporter would write)
        manifest.pop("manifest_sha256")
        write_manifest(directory, manifest)
    else:  # a hand edit
        path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from deploy.export import ExportSettings, export_policy

    ckpt = saved_policy(tmp_path_factory.mktemp("reliability") / "policy")
    export_policy(ExportSettings(checkpoint=str(ckpt), sampler="ddim", steps=4))
    return ckpt


@pytest.mark.parametrize("field", ["horizon", "normalizer", "steps", "output shape"])
def test_an_edited_export_manifest_is_refused_naming_the_file(exported, tmp_path, field):
    import shutil

    from deploy.artifacts import ExportError
    from deploy.backends import OnnxRuntimeBackend

    ckpt = tmp_path / "policy"
    shutil.copytree(exported, ckpt)
    edits = {"horizon": lambda m: m["policy"].update(horizon=m["policy"]["horizon"] + 8),
             "normalizer": lambda m: m["normalizer"]["action"]["scale"].__setitem__(0, 7.0),
             "steps": lambda m: m["sampler"].update(steps=50),
             "output shape": lambda m: m["graphs"]["denoiser"]["outputs"][0]["shape"].__setitem__(2, 5)}
    onnx = ckpt / "onnx"
    before = (onnx / "manifest.json").read_bytes()
    _rewrite_manifest(onnx, edits[field], seal=False)
    with pytest.raises(ExportError, match=r"manifest.json was edited after export"):
        OnnxRuntimeBackend(onnx)
    (onnx / "manifest.json").write_bytes(before)
    _rewrite_manifest(onnx, edits[field], seal=True)
    if field == "output shape":
        with pytest.raises(ExportError, match=r"denoiser graph .*denoiser.onnx: 'pred' has shape \[-1, 8, 2\], its "
                                              r"manifest says \['batch', 8, 5\]"):
            OnnxRuntimeBackend(onnx)
    elif field == "steps":  # the sampler settings are the runtime's; a sealed edit changes no decision
        OnnxRuntimeBackend(onnx)
    else:
        from deploy.runtime import RuntimeSettings, build_policy

        with pytest.raises(ExportError, match=f"records another {'policy' if field == 'horizon' else field} than "
                                              "the checkpoint"):
            build_policy(RuntimeSettings(str(ckpt), backend="onnxruntime"))


def test_control_with_a_corrupt_export_or_an_impossible_rti_entry_is_one_line_and_nothing_runs(exported, tmp_path,
                                                                                                capsys):
    import shutil

    ckpt = tmp_path / "policy"
    shutil.copytree(exported, ckpt)
    graph = ckpt / "onnx" / "encoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 3] ^= 0x55
    graph.write_bytes(bytes(data))
    run = ["control", "--checkpoint", str(ckpt), "--episodes", "1", "--rate", "50", "--no-progress"]
    assert main([*run, "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rtdp control: error: inference process: ExportError: encoder graph")
    assert "encoder.onnx does not match its manifest hash" in err
    assert len(err.splitlines()) == 1
    assert main([*run, "--rti", "500"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("rtdp control: error: inference process: ValueError: RTI k0=500 is outside the schedule's "
                   "steps [0, 99]")


def test_a_tensorrt_engine_cache_is_used_only_when_its_bytes_match_their_hash(tmp_path):
    from deploy.tensorrt_backend import cached_engine, write_engine

    path = tmp_path / "denoiser.engine"
    meta = {"graph_sha256": "ab" * 32, "tensorrt": "10.9", "gpu": "NVIDIA H200", "max_batch": 8}
    engine = bytes(range(256)) * 64
    assert cached_engine(path, meta) is None
    write_engine(path, meta, engine)
    assert cached_engine(path, meta) == engine
    assert cached_engine(path, {**meta, "gpu": "NVIDIA GeForce RTX 4090"}) is None  # another GPU: rebuilt
    flipped = bytearray(engine)
    flipped[1000] ^= 0x01
    path.write_bytes(bytes(flipped))
    assert cached_engine(path, meta) is None  # a flipped byte: rebuilt, not deserialised
    path.with_suffix(".engine.json").write_text("{truncated")
    assert cached_engine(path, meta) is None
