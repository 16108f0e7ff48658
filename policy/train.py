"""Training loop for any model kind (Diffusion Policy by default): AdamW with warm-up and cosine decay, EMA
weights, periodic checkpoints, exact resume, and data-parallel training under torchrun (gloo on CPU, NCCL on GPU;
rank 0 writes).

Reproducibility: every step reseeds the RNG from (seed, step, rank) and draws its batch from a permutation
seeded by (seed, epoch), so a run resumed from a checkpoint takes the same steps as one never stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import (
    load_run_config,
    load_tensors,
    record_checksums,
    save_checkpoint,
    save_tensors,
    verify_checksums,
)
from .config import RunConfig, TrainConfig, config_to_yaml
from .diffusion_policy import DiffusionPolicy
from .ema import EMA
from .normalizer import RANGE_EPS, FieldNormalizer, Normalizer

TRAIN_STATE = "train_state.safetensors"
TRAIN_META = "train_state.json"


class TrainingData(Protocol):
    state_dim: int
    action_dim: int
    image_shape: list[int] | None

    def __len__(self) -> int: ...
    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...
    def all_states(self) -> np.ndarray: ...
    def all_actions(self) -> np.ndarray: ...


@dataclass
class TrainSummary:
    steps: int
    start_step: int
    world_size: int
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    param_checksums: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        first = self.losses[0][1] if self.losses else None
        last = self.losses[-1][1] if self.losses else None
        return {"steps": self.steps, "start_step": self.start_step, "world_size": self.world_size,
                "seconds": round(self.seconds, 3), "loss_first": first, "loss_last": last,
                "losses": self.losses, "param_checksums": self.param_checksums}


def learning_rate(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to tc.lr, then cosine decay to 0 at tc.steps."""
    if tc.warmup_steps > 0 and step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    return tc.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(step: int, n: int, batch_size: int, rank: int, world: int, seed: int) -> np.ndarray:
    """This rank's share of the global batch at `step`: epoch permutations without replacement, or draws with
    replacement when the data holds fewer windows than one global batch."""
    global_batch = batch_size * world
    if n < global_batch:
        rng = np.random.default_rng([seed, step])
        return rng.integers(0, n, size=global_batch)[rank::world]
    per_epoch = n // global_batch
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * global_batch : (k + 1) * global_batch][rank::world]


def fit_normalizer(data: TrainingData, range_eps: float = RANGE_EPS, discrete_dims: list[int] = (),
                   discrete_scale: float = 1.0) -> Normalizer:
    action = FieldNormalizer.fit_minmax(data.all_actions(), range_eps)
    if discrete_scale != 1.0:
        action = action.shrink(discrete_dims, discrete_scale)
    fields = {"state": FieldNormalizer.fit_minmax(data.all_states(), range_eps), "action": action}
    if data.image_shape is not None:
        fields["image"] = FieldNormalizer.image()
    return Normalizer(fields)


def _fill_dims(cfg: RunConfig, data: TrainingData) -> None:
    p = cfg.policy
    for name, value in (("state_dim", data.state_dim), ("action_dim", data.action_dim)):
        if getattr(p, name) not in (0, value):
            raise ValueError(f"policy.{name}={getattr(p, name)} in the config, but the dataset has {value}")
        setattr(p, name, value)
    if p.image_shape is not None and data.image_shape is not None and list(p.image_shape) != data.image_shape:
        raise ValueError(f"policy.image_shape={p.image_shape} in the config, but the dataset has {data.image_shape}")
    p.image_shape = data.image_shape
    if p.discrete_action_dims is None:  # `rtdp train` fills it from the task; a bare call has none
        p.discrete_action_dims = []
    bad = [d for d in p.discrete_action_dims if not -p.action_dim <= d < p.action_dim]
    if bad:
        raise ValueError(f"policy.discrete_action_dims {bad} are outside the {p.action_dim}-d action")
    p.discrete_action_dims = [d % p.action_dim for d in p.discrete_action_dims]
    if p.discrete_action_scale <= 0:
        raise ValueError(f"policy.discrete_action_scale must be > 0, got {p.discrete_action_scale}")
    if p.discrete_action_scale != 1.0 and not p.discrete_action_dims:
        raise ValueError("policy.discrete_action_scale is set but no policy.discrete_action_dims are known")


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def build_diffusion_policy(cfg: RunConfig, data: TrainingData) -> DiffusionPolicy:
    """A new Diffusion Policy for `data`: its dimensions filled from the data, its normaliser fitted on it."""
    _fill_dims(cfg, data)
    p = cfg.policy
    return DiffusionPolicy(p, fit_normalizer(data, cfg.data.normalizer_range_eps, p.discrete_action_dims,
                                             p.discrete_action_scale))


