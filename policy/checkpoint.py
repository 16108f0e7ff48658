"""Checkpoint folders: `config.yaml` (the full resolved run config), `model.safetensors` (inference weights)
and `normalizer.json`, with `checksums.json` recording the sha256 of each. Nothing is pickled. Loading verifies
every recorded checksum (a flipped byte anywhere is refused, naming the file) and names the tensor that does not
fit. Checkpoints written before checksums existed load unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, RunConfig, config_from_dict, config_to_yaml
from .diffusion_policy import DiffusionPolicy
from .normalizer import Normalizer

CONFIG, WEIGHTS, NORMALIZER = "config.yaml", "model.safetensors", "normalizer.json"
CHECKSUMS = "checksums.json"


class CheckpointError(ValueError):
    pass


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda p: save_file(data, str(p), metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def save_checkpoint(directory: str | Path, cfg: RunConfig, policy: DiffusionPolicy) -> Path:
    """Write the three files; each is written to a temporary name first, so a crash leaves no half file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic(directory / CONFIG, lambda p: p.write_text(config_to_yaml(cfg)))
    _atomic(directory / NORMALIZER, policy.normalizer.save)
    save_tensors(directory / WEIGHTS, policy.state_dict(), metadata={"format": "rtdp-policy-v1"})
    record_checksums(directory, (CONFIG, WEIGHTS, NORMALIZER))
    return directory


def record_checksums(directory: str | Path, names) -> None:
    """Add (or refresh) the sha256 of the named files in the folder's checksums.json."""
    directory = Path(directory)
    path = directory / CHECKSUMS
    sums = json.loads(path.read_text()) if path.is_file() else {}
    sums.update({name: file_sha256(directory / name) for name in names})
    _atomic(path, lambda p: p.write_text(json.dumps(sums, indent=1, sort_keys=True)))


def verify_checksums(directory: str | Path, names=None) -> None:
    """Check the named files (default: every one recorded) against checksums.json; a folder without one (made
    before checksums existed) passes."""
    directory = Path(directory)
    path = directory / CHECKSUMS
    if not path.is_file():
        return
    try:
        sums = json.loads(path.read_text())
        if not isinstance(sums, dict):
            raise ValueError("not a mapping")
    except ValueError as e:
        raise CheckpointError(f"{path} is not a valid checksum file: {e}") from None
    for name in names if names is not None else sorted(sums):
        if name in sums and (not (directory / name).is_file() or file_sha256(directory / name) != sums[name]):
            raise CheckpointError(f"{directory / name} does not match the sha256 recorded in {path}: it is "
                                  f"corrupt or was changed after it was saved")


DEFAULT_KIND = "diffusion_policy"  # what a config.yaml without `kind:` holds (every checkpoint made before it)


def read_config_dict(directory: str | Path) -> dict:
    """config.yaml as a mapping, whatever kind of model it describes."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {CONFIG}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping at the top level")
    return data


def checkpoint_kind(directory: str | Path) -> str:
    kind = read_config_dict(directory).get("kind", DEFAULT_KIND)
    if not isinstance(kind, str):
        raise CheckpointError(f"{Path(directory) / CONFIG}: kind must be a name, got {kind!r}")
    return kind


def load_config_file(directory: str | Path) -> RunConfig:
    """A Diffusion Policy checkpoint's run config."""
    path = Path(directory) / CONFIG
    data = read_config_dict(directory)
    kind = data.get("kind", DEFAULT_KIND)
    if kind != DEFAULT_KIND:
        raise CheckpointError(f"{path} holds a {kind!r} model, not a {DEFAULT_KIND}")
    try:
        return config_from_dict(data, str(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_run_config(directory: str | Path, config_class: type = RunConfig):
    """A checkpoint's run config parsed by `config_class` (a model kind's run config dataclass)."""
    if config_class is RunConfig:
        return load_config_file(directory)
    path = Path(directory) / CONFIG
    try:
        return config_from_dict(read_config_dict(directory), str(path), config_class)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def open_checkpoint(directory: str | Path, config_class: type = RunConfig) -> tuple[object, Normalizer]:
    """(run config, normaliser) of a checkpoint folder, every file present and matching its checksum."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    for name in (CONFIG, WEIGHTS, NORMALIZER):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {name} (expected {CONFIG}, {WEIGHTS}, "
                                  f"{NORMALIZER})")
    verify_checksums(directory, (CONFIG, WEIGHTS, NORMALIZER))
    cfg = load_run_config(directory, config_class)
    try:
        normalizer = Normalizer.load(directory / NORMALIZER)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return cfg, normalizer


def load_policy(directory: str | Path) -> tuple[DiffusionPolicy, RunConfig]:
    """A Diffusion Policy checkpoint, its sampler as its config gives it (configure_inference changes it)."""
    cfg, normalizer = open_checkpoint(directory)
    policy = DiffusionPolicy(cfg.policy, normalizer)
    load_weights(policy, Path(directory) / WEIGHTS)
    return policy.eval(), cfg


def load_planner_checkpoint(directory: str | Path, config_class: type, planner_class: type) -> tuple:
    """(planner in eval mode, run config) of a planner checkpoint whose `kind` must be `planner_class.kind`;
    the planner is built as `planner_class(run_cfg.planner, normalizer)`."""
    run_cfg, normalizer = open_checkpoint(directory, config_class)
    if run_cfg.kind != planner_class.kind:
        raise ValueError(f"{directory} holds a {run_cfg.kind!r} planner, not a {planner_class.kind!r}")
    model = planner_class(run_cfg.planner, normalizer)
    load_weights(model, Path(directory) / WEIGHTS)
    return model.eval(), run_cfg


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a safetensors file into `module`, refusing missing, unexpected or mis-shaped tensors by name."""
    state = load_tensors(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append("tensors of another shape: " + "; ".join(wrong[:5]))
    if problems:
        raise CheckpointError(f"{path} does not fit the model its config describes: " + ", ".join(problems))
    module.load_state_dict(state)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(directory: str | Path) -> str:
    """Identifies the weights a derived artefact (a cache schedule, an ONNX export) was made from."""
    return file_sha256(Path(directory) / WEIGHTS)
