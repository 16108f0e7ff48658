import numpy as np
import pytest
import torch

from policy.config import RunConfig
from policy.normalizer import FieldNormalizer, Normalizer


def tiny_config(denoiser: str = "unet") -> RunConfig:
    cfg = RunConfig()
    p = cfg.policy
    p.denoiser, p.state_dim, p.action_dim = denoiser, 4, 2
    p.horizon, p.n_obs_steps, p.n_action_steps = 8, 2, 4
    p.unet.down_dims, p.unet.diffusion_step_embed_dim = [16, 32], 16
    p.transformer.n_layer, p.transformer.n_emb, p.transformer.n_head = 2, 32, 2
    p.transformer.p_drop_attn = 0.0
    cfg.train.batch_size, cfg.train.warmup_steps, cfg.train.log_every = 32, 5, 5
    return cfg


def tiny_normalizer(state_dim=4, action_dim=2) -> Normalizer:
    rng = np.random.default_rng(0)
    return Normalizer({"state": FieldNormalizer.fit_minmax(rng.uniform(-1, 1, (64, state_dim))),
                       "action": FieldNormalizer.fit_minmax(rng.uniform(-1, 1, (64, action_dim)))})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
