"""int8 exports: onnxruntime's static quantisation of an fp32 export, calibrated on the checkpoint's own data.

    rtdp export --checkpoint CKPT --precision int8 [--calibration-data DATA.zarr] [--calibration-windows 64]

Each graph is quantised in QDQ form with per-channel int8 weights and uint8 activations (the layout onnxruntime's
x86 kernels run fastest on a CPU with VNNI), and only its heavy operators (Conv, MatMul, Gemm) are quantised: the
normalisation layers, activations and, in the fused graph, the sampler's arithmetic stay fp32.

On an x86 CPU without VNNI, onnxruntime multiplies uint8 by int8 with an instruction whose 16-bit sums saturate, and
full-range int8 weights overflow them: on an AVX2 VM the test policy's sampled chunk moved 0.055 from fp32 (3e-2
allowed; 0.011 with 7-bit weights), on an AVX-512 VNNI VM it stayed inside. The weights then keep to 7 bits
(onnxruntime's `reduce_range`), which cannot overflow. `--reduce-range auto` (the default) decides by the CPU that
exports, the one `--check` measures on; export for another target with `on` (any x86 CPU) or `off` (VNNI or Arm).

Calibration inputs come from the data the checkpoint was trained on and from its own sampler: observation windows
(evaluation/quantisation_data.py draws them; deploy reads no dataset itself), normalised and encoded as a decision
would; for the denoiser, the chunks the sampler's step list visits from noise on those observations, and the
windows' own action chunks noised to the same timesteps (what the network saw in training); for the fused graph,
its entry point (noise, or an RTI warm start: a data chunk noised to k0) with fresh step noise.

Besides the int8 graphs, `calibration/<graph>/` keeps the activation ranges measured on the fp32 graph:
`ranges.json` (onnxruntime's calibration cache, in JSON) and the TensorRT INT8 calibration table onnxruntime
writes from them (`calibration.flatbuffers`, read by onnxruntime's TensorRT
execution provider as `trt_int8_calibration_table_name` for the fp32 graph; `calibration.cache`, its plain-text
form). TensorRT itself builds from the QDQ graphs directly (explicit quantisation): the tables serve the implicit
path of older TensorRT releases, such as a Jetson's JetPack 5.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifacts import ExportError

# ConvTranspose (the U-Net's two upsamplers) stays fp32: quantised as well, onnxruntime 1.32 ran the Chi-size
# denoiser call slower on this CPU (9.1-10.9 ms against 6.5-8.3 ms).
QUANTISED_OPS = ["Conv", "MatMul", "Gemm"]
CALIBRATION_BATCH = 16


REDUCE_RANGE_CHOICES = ("auto", "on", "off")


@functools.cache  # asked once per graph and per backend load; the CPU does not change under a process
def cpu_saturates_int8(machine: str | None = None, cpuinfo: str | None = None) -> bool:
    """Whether onnxruntime's uint8 x int8 kernels can saturate on this CPU: an x86 CPU without VNNI (AVX-512 VNNI
    or AVX-VNNI). Arm's kernels and VNNI's do not. An x86 CPU whose flags cannot be read counts as saturating:
    7-bit weights cost a little precision there, an overflow costs the actions."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()}
    return not flags & {"avx512_vnni", "avx_vnni"}


@dataclass(frozen=True)
class QuantisationSettings:
    calibration_data: str | None = None  # the dataset the windows were drawn from (recorded in the manifest)
    windows: int = 64  # observation windows drawn from it
    seed: int = 0
    method: str = "minmax"  # minmax | entropy | percentile (onnxruntime's calibration methods)
    reduce_range: str = "auto"  # 7-bit weights: auto (where this CPU would saturate) | on | off

    def __post_init__(self):
        if self.reduce_range not in REDUCE_RANGE_CHOICES:
            raise ValueError(f"reduce_range must be one of {REDUCE_RANGE_CHOICES}, got {self.reduce_range!r}")

    @property
    def seven_bit_weights(self) -> bool:
        return cpu_saturates_int8() if self.reduce_range == "auto" else self.reduce_range == "on"

    def describe(self) -> dict:
        weights = "int8, per channel" + (", 7-bit range" if self.seven_bit_weights else "")
        return {"format": "QDQ", "weights": weights, "activations": "uint8", "ops": QUANTISED_OPS,
                "reduce_range": {"setting": self.reduce_range, "seven_bit_weights": self.seven_bit_weights,
                                 "exporting_cpu_saturates": cpu_saturates_int8()},
                "calibration": {"data": self.calibration_data, "windows": self.windows, "seed": self.seed,
                                "method": self.method}}


def check_quantisable(model) -> None:
    kind = model.spec.kind
    if kind != "diffusion_policy":
        raise ExportError(f"int8 calibration reads Diffusion Policy datasets; a {kind} checkpoint exports fp32 or "
                          f"fp16")


