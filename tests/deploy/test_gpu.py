"""GPU paths, run where torch sees a CUDA device (`pytest -m gpu`, on a lent GPU machine); skipped elsewhere."""

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
    want = cpu.predict_chunk(obs, noise=noise, sampler=sampler, steps=steps,
                             generator=torch.Generator().manual_seed(0))["action_pred"]
    got = wrapped.predict_chunk(obs, noise=noise, sampler=sampler, steps=steps,
                                generator=torch.Generator().manual_seed(0))["action_pred"]
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), want.numpy(), atol=1e-4)
