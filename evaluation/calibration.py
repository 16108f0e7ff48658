"""Calibration runs: closed-loop episodes on calibration seeds (neither demos nor evaluation use them) that choose
an acceleration's settings for a checkpoint.

- `calibrate_rti`: RTI's k0, from episodes that run a full denoise at every step and log each decision's warm
  guess beside it (policy.rti.calibrate_k0).
- `calibrate_cache` (`rtdp cache`): BAC schedules for a transformer checkpoint, saved in its cache_schedule.json.
  Observations come from episodes of the uncached policy. For a full denoise the calibration starts from seeded
  noise; for an RTI tail it starts from the warm guesses those episodes produced, so the schedule is made for the
  inputs the tail really sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from deploy.kinds import read_config
from deploy.runtime import RuntimeSettings, build_policy
from envs.rollout import run_episode
from envs.tasks import discrete_action_dims
from policy.cache import calibrate, make_schedule, save_schedule, transformer_of
from policy.checkpoint import weights_sha256
from policy.rti import calibrate_k0

from .episodes import CALIBRATION_SEED_OFFSET, TimedPolicy
from .tasks import open_env, resolve_task


def calibrate_rti(settings, progress: bool = True):
    """Choose RTI's k0 for evaluation `settings` (evaluation.evaluate.EvalSettings) whose rti k0 is "auto"."""
    if settings.rti_calibration_episodes < 1:
        raise ValueError(f"RTI calibration needs >= 1 episode, got {settings.rti_calibration_episodes}")
    run_cfg = read_config(settings.checkpoint)
    task = resolve_task(settings.checkpoint, run_cfg, settings.task)
    runtime = build_policy(RuntimeSettings(
        checkpoint=settings.checkpoint, sampler=settings.sampler, steps=settings.steps,
        rti={**settings.rti, "k0": 0}, backend=settings.backend, precision=settings.precision,
        export=settings.export, ort=settings.ort, discrete_action_dims=discrete_action_dims(task)),
        record_pairs=True)
    rti = runtime.rti_policy
    env = open_env(settings.checkpoint, run_cfg, task, settings.rti_calibration_steps)
    act = TimedPolicy(rti)
    pairs = []
    for _ in _rollouts(env, act, act, settings.rti_calibration_episodes, settings.seed, rti.spec.n_obs_steps,
                       f"calibrate k0 {task}", progress):
        pairs += rti.pairs
    return calibrate_k0(pairs, runtime.model.schedule, margin=settings.rti_margin)


def _rollouts(env, act, timed: TimedPolicy, episodes: int, seed: int, n_obs_steps: int, desc: str, progress: bool):
    """Run `episodes` episodes of `act` on calibration seeds, yielding after each; the env is closed at the end."""
    try:
        for i in tqdm(range(episodes), desc=desc, disable=not progress, dynamic_ncols=True):
            episode_seed = CALIBRATION_SEED_OFFSET + seed + i
            timed.reset(episode_seed)
            run_episode(env, act, n_obs_steps, episode_seed)
            yield episode_seed
    finally:
        env.close()


@dataclass
class CacheSettings:
    checkpoint: str
    budgets: list[int]
    sampler: str | None = None  # None: the checkpoint's inference config
    steps: int | None = None
    rti: dict | None = None  # make the schedule for this RTI tail instead
    episodes: int = 2
    samples: int = 64  # calibration observations, spread evenly over the episodes' decisions
    bubble_n: int = 3
    kind: str = "bac"  # bac | error (policy/cache_error.py: Uniform's evaluations, placed by final-chunk error)
    seed: int = 0
    task: str | None = None
    max_episode_steps: int | None = 200


@dataclass
class CacheResult:
    path: str
    schedules: list[dict] = field(default_factory=list)


def calibrate_cache(settings: CacheSettings, progress: bool = True) -> CacheResult:
    import torch

    if settings.episodes < 1 or settings.samples < 1:
        raise ValueError(f"cache calibration needs >= 1 episode and sample, got {settings.episodes}, "
                         f"{settings.samples}")
    if not settings.budgets or min(settings.budgets) < 1:
        raise ValueError(f"cache budgets must be >= 1, got {settings.budgets}")
    run_cfg = read_config(settings.checkpoint)
    task = resolve_task(settings.checkpoint, run_cfg, settings.task)
    runtime = build_policy(RuntimeSettings(checkpoint=settings.checkpoint, sampler=settings.sampler,
                                           steps=settings.steps, rti=settings.rti,
                                           discrete_action_dims=discrete_action_dims(task)))
    actor, model = runtime.rti_policy or runtime.policy.inner, runtime.model
    blocks = list(transformer_of(model).residual_branches())
    method, timesteps = actor.method, actor.timesteps  # the step list a decision runs (RTI: its warm tail)
    act = TimedPolicy(runtime.policy)
    histories: list[dict[str, np.ndarray]] = []
    guesses: list[torch.Tensor] = []

    def recording(history):
        guess = actor.warm_guess(actor.cfg.n_exec) if settings.rti is not None else None
        if settings.rti is None or guess is not None:  # RTI: only decisions that warm-start
            histories.append({k: v.copy() for k, v in history.items()})
            if guess is not None:
                guesses.append(guess)
        return act(history)

    env = open_env(settings.checkpoint, run_cfg, task, settings.max_episode_steps)
    for _ in _rollouts(env, recording, act, settings.episodes, settings.seed, actor.spec.n_obs_steps,
                       f"cache calibration rollouts {task}", progress):
        pass
    if not histories:
        raise ValueError("the calibration episodes made no decision to calibrate on")
    pick = np.unique(np.linspace(0, len(histories) - 1, min(settings.samples, len(histories))).round().astype(int))
    obs = {k: torch.from_numpy(np.stack([histories[i][k] for i in pick])) for k in histories[0]}
    with torch.no_grad():
        cond = model.condition(obs)
    g = torch.Generator().manual_seed(settings.seed)
    if settings.rti is not None:
        x_init = torch.cat([guesses[i] for i in pick])
    else:
        x_init = torch.randn(model.chunk_shape(cond.shape[0]), generator=g)
    if settings.kind not in ("bac", "error"):
        raise ValueError(f"cache calibration makes bac or error schedules, got {settings.kind!r}")
    calibration = calibrate(model, cond, x_init, timesteps, method, generator=g, costs=settings.kind == "error")
    sha = weights_sha256(settings.checkpoint)
    result = CacheResult(path="")
    for budget in settings.budgets:
        schedule = make_schedule(settings.kind, budget, method, timesteps, blocks, sha, calibration,
                                 settings.bubble_n)
        result.path = str(save_schedule(settings.checkpoint, schedule))
        result.schedules.append({"kind": schedule.kind, "budget": budget, "method": method,
                                 "steps": len(timesteps), "block_evals_per_decision": schedule.block_evals,
                                 "uncached_block_evals": len(blocks) * len(timesteps),
                                 "selected": schedule.selected, "samples": int(cond.shape[0])})
    return result


def result_dict(result: CacheResult) -> dict:
    return asdict(result)
