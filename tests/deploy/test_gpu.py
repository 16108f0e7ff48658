"""GPU paths, run where torch sees a CUDA device (`pytest -m gpu`, on a lent GPU machine); skipped elsewhere."""

import importlib.util

import numpy as np
import pytest
import torch

from deploy.backends import BackendPolicy, TorchBackend
from policy.diffusion_policy import DiffusionPolicy
from tests.conftest import tiny_config, tiny_normalizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("denoiser", ["unet", "transformer"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", 100), ("dpmpp_2m", 8)])
def test_cuda_backend_samples_what_the_cpu_policy_samples(denoiser, sampler, steps, monkeypatch):
    # cuDNN convolutions default to TF32 (10-bit mantissa): fp32 parity needs them off.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cpu = DiffusionPolicy(tiny_config(denoiser).policy, tiny_normalizer()).eval()
    gpu = DiffusionPolicy(tiny_config(denoiser).policy, tiny_normalizer()).eval()
    gpu.load_state_dict(cpu.state_dict())
    wrapped = BackendPolicy(gpu, TorchBackend(gpu, device="cuda"))
    obs = {"state": torch.rand(4, 2, 4) * 2 - 1}
    noise = torch.randn(4, 8, 2)
    cpu.configure_inference(sampler, steps)
    gpu.configure_inference(sampler, steps)
    want = cpu.predict_chunk(obs, noise=noise, generator=torch.Generator().manual_seed(0)).action_pred
    got = wrapped.predict_chunk(obs, noise=noise, generator=torch.Generator().manual_seed(0)).action_pred
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), want.numpy(), atol=1e-4)


@pytest.mark.parametrize("denoiser", ["unet", "transformer"])
def test_an_fp16_network_on_cuda_samples_close_to_the_fp32_policy(denoiser):
    cpu = DiffusionPolicy(tiny_config(denoiser).policy, tiny_normalizer()).eval()
    gpu = DiffusionPolicy(tiny_config(denoiser).policy, tiny_normalizer()).eval()
    gpu.load_state_dict(cpu.state_dict())
    backend = TorchBackend(gpu, device="cuda", precision="fp16")
    assert next(backend.model.parameters()).dtype == torch.float16
    obs = {"state": torch.rand(4, 2, 4) * 2 - 1}
    noise = torch.randn(4, 8, 2)
    want = cpu.configure_inference("ddim", 10).predict_chunk(obs, noise=noise).action_pred
    got = BackendPolicy(gpu.configure_inference("ddim", 10), backend).predict_chunk(obs, noise=noise).action_pred
    assert got.dtype == torch.float32  # the sampler accumulates in fp32
    np.testing.assert_allclose(got.cpu().numpy(), want.numpy(), atol=2e-2)
    assert not np.array_equal(got.cpu().numpy(), want.numpy())  # the network really ran in fp16


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="no tensorrt package")
@pytest.mark.parametrize("precision,atol", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_native_tensorrt_engines_match_torch(precision, atol, tmp_path):
    from deploy.backends import make_backend
    from deploy.export import ExportSettings, export_policy
    from policy.checkpoint import load_policy
    from tests.deploy.test_export import saved_policy

    ckpt = saved_policy(tmp_path / "policy")
    export_policy(ExportSettings(checkpoint=str(ckpt), sampler="ddim", steps=10, precision=precision))
    cpu, _ = load_policy(ckpt)
    trt_policy = BackendPolicy(cpu, make_backend("tensorrt", cpu, ckpt, precision=precision))
    obs = {"state": torch.rand(4, 2, 4) * 2 - 1}
    noise = torch.randn(4, 8, 2)
    cpu.configure_inference("ddim", 10)
    want = cpu.predict_chunk(obs, noise=noise).action_pred
    got = trt_policy.predict_chunk(obs, noise=noise).action_pred
    np.testing.assert_allclose(got.cpu().numpy(), want.numpy(), atol=atol)
