"""The accelerations an evaluation (or a control run) asks for, put around a loaded policy: a backend, a block
cache, an RTI warm start. The orchestrator resolves and validates them once, before any worker starts, so a bad
setting is refused with a clear message instead of failing inside a worker."""

from __future__ import annotations

from dataclasses import asdict

from .evaluation import CALIBRATION_SEED_OFFSET, EvalSettings, TimedPolicy, _load_for_eval, resolve_task


def rti_config(settings: EvalSettings):
    from policy.rti import RTIConfig

    fields = dict(settings.rti)
    if fields.get("k0") == "auto":
        raise ValueError("RTI k0 is 'auto': calibrate it first (calibrate_rti)")
    try:
        return RTIConfig(**fields)
    except TypeError as e:
        raise ValueError(f"bad RTI settings {fields}: {e}") from None


def wrap_policy(policy, settings: EvalSettings):
    """The loaded policy behind the settings' backend, cache and RTI wrappers (a cache made for an RTI tail
    goes inside the RTI wrapper)."""
    if settings.backend != "torch":
        from .backends import BackendPolicy, make_backend

        policy = BackendPolicy(policy, make_backend(settings.backend, policy, settings.checkpoint, threads=1,
                                                    precision=settings.precision))
    if settings.cache is not None:
        from .caching import cached

        return cached(policy, settings)[0]
    if settings.rti is not None:
        from policy.rti import RTIPolicy

        return RTIPolicy(policy, rti_config(settings))
    return policy


def resolve_accelerations(settings: EvalSettings, progress: bool = True) -> tuple[EvalSettings, dict | None,
                                                                                   dict | None]:
    """(settings with an RTI k0 of 'auto' calibrated, what the report records of RTI, of the cache)."""
    rti = cache = None
    if settings.rti is None and settings.cache is None and settings.backend == "torch":
        return settings, rti, cache
    from envs.tasks import discrete_action_dims
    from policy.checkpoint import load_policy

    policy, run_cfg = load_policy(settings.checkpoint)  # once, for every check below
    if run_cfg.policy.discrete_action_dims is None:  # a checkpoint from before the field existed
        policy.cfg.discrete_action_dims = discrete_action_dims(resolve_task(settings, run_cfg))
    if settings.rti is not None:
        calibration = None
        if settings.rti.get("k0") == "auto":
            calibration = calibrate_rti(settings, progress)
            settings = EvalSettings(**{**asdict(settings), "rti": {**settings.rti, "k0": calibration.k0}})
        rti = describe_rti(policy, settings)
        if calibration is not None:
            rti["calibration"] = calibration.to_dict()
    if settings.cache is not None:
        cache = describe_cache(policy, settings)
    if settings.backend != "torch":
        check_backend(policy, settings)
    return settings, rti, cache


def calibrate_rti(settings: EvalSettings, progress: bool = True):
    """Choose RTI's k0 from closed-loop episodes that run a full denoise at every step, logging each decision's
    warm guess beside the full result (policy.rti.calibrate_k0). Runs in this process, on calibration seeds."""
    from tqdm import tqdm

    from envs.rollout import run_episode
    from policy.rti import RTIPolicy, calibrate_k0

    if settings.rti_calibration_episodes < 1:
        raise ValueError(f"RTI calibration needs >= 1 episode, got {settings.rti_calibration_episodes}")
    policy, run_cfg, task, env = _load_for_eval(settings, max_episode_steps=settings.rti_calibration_steps)
    rti = RTIPolicy(policy, rti_config(EvalSettings(**{**asdict(settings), "rti": {**settings.rti, "k0": 0}})),
                    record_pairs=True)
    act = TimedPolicy(rti)
    pairs = []
    for i in tqdm(range(settings.rti_calibration_episodes), desc=f"calibrate k0 {task}", disable=not progress,
                  dynamic_ncols=True):
        seed = CALIBRATION_SEED_OFFSET + settings.seed + i
        act.reset(seed)
        run_episode(env, act, run_cfg.policy.n_obs_steps, seed)
        pairs += rti.pairs
    env.close()
    return calibrate_k0(pairs, policy.schedule, margin=settings.rti_margin)


def check_backend(policy, settings: EvalSettings) -> None:
    """Refuse an unusable backend before any worker starts: a missing or corrupt export, a provider this
    onnxruntime lacks, or a combination the backend cannot run."""
    from .backends import make_backend

    if settings.cache is not None:
        raise ValueError("--cache runs the transformer's branches in torch; to cache on onnxruntime, export a "
                         "fused graph with the schedule (rtdp export --cache ...)")
    make_backend(settings.backend, policy, settings.checkpoint, threads=1, precision=settings.precision)


def describe_cache(policy, settings: EvalSettings) -> dict:
    """Resolve the cache schedule before any worker starts (a missing or stale one is refused here)."""
    from .caching import resolve_schedule

    s = resolve_schedule(policy, settings.checkpoint, settings.cache, settings.sampler, settings.steps, settings.rti)
    return {"kind": s.kind, "budget": s.budget, "method": s.method, "steps": len(s.timesteps),
            "block_evals_per_denoise": s.block_evals, "uncached_block_evals": len(s.blocks) * len(s.timesteps),
            "selected": s.selected}


def describe_rti(policy, settings: EvalSettings) -> dict:
    """Validate the RTI settings against the checkpoint before any worker starts; what the report records."""
    from policy.rti import RTIPolicy

    return RTIPolicy(policy, rti_config(settings)).describe()
