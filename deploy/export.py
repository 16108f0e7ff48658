"""ONNX export of a model kind's graphs (the kind names them, with example inputs: `model.export_graphs()`), and
optionally a fused graph that unrolls a fixed sampler step list (a full denoise, or an RTI tail entered from a
warm start, with a BAC schedule as static structure) so that one engine call returns the clean chunk.

    out/encoder.onnx    normalised obs fields (B, To, ...)          -> cond (B, To, F)
    out/denoiser.onnx   x (B, H, A), t (B,) int64, cond (B, To, F)   -> pred (B, H, A)
    out/fused.onnx      cond, x_init (B, H, A), step_noise (K, B, H, A) -> x0 (B, H, A)
    out/manifest.json   names, shapes, opset, the policy's spec ("policy"), schedule tables, normaliser,
                        sampler, every file's sha256

Normalisation stays outside the graphs: the manifest carries the normaliser, and rtdp's backends apply the same
one in torch. Every graph's inputs and outputs are float32 (and int64 timesteps). With `precision="fp16"`
(written to <checkpoint>/onnx-fp16) the network runs in float16 between casts, while the sampler arithmetic in the
fused graph, the accumulation of x_t, stays float32. With `precision="int8"` (<checkpoint>/onnx-int8) the fp32
graphs are quantised by deploy/quantize.py on calibration windows the caller passes. `check_export` compares every
graph and the sampled chunk with the float32 torch model and raises if any differs by more than the precision's
tolerance.
"""

from __future__ import annotations

import datetime
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from policy.cache import CachedDenoiser
from policy.checkpoint import file_sha256, weights_sha256
from policy.diffusion import sample
from policy.rti import RTIPolicy, rti_config

from .artifacts import FORMAT, INT8_CHECKED, TOLERANCE, ExportError, export_dir, load_manifest, write_manifest
from .backends import OnnxRuntimeBackend, network_in
from .quantize import QuantisationSettings, calibration_feeds, check_quantisable, check_quantised, quantise_graph
from .runtime import RuntimeSettings, cache_schedule_for, load_model


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
    precision: str = "fp32"  # the network's: fp32 | fp16 | int8 (inputs, outputs and sampler stay fp32)
    calibration_data: str | None = None  # int8: the dataset calibrated on (default: the checkpoint's training data)
    calibration_windows: int = 64  # int8: observation windows drawn from it
    reduce_range: str = "auto"  # int8: 7-bit weights, auto | on | off (deploy/quantize.py says when)


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


class _Graph(nn.Module):
    """A kind's graph function with its floating inputs cast to the network's precision and its outputs to
    float32."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn, self.dtype = model, fn, _dtype(model)

    def forward(self, *inputs):
        out = self.fn(*(x.to(self.dtype) if x.is_floating_point() else x for x in inputs))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


class _FusedSampler(nn.Module):
    """The whole step list as one graph: every timestep and coefficient is a constant, a cache schedule's
    reuse decisions are resolved while tracing, and stochastic steps read their noise from an input. The
    network sees its own precision; the sampler's arithmetic is float32."""

    def __init__(self, model, method: str, timesteps: list[int], cache_schedule=None):
        super().__init__()
        self.model, self.method, self.timesteps = model, method, timesteps
        self.cache_schedule, self.dtype = cache_schedule, _dtype(model)

    def forward(self, cond, x_init, step_noise):
        denoise = CachedDenoiser(self.model, self.cache_schedule) if self.cache_schedule else self.model.denoise
        net_cond = cond.to(self.dtype)
        return sample(lambda x, t: denoise(x.to(self.dtype), t, net_cond).float(), x_init, self.model.schedule,
                      self.timesteps, self.method, eta=self.model.cfg.inference.eta, step_noise=step_noise)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], opset: int) -> None:
    dynamic = {name: {0: "batch"} for name in [*inputs, *outputs]}
    if "step_noise" in dynamic:
        dynamic["step_noise"] = {1: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape checks that are constant for a given export
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True)


def _pin_output_shapes(path: Path, outputs: dict[str, torch.Tensor]) -> None:
    """Write the outputs' static axes into the graph where the tracer left them symbolic (a shape computed through
    a sampler's loop), so an engine reads the same shapes the manifest records; the batch axis stays dynamic."""
    import onnx

    model = onnx.load(str(path))
    changed = False
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        for axis, size in enumerate(outputs[out.name].shape):
            if axis > 0 and dims[axis].dim_value != size:
                dims[axis].ClearField("dim_param")
                dims[axis].dim_value = size
                changed = True
    if changed:
        onnx.save(model, str(path))


def _io(arrays: dict[str, torch.Tensor], batch_axis: dict[str, int]) -> list[dict]:
    out = []
    for name, a in arrays.items():
        shape = list(a.shape)
        shape[batch_axis.get(name, 0)] = "batch"
        out.append({"name": name, "shape": shape, "dtype": str(a.dtype).replace("torch.", "")})
    return out


