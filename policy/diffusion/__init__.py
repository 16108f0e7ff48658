"""Noise schedules and samplers shared by every policy, planner and acceleration."""

from .samplers import METHODS, CallCounter, as_timesteps, sample
from .schedule import BETA_SCHEDULES, PREDICTION_TYPES, NoiseSchedule

__all__ = ["BETA_SCHEDULES", "METHODS", "PREDICTION_TYPES", "CallCounter", "NoiseSchedule", "as_timesteps", "sample"]