def train(cfg, data, out_dir: str | Path, resume: bool = False, progress: bool = True, overwrite: bool = False,
          build=build_diffusion_policy) -> TrainSummary:
    """Train into `out_dir`. A folder that already holds files is refused unless `resume` (continue its run) or
    `overwrite` (replace it); everything is checked before any file is written.

    Any model kind trains here: `build(cfg, data)` makes the model (filling what the config takes from the data),
    and the model's `forward(batch)` is its training loss. `data` has `__len__` and `batch(indices)`."""
    out_dir = Path(out_dir)
    if not resume and not overwrite and out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} already holds files; nothing was written (pass --resume to continue its run, "
                         f"--overwrite to replace it, or choose another --out)")
    rank, world = _distributed()
    tc = cfg.train
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(tc.threads if tc.threads > 0 else max(1, (os.cpu_count() or 1) // local_world))
    if tc.steps < 1 or tc.batch_size < 1:
        raise ValueError(f"train.steps and train.batch_size must be >= 1, got {tc.steps}, {tc.batch_size}")

    torch.manual_seed(tc.seed)  # the initial weights are the same on every rank
    policy = build(cfg, data)
    ema = EMA(policy, tc.ema_power, tc.ema_max_decay) if tc.ema else None
    opt = torch.optim.AdamW(policy.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    start = 0
    if resume:
        start = _restore(out_dir, cfg, policy, ema, opt)
        if start >= tc.steps:
            raise ValueError(f"cannot resume: the run in {out_dir} is already at step {start}, and train.steps is "
                             f"{tc.steps}; pass a larger train.steps to train on")
    model = torch.nn.parallel.DistributedDataParallel(policy) if world > 1 else policy

    summary = TrainSummary(steps=tc.steps, start_step=start, world_size=world, seconds=0.0)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(range(start, tc.steps), desc="train", disable=not progress or rank != 0, initial=start,
               total=tc.steps, dynamic_ncols=True)
    t0 = time.perf_counter()
    policy.train()
    running = []
    for step in bar:
        batch = data.batch(batch_indices(step, len(data), tc.batch_size, rank, world, tc.seed))
        torch.manual_seed(int(np.random.SeedSequence([tc.seed, step, rank]).generate_state(1)[0]))
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, tc)
        loss = model({k: torch.from_numpy(v) for k, v in batch.items()})
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss)} at step {step}; the last checkpoint in "
                                     f"{out_dir} is from before it (lower train.lr or check the data)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(policy)
        running.append(float(loss.detach()))
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            mean = float(np.mean(running))
            summary.losses.append((done, mean))
            running.clear()
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{learning_rate(step, tc):.2e}")
        if rank == 0 and (done % tc.checkpoint_every == 0 or done == tc.steps):
            _save(out_dir, cfg, policy, ema, opt, done)
    summary.seconds = time.perf_counter() - t0
    summary.param_checksums = _checksums(policy, world)
    if rank == 0:
        (out_dir / "train_report.json").write_text(json.dumps(summary.to_dict(), indent=2))
        plot_losses(summary.losses, out_dir / "loss.png", f"{cfg.kind}, world size {world}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def plot_losses(losses: list[tuple[int, float]], path: Path, title: str) -> None:
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, values = zip(*losses, strict=True)
    ax.plot(steps, values)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over log interval)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _checksums(policy: torch.nn.Module, world: int) -> list[float]:
    """Sum of all weights on each rank: equal across ranks exactly when data-parallel training kept them in step."""
    local = torch.stack([p.detach().double().sum() for p in policy.parameters()]).sum().reshape(1)
    if world == 1:
        return [float(local)]
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return [float(g) for g in gathered]


def _save(out_dir: Path, cfg: RunConfig, policy: DiffusionPolicy, ema: EMA | None, opt, step: int) -> None:
    save_checkpoint(out_dir, cfg, ema.averaged if ema is not None else policy)
    tensors = {f"model.{k}": v for k, v in policy.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.averaged.state_dict().items()})
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update(opt_tensors)
    save_tensors(out_dir / TRAIN_STATE, tensors)
    meta = {"step": step, "ema_updates": ema.updates if ema is not None else 0, "optimizer": opt_meta}
    (out_dir / TRAIN_META).write_text(json.dumps(meta))
    record_checksums(out_dir, (TRAIN_STATE, TRAIN_META))


def _restore(out_dir: Path, cfg: RunConfig, policy: DiffusionPolicy, ema: EMA | None, opt) -> int:
    for name in (TRAIN_STATE, TRAIN_META):
        if not (out_dir / name).is_file():
            raise FileNotFoundError(f"cannot resume: {out_dir / name} is missing")
    verify_checksums(out_dir)
    saved = load_run_config(out_dir, type(cfg))
    saved.train.steps = cfg.train.steps  # training on past the first plan is allowed
    if config_to_yaml(saved) != config_to_yaml(cfg):
        raise ValueError(f"cannot resume: the config differs from {out_dir / 'config.yaml'} (other than "
                         "train.steps); start a new run folder instead")
    tensors = load_tensors(out_dir / TRAIN_STATE)
    meta = json.loads((out_dir / TRAIN_META).read_text())
    policy.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.averaged.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        ema.updates = meta["ema_updates"]
    _load_optimizer(opt, tensors, meta["optimizer"])
    return int(meta["step"])
