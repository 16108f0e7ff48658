"""A runnable policy from a checkpoint and settings: the one place that puts wrappers around a model.

    runtime = build_policy(RuntimeSettings(checkpoint="runs/push", sampler="ddim", steps=10, rti={"k0": 3},
                                           backend="onnxruntime"))
    runtime.policy.predict_chunk(obs)      # the decision contract (policy/contract.py), whatever is on
    runtime.config                         # what a report records: sampler, steps, RTI, cache, backend, ...

The order is fixed: the model (its sampler and steps set at build time), then the backend its encoder and
denoiser run on, then a block cache over the decision's step list, then RTI's warm start. The combination is
validated once, here: evaluation, calibration, export, profile, control and the node all build through it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from planners.clearance import ClearanceCheck, ClearanceConfig
from policy.cache import (
    CACHE_KINDS,
    CachedPolicy,
    CacheSchedule,
    CacheScheduleError,
    find_schedule,
    make_schedule,
    transformer_of,
)
from policy.checkpoint import weights_sha256
from policy.chunking import AnytimePolicy, ChunkingConfig, PrefixConditionedPolicy
from policy.guard import ActionGuard
from policy.rti import RTIPolicy, rti_config

from .artifacts import PRECISIONS, BackendUnavailable
from .backends import BACKENDS, BackendPolicy, GraphPolicy, OrtOptions, make_backend
from .kinds import kind_of, load_checkpoint

# The backends a kind that decides in one exported graph (a planner) runs on, beside torch.
GRAPH_BACKENDS = ("torch", "onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt")
ANYTIME_FIELDS = {"margin_ms", "period_ms", "mode", "max_budget_ms"}  # RuntimeSettings.anytime's keys


@dataclass
class RuntimeSettings:
    checkpoint: str
    sampler: str | None = None  # None: the checkpoint's inference config
    steps: int | None = None
    rti: dict | None = None  # policy.rti.RTIConfig fields, k0 an integer
    cache: str | None = None  # bac:S | uniform:S (transformer denoisers)
    backend: str = "torch"  # deploy.backends.BACKENDS; the engine ones read an export
    precision: str = "fp32"  # the network's: fp32 | fp16 | int8 (engine backends)
    export: str | None = None  # the export folder the engine backends read; None: the checkpoint's
    threads: int = 1  # intra-op threads of an engine backend
    ort: dict | None = None  # onnxruntime session settings (deploy.backends.OrtOptions); None: its defaults
    # The action dims that are binary commands, for a checkpoint written before its config recorded them (the
    # caller knows the task; the runtime does not import the tasks).
    discrete_action_dims: list[int] | None = None
    # Real-time chunking (policy.chunking.ChunkingConfig fields: method inpaint | guidance, delay, period_ms, ...):
    # each chunk denoised with the actions that run while it is computed held to the previous chunk's.
    chunking: dict | None = None
    # Anytime decisions: {"margin_ms", "period_ms": the control period, "mode": truncate | respace, "max_budget_ms":
    # a cap}; the decider gives each decision the time until the actions it has run out (policy.chunking).
    anytime: dict | None = None
    # A frame-predicting model (PAD) decodes its predicted frames into every chunk's extras only when something
    # shows them (a video); a control loop acts on the poses alone.
    predicted_frames: bool = False
    # A return-conditioned planner's target return (x the data's highest initial return-to-go, as the
    # checkpoint's `planner.target_return`); None: the checkpoint's.
    target_return: float | None = None
    # A driving planner's candidates checked against the other vehicles' constant-velocity forecasts before one
    # executes (planners.clearance.ClearanceConfig fields; {} for its defaults); None: the planner's own choice.
    clearance: dict | None = None


@dataclass
class Runtime:
    policy: object  # the decision contract, wrapped as the settings ask, every chunk checked (policy.guard)
    model: object  # the loaded model underneath
    run_cfg: object
    settings: RuntimeSettings
    rti: dict | None = None  # what RTI was built with (RTIPolicy.describe)
    cache: dict | None = None  # the cache schedule's summary
    config: dict = field(default_factory=dict)  # what a report's `config` records
    branches_per_call: int | None = None  # residual branches in one uncached call, for a transformer denoiser
    backend: object = None  # the engine or torch backend the policy runs on; None: the model's own torch modules
    rti_policy: object = None  # the RTI wrapper, when on (calibration reads its logged pairs and warm guesses)
    anytime_policy: object = None  # the anytime wrapper, when on (the decider sets each decision's budget)


def parse_cache(spec: str) -> tuple[str, int]:
    kind, _, budget = spec.partition(":")
    if kind not in CACHE_KINDS or not budget.isdigit() or int(budget) < 1:
        raise ValueError(f"--cache takes bac:S, error:S or uniform:S with S >= 1 the update budget per block, got "
                         f"{spec!r}")
    return kind, int(budget)


def load_model(settings: RuntimeSettings):
    """(model, run config): the checkpoint's model in eval mode, its sampler and steps set from the settings."""
    model, run_cfg = load_checkpoint(settings.checkpoint)
    if getattr(model.cfg, "discrete_action_dims", ()) is None:  # a checkpoint from before the field existed
        model.cfg.discrete_action_dims = list(settings.discrete_action_dims or [])
    model.configure_inference(settings.sampler, settings.steps)
    if settings.target_return is not None:
        if model.inference_config().get("target_return") is None:  # what the model's decision reads
            raise ValueError(f"a {model.spec.kind} checkpoint is not conditioned on a return: run it without "
                             f"a target return")
        model.cfg.target_return = float(settings.target_return)
    if hasattr(model, "decode_frames"):  # a frame-predicting model (PAD)
        model.decode_frames = settings.predicted_frames
    return model.eval(), run_cfg


