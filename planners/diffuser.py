"""The Diffuser-style baseline (Janner et al., ICML 2022): plans denoised from noise in a short chain (20 steps),
steered by the gradient of a value network trained on noisy plans, instead of conditioned on a return.

The same temporal U-Net (trained unconditionally: `condition_dropout: 1`), inverse dynamics and critic choice as
Trajectory Diffuser (`configs/planners/diffuser.yaml`). Guidance enters as classifier guidance does in the noise
prediction (Dhariwal and Nichol): eps - sqrt(1 - alpha_bar_t) * guide_scale * grad_x V(x_t, t), so it works with
every shared sampler; Janner's code instead moves x_t by the gradient twice before each step. As in his code there
is no guidance below t = guide_stop_t. The value net regresses the plan's return-to-go (the critic's target) from
the noised plan and t. A decision takes a gradient through the value net at each guided step, which an ONNX graph
does not hold: this baseline runs in torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policy.contract import GraphSpec
from policy.nets.unet1d import SinusoidalPosEmb

from .decision_diffuser import DecisionDiffuser
from .trajectory_diffuser import TrajectoryDiffuserRunConfig, hold_first, mlp, prepare_training

KIND = "diffuser"


class PlanValue(nn.Module):
    """V(x_t, t): a noised plan's return-to-go (in return_scale units)."""

    def __init__(self, horizon: int, state_dim: int, step_dim: int, hidden: int):
        super().__init__()
        self.step = SinusoidalPosEmb(step_dim)
        self.net = mlp(horizon * state_dim + step_dim, hidden, 1)

    def forward(self, plans: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([plans.flatten(1), self.step(t.float())], dim=-1))[:, 0]


class Diffuser(DecisionDiffuser):
    """Decision-Diffuser-style planning from noise (its steps, start and inference settings), with the return
    condition replaced by value guidance."""

    kind = KIND

    def __init__(self, cfg, normalizer):
        super().__init__(cfg, normalizer)
        self.value = PlanValue(cfg.horizon, cfg.state_dim, cfg.step_embed_dim, cfg.value_hidden)

    def inference_config(self) -> dict:
        cfg = self.cfg
        return {**super().inference_config(), "guidance": "value", "guide_scale": cfg.guide_scale,
                "guide_stop_t": cfg.guide_stop_t, "guidance_weight": None, "target_return": None}

    def guided_denoiser(self, first_state: torch.Tensor, returns: torch.Tensor):
        """The unconditional epsilon, shifted up the value's gradient (the return is not an input here)."""
        cfg = self.cfg
        uncond = torch.zeros(first_state.shape[0], cfg.return_embed_dim)
        noise_std = self.schedule.sqrt_one_minus_alpha_bar

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = hold_first(x, first_state)
            eps = self.unet(x, t, uncond)
            if cfg.guide_scale <= 0 or int(t[0]) < cfg.guide_stop_t:
                return eps
            with torch.enable_grad():
                plans = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.value(plans, t).sum(), plans)
            grad[:, 0] = 0.0  # the first state is the robot's, not the plan's to change
            return eps - noise_std[t].to(x)[:, None, None] * cfg.guide_scale * grad

        return denoise

    def export_graphs(self, batch: int = 2, generator: torch.Generator | None = None) -> dict[str, GraphSpec]:
        raise ValueError("a diffuser planner takes the value net's gradient at every guided step, which an ONNX graph "
                         "does not hold; it runs in torch only (--backend torch)")

    def compute_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Trajectory Diffuser's losses (the U-Net unconditional by `condition_dropout: 1`) + the value net's
        regression of the return-to-go from plans noised at a random t."""
        cfg = self.cfg
        loss = super().compute_loss(batch, generator)
        states = self.normalizer["state"].normalize(batch["states"].float())
        rtg = batch["rtg"].float()[:, 0] / cfg.return_scale
        t = torch.randint(0, cfg.train_timesteps, (states.shape[0],), generator=generator)
        noise = torch.randn(states.shape, generator=generator)
        noise[:, 0] = 0.0
        noisy = hold_first(self.schedule.add_noise(states, noise, t), states[:, 0])
        return loss + cfg.value_weight * F.mse_loss(self.value(noisy, t), rtg)


def build_for_training(run_cfg: TrajectoryDiffuserRunConfig, data) -> Diffuser:
    return Diffuser(run_cfg.planner, prepare_training(run_cfg, data))
