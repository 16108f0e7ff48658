"""int8 exports (deploy/quantize.py): onnxruntime's QDQ static quantisation of a policy trained here through
`rtdp train`, calibrated on that training data and the policy's own sampler, checked on held-out windows and in
closed loop against the fp32 graphs on the same seeds."""

import json

import numpy as np
import onnx
import pytest

from deploy.artifacts import TOLERANCE, BackendUnavailable, ExportError, load_manifest
from deploy.export import ExportSettings, export_policy
from deploy.quantize import calibration_feeds, cpu_saturates_int8
from deploy.runtime import RuntimeSettings, build_policy, load_model
from envs.collect import collect_demos
from evaluation.evaluate import EvalSettings, evaluate
from evaluation.quantisation_data import check_int8, export_int8, observation_windows
from policy.config import config_to_yaml
from rtdp.cli import main
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small U-Net trained by `rtdp train` on 60 point-mass demos (about 20 s on 2 cores), exported at fp32 and
    at int8 with `--check`."""
    tmp = tmp_path_factory.mktemp("int8")
    collect_demos("point_mass/reach", 60, seed=0, progress=False).save(tmp / "pm.zarr")
    cfg = tiny_config()
    cfg.policy.state_dim = cfg.policy.action_dim = 0
    cfg.policy.unet.down_dims, cfg.policy.unet.diffusion_step_embed_dim = [32, 64], 32
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.lr, cfg.train.batch_size = 400, 400, 2e-3, 128
    (tmp / "tiny.yaml").write_text(config_to_yaml(cfg))
    ckpt = tmp / "policy"
    assert main(["train", "--config", str(tmp / "tiny.yaml"), "--data", str(tmp / "pm.zarr"), "--out", str(ckpt),
                 "--no-progress"]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--no-fused"]) == 0
    report = tmp / "export.json"
    assert main(["export", "--checkpoint", str(ckpt), "--precision", "int8", "--rti", "3", "--check",
                 "--calibration-windows", "48", "--report", str(report)]) == 0
    return {"checkpoint": ckpt, "data": tmp / "pm.zarr", "report": json.loads(report.read_text())}


def test_the_graphs_hold_int8_weights_in_qdq_form_and_say_what_they_were_calibrated_on(trained):
    ckpt = trained["checkpoint"]
    manifest = load_manifest(ckpt / "onnx-int8", ckpt)
    assert manifest["precision"] == "int8"
    q = manifest["quantisation"]
    assert q["format"] == "QDQ" and q["calibration"]["data"] == str(trained["data"].resolve())
    assert q["calibration"]["windows"] == 48
    seven_bit = cpu_saturates_int8()  # --reduce-range auto: decided by the CPU that exported
    assert q["reduce_range"] == {"setting": "auto", "seven_bit_weights": seven_bit,
                                 "exporting_cpu_saturates": seven_bit}
    for graph in ("denoiser", "fused"):
        model = onnx.load(str(ckpt / "onnx-int8" / f"{graph}.onnx"))
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("Conv") > 0 and ops.count("QuantizeLinear") > 0
        init = {i.name: i for i in model.graph.initializer}
        int8_weights = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
                        and n.input[0] in init and init[n.input[0]].data_type == onnx.TensorProto.INT8
                        and len(init[n.input[1]].dims) == 1 and init[n.input[1]].dims[0] > 1}  # per channel
        # every conv's weight (the fused graph runs the same weights once per step) is int8 with one scale per
        # output channel
        assert all(n.input[1] in int8_weights for n in model.graph.node if n.op_type == "Conv"), graph
        widest = max(int(np.abs(onnx.numpy_helper.to_array(init[n.input[0]])).max()) for n in model.graph.node
                     if n.op_type == "DequantizeLinear" and n.output[0] in int8_weights)
        assert widest <= 64 if seven_bit else widest == 127, (graph, widest)  # per-channel scales reach the end
        fp32_kernels = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                        and len(i.dims) == 3}
        upsamplers = {n.input[1] for n in model.graph.node if n.op_type == "ConvTranspose"}
        assert fp32_kernels == upsamplers and len(upsamplers) == 1  # left fp32 on purpose (deploy/quantize.py)
    # The TensorRT calibration table, written from the same ranges, names the fp32 graph's tensors.
    table = (ckpt / "onnx-int8" / "calibration" / "denoiser" / "calibration.cache").read_text().splitlines()
    ranges = json.loads((ckpt / "onnx-int8" / "calibration" / "denoiser" / "calibration.json").read_text())
    assert len(table) == len(ranges) > 10 and all(float(line.split()[-1]) >= 0 for line in table)
    assert (ckpt / "onnx-int8" / "calibration" / "denoiser" / "calibration.flatbuffers").stat().st_size > 100


def test_check_holds_the_sampled_chunk_to_the_int8_tolerance_on_held_out_data(trained):
    errors = trained["report"]["max_abs_error"]
    assert errors["sampled_chunk_mean"] <= TOLERANCE["int8"] and errors["encoder_mean"] <= TOLERANCE["int8"]
    assert 0 < errors["sampled_chunk_mean"] <= errors["sampled_chunk_max"]  # quantised: not bit-exact
    # ... and a tolerance it cannot meet fails loudly, naming the error
    with pytest.raises(ExportError, match="sampled_chunk_mean"):
        check_int8(trained["checkpoint"], tolerance=1e-6)


def test_seven_bit_weights_are_chosen_where_onnxruntimes_x86_kernels_would_saturate():
    flags = "flags\t\t: fpu sse sse2 ssse3 fma avx avx2 "
    assert cpu_saturates_int8("x86_64", flags) and cpu_saturates_int8("AMD64", "")
    assert not cpu_saturates_int8("x86_64", flags + "avx512f avx512_vnni")
    assert not cpu_saturates_int8("x86_64", flags + "avx_vnni")
    assert not cpu_saturates_int8("aarch64", flags)  # a Jetson: Arm's dot-product kernels do not saturate


@pytest.mark.skipif(not cpu_saturates_int8(), reason="this CPU has VNNI: full-range int8 weights do not saturate")
def test_on_a_cpu_without_vnni_full_range_weights_err_more_than_seven_bit_ones(trained, tmp_path):
    assert main(["export", "--checkpoint", str(trained["checkpoint"]), "--precision", "int8", "--rti", "3",
                 "--calibration-windows", "48", "--reduce-range", "off", "--out", str(tmp_path / "int8-full")]) == 0
    with pytest.warns(UserWarning, match="full-range int8 weights"):  # loading them on this CPU says so
        full = check_int8(trained["checkpoint"], tmp_path / "int8-full", tolerance=1.0)
    seven = trained["report"]["max_abs_error"]
    assert full["sampled_chunk_mean"] > 1.5 * seven["sampled_chunk_mean"], (full, seven)


def test_calibration_feeds_come_from_the_data_and_the_sampler(trained):
    model, _ = load_model(RuntimeSettings(checkpoint=str(trained["checkpoint"])))
    windows = observation_windows(trained["checkpoint"], trained["data"], 40, seed=0)
    assert windows["state"].shape == (40, 2, 4) and windows["action"].shape == (40, 8, 2)
    fused = {"timesteps": [3, 2, 1, 0], "entry": "warm"}
    feeds = calibration_feeds(model, windows, fused)
    batches = 3  # 40 windows in batches of 16
    assert len(feeds["encoder"]) == len(feeds["fused"]) == batches
    steps = model.timesteps
    # per batch: the sampler's own chain from noise, then the data's chunks noised to the same timesteps
    assert len(feeds["denoiser"]) == batches * 2 * len(steps)
    assert [int(f["t"][0]) for f in feeds["denoiser"][: 2 * len(steps)]] == [*steps, *steps]
    assert sum(len(f["x"]) for f in feeds["denoiser"][: 2 * len(steps) * batches: 2 * len(steps)]) == 40
    state = np.concatenate([f["state"] for f in feeds["encoder"]])
    assert state.shape == (40, 2, 4) and np.abs(state).max() <= 1.0 + 1e-5  # normalised data, not noise
    # the warm entry of an RTI graph is a data chunk noised to k0, far from unit-variance noise
    assert feeds["fused"][0]["step_noise"].shape[0] == 4
    assert np.std(feeds["fused"][0]["x_init"]) < 0.9


def test_int8_closed_loop_success_matches_fp32_on_the_same_seeds(trained):
    kw = dict(checkpoint=str(trained["checkpoint"]), episodes=20, workers=1, backend="onnxruntime")
    fp32 = evaluate(EvalSettings(**kw), progress=False)
    int8 = evaluate(EvalSettings(**kw, precision="int8"), progress=False)
    assert fp32["success_rate"] >= 0.8
    lo, hi = fp32["success_ci95"]
    assert lo <= int8["success_rate"] <= hi
    assert int8["config"]["precision"] == "int8"


def test_int8_is_refused_clearly_where_it_cannot_run(trained, tmp_path):
    with pytest.raises(BackendUnavailable, match="engine backends"):
        build_policy(RuntimeSettings(checkpoint=str(trained["checkpoint"]), precision="int8"))
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.yaml", "model.safetensors", "normalizer.json"):
        (bare / f).write_bytes((trained["checkpoint"] / f).read_bytes())
    with pytest.raises(ExportError, match="--calibration-data"):
        export_int8(ExportSettings(checkpoint=str(bare), precision="int8"))
    with pytest.raises(ExportError, match="does not exist"):
        export_int8(ExportSettings(checkpoint=str(bare), precision="int8", calibration_data=str(tmp_path / "no")))
    with pytest.raises(ExportError, match="calibrated on observation windows"):
        export_policy(ExportSettings(checkpoint=str(bare), precision="int8"))  # deploy alone reads no dataset