def cache_schedule_for(model, checkpoint: str, spec: str, method: str, timesteps) -> CacheSchedule:
    """The cache schedule `spec` (bac:S | uniform:S) for a decision over `method` and `timesteps`, checked against
    the checkpoint's weights. Uniform schedules need no calibration and are made here; BAC ones come from
    `rtdp cache`."""
    kind, budget = parse_cache(spec)
    blocks = list(transformer_of(model).residual_branches())
    timesteps = [int(t) for t in timesteps]
    sha = weights_sha256(checkpoint)
    if kind == "uniform":
        return make_schedule("uniform", budget, method, timesteps, blocks, sha)
    schedule = find_schedule(checkpoint, kind, budget, method, timesteps)
    schedule.check(blocks, method, timesteps, sha)
    return schedule


def describe_cache(schedule: CacheSchedule) -> dict:
    return {"kind": schedule.kind, "budget": schedule.budget, "method": schedule.method,
            "steps": len(schedule.timesteps), "block_evals_per_denoise": schedule.block_evals,
            "uncached_block_evals": len(schedule.blocks) * len(schedule.timesteps), "selected": schedule.selected}


def validate(settings: RuntimeSettings) -> None:
    """What can be refused without loading anything."""
    if settings.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {settings.backend!r}")
    if settings.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {settings.precision!r}")
    if settings.precision == "int8" and settings.backend.startswith("torch"):
        raise BackendUnavailable("int8 networks run in the engine backends (onnxruntime, tensorrt) from `rtdp "
                                 "export --precision int8`; the torch backends run fp32 or fp16")
    if settings.steps is not None and settings.steps < 0:  # 0: a planner's draft alone; other kinds refuse it
        raise ValueError(f"steps must be >= 0, got {settings.steps}")
    if settings.target_return is not None and not math.isfinite(settings.target_return):
        raise ValueError(f"target_return must be a finite number, got {settings.target_return}")
    if settings.threads < 0:
        raise ValueError(f"threads must be >= 0, got {settings.threads}")
    if settings.ort is not None:
        OrtOptions.parse(settings.ort)
        if not settings.backend.startswith("onnxruntime"):
            raise ValueError(f"--ort sets onnxruntime's sessions; backend {settings.backend!r} has none")
    if settings.cache is not None:
        parse_cache(settings.cache)
        if settings.backend != "torch":
            raise ValueError("--cache runs the transformer's branches in torch; to cache on an engine, export a "
                             "fused graph with the schedule (rtdp export --cache ...)")
    if settings.rti is not None:
        rti_config(settings.rti)
    if settings.chunking is not None:
        ChunkingConfig(**settings.chunking)
        if settings.chunking.get("method") == "guidance" and settings.backend != "torch":
            raise ValueError(f"chunking by guidance differentiates through the denoiser: run it on the torch "
                             f"backend, not {settings.backend} (inpainting runs on any)")
    if settings.clearance is not None:
        unknown = set(settings.clearance) - set(ClearanceConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"clearance settings are {sorted(ClearanceConfig.__dataclass_fields__)}, got "
                             f"{sorted(unknown)}")
        ClearanceConfig(**settings.clearance)
    if settings.anytime is not None and set(settings.anytime) - ANYTIME_FIELDS:
        raise ValueError(f"anytime settings are {sorted(ANYTIME_FIELDS)}, got {sorted(settings.anytime)}")
    if settings.anytime is not None and settings.chunking is not None:
        raise ValueError("anytime decisions and prefix-conditioned chunking do not combine yet: pass one")
    if settings.export is not None and not settings.backend.startswith(("onnxruntime", "tensorrt")):
        raise ValueError(f"--export names the folder an engine backend reads; backend {settings.backend!r} runs "
                         f"the checkpoint's torch weights")


