"""ONNX export of a policy: the observation encoder, one denoiser step, and optionally a fused graph that unrolls
a fixed sampler step list (a full denoise, or an RTI tail entered from a warm start, with a BAC schedule as
static structure) so that one engine call returns the clean chunk.

    out/encoder.onnx    normalised obs fields (B, To, ...)          -> cond (B, To, F)
    out/denoiser.onnx   x (B, H, A), t (B,) int64, cond (B, To, F)   -> pred (B, H, A)
    out/fused.onnx      cond, x_init (B, H, A), step_noise (K, B, H, A) -> x0 (B, H, A)
    out/manifest.json   names, shapes, opset, schedule tables, normaliser, sampler settings, file hashes

Normalisation stays outside the graphs: the manifest carries the normaliser, and rtdp's backends apply the same
one in torch. Every graph's inputs and outputs are float32. With `precision="fp16"` (written to <checkpoint>/
onnx-fp16) the network runs in float16 between casts, while the sampler arithmetic in the fused graph, the
accumulation of x_t, stays float32. `check_export` compares every graph and the sampled chunk with the float32
torch policy on seeded inputs and raises if any differs by more than the precision's tolerance.
"""

from __future__ import annotations

import copy
import datetime
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from policy.checkpoint import file_sha256

MANIFEST = "manifest.json"
FORMAT = 1
PRECISIONS = ("fp32", "fp16")
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}  # max abs error against the float32 torch policy


class ExportError(ValueError):
    pass


@dataclass
class ExportSettings:
    checkpoint: str
    out: str | None = None  # default: export_dir(checkpoint, precision)
    opset: int = 17
    fused: bool = True
    sampler: str | None = None  # the fused graph's sampler and steps; None: the checkpoint's inference config
    steps: int | None = None
    rti_k0: int | None = None  # fuse the RTI tail [k0 .. 0] (entered from a warm start) instead of a full denoise
    cache: str | None = None  # fuse a BAC / Uniform schedule (transformer policies): bac:S | uniform:S
    precision: str = "fp32"  # the network's precision: fp32 | fp16 (inputs, outputs and sampler stay fp32)


def export_dir(checkpoint: str | Path, precision: str = "fp32") -> Path:
    """Where `rtdp export` writes, and the onnxruntime / TensorRT backends read, a checkpoint's graphs."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return Path(checkpoint) / ("onnx" if precision == "fp32" else f"onnx-{precision}")


def network_in(policy, precision: str):
    """The policy whose network computes in `precision` (a copy for fp16; its noise schedule, a plain object,
    stays float32)."""
    if precision == "fp32":
        return policy
    if precision != "fp16":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return copy.deepcopy(policy).half()


def _dtype(policy) -> torch.dtype:
    return next(policy.parameters()).dtype


class _Encoder(nn.Module):
    def __init__(self, policy, keys: list[str]):
        super().__init__()
        self.policy, self.keys, self.dtype = policy, keys, _dtype(policy)

    def forward(self, *fields):
        return self.policy.encode_obs({k: v.to(self.dtype) for k, v in zip(self.keys, fields, strict=True)}).float()


class _DenoiserStep(nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.policy, self.dtype = policy, _dtype(policy)

    def forward(self, x, t, cond):
        return self.policy.denoise(x.to(self.dtype), t, cond.to(self.dtype)).float()


class _FusedSampler(nn.Module):
    """The whole step list as one graph: every timestep and coefficient is a constant, a cache schedule's
    reuse decisions are resolved while tracing, and stochastic steps read their noise from an input. The
    network sees its own precision; the sampler's arithmetic is float32."""

    def __init__(self, policy, method: str, timesteps: list[int], cache_schedule=None):
        super().__init__()
        self.policy, self.method, self.timesteps = policy, method, timesteps
        self.cache_schedule, self.dtype = cache_schedule, _dtype(policy)

    def forward(self, cond, x_init, step_noise):
        from policy.cache import CachedDenoiser
        from policy.diffusion import sample

        if self.cache_schedule is not None:
            denoise = CachedDenoiser(self.policy, self.cache_schedule)
        else:
            denoise = self.policy.denoise
        net_cond = cond.to(self.dtype)
        return sample(lambda x, t: denoise(x.to(self.dtype), t, net_cond).float(), x_init, self.policy.schedule,
                      self.timesteps, self.method, eta=self.policy.cfg.inference.eta, step_noise=step_noise)


def obs_fields(cfg) -> dict[str, tuple]:
    """Normalised observation inputs of the encoder graph and their shapes after the batch dim."""
    fields = {"state": (cfg.n_obs_steps, cfg.state_dim)}
    if cfg.image_shape is not None:
        fields["image"] = (cfg.n_obs_steps, 3, *cfg.image_shape)
    return fields


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict,
            opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape checks that are constant for a given export
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True)


