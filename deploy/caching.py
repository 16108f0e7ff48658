"""`rtdp cache`: calibrate BAC schedules for a transformer checkpoint on its own task and save them in the
checkpoint's cache_schedule.json.

Observations come from closed-loop episodes of the uncached policy on calibration seeds (neither demos nor
evaluation use them). For a full denoise the calibration starts from seeded noise; for an RTI tail it starts
from the warm guesses those episodes produced, so the schedule is made for the inputs the tail really sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .accelerations import rti_config
from .evaluation import CALIBRATION_SEED_OFFSET, EvalSettings, TimedPolicy, _load_for_eval


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
    seed: int = 0
    task: str | None = None
    max_episode_steps: int | None = 200


@dataclass
class CacheResult:
    path: str
    schedules: list[dict] = field(default_factory=list)


def step_list(policy, sampler: str | None, steps: int | None, rti: dict | None) -> tuple[str, list[int]]:
    """The (method, timesteps) a decision runs: what a cache schedule must be made for."""
    if rti is not None:
        from policy.rti import RTIPolicy

        r = RTIPolicy(policy, rti_config(EvalSettings(checkpoint="", rti=rti)))
        return r.cfg.sampler, r.tail
    return sampler or policy.cfg.inference.sampler, policy.inference_timesteps(steps).tolist()


def calibrate_cache(settings: CacheSettings, progress: bool = True) -> CacheResult:
    import torch
    from tqdm import tqdm

    from envs.rollout import run_episode
    from policy.cache import calibrate, make_schedule, save_schedule, transformer_of
    from policy.checkpoint import weights_sha256
    from policy.rti import RTIPolicy

    if settings.episodes < 1 or settings.samples < 1:
        raise ValueError(f"cache calibration needs >= 1 episode and sample, got {settings.episodes}, "
                         f"{settings.samples}")
    eval_settings = EvalSettings(checkpoint=settings.checkpoint, task=settings.task,
                                 max_episode_steps=settings.max_episode_steps, rti=settings.rti)
    policy, run_cfg, task, env = _load_for_eval(eval_settings)
    blocks = list(transformer_of(policy).residual_branches())
    method, timesteps = step_list(policy, settings.sampler, settings.steps, settings.rti)
    actor = RTIPolicy(policy, rti_config(eval_settings)) if settings.rti else policy
    act = TimedPolicy(actor, settings.sampler, settings.steps)
    histories: list[dict[str, np.ndarray]] = []
    guesses: list[torch.Tensor] = []

    def recording(history):
        if settings.rti is None or actor._chunk is not None:  # RTI: only decisions that warm-start
            histories.append({k: v.copy() for k, v in history.items()})
            if settings.rti is not None:
                guesses.append(actor.shifted_guess(actor.cfg.n_exec))
        return act(history)

    for i in tqdm(range(settings.episodes), desc=f"cache calibration rollouts {task}", disable=not progress,
                  dynamic_ncols=True):
        seed = CALIBRATION_SEED_OFFSET + settings.seed + i
        act.reset(seed)
        run_episode(env, recording, run_cfg.policy.n_obs_steps, seed)
    env.close()
    if not histories:
        raise ValueError("the calibration episodes made no decision to calibrate on")
    pick = np.unique(np.linspace(0, len(histories) - 1, min(settings.samples, len(histories))).round().astype(int))
    obs = {k: torch.from_numpy(np.stack([histories[i][k] for i in pick])) for k in histories[0]}
    with torch.no_grad():
        cond = policy.condition(obs)
    g = torch.Generator().manual_seed(settings.seed)
    if settings.rti is not None:
        x_init = torch.cat([guesses[i] for i in pick])
    else:
        x_init = torch.randn(policy.chunk_shape(cond.shape[0]), generator=g)
    calibration = calibrate(policy, cond, x_init, timesteps, method, generator=g)
    sha = weights_sha256(settings.checkpoint)
    result = CacheResult(path="")
    for budget in settings.budgets:
        schedule = make_schedule("bac", budget, method, timesteps, blocks, sha, calibration,
                                 settings.bubble_n)
        result.path = str(save_schedule(settings.checkpoint, schedule))
        result.schedules.append({"kind": schedule.kind, "budget": budget, "method": method,
                                 "steps": len(timesteps), "block_evals_per_decision": schedule.block_evals,
                                 "uncached_block_evals": len(blocks) * len(timesteps),
                                 "selected": schedule.selected, "samples": int(cond.shape[0])})
    return result


def result_dict(result: CacheResult) -> dict:
    return asdict(result)


def parse_cache(spec: str) -> tuple[str, int]:
    kind, _, budget = spec.partition(":")
    if kind not in ("bac", "uniform") or not budget.isdigit():
        raise ValueError(f"--cache takes bac:S or uniform:S with S the update budget per block, got {spec!r}")
    return kind, int(budget)


def resolve_schedule(policy, checkpoint: str, spec: str, sampler: str | None, steps: int | None, rti: dict | None):
    """The cache schedule `spec` (bac:S | uniform:S) for the step list this evaluation runs, checked against
    the checkpoint's weights. Uniform schedules need no calibration and are made here."""
    from policy.cache import find_schedule, make_schedule, transformer_of
    from policy.checkpoint import weights_sha256

    kind, budget = parse_cache(spec)
    blocks = list(transformer_of(policy).residual_branches())
    method, timesteps = step_list(policy, sampler, steps, rti)
    sha = weights_sha256(checkpoint)
    if kind == "uniform":
        return make_schedule("uniform", budget, method, timesteps, blocks, sha)
    schedule = find_schedule(checkpoint, kind, budget, method, timesteps)
    schedule.check(blocks, method, timesteps, sha)
    return schedule


def cached(policy, settings: EvalSettings):
    """Wrap `policy` for an evaluation's --cache (and --rti) settings."""
    from policy.cache import CachedDenoiser, CachedPolicy
    from policy.rti import RTIPolicy

    schedule = resolve_schedule(policy, settings.checkpoint, settings.cache, settings.sampler, settings.steps,
                                settings.rti)
    if settings.rti is not None:
        return RTIPolicy(policy, rti_config(settings), tail_denoiser=CachedDenoiser(policy, schedule)), schedule
    return CachedPolicy(policy, schedule), schedule
