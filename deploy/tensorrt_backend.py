"""A native TensorRT backend: engines built from an `rtdp export` folder's ONNX graphs with the `tensorrt`
package (an extra: `pip install rtdp[tensorrt]` on a machine with an NVIDIA GPU), run on torch's CUDA memory.

- The network is built strongly typed: every tensor keeps the type the ONNX graph gives it. An fp16 export
  (`rtdp export --precision fp16`) runs its network in fp16 while the sampler's arithmetic around it, inside the
  fused graph, stays fp32 exactly as exported; TensorRT is not free to lower it.
- Engines are cached beside the graphs as `<graph>.engine`, with `<graph>.engine.json` naming the graph's
  sha256, the TensorRT version, the GPU and the engine's own sha256; a cache that names anything else, or whose
  bytes do not match their hash, is rebuilt, never reused.
- Batch is dynamic from 1 to `max_batch`; inputs are copied into, and outputs written to, CUDA buffers made once
  per shape, so a call allocates nothing.

Not run by CI: neither the development machine nor the lent GPU machine has `tensorrt` (see BENCHMARKS.md);
`tests/deploy/test_gpu.py` runs its parity test wherever both are present.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from policy.checkpoint import file_sha256

from .artifacts import BackendUnavailable, ExportError, check_graph_io, load_manifest


def cached_engine(path: Path, meta: dict) -> bytes | None:
    """A cached engine's bytes, if its record names exactly `meta` (graph hash, TensorRT version, GPU, batch) and
    the bytes match the hash recorded beside them; None means build it again."""
    record = path.with_suffix(".engine.json")
    if not (path.is_file() and record.is_file()):
        return None
    try:
        stored = json.loads(record.read_text())
    except ValueError:
        return None
    if not isinstance(stored, dict) or {k: v for k, v in stored.items() if k != "engine_sha256"} != meta:
        return None
    if stored.get("engine_sha256") != file_sha256(path):
        return None
    return path.read_bytes()


def write_engine(path: Path, meta: dict, engine: bytes) -> None:
    path.write_bytes(engine)
    path.with_suffix(".engine.json").write_text(json.dumps({**meta, "engine_sha256": file_sha256(path)}))


class TensorRTBackend:
    def __init__(self, directory: str | Path, checkpoint: str | Path | None = None, max_batch: int = 8,
                 workspace_bytes: int = 1 << 30):
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendUnavailable("the tensorrt package is not installed (pip install rtdp[tensorrt])") from None
        if not torch.cuda.is_available():
            raise BackendUnavailable("TensorRT needs a CUDA device and torch here has none")
        self.trt = trt
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory, checkpoint)
        self.name, self.device = "tensorrt", "cuda"
        self.max_batch, self.workspace_bytes = max_batch, workspace_bytes
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.stream = torch.cuda.Stream()
        self.engines, self.contexts, self.inputs, self.outputs = {}, {}, {}, {}
        for graph, spec in self.manifest["graphs"].items():
            engine = self._engine(graph, spec)
            self.engines[graph], self.contexts[graph] = engine, engine.create_execution_context()
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            self.inputs[graph] = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self.outputs[graph] = [n for n in names if n not in self.inputs[graph]]
            for declared, tensors in ((spec["inputs"], self.inputs[graph]), (spec["outputs"], self.outputs[graph])):
                check_graph_io(graph, self.directory / spec["file"], declared,
                               {n: tuple(engine.get_tensor_shape(n)) for n in tensors})
        self._buffers: dict[tuple, dict[str, torch.Tensor]] = {}
        self._bound: dict[str, tuple] = {}  # graph -> the buffers' key its context's shapes and addresses are set to

    # -- building --

    def _engine(self, graph: str, spec: dict):
        trt = self.trt
        path = self.directory / f"{graph}.engine"
        meta = {"graph_sha256": spec["sha256"], "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(),
                "max_batch": self.max_batch}
        runtime = trt.Runtime(self.logger)
        cached = cached_engine(path, meta)
        if cached is not None:
            engine = runtime.deserialize_cuda_engine(cached)
            if engine is not None:
                return engine
        builder = trt.Builder(self.logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse((self.directory / spec["file"]).read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT cannot parse the {graph} graph: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        # fp32 layers stay fp32: TF32's 10-bit mantissa breaks 1e-4 parity (as cuDNN's does, tests/deploy/test_gpu.py)
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = list(tensor.shape)
            lo, hi = ([1 if d < 0 else d for d in shape], [self.max_batch if d < 0 else d for d in shape])
            profile.set_shape(tensor.name, lo, lo, hi)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError(f"TensorRT could not build an engine for the {graph} graph (its log is above)")
        write_engine(path, meta, bytes(serialized))
        return runtime.deserialize_cuda_engine(bytes(serialized))

    # -- running --

    def _run(self, graph: str, inputs: dict[str, torch.Tensor], out_name: str) -> torch.Tensor:
        """One engine call. Buffers are made, and the context's shapes and addresses set, only when the input
        shapes change; a call copies its inputs in and runs."""
        engine, context = self.engines[graph], self.contexts[graph]
        missing = [n for n in self.inputs[graph] if n not in inputs]
        if missing:
            raise ExportError(f"the {graph} engine wants inputs {missing}")
        key = (graph, *(tuple(inputs[n].shape) for n in self.inputs[graph]))
        buffers = self._buffers.get(key)
        if buffers is None:
            buffers = {n: torch.empty(tuple(inputs[n].shape), dtype=_torch_dtype(engine.get_tensor_dtype(n)),
                                      device="cuda") for n in self.inputs[graph]}
            for n in self.inputs[graph]:
                context.set_input_shape(n, tuple(buffers[n].shape))
            for n in self.outputs[graph]:
                buffers[n] = torch.empty(tuple(context.get_tensor_shape(n)),
                                         dtype=_torch_dtype(engine.get_tensor_dtype(n)), device="cuda")
            self._buffers[key] = buffers
        if self._bound.get(graph) != key:
            for n, buf in buffers.items():
                if n in self.inputs[graph]:
                    context.set_input_shape(n, tuple(buf.shape))
                context.set_tensor_address(n, buf.data_ptr())
            self._bound[graph] = key
        self.stream.wait_stream(torch.cuda.current_stream())  # the inputs are written on the caller's stream
        with torch.cuda.stream(self.stream):
            for n in self.inputs[graph]:
                buffers[n].copy_(inputs[n], non_blocking=True)
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run the {graph} engine")
        torch.cuda.current_stream().wait_stream(self.stream)
        return buffers[out_name]

    def encode(self, nobs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._run("encoder", {k: v.float() for k, v in nobs.items()}, "cond").clone()

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._run("denoiser", {"x": x.float(), "t": t.long(), "cond": cond.float()}, "pred")

    def fused(self, cond: torch.Tensor, x_init: torch.Tensor, step_noise: torch.Tensor) -> torch.Tensor:
        if "fused" not in self.engines:
            raise ExportError(f"{self.directory} was exported without a fused graph")
        return self._run("fused", {"cond": cond.float(), "x_init": x_init.float(), "step_noise": step_noise.float()},
                         "x0").clone()


def _torch_dtype(trt_dtype) -> torch.dtype:
    import tensorrt as trt

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32,
             trt.bool: torch.bool}
    if trt_dtype not in table:
        raise ExportError(f"an engine tensor has TensorRT type {trt_dtype}, which this backend does not bind")
    return table[trt_dtype]
