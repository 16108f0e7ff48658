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


def train_small_policy(out, task: str, episodes: int, configure, steps: int, lr: float, denoiser: str = "unet",
                       batch_size: int = 128, warmup_steps: int = 5):
    """Collect `episodes` expert demos of `task` and train a small policy on them into `out`; `configure(cfg)`
    sizes the model. For tests that need a policy that really works on its task."""
    from envs.collect import collect_demos
    from envs.datasets import PolicyDataset
    from policy.train import train

    torch.manual_seed(0)
    buffer = collect_demos(task, episodes, seed=0, progress=False)
    cfg = tiny_config(denoiser)
    cfg.policy.state_dim = cfg.policy.action_dim = 0
    configure(cfg)
    cfg.train.steps, cfg.train.lr, cfg.train.batch_size = steps, lr, batch_size
    cfg.train.warmup_steps, cfg.train.checkpoint_every = warmup_steps, steps
    cfg.data.task = task
    p = cfg.policy
    data = PolicyDataset(buffer, p.horizon, p.n_obs_steps, p.n_action_steps, ["state"], "action")
    train(cfg, data, out, progress=False)
    return out


def tiny_normalizer(state_dim=4, action_dim=2) -> Normalizer:
    rng = np.random.default_rng(0)
    return Normalizer({"state": FieldNormalizer.fit_minmax(rng.uniform(-1, 1, (64, state_dim))),
                       "action": FieldNormalizer.fit_minmax(rng.uniform(-1, 1, (64, action_dim)))})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