def calibration_feeds(model, batch: dict[str, torch.Tensor], fused: dict | None,
                      seed: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    """The inputs each graph is calibrated on, in batches, keyed by graph name. `batch`: raw observation windows
    and their action chunks (`action`), as evaluation.quantisation_data draws them from the training data."""
    from policy.diffusion import sample

    g = torch.Generator().manual_seed(seed)
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"encoder": [], "denoiser": [], "fused": []}
    schedule = model.schedule
    with torch.no_grad():
        for lo in range(0, len(batch["action"]), CALIBRATION_BATCH):
            part = {k: v[lo:lo + CALIBRATION_BATCH] for k, v in batch.items()}
            nobs = model.normalize_obs({k: v for k, v in part.items() if k != "action"})
            feeds["encoder"].append({k: _np(v) for k, v in nobs.items()})
            cond = model.encode_obs(nobs)
            actions = model.normalizer["action"].normalize(part["action"].float())
            n = len(actions)

            def record(x, t, cond=cond):
                feeds["denoiser"].append({"x": _np(x), "t": _np(t), "cond": _np(cond)})
                return model.denoise(x, t, cond)

            x_init = torch.randn(actions.shape, generator=g)
            sample(record, x_init, schedule, model.timesteps, model.method, generator=g,
                   eta=model.cfg.inference.eta)
            for t in model.timesteps:
                tt = torch.full((n,), int(t), dtype=torch.long)
                noisy = schedule.add_noise(actions, torch.randn(actions.shape, generator=g), tt)
                feeds["denoiser"].append({"x": _np(noisy), "t": _np(tt), "cond": _np(cond)})
            if fused is not None:
                steps = fused["timesteps"]
                start = torch.randn(actions.shape, generator=g)
                if fused["entry"] == "warm":
                    start = schedule.add_noise(actions, start, torch.full((n,), steps[0], dtype=torch.long))
                feeds["fused"].append({"cond": _np(cond), "x_init": _np(start),
                                       "step_noise": _np(torch.randn(len(steps), *actions.shape, generator=g))})
    return feeds


def _np(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().numpy())


class _Feeds:
    """onnxruntime's CalibrationDataReader over a list of input dicts (only the inputs the graph kept)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], names: set[str]):
        self._feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
        self._next = 0

    def get_next(self):
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def rewind(self):
        self._next = 0

    def __len__(self):
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int):  # the reader interface; strided calibration is unused
        self._feeds = self._feeds[start_index:end_index]


def quantise_graph(fp32: Path, out: Path, feeds: list[dict[str, np.ndarray]], calibration_dir: Path,
                   settings: QuantisationSettings) -> None:
    """One fp32 graph -> its int8 QDQ graph at `out`, and its activation ranges and TensorRT calibration table in
    `calibration_dir`."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data
    from onnxruntime.quantization.quant_utils import write_calibration_table
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if settings.method not in methods:
        raise ValueError(f"calibration method must be one of {sorted(methods)}, got {settings.method!r}")
    if not feeds:
        raise ExportError(f"no calibration inputs for {fp32.name}")
    calibration_dir.mkdir(parents=True, exist_ok=True)
    prepared = out.with_suffix(".prepared.onnx")
    # Calibration sessions warn about every initializer the optimiser folds away: expected here, and hundreds.
    ort.set_default_logger_severity(3)
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        names = {i.name for i in ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"])
                 .get_inputs()}
        ranges = calibration_dir / "ranges.json"
        ranges.unlink(missing_ok=True)  # onnxruntime would reuse ranges from an earlier export's data
        quantize_static(str(prepared), str(out), _Feeds(feeds, names), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=QUANTISED_OPS, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=methods[settings.method],
                        reduce_range=settings.seven_bit_weights, calibration_cache_path=ranges)
        write_calibration_table(dict(load_tensors_data(ranges).data), str(calibration_dir))
    finally:
        prepared.unlink(missing_ok=True)
        ort.set_default_logger_severity(2)
    onnx.checker.check_model(str(out))


def check_quantised(model, backend, batch: dict[str, torch.Tensor], seed: int = 1) -> dict:
    """An int8 export against the fp32 torch model on what it will meet: `batch`, observation windows held out
    from calibration (evaluation.quantisation_data draws them from the calibration data with another seed), the
    denoiser on their action chunks noised to each of the sampler's timesteps, and the chunk sampled from the same
    noise through both. Errors are on normalised values: `*_mean` mean abs, `*_max` max abs. The denoiser's is the
    error of the clean chunk its prediction implies (an epsilon error at t counts sqrt((1 - abar_t) / abar_t)
    times: what the sampler's next step sees)."""
    from policy.diffusion import sample

    g = torch.Generator().manual_seed(seed)
    errors: dict[str, float] = {}

    def note(name, diff):
        errors[f"{name}_max"] = max(errors.get(f"{name}_max", 0.0), float(diff.max()))
        errors[f"{name}_mean"] = max(errors.get(f"{name}_mean", 0.0), float(diff.mean()))

    schedule = model.schedule
    with torch.no_grad():
        nobs = model.normalize_obs({k: v for k, v in batch.items() if k != "action"})
        cond = model.encode_obs(nobs)
        note("encoder", (backend.encode(nobs) - cond).abs())
        actions = model.normalizer["action"].normalize(batch["action"].float())
        for t in model.timesteps:
            tt = torch.full((len(actions),), int(t), dtype=torch.long)
            x = schedule.add_noise(actions, torch.randn(actions.shape, generator=g), tt)
            diff = (backend.denoise(x, tt, cond) - model.denoise(x, tt, cond)).abs()
            if schedule.prediction_type == "epsilon":
                abar = float(schedule.alphas_cumprod[int(t)])
                diff = diff * ((1 - abar) / abar) ** 0.5
            note("denoiser_x0", diff)
        x = torch.randn(actions.shape, generator=g)
        eta = model.cfg.inference.eta
        noise = torch.randn(len(model.timesteps), *actions.shape, generator=g)
        want = sample(lambda a, t: model.denoise(a, t, cond), x, schedule, model.timesteps, model.method,
                      eta=eta, step_noise=noise)
        got = sample(lambda a, t: backend.denoise(a, t, cond), x, schedule, model.timesteps, model.method,
                     eta=eta, step_noise=noise)
        note("sampled_chunk", (got - want).abs())
    return errors
