"""The vanilla diffusion planner DiffusionDrive is measured against (its "Transfuser_DP"): the same scene encoder
and decoder, but no anchors: every candidate starts from pure noise, training draws t over the whole schedule,
and a decision runs `steps` DDIM steps (20 by default) over `n_anchors` independent samples. With no scorer, it
executes the first sample, as a plain diffusion policy executes its one draw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from policy.diffusion import sample

from .diffusiondrive import OBSERVATIONS, DiffusionDrive, DiffusionDriveRunConfig, prepare_training

KIND = "diffusion_planner"


class DiffusionPlanner(DiffusionDrive):
    kind = KIND
    scores_anchors = False

    def configure_inference(self, sampler: str | None = None, steps: int | None = None) -> DiffusionPlanner:
        """`steps` evenly spaced ("leading") over the whole schedule; the config's `timesteps` gives the default
        count."""
        if steps is not None and steps < 1:
            raise ValueError(f"a plan from noise needs at least one step, got {steps}")
        super().configure_inference(sampler)
        count = steps or len(self.cfg.timesteps)
        self.timesteps = self.schedule.timesteps(count, "leading").tolist()
        return self

    def inference_config(self) -> dict:
        return {"sampler": self.method, "steps": len(self.timesteps), "timesteps": self.timesteps,
                "samples": self.cfg.n_anchors}

    def plan_normalized(self, scene, anchor_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A full denoise of every candidate from pure noise; scores are all zero (nothing ranks them)."""
        points = sample(lambda x_t, t: self.decode(x_t, t, scene)[-1][1], anchor_noise, self.schedule,
                        self.timesteps, self.method)
        return points, points.new_zeros(points.shape[:2])

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.new_zeros(scores.shape[0], dtype=torch.long)

    def compute_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Clean-sample regression (L1 x reg_weight, every cascade layer) of the ground truth noised to t drawn
        over the whole schedule."""
        cfg, lay = self.cfg, self.cfg.layout
        nobs = self.normalize_obs({k: batch[k] for k in OBSERVATIONS})
        target = self.normalizer["action"].normalize(batch["plan"].float()).reshape(-1, 1, lay.points, lay.coords)
        t = torch.randint(0, cfg.train_timesteps, (target.shape[0],), generator=generator)
        noisy = self.schedule.add_noise(target, torch.randn(target.shape, generator=generator), t)
        loss = torch.zeros(())
        for _, points in self.decode(noisy, t, self.encode(nobs["ego"], nobs["agents"], nobs["bev"])):
            loss = loss + cfg.reg_weight * F.l1_loss(points, target)
        return loss


def build_for_training(run_cfg: DiffusionDriveRunConfig, data) -> DiffusionPlanner:
    normalizer, _ = prepare_training(run_cfg, data)
    return DiffusionPlanner(run_cfg.planner, normalizer)  # no anchors: the buffer stays zero