def _io(names: list[str], arrays: list, batch_axes: dict[str, dict]) -> list[dict]:
    out = []
    for name, a in zip(names, arrays, strict=True):
        shape = list(a.shape)
        for axis, label in batch_axes.get(name, {}).items():
            shape[axis] = label
        out.append({"name": name, "shape": shape, "dtype": str(a.dtype).replace("torch.", "")})
    return out


def export_policy(settings: ExportSettings) -> dict:
    """Write the graphs and manifest.json; returns the manifest."""
    from policy.checkpoint import load_policy, weights_sha256

    policy, run_cfg = load_policy(settings.checkpoint)
    policy.eval()
    cfg = policy.cfg
    out = Path(settings.out or export_dir(settings.checkpoint, settings.precision))
    net = network_in(policy, settings.precision)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    B = 2
    fields = obs_fields(cfg)
    obs = [torch.randn(B, *shape, generator=g) for shape in fields.values()]
    graphs: dict[str, dict] = {}

    batch = {name: {0: "batch"} for name in [*fields, "cond", "x", "t", "pred", "x_init", "x0"]}
    with torch.no_grad():
        cond = policy.encode_obs(dict(zip(fields, obs, strict=True)))
    _export(_Encoder(net, list(fields)), tuple(obs), out / "encoder.onnx", list(fields), ["cond"],
            {k: v for k, v in batch.items() if k in [*fields, "cond"]}, settings.opset)
    graphs["encoder"] = {"file": "encoder.onnx", "inputs": _io(list(fields), obs, batch),
                         "outputs": _io(["cond"], [cond], batch)}

    x = torch.randn(B, cfg.horizon, cfg.action_dim, generator=g)
    t = torch.tensor([10] * B)
    _export(_DenoiserStep(net), (x, t, cond), out / "denoiser.onnx", ["x", "t", "cond"], ["pred"],
            {k: batch[k] for k in ("x", "t", "cond", "pred")}, settings.opset)
    graphs["denoiser"] = {"file": "denoiser.onnx", "inputs": _io(["x", "t", "cond"], [x, t, cond], batch),
                          "outputs": _io(["pred"], [x], batch)}

    fused = None
    if settings.fused:
        fused = fused_spec(policy, settings)
        module = _FusedSampler(net, fused["method"], fused["timesteps"], fused.pop("_schedule"))
        K = len(fused["timesteps"])
        noise = torch.randn(K, B, cfg.horizon, cfg.action_dim, generator=g)
        fused_batch = {**batch, "step_noise": {1: "batch"}}
        _export(module, (cond, x, noise), out / "fused.onnx", ["cond", "x_init", "step_noise"], ["x0"],
                {k: fused_batch[k] for k in ("cond", "x_init", "step_noise", "x0")}, settings.opset)
        graphs["fused"] = {"file": "fused.onnx", "inputs": _io(["cond", "x_init", "step_noise"], [cond, x, noise],
                                                                fused_batch),
                           "outputs": _io(["x0"], [x], batch), **fused}

    for spec in graphs.values():
        spec["sha256"] = file_sha256(out / spec["file"])
    s = policy.schedule
    manifest = {
        "format": FORMAT,
        "opset": settings.opset,
        "precision": settings.precision,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "checkpoint": {"path": str(settings.checkpoint), "model_sha256": weights_sha256(settings.checkpoint)},
        "policy": {"denoiser": cfg.denoiser, "horizon": cfg.horizon, "n_obs_steps": cfg.n_obs_steps,
                   "n_action_steps": cfg.n_action_steps, "state_dim": cfg.state_dim, "action_dim": cfg.action_dim,
                   "image_shape": cfg.image_shape},
        "schedule": {**s.config(), "alphas_cumprod": s.alphas_cumprod.tolist()},
        "sampler": {"method": cfg.inference.sampler, "steps": cfg.inference.steps, "spacing": cfg.inference.spacing,
                    "eta": cfg.inference.eta},
        "normalizer": {k: v.to_dict() for k, v in policy.normalizer.fields.items()},
        "graphs": graphs,
        "settings": asdict(settings),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def fused_spec(policy, settings: ExportSettings) -> dict:
    """The fused graph's step list: a full denoise with the chosen sampler, or the RTI tail."""
    from policy.rti import rti_tail

    method = settings.sampler or policy.cfg.inference.sampler
    if settings.rti_k0 is not None:
        timesteps = rti_tail(settings.rti_k0, policy.schedule)
        entry = "warm"
    else:
        timesteps = policy.inference_timesteps(settings.steps).tolist()
        entry = "noise"
    schedule = None
    if settings.cache is not None:
        from deploy.caching import resolve_schedule

        rti = {"k0": settings.rti_k0, "sampler": method} if settings.rti_k0 is not None else None
        schedule = resolve_schedule(policy, settings.checkpoint, settings.cache, method, settings.steps, rti)
    return {"method": method, "timesteps": [int(t) for t in timesteps], "entry": entry,
            "cache": settings.cache, "block_evals": schedule.block_evals if schedule else None,
            "_schedule": schedule}


# -- loading and checking --

def load_manifest(directory: str | Path, checkpoint: str | Path | None = None) -> dict:
    """Read manifest.json and verify every graph file against its hash (and the checkpoint's weights, when
    given): a missing, truncated or foreign file is refused before anything runs."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportError(f"{directory} has no {MANIFEST}: run `rtdp export` first")
    try:
        manifest = json.loads(path.read_text())
        graphs = manifest["graphs"]
        if manifest.get("format") != FORMAT:
            raise ExportError(f"{path}: format {manifest.get('format')}, this rtdp reads {FORMAT}")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"{path}: not a valid export manifest: {e}") from None
    for name, spec in graphs.items():
        f = directory / spec["file"]
        if not f.is_file():
            raise ExportError(f"{name} graph {f} is missing")
        if file_sha256(f) != spec["sha256"]:
            raise ExportError(f"{name} graph {f} does not match its manifest hash: corrupt or replaced; export again")
    if checkpoint is not None:
        from policy.checkpoint import weights_sha256

        weights = weights_sha256(checkpoint)
        if weights != manifest["checkpoint"]["model_sha256"]:
            raise ExportError(f"the export in {directory} was made from other weights than {checkpoint}: "
                              f"export again")
    return manifest


def check_export(checkpoint: str | Path, directory: str | Path, tolerance: float | None = None,
                 samples: int = 4, seed: int = 0) -> dict:
    """Parity of every graph, and of a chunk sampled through the step graph, against the float32 torch policy on
    seeded inputs. Returns the max abs errors; raises ExportError if any exceeds `tolerance` (default: the
    export's precision's, TOLERANCE)."""
    from policy.checkpoint import load_policy
    from policy.diffusion import sample

    from .backends import OnnxRuntimeBackend

    manifest = load_manifest(directory, checkpoint)
    if tolerance is None:
        tolerance = TOLERANCE[manifest.get("precision", "fp32")]
    policy, _ = load_policy(checkpoint)
    policy.eval()
    backend = OnnxRuntimeBackend(directory, threads=1)
    cfg = policy.cfg
    g = torch.Generator().manual_seed(seed)
    fields = obs_fields(cfg)
    nobs = {k: torch.rand(samples, *shape, generator=g) * 2 - 1 for k, shape in fields.items()}
    errors = {}
    with torch.no_grad():
        cond = policy.encode_obs(nobs)
        errors["encoder"] = _max_err(backend.encode(nobs), cond)
        x = torch.randn(samples, cfg.horizon, cfg.action_dim, generator=g)
        worst = 0.0
        for t in (0, 1, policy.schedule.num_train_timesteps // 2, policy.schedule.num_train_timesteps - 1):
            tt = torch.full((samples,), t, dtype=torch.long)
            worst = max(worst, _max_err(backend.denoise(x, tt, cond), policy.denoise(x, tt, cond)))
        errors["denoiser"] = worst
        ts = policy.inference_timesteps().tolist()
        method = cfg.inference.sampler
        noise = torch.randn(len(ts), samples, cfg.horizon, cfg.action_dim, generator=g)
        want = sample(lambda a, t: policy.denoise(a, t, cond), x, policy.schedule, ts, method,
                      eta=cfg.inference.eta, step_noise=noise)
        got = sample(lambda a, t: backend.denoise(a, t, cond), x, policy.schedule, ts, method,
                     eta=cfg.inference.eta, step_noise=noise)
        errors["sampled_chunk"] = _max_err(got, want)
        if "fused" in manifest["graphs"]:
            spec = manifest["graphs"]["fused"]
            module = _FusedSampler(policy, spec["method"], spec["timesteps"], _fused_schedule(policy, manifest))
            noise = torch.randn(len(spec["timesteps"]), samples, cfg.horizon, cfg.action_dim, generator=g)
            errors["fused"] = _max_err(backend.fused(cond, x, noise), module(cond, x, noise))
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    if bad:
        raise ExportError("ONNX parity check failed: max abs error " + ", ".join(f"{k} {v:.2e}" for k, v in
                                                                                bad.items())
                          + f" exceeds {tolerance:.0e} (all: {errors})")
    return errors


def _fused_schedule(policy, manifest: dict):
    spec = manifest["graphs"]["fused"]
    if not spec.get("cache"):
        return None
    settings = ExportSettings(**manifest["settings"])
    return fused_spec(policy, settings)["_schedule"]


def _max_err(a, b) -> float:
    a = a.detach().numpy() if torch.is_tensor(a) else np.asarray(a)
    b = b.detach().numpy() if torch.is_tensor(b) else np.asarray(b)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
