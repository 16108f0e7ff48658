"""The image + state policy: uint8 frames in, normalised and encoded outside the denoiser, trainable."""

import numpy as np
import pytest
import torch

from envs.datasets import PolicyDataset, ReplayBuffer
from policy.diffusion_policy import DiffusionPolicy
from policy.train import fit_normalizer
from tests.conftest import tiny_config

H = W = 32


def image_dataset() -> PolicyDataset:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer()
    for _ in range(3):
        n = 12
        buf.add_episode({"state": rng.normal(size=(n, 3)).astype(np.float32),
                         "image": rng.integers(0, 256, size=(n, H, W, 3), dtype=np.uint8),
                         "action": rng.normal(size=(n, 2)).astype(np.float32)})
    return PolicyDataset(buf, horizon=8, n_obs_steps=2, n_action_steps=4, state_keys=["state"],
                         action_key="action", image_key="image")


def image_policy(data: PolicyDataset) -> DiffusionPolicy:
    cfg = tiny_config().policy
    cfg.state_dim, cfg.image_shape = 3, [H, W]
    cfg.image_encoder.channels, cfg.image_encoder.num_kp, cfg.image_encoder.feature_dim = [8, 16], 4, 8
    return DiffusionPolicy(cfg, fit_normalizer(data))


def test_image_batches_train_and_predict():
    data = image_dataset()
    assert data.image_shape == [H, W]
    policy = image_policy(data)
    batch = {k: torch.from_numpy(v) for k, v in data.batch(np.arange(6)).items()}
    assert batch["image"].shape == (6, 2, H, W, 3) and batch["image"].dtype == torch.uint8
    loss = policy.compute_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert policy.obs_encoder.image.backbone[0][0].weight.grad.abs().sum() > 0
    out = policy.eval().predict_chunk({"state": batch["state"][:2], "image": batch["image"][:2]})
    assert out.action.shape == (2, 4, 2)


def test_image_changes_the_prediction():
    data = image_dataset()
    policy = image_policy(data).eval()
    state = torch.zeros(1, 2, 3)
    noise = torch.randn(1, 8, 2)
    a = policy.predict_chunk({"state": state, "image": torch.zeros(1, 2, H, W, 3, dtype=torch.uint8)}, noise=noise)
    b = policy.predict_chunk({"state": state, "image": torch.full((1, 2, H, W, 3), 255, dtype=torch.uint8)},
                             noise=noise)
    assert (a.action - b.action).abs().max() > 1e-6


def test_image_must_be_uint8_frames_of_the_trained_size():
    policy = image_policy(image_dataset()).eval()
    state = torch.zeros(1, 2, 3)
    with pytest.raises(TypeError, match="uint8"):
        policy.predict_chunk({"state": state, "image": torch.zeros(1, 2, H, W, 3)})
    with pytest.raises(ValueError, match=r"shape \(B, 2, 32, 32, 3\)"):
        policy.predict_chunk({"state": state, "image": torch.zeros(1, 2, 3, H, W, dtype=torch.uint8)})
    with pytest.raises(KeyError, match="missing 'image'"):
        policy.predict_chunk({"state": state})