def build_policy(settings: RuntimeSettings, model=None, run_cfg=None, record_pairs: bool = False,
                 fused_graph: bool = False) -> Runtime:
    """The runnable policy the settings describe. `model` and `run_cfg` reuse a model already loaded from the same
    checkpoint with the same sampler settings; `record_pairs` makes RTI log (warm guess, full denoise) pairs for
    k0 calibration; `fused_graph` also loads an onnxruntime export's fused graph (the profiler times it; a decision
    calls the step graphs, so the runtime leaves its copy of the weights on disk)."""
    validate(settings)
    kind = kind_of(settings.checkpoint)
    if not kind.denoising_wrappers and any(x is not None for x in (settings.rti, settings.cache, settings.chunking,
                                                                   settings.anytime)):
        raise ValueError(f"RTI, the block cache, chunking and anytime decisions re-enter a denoising policy's "
                         f"sampler; a {kind.name} checkpoint decides in its own way: run it without them")
    if model is None:
        model, run_cfg = load_model(settings)
    policy, backend = model, None
    if settings.backend != "torch" or settings.precision != "fp32":  # torch at fp16 runs a half copy
        if not kind.denoising_wrappers and settings.backend not in GRAPH_BACKENDS:
            raise ValueError(f"a {kind.name} checkpoint decides in one exported graph: run it on torch or an "
                             f"onnxruntime backend, not {settings.backend}")
        backend = make_backend(settings.backend, model, settings.checkpoint, settings.threads, settings.precision,
                               settings.export, fused=fused_graph, ort_options=OrtOptions.parse(settings.ort))
        policy = BackendPolicy(policy, backend) if kind.denoising_wrappers else GraphPolicy(policy, backend)
    rti_cfg = rti_config(settings.rti) if settings.rti is not None else None
    # The step list a decision runs (RTI: the warm tail) is what a cache schedule is made for.
    decision = RTIPolicy(policy, rti_cfg) if rti_cfg is not None else policy
    cache = None
    if settings.cache is not None:
        schedule = cache_schedule_for(model, settings.checkpoint, settings.cache, decision.method,
                                      decision.timesteps)
        policy = CachedPolicy(policy, schedule)
        cache = describe_cache(schedule)
    rti = rti_policy = chunking = anytime_policy = None
    prefix = ChunkingConfig(**settings.chunking) if settings.chunking is not None else None
    if rti_cfg is not None:  # RTI conditions its own warm tails on the prefix
        policy = rti_policy = RTIPolicy(policy, rti_cfg, record_pairs=record_pairs, prefix=prefix)
        rti = policy.describe()
    elif prefix is not None:
        policy = PrefixConditionedPolicy(policy, prefix)
    if prefix is not None:
        chunking = prefix.describe()
    if settings.anytime is not None:
        fields = {k: v for k, v in settings.anytime.items() if k != "period_ms"}
        policy = anytime_policy = AnytimePolicy(policy, **fields)
    if settings.clearance is not None:
        policy = ClearanceCheck(policy, model, ClearanceConfig(**settings.clearance))
    config = {**model.inference_config(), "sampler": policy.method, "steps": len(policy.timesteps),
              "kind": model.spec.kind, "backend": settings.backend, "precision": settings.precision,
              "export": settings.export}
    if rti is not None:
        config["rti"] = rti
    if cache is not None:
        config["cache"] = cache
    if chunking is not None:
        config["prefix_conditioning"] = chunking
    if anytime_policy is not None:
        config["anytime"] = {**anytime_policy.describe(), **settings.anytime}
    if settings.clearance is not None:
        config["clearance"] = policy.describe()
    if backend is not None and hasattr(backend, "options"):
        config["ort"] = asdict(backend.options)
    stats = model.normalizer["action"].stats
    bounded = "min" in stats and kind.bounded_by_training_range
    guard = ActionGuard(policy, stats["min"], stats["max"]) if bounded else ActionGuard(policy)
    config["action_bounds"] = guard.bounds()
    return Runtime(guard, model, run_cfg, settings, rti, cache, config, residual_branches(model), backend,
                   rti_policy, anytime_policy)


def residual_branches(model) -> int | None:
    try:
        return len(transformer_of(model).residual_branches())
    except CacheScheduleError:
        return None
