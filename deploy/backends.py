"""Inference backends behind one interface: `encode(nobs) -> cond` and `denoise(x, t, cond) -> pred` on
normalised torch tensors, so a backend is just another model_fn for the samplers.

- `TorchBackend`: the policy's own modules, eager or through torch.compile.
- `OnnxRuntimeBackend`: the exported graphs in onnxruntime, on execution providers named explicitly (CPU, CUDA,
  TensorRT). Inputs are bound in place and outputs go to buffers allocated once per batch size (IO binding), so a
  decision allocates no new engine memory.
- `TensorRTBackend` (deploy/tensorrt_backend.py): engines built natively from the exported graphs.

Every backend takes a precision: fp32, or fp16 for the network alone (the torch backends cast a half copy's
inputs and outputs; the engines read the fp16 export). The sampler's arithmetic stays fp32 either way.

`BackendPolicy` wraps a denoising policy (policy.denoising) so that its encoder and denoiser run on a backend:
validation and normalisation stay in torch, outside the graphs, exactly as in the policy itself. Nothing here
knows the model kind: the torch backends call the model's `encode_obs` and `denoise`, the engines run the graphs
the kind exported under those names.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from policy.contract import PolicyWrapper
from policy.denoising import Denoised, DenoisingWrapper

from .artifacts import PRECISIONS, BackendUnavailable, ExportError, check_graph_io, export_dir, load_manifest
from .quantize import cpu_saturates_int8
from .tensorrt_backend import TensorRTBackend

BACKENDS = ("torch", "torch-compile", "torch-cuda", "torch-compile-cuda", "onnxruntime", "onnxruntime-cuda",
            "onnxruntime-tensorrt", "tensorrt")
_PROVIDERS = {
    "onnxruntime": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def network_in(model, precision: str):
    """The model whose network computes in `precision` (a copy for fp16; its noise schedule, a plain object,
    stays float32)."""
    if precision == "fp32":
        return model
    if precision == "int8":
        raise BackendUnavailable("int8 networks run in the engine backends (onnxruntime, tensorrt) from `rtdp export "
                                 "--precision int8`; the torch backends run fp32 or fp16")
    if precision != "fp16":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return copy.deepcopy(model).half()


class TorchBackend:
    def __init__(self, model, compile: bool = False, device: str = "cpu", precision: str = "fp32"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("torch here has no CUDA device")
        self.model = network_in(model.eval(), precision).to(device)
        self.dtype = next(self.model.parameters()).dtype
        self.name = ("torch-compile" if compile else "torch") + ("-cuda" if device.startswith("cuda") else "")
        self.device, self.precision = device, precision
        # On a GPU a batch-1 denoiser call is bound by kernel launches; "reduce-overhead" replays CUDA graphs.
        mode = "reduce-overhead" if device.startswith("cuda") else None
        net = self.model.denoise
        self._denoise = torch.compile(net, dynamic=False, mode=mode) if compile else net

    @torch.no_grad()
    def encode(self, nobs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_obs({k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
                                      for k, v in nobs.items()}).float()

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._denoise(x.to(self.dtype), t, cond.to(self.dtype)).float()


ORT_OPTIMIZATION = ("disabled", "basic", "extended", "all")


@dataclass(frozen=True)
class OrtOptions:
    """onnxruntime session settings that move batch-1 latency (defaults measured in BENCHMARKS.md, "Session
    settings"). Intra-op threads are the backend's `threads`."""

    optimization: str = "all"  # graph optimisation level: disabled | basic | extended | all
    spinning: bool = True  # intra-op worker threads spin while waiting for work instead of sleeping
    memory_pattern: bool = True  # plan a call's intermediate buffers once, from the first call's shapes

    @classmethod
    def parse(cls, items: dict | None) -> OrtOptions:
        """From `{"optimization": "extended", "spinning": "0", ...}` (the command line's --ort KEY=VALUE)."""
        items = dict(items or {})
        unknown = set(items) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown onnxruntime option(s) {sorted(unknown)}; they are "
                             f"{[f.name for f in fields(cls)]}")
        for key in ("spinning", "memory_pattern"):
            if key in items and not isinstance(items[key], bool):
                value = str(items[key]).lower()
                if value not in ("1", "0", "true", "false", "on", "off"):
                    raise ValueError(f"onnxruntime option {key} is on or off, got {items[key]!r}")
                items[key] = value in ("1", "true", "on")
        options = cls(**items)
        if options.optimization not in ORT_OPTIMIZATION:
            raise ValueError(f"onnxruntime optimization must be one of {ORT_OPTIMIZATION}, got "
                             f"{options.optimization!r}")
        return options

    def session_options(self, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        options.graph_optimization_level = levels[self.optimization]
        options.enable_mem_pattern = self.memory_pattern
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return options


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


class OnnxRuntimeBackend:
    """The graphs of an `rtdp export` folder in onnxruntime. `providers` is always explicit; asking for one that
    this onnxruntime build lacks is an error, not a silent fall back to the CPU."""

    def __init__(self, directory: str | Path, providers: list[str] | None = None, threads: int = 0,
                 name: str = "onnxruntime", checkpoint: str | Path | None = None,
                 graphs: list[str] | None = None, options: OrtOptions | None = None):
        """`graphs`: the exported graphs to load (default: all); a session holds its own copy of the weights, so
        a runtime that never calls the fused graph does not load it."""
        import onnxruntime as ort

        providers = providers or ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendUnavailable(f"onnxruntime here has no {', '.join(missing)} (it has "
                                     f"{', '.join(ort.get_available_providers())})")
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory, checkpoint)
        quantised = self.manifest.get("quantisation", {}).get("reduce_range", {})
        if quantised.get("seven_bit_weights") is False and providers == ["CPUExecutionProvider"] \
                and cpu_saturates_int8():
            warnings.warn(f"{self.directory} holds full-range int8 weights, exported on a CPU with VNNI; this CPU "
                          f"has none, and onnxruntime's int8 kernels can saturate on it. Re-export here (or with "
                          f"`rtdp export --precision int8 --reduce-range on`) and --check it", stacklevel=2)
        self.name, self.providers = name, providers
        self.device = "cpu"  # inputs and outputs are bound in host memory, whichever provider computes
        self.options = options or OrtOptions()
        session_options = self.options.session_options(threads)
        self.sessions = {}
        for graph, spec in self.manifest["graphs"].items():
            if graphs is not None and graph not in graphs:
                continue
            try:
                self.sessions[graph] = ort.InferenceSession(str(self.directory / spec["file"]), session_options,
                                                            providers=providers)
            except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
                raise ExportError(f"{graph} graph {self.directory / spec['file']} cannot be loaded: {e}") from None
            session = self.sessions[graph]
            for declared, actual in ((spec["inputs"], session.get_inputs()), (spec["outputs"], session.get_outputs())):
                check_graph_io(graph, self.directory / spec["file"], declared,
                               {a.name: tuple(d if isinstance(d, int) else -1 for d in a.shape) for a in actual})
        # A deterministic sampler's fused graph has no use for step_noise, and the exporter drops unused inputs.
        self._input_names = {g: {i.name for i in sess.get_inputs()} for g, sess in self.sessions.items()}
        self._outputs: dict[tuple, tuple] = {}  # (graph, output shape) -> (binding, OrtValue, tensor view)
        self._ort = ort

    def _run(self, graph: str, inputs: dict[str, np.ndarray], out_name: str, out_shape: tuple) -> torch.Tensor:
        """One engine call. The binding and its output buffer are made once per (graph, output shape); a call only
        rebinds its inputs in place and returns a tensor viewing the same buffer."""
        session = self.sessions[graph]
        key = (graph, out_shape)
        bound = self._outputs.get(key)
        if bound is None:
            out = self._ort.OrtValue.ortvalue_from_shape_and_type(out_shape, np.float32, "cpu", 0)
            binding = session.io_binding()
            binding.bind_ortvalue_output(out_name, out)
            bound = self._outputs[key] = (binding, out, torch.from_numpy(out.numpy()))
        binding, _, result = bound
        for name, value in inputs.items():
            if name in self._input_names[graph]:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        session.run_with_iobinding(binding)
        return result

    def encode(self, nobs: dict[str, torch.Tensor]) -> torch.Tensor:
        spec = self.manifest["graphs"]["encoder"]
        inputs = {i["name"]: nobs[i["name"]].detach().float().numpy() if nobs[i["name"]].is_floating_point()
                  else nobs[i["name"]].detach().numpy() for i in spec["inputs"]}
        batch = next(iter(inputs.values())).shape[0]
        out = spec["outputs"][0]
        shape = tuple(batch if isinstance(d, str) else d for d in out["shape"])
        return self._run("encoder", inputs, out["name"], shape).clone()

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._run("denoiser", {"x": x.detach().float().numpy(), "t": t.detach().long().numpy(),
                                      "cond": cond.detach().float().numpy()}, "pred", tuple(x.shape))

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Any exported graph by name, every output returned (a kind that decides in one graph)."""
        if graph not in self.sessions:
            raise ExportError(f"{self.directory} holds no {graph!r} graph (it has {sorted(self.sessions)})")
        feed = {k: v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy()
                for k, v in inputs.items() if k in self._input_names[graph]}
        return [torch.from_numpy(o) for o in self.sessions[graph].run(None, feed)]

    def fused(self, cond: torch.Tensor, x_init: torch.Tensor, step_noise: torch.Tensor) -> torch.Tensor:
        if "fused" not in self.sessions:
            raise ExportError(f"{self.directory} was exported without a fused graph")
        return self._run("fused", {"cond": cond.detach().float().numpy(), "x_init": x_init.detach().float().numpy(),
                                   "step_noise": step_noise.detach().float().numpy()}, "x0",
                         tuple(x_init.shape)).clone()


def make_backend(name: str, model, checkpoint: str | Path, threads: int = 0, precision: str = "fp32",
                 directory: str | Path | None = None, fused: bool = True, ort_options: OrtOptions | None = None):
    """The backend `name` for a loaded model; the engine backends read the export in `directory` (default: the
    checkpoint's, for this precision) and check it was made from the checkpoint's weights. `fused=False` leaves
    the fused graph unloaded (onnxruntime: the decision path calls the step graphs)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name.startswith("torch"):
        return TorchBackend(model, compile="compile" in name, device="cuda" if name.endswith("cuda") else "cpu",
                            precision=precision)
    directory = Path(directory) if directory is not None else export_dir(checkpoint, precision)
    if name == "tensorrt":
        backend = TensorRTBackend(directory, checkpoint)
    else:
        graphs = None if fused else [g for g in load_manifest(directory)["graphs"] if g != "fused"]
        backend = OnnxRuntimeBackend(directory, _PROVIDERS[name], threads, name, checkpoint, graphs, ort_options)
    _check_manifest_matches(backend.manifest, model, directory)
    exported = backend.manifest.get("precision", "fp32")
    if exported != precision:
        raise ExportError(f"{directory} holds an {exported} export, not {precision}: export it with --precision "
                          f"{precision}, or pass --precision {exported}")
    return backend


def _check_manifest_matches(manifest: dict, model, directory: Path) -> None:
    """The export's record of the policy (spec, normaliser) against the checkpoint's: the graphs run with the
    checkpoint's normaliser, so an export that records another one was made for another policy."""
    ours = {"policy": model.spec.to_dict(),
            "normalizer": {k: v.to_dict() for k, v in model.normalizer.fields.items()}}
    for key, value in ours.items():
        if json.loads(json.dumps(value)) != manifest.get(key):
            raise ExportError(f"{directory}/manifest.json records another {key} than the checkpoint it is "
                              f"used with: export again")


class GraphPolicy(PolicyWrapper):
    """A model kind that decides in one exported graph (a driving planner), run on an engine backend: validation
    and normalisation stay in torch (`graph_inputs`), and the graph's outputs become the chunk
    (`chunk_from_graph`)."""

    def __init__(self, policy, backend):
        super().__init__(policy)
        self.backend = backend

    @torch.no_grad()
    def predict_chunk(self, obs, *, executed=None, generator=None, noise=None):
        outputs = self.backend.run(self.inner.decision_graph, self.inner.graph_inputs(obs, generator, noise))
        return self.inner.chunk_from_graph(*outputs)


class BackendPolicy(DenoisingWrapper):
    """A denoising policy whose encoder and denoiser run on `backend`; the same contract. Wrappers put around it
    (a block cache, RTI) call its `condition` and `sample_normalized`, and so run on the backend too."""

    def __init__(self, policy, backend):
        super().__init__(policy)
        self.backend = backend

    def condition(self, obs):
        return self.backend.encode(self.model.normalize_obs(obs))

    def sample_normalized(self, cond, x_init, timesteps, method, generator=None, denoiser=None, stop=None
                          ) -> Denoised:
        return self.inner.sample_normalized(cond, x_init, timesteps, method, generator,
                                            denoiser=denoiser or self.backend.denoise, stop=stop)
