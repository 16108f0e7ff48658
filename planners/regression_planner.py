"""The deterministic baseline (DiffusionDrive's "Transfuser (MLP)"): one trajectory regressed in one decoder pass
from the scene, starting from the training set's mean plan. No noise, no sampler, no ranking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .diffusiondrive import OBSERVATIONS, DiffusionDrive, DiffusionDriveRunConfig, prepare_training

KIND = "regression_planner"


class RegressionPlanner(DiffusionDrive):
    kind = KIND
    scores_anchors = False

    def configure_inference(self, sampler: str | None = None, steps: int | None = None) -> RegressionPlanner:
        if steps not in (None, 1):
            raise ValueError(f"a regression planner decides in one pass; got steps={steps}")
        super().configure_inference(sampler, 1)
        self.timesteps = [0]
        return self

    def inference_config(self) -> dict:
        return {"sampler": "none", "steps": 1, "anchors": self.cfg.n_anchors}

    def plan_normalized(self, scene, anchor_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass from the mean plan (the anchor buffer); `anchor_noise` only sets the batch."""
        batch = anchor_noise.shape[0]
        start = self.anchors.expand(batch, -1, -1, -1)
        scores, points = self.decode(start, anchor_noise.new_zeros(batch, dtype=torch.long), scene)[-1]
        return points, scores

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.new_zeros(scores.shape[0], dtype=torch.long)

    def compute_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """L1 (x reg_weight) of every cascade layer's plan against the ground truth."""
        cfg, lay = self.cfg, self.cfg.layout
        nobs = self.normalize_obs({k: batch[k] for k in OBSERVATIONS})
        target = self.normalizer["action"].normalize(batch["plan"].float()).reshape(-1, lay.points, lay.coords)
        start = self.anchors.expand(target.shape[0], -1, -1, -1)
        t = torch.zeros(target.shape[0], dtype=torch.long)
        loss = torch.zeros(())
        for _, points in self.decode(start, t, self.encode(nobs["ego"], nobs["agents"], nobs["bev"])):
            loss = loss + cfg.reg_weight * F.l1_loss(points[:, 0], target)
        return loss


def build_for_training(run_cfg: DiffusionDriveRunConfig, data) -> RegressionPlanner:
    if run_cfg.planner.n_anchors != 1:
        raise ValueError(f"a regression planner regresses one trajectory: planner.n_anchors must be 1, got "
                         f"{run_cfg.planner.n_anchors}")
    normalizer, plans = prepare_training(run_cfg, data)
    mean = torch.from_numpy(plans.mean(axis=0, keepdims=True))
    return RegressionPlanner(run_cfg.planner, normalizer, mean)
