"""The Decision-Diffuser-style baseline Trajectory Diffuser is measured against (Ajay et al., ICLR 2023): the same
temporal U-Net, return guidance, inverse dynamics and critic choice, but no draft: every candidate plan is denoised
from pure noise over the whole schedule (200 steps by default, `configs/planners/decision_diffuser.yaml`).
"""

from __future__ import annotations

import torch

from .trajectory_diffuser import TrajectoryDiffuser, TrajectoryDiffuserRunConfig, hold_first, prepare_training

KIND = "decision_diffuser"


class DecisionDiffuser(TrajectoryDiffuser):
    kind = KIND
    has_draft = False

    def configure_inference(self, sampler: str | None = None, steps: int | None = None) -> DecisionDiffuser:
        """`steps` evenly spaced ("leading") over the schedule; by default every one of its steps."""
        if steps is not None and steps < 1:
            raise ValueError(f"a plan from noise needs at least one step, got {steps}")
        super().configure_inference(sampler, 0)
        self.timesteps = self.schedule.timesteps(steps or self.cfg.train_timesteps, "leading").tolist()
        return self

    def inference_config(self) -> dict:
        return {**super().inference_config(), "start": "noise", "entry": None, "draft_steps": 0}

    @property
    def draft_steps(self) -> int:
        return 0

    def start(self, state: torch.Tensor, returns: torch.Tensor, entry_noise: torch.Tensor) -> torch.Tensor:
        """Pure noise, its first state held at the current one."""
        return hold_first(entry_noise, state.repeat_interleave(self.cfg.candidates, dim=0))


def build_for_training(run_cfg: TrajectoryDiffuserRunConfig, data) -> DecisionDiffuser:
    return DecisionDiffuser(run_cfg.planner, prepare_training(run_cfg, data))