def _write_graphs(model, net, settings: ExportSettings, out: Path) -> dict[str, dict]:
    """The kind's graphs, and the fused sampler where it has a denoiser, traced from `net` (the model in its
    export precision) into `out`; returns their manifest entries."""
    g = torch.Generator().manual_seed(0)
    graphs: dict[str, dict] = {}
    examples = {}
    for name, graph in net.export_graphs(batch=2, generator=g).items():
        inputs = {k: v.float() if v.is_floating_point() else v for k, v in graph.inputs.items()}
        with torch.no_grad():
            result = _Graph(net, graph.fn)(*inputs.values())
        results = list(result) if isinstance(result, tuple) else [result]
        _export(_Graph(net, graph.fn), tuple(inputs.values()), out / f"{name}.onnx", list(inputs),
                list(graph.outputs), settings.opset)
        _pin_output_shapes(out / f"{name}.onnx", dict(zip(graph.outputs, results, strict=True)))
        graphs[name] = {"file": f"{name}.onnx", "inputs": _io(inputs, {}),
                        "outputs": _io(dict(zip(graph.outputs, results, strict=True)), {})}
        examples[name] = inputs

    if settings.fused and "denoiser" in graphs:  # a kind that decides in one graph has nothing to fuse
        fused = fused_spec(model, settings)
        schedule = fused.pop("_schedule")
        module = _FusedSampler(net, fused["method"], fused["timesteps"], schedule)
        cond, x = examples["denoiser"]["cond"], examples["denoiser"]["x"]
        noise = torch.randn(len(fused["timesteps"]), *x.shape, generator=g)
        _export(module, (cond, x, noise), out / "fused.onnx", ["cond", "x_init", "step_noise"], ["x0"],
                settings.opset)
        graphs["fused"] = {"file": "fused.onnx",
                           "inputs": _io({"cond": cond, "x_init": x, "step_noise": noise}, {"step_noise": 1}),
                           "outputs": _io({"x0": x}, {}), **fused}
    return graphs


def export_policy(settings: ExportSettings, calibration: dict[str, torch.Tensor] | None = None) -> dict:
    """Write the graphs and manifest.json; returns the manifest. An int8 export is calibrated on `calibration`:
    raw observation windows and their action chunks from the checkpoint's data (evaluation.quantisation_data
    draws them; `rtdp export --precision int8` does it for you)."""
    model, _ = load_model(RuntimeSettings(settings.checkpoint, sampler=settings.sampler, steps=settings.steps))
    out = Path(settings.out or export_dir(settings.checkpoint, settings.precision))
    out.mkdir(parents=True, exist_ok=True)
    quantisation = None
    if settings.precision == "int8":
        check_quantisable(model)
        if calibration is None:
            raise ExportError("an int8 export is calibrated on observation windows of the checkpoint's data: use "
                              "`rtdp export --precision int8`, or evaluation.quantisation_data.export_int8")
        quantisation = QuantisationSettings(settings.calibration_data, len(calibration["action"]),
                                            reduce_range=settings.reduce_range)
        with tempfile.TemporaryDirectory(prefix="rtdp-fp32-") as tmp:
            graphs = _write_graphs(model, model, settings, Path(tmp))
            feeds = calibration_feeds(model, calibration, graphs.get("fused"), quantisation.seed)
            for name, spec in graphs.items():
                quantise_graph(Path(tmp) / spec["file"], out / spec["file"], feeds[name],
                               out / "calibration" / name, quantisation)
    else:
        graphs = _write_graphs(model, network_in(model, settings.precision), settings, out)

    for spec in graphs.values():
        spec["sha256"] = file_sha256(out / spec["file"])
    s = model.schedule
    manifest = {
        "format": FORMAT,
        "opset": settings.opset,
        "precision": settings.precision,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "checkpoint": {"path": str(settings.checkpoint), "model_sha256": weights_sha256(settings.checkpoint)},
        "policy": model.spec.to_dict(),
        "schedule": {**s.config(), "alphas_cumprod": s.alphas_cumprod.tolist()},
        "sampler": model.inference_config(),
        "normalizer": {k: v.to_dict() for k, v in model.normalizer.fields.items()},
        "graphs": graphs,
        "settings": asdict(settings),
    }
    if quantisation is not None:
        manifest["quantisation"] = quantisation.describe()
    return write_manifest(out, manifest)


def fused_spec(model, settings: ExportSettings) -> dict:
    """The fused graph's step list, and the cache schedule made for it: a full denoise with the model's sampler
    (as configured from the settings), or RTI's warm tail [k0 .. 0] as `rtdp eval --rti K0` runs it (--sampler
    names the tail's sampler)."""
    if settings.rti_k0 is not None:
        rti = RTIPolicy(model, rti_config({"k0": settings.rti_k0, **({"sampler": settings.sampler}
                                                                       if settings.sampler else {})}))
        method, timesteps, entry = rti.method, rti.timesteps, "warm"
    else:
        method, timesteps, entry = model.method, model.timesteps, "noise"
    schedule = None
    if settings.cache is not None:
        schedule = cache_schedule_for(model, settings.checkpoint, settings.cache, method, timesteps)
    return {"method": method, "timesteps": [int(t) for t in timesteps], "entry": entry,
            "cache": settings.cache, "block_evals": schedule.block_evals if schedule else None,
            "_schedule": schedule}


