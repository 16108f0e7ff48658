"""fp16 networks with fp32 accumulation: the export's network really computes in float16 (its weights are
float16 and its outputs differ from fp32's), its inputs and outputs and the fused graph's sampler arithmetic stay
float32, its error against the float32 policy is within the fp16 tolerance, and an export of one precision is
never read as the other."""

import numpy as np
import onnx
import pytest
import torch

from deploy.backends import BackendPolicy, TorchBackend, make_backend
from deploy.export import TOLERANCE, ExportError, ExportSettings, check_export, export_dir, export_policy
from policy.checkpoint import load_policy
from policy.diffusion import sample
from tests.deploy.test_export import saved_policy


@pytest.fixture(scope="module", params=["unet", "transformer"])
def fp16_export(request, tmp_path_factory):
    ckpt = saved_policy(tmp_path_factory.mktemp(request.param) / "policy", request.param)
    export_policy(ExportSettings(checkpoint=str(ckpt), sampler="ddpm", rti_k0=3, precision="fp16"))
    return ckpt


def test_the_network_is_float16_between_float32_inputs_and_outputs(fp16_export):
    directory = export_dir(fp16_export, "fp16")
    assert directory.name == "onnx-fp16"
    model = onnx.load(str(directory / "denoiser.onnx"))
    types = {init.data_type for init in model.graph.initializer if len(init.dims) >= 2}  # weight matrices
    assert types == {onnx.TensorProto.FLOAT16}
    for value in [*model.graph.input, *model.graph.output]:
        if value.name != "t":
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, value.name


def test_fp16_parity_with_the_float32_policy_is_within_tolerance_and_not_exact(fp16_export):
    errors = check_export(fp16_export, export_dir(fp16_export, "fp16"))
    assert set(errors) == {"encoder", "denoiser", "sampled_chunk", "fused"}
    assert max(errors.values()) <= TOLERANCE["fp16"]
    assert errors["denoiser"] > 1e-6  # fp16 rounding shows: the network did not silently run in fp32


def test_the_fused_graph_accumulates_in_float32(fp16_export):
    """The fused graph equals the step loop run in float32 torch around the same fp16 denoiser graph, to 1e-4.
    Had the fused graph's sampler arithmetic been lowered to fp16, a single rounding of x (|x| ~ 1, half an fp16
    ulp ~ 2.4e-4) per step would show, over four steps."""
    policy, _ = load_policy(fp16_export)
    backend = make_backend("onnxruntime", policy, fp16_export, threads=1, precision="fp16")
    cond = backend.encode({"state": torch.rand(3, 2, 4) * 2 - 1})
    x = torch.randn(3, 8, 2)
    ts = backend.manifest["graphs"]["fused"]["timesteps"]
    noise = torch.randn(len(ts), 3, 8, 2)
    want = sample(lambda a, t: backend.denoise(a, t, cond).clone(), x, policy.schedule, ts, "ddpm",
                  step_noise=noise)
    got = backend.fused(cond, x, noise)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)


def test_a_torch_fp16_backend_samples_close_to_fp32(fp16_export):
    policy, _ = load_policy(fp16_export)
    backend = TorchBackend(policy, precision="fp16")
    assert next(backend.model.parameters()).dtype == torch.float16
    assert next(policy.parameters()).dtype == torch.float32  # the caller's policy is left as it was
    obs = {"state": torch.rand(3, 2, 4) * 2 - 1}
    noise = torch.randn(3, 8, 2)
    policy.configure_inference("ddim", 10)
    want = policy.predict_chunk(obs, noise=noise).action_pred
    got = BackendPolicy(policy, backend).predict_chunk(obs, noise=noise).action_pred
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=TOLERANCE["fp16"])


def test_an_export_is_only_read_at_its_own_precision(fp16_export, tmp_path):
    policy, _ = load_policy(fp16_export)
    with pytest.raises(ExportError, match="has no manifest.json"):
        make_backend("onnxruntime", policy, fp16_export, precision="fp32")  # only onnx-fp16 exists
    export_policy(ExportSettings(checkpoint=str(fp16_export), out=str(tmp_path / "onnx"), fused=False))
    (tmp_path / "onnx").rename(export_dir(fp16_export, "fp32"))
    make_backend("onnxruntime", policy, fp16_export, precision="fp32")
    export_dir(fp16_export, "fp32").rename(tmp_path / "fp32")
    export_dir(fp16_export, "fp16").rename(export_dir(fp16_export, "fp32"))
    try:
        with pytest.raises(ExportError, match="holds an fp16 export, not fp32"):
            make_backend("onnxruntime", policy, fp16_export, precision="fp32")
    finally:
        export_dir(fp16_export, "fp32").rename(export_dir(fp16_export, "fp16"))
    with pytest.raises(ValueError, match="precision must be one of"):
        export_dir(fp16_export, "int4")
