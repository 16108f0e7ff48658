"""The data an int8 export is calibrated and checked on: observation windows drawn from the dataset the checkpoint
was trained on (`rtdp train` records it in the checkpoint's train_report.json), for deploy/quantize.py.

    export_int8(ExportSettings(checkpoint, precision="int8"))   # what `rtdp export --precision int8` runs
    check_int8(checkpoint, directory)                          # ... with --check: held-out windows, another seed
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from deploy.artifacts import ExportError, export_dir, load_manifest
from deploy.export import ExportSettings, check_export, export_policy
from deploy.kinds import kind_of, read_config
from envs.datasets import DatasetError, PolicyDataset, ReplayBuffer

HELD_OUT_SEED = 1  # the check's windows; calibration draws with seed 0
HELD_OUT_WINDOWS = 32


def calibration_data_path(checkpoint: str | Path, given: str | None) -> Path:
    if given:
        path = Path(given)
    else:
        report = Path(checkpoint) / "train_report.json"
        try:
            path = Path(json.loads(report.read_text())["data"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ExportError(f"int8 calibration needs the checkpoint's training data and {report} does not name "
                              f"it: pass --calibration-data DATA") from None
    if not path.exists():
        raise ExportError(f"int8 calibration data {path} does not exist: pass --calibration-data DATA")
    return path


def observation_windows(checkpoint: str | Path, data: Path, windows: int, seed: int) -> dict[str, torch.Tensor]:
    """`windows` raw observation windows and their action chunks (`action`), drawn at random from a dataset of the
    kind the checkpoint was trained on."""
    kind = kind_of(checkpoint).name
    if kind != "diffusion_policy":
        raise ExportError(f"int8 calibration reads Diffusion Policy datasets; a {kind} checkpoint exports fp32 or "
                          f"fp16")
    cfg = read_config(checkpoint)
    d, p = cfg.data, cfg.policy
    keys = [*d.state_keys, d.action_key, *([d.image_key] if d.image_key else [])]
    try:
        dataset = PolicyDataset(ReplayBuffer.load(data, keys=keys), p.horizon, p.n_obs_steps, p.n_action_steps,
                                d.state_keys, d.action_key, d.image_key)
    except (DatasetError, KeyError) as e:
        raise ExportError(f"int8 calibration data {data} does not fit the checkpoint: {e}") from None
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(dataset), size=min(windows, len(dataset)), replace=False)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in dataset.batch(np.sort(idx)).items()}


def export_int8(settings: ExportSettings) -> dict:
    """An int8 export calibrated on `settings.calibration_windows` windows of the checkpoint's training data (or of
    `settings.calibration_data`); returns the manifest."""
    data = calibration_data_path(settings.checkpoint, settings.calibration_data)
    windows = observation_windows(settings.checkpoint, data, settings.calibration_windows, seed=0)
    return export_policy(replace(settings, precision="int8", calibration_data=str(data.resolve())), windows)


def check_int8(checkpoint: str | Path, directory: str | Path | None = None, tolerance: float | None = None) -> dict:
    """check_export for an int8 export, on windows of its calibration data held out from calibration."""
    directory = Path(directory) if directory is not None else export_dir(checkpoint, "int8")
    manifest = load_manifest(directory, checkpoint)
    data = Path(manifest.get("quantisation", {}).get("calibration", {}).get("data") or "")
    held_out = observation_windows(checkpoint, calibration_data_path(checkpoint, str(data)), HELD_OUT_WINDOWS,
                                   HELD_OUT_SEED)
    return check_export(checkpoint, directory, tolerance, held_out=held_out)
