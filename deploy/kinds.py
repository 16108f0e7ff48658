"""The model kinds rtdp runs, as one explicit table: a checkpoint's `kind:` (none: a Diffusion Policy) names its
config class, how its config is read, how the model is built from that config, and how a checkpoint is loaded.

Every kind's model is a denoising policy (policy/denoising.py) that keeps the decision contract
(policy/contract.py) and names the graphs it exports, so the runtime, export, the backends, evaluation and the
control loop need no path of their own per kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from planners import (
    aamdm,
    amdm,
    decision_diffuser,
    diffuser,
    diffusion_planner,
    diffusiondrive,
    motion_autoencoder,
    regression_planner,
    trajectory_diffuser,
)
from policy import pad
from policy.checkpoint import CheckpointError, checkpoint_kind, load_config_file, load_policy
from policy.config import RunConfig
from policy.diffusion_policy import KIND as DIFFUSION_POLICY
from policy.diffusion_policy import DiffusionPolicy
from policy.train import build_diffusion_policy


@dataclass(frozen=True)
class ModelKind:
    name: str
    config_class: type  # the run config's dataclass
    read_config: Callable[[Path], object]  # checkpoint folder -> its run config
    build: Callable  # (the config's model section, normaliser) -> the model
    load: Callable[[Path], tuple]  # checkpoint folder -> (model in eval mode, run config)
    build_for_training: Callable  # (run config, training data) -> a new model, its config filled from the data
    # What the runtime may wrap around it: RTI and the block cache re-enter a denoising policy's sampler.
    denoising_wrappers: bool = True
    # Whether the runtime's guard refuses actions outside the training range. A driving plan is a path for the
    # tracker, whose own limits bound the steering and acceleration; a plan past the training range (a tighter
    # turn on the roundabout's ring than any expert drove) is a new situation, not a fault. NaN is refused always.
    bounded_by_training_range: bool = True


KINDS: dict[str, ModelKind] = {
    DIFFUSION_POLICY: ModelKind(DIFFUSION_POLICY, RunConfig, load_config_file, DiffusionPolicy, load_policy,
                                build_diffusion_policy),
    diffusiondrive.KIND: ModelKind(diffusiondrive.KIND, diffusiondrive.DiffusionDriveRunConfig,
                                   diffusiondrive.read_config, diffusiondrive.DiffusionDrive,
                                   diffusiondrive.load_planner, diffusiondrive.build_for_training,
                                   denoising_wrappers=False, bounded_by_training_range=False),
    pad.KIND: ModelKind(pad.KIND, pad.PADRunConfig, pad.read_config, pad.PAD, pad.load_pad, pad.build_for_training),
}
# DiffusionDrive's baselines: the same scene encoder and decoder, other starting points.
for _module, _planner in ((diffusion_planner, diffusion_planner.DiffusionPlanner),
                          (regression_planner, regression_planner.RegressionPlanner)):
    KINDS[_module.KIND] = ModelKind(_module.KIND, diffusiondrive.DiffusionDriveRunConfig, diffusiondrive.read_config,
                                    _planner, partial(diffusiondrive.load_planner, planner_class=_planner),
                                    _module.build_for_training, denoising_wrappers=False,
                                    bounded_by_training_range=False)
# Offline-RL planners over state plans: Trajectory Diffuser and its Decision-Diffuser- and Diffuser-style baselines.
for _module, _planner in ((trajectory_diffuser, trajectory_diffuser.TrajectoryDiffuser),
                          (decision_diffuser, decision_diffuser.DecisionDiffuser), (diffuser, diffuser.Diffuser)):
    KINDS[_module.KIND] = ModelKind(_module.KIND, trajectory_diffuser.TrajectoryDiffuserRunConfig,
                                    trajectory_diffuser.read_config, _planner,
                                    partial(trajectory_diffuser.load_planner, planner_class=_planner),
                                    _module.build_for_training, denoising_wrappers=False)

# Motion synthesis: AAMDM and its plain per-frame diffusion baseline (AMDM-200 / AMDM-5 by config).
for _module, _model, _config in ((aamdm, aamdm.AAMDM, aamdm.AAMDMRunConfig), (amdm, amdm.AMDM, amdm.AMDMRunConfig)):
    KINDS[_module.KIND] = ModelKind(_module.KIND, _config, _module.read_config, _model, _module.load_planner,
                                    _module.build_for_training, denoising_wrappers=False)
# AAMDM's embedding: trained and loaded here like the others, but an autoencoder, not a policy (no decisions).
KINDS[motion_autoencoder.KIND] = ModelKind(motion_autoencoder.KIND, motion_autoencoder.MotionAutoencoderRunConfig,
                                           motion_autoencoder.read_config, motion_autoencoder.MotionAutoencoder,
                                           motion_autoencoder.load_autoencoder, motion_autoencoder.build_for_training,
                                           denoising_wrappers=False)


def kind_of(checkpoint: str | Path) -> ModelKind:
    name = checkpoint_kind(checkpoint)
    if name not in KINDS:
        raise CheckpointError(f"checkpoint {checkpoint} holds a model of kind {name!r}; this rtdp knows "
                              f"{', '.join(sorted(KINDS))}")
    return KINDS[name]


def kind_named(name: str) -> ModelKind:
    if name not in KINDS:
        raise ValueError(f"unknown model kind {name!r}; this rtdp knows {', '.join(sorted(KINDS))}")
    return KINDS[name]


def read_config(checkpoint: str | Path):
    """A checkpoint's run config, parsed by its kind's config class, without loading the weights."""
    return kind_of(checkpoint).read_config(Path(checkpoint))


def load_checkpoint(checkpoint: str | Path) -> tuple:
    """(model, run config) of any kind."""
    return kind_of(checkpoint).load(Path(checkpoint))