def check_export(checkpoint: str | Path, directory: str | Path, tolerance: float | None = None,
                 samples: int = 4, seed: int = 0, held_out: dict[str, torch.Tensor] | None = None) -> dict:
    """Parity of every graph, and of a chunk sampled through the step graph, against the float32 torch model.
    fp32 and fp16: max abs errors on seeded inputs. int8: errors on `held_out` observation windows of its
    calibration data (deploy.quantize.check_quantised; evaluation.quantisation_data.check_int8 draws them), of
    which the mean abs errors of the encoder and the sampled chunk are held to the tolerance: a max abs bound would
    fail on the odd chain that a perturbation sends to another mode of a multimodal policy, which closed-loop
    success judges better. Raises ExportError if a checked error exceeds `tolerance` (default: the export's
    precision's, TOLERANCE); returns every error."""
    manifest = load_manifest(directory, checkpoint)
    if tolerance is None:
        tolerance = TOLERANCE[manifest.get("precision", "fp32")]
    model, _ = load_model(RuntimeSettings(checkpoint=str(checkpoint)))
    backend = OnnxRuntimeBackend(directory, threads=1)
    g = torch.Generator().manual_seed(seed)
    if "quantisation" in manifest:
        if held_out is None:
            raise ExportError("an int8 export is checked on held-out observation windows of its calibration data: "
                              "use `rtdp export --precision int8 --check`, or evaluation.quantisation_data.check_int8")
        errors = check_quantised(model, backend, held_out)
        checked = {k: errors[k] for k in INT8_CHECKED}
    else:
        if "encoder" not in manifest["graphs"]:
            errors = _check_decision_graphs(model, backend, manifest, samples, g)
        else:
            errors = _check_denoising_graphs(model, backend, manifest, checkpoint, samples, g)
        checked = errors
    bad = {k: v for k, v in checked.items() if not v <= tolerance}
    if bad:
        raise ExportError("ONNX parity check failed: " + ", ".join(f"{k} {v:.2e}" for k, v in bad.items())
                          + f" exceeds {tolerance:.0e} (all: {errors})")
    return errors


def _check_decision_graphs(model, backend, manifest: dict, samples: int, g: torch.Generator) -> dict:
    """A kind that decides in one graph (a planner): every output against torch, on the kind's own seeded example
    inputs (it knows which features are flags)."""
    errors = {}
    graphs = model.export_graphs(batch=samples, generator=g)
    for name, spec in manifest["graphs"].items():
        graph = graphs[name]
        with torch.no_grad():
            want = graph.fn(*graph.inputs.values())
        want = want if isinstance(want, tuple) else (want,)
        got = backend.run(name, graph.inputs)
        for o, w, r in zip(spec["outputs"], want, got, strict=True):
            errors[f"{name}.{o['name']}"] = _max_err(r, w)
    return errors


def _check_denoising_graphs(model, backend, manifest: dict, checkpoint, samples: int, g: torch.Generator) -> dict:
    nobs = model.export_graphs(batch=samples, generator=g)["encoder"].inputs  # the kind knows which are indices
    shape = model.chunk_shape(samples)
    errors = {}
    with torch.no_grad():
        cond = model.encode_obs(nobs)
        errors["encoder"] = _max_err(backend.encode(nobs), cond)
        x = torch.randn(shape, generator=g)
        worst = 0.0
        T = model.schedule.num_train_timesteps
        for t in (0, 1, T // 2, T - 1):
            tt = torch.full((samples,), t, dtype=torch.long)
            worst = max(worst, _max_err(backend.denoise(x, tt, cond), model.denoise(x, tt, cond)))
        errors["denoiser"] = worst
        ts, method, eta = model.timesteps, model.method, model.cfg.inference.eta
        noise = torch.randn(len(ts), *shape, generator=g)
        want = sample(lambda a, t: model.denoise(a, t, cond), x, model.schedule, ts, method, eta=eta,
                      step_noise=noise)
        got = sample(lambda a, t: backend.denoise(a, t, cond), x, model.schedule, ts, method, eta=eta,
                     step_noise=noise)
        errors["sampled_chunk"] = _max_err(got, want)
        if "fused" in manifest["graphs"]:
            spec = manifest["graphs"]["fused"]
            schedule = _fused_schedule(model, manifest, checkpoint)
            module = _FusedSampler(model, spec["method"], spec["timesteps"], schedule)
            noise = torch.randn(len(spec["timesteps"]), *shape, generator=g)
            errors["fused"] = _max_err(backend.fused(cond, x, noise), module(cond, x, noise))
    return errors


def _fused_schedule(model, manifest: dict, checkpoint):
    spec = manifest["graphs"]["fused"]
    if not spec.get("cache"):
        return None
    return cache_schedule_for(model, checkpoint, spec["cache"], spec["method"], spec["timesteps"])


def _max_err(a, b) -> float:
    a = a.detach().numpy() if torch.is_tensor(a) else np.asarray(a)
    b = b.detach().numpy() if torch.is_tensor(b) else np.asarray(b)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
