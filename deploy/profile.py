"""`rtdp profile`: decision latency and denoiser-call latency of a checkpoint on every backend available here,
in one run: warm-up, then N timed decisions each, percentiles, a histogram PNG and a comparison table.

A decision is what the control loop pays per chunk: the runtime's policy (deploy/runtime.py) called through the
decision contract, so validation and normalisation, the encoder, the sampler's denoiser calls and the actions'
post-processing; with --rti, RTI's warm decision. The fused graph, where exported, is timed as one engine call
per decision. Inputs are raw observations drawn inside the normaliser's range.

Each backend also reports its peak resident memory (deploy/memory.py): the whole process's peak while the backend
was built and run (`peak_rss_mb`, the torch model every runtime keeps for normalisation included) and how far above
what was resident before (`peak_added_mb`, the backend's own sessions, buffers and workspace).
"""

from __future__ import annotations

import datetime
import gc
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from policy.denoising import Denoised

from .artifacts import BackendUnavailable, ExportError
from .backends import BACKENDS, OnnxRuntimeBackend
from .memory import PeakMemory
from .runtime import GRAPH_BACKENDS, RuntimeSettings, build_policy, load_model
from .timing import percentiles


@dataclass
class ProfileSettings:
    checkpoint: str
    backends: list[str] = field(default_factory=list)  # empty: every backend that runs here
    iters: int = 200
    warmup: int = 20
    sampler: str | None = None
    steps: int | None = None
    rti_k0: int | None = None  # profile RTI's warm decision ([k0 .. 0]) instead of a full denoise
    rti_steps: int | None = None  # the warm tail's calls; None: RTIConfig's default
    rti_every_step: bool = False  # the tail is every step k0 .. 0
    threads: int = 1
    precision: str = "fp32"  # the network's: fp32 | fp16 | int8 (engine backends)
    export: str | None = None  # the export folder the engine backends read; None: the checkpoint's
    ort: dict | None = None  # onnxruntime session settings (deploy.backends.OrtOptions)
    fused: bool = True  # also time the exported fused graph (one engine call per decision), when present
    rate_hz: float = 50.0  # the control rate reaction times are given for
    predicted_frames: bool = False  # a frame-predicting model (PAD) also decodes its predicted frames
    plot: str | None = None

    def runtime(self, backend: str) -> RuntimeSettings:
        rti = None
        if self.rti_k0 is not None:
            rti = {"k0": self.rti_k0, **({"sampler": self.sampler} if self.sampler else {})}
            if self.rti_every_step or self.rti_steps is not None:
                rti["steps"] = None if self.rti_every_step else self.rti_steps
        return RuntimeSettings(checkpoint=self.checkpoint, sampler=self.sampler, steps=self.steps, rti=rti,
                               backend=backend, precision=self.precision,
                               export=self.export if not backend.startswith("torch") else None,
                               ort=self.ort if backend.startswith("onnxruntime") else None,
                               threads=self.threads, predicted_frames=self.predicted_frames)


def raw_observation(spec, normalizer, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One raw observation history per the spec: floats uniform inside the normaliser's training range, frames
    uniform bytes, indices 0."""
    obs = {}
    for f in spec.observations:
        if f.dtype == "uint8":
            obs[f.name] = torch.randint(0, 256, (1, *f.shape), generator=generator, dtype=torch.uint8)
            continue
        if f.dtype == "int64":  # an index (a task): the first one
            obs[f.name] = torch.zeros((1, *f.shape), dtype=torch.int64)
            continue
        dim = f.shape[-1]
        stats = normalizer[f.name].stats
        lo = torch.tensor(stats.get("min", [-1.0] * dim), dtype=torch.float32)
        hi = torch.tensor(stats.get("max", [1.0] * dim), dtype=torch.float32)
        obs[f.name] = lo + (hi - lo) * torch.rand(1, *f.shape, generator=generator)
    return obs


def _time(fn, n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def profile_graph_decisions(runtime, settings: ProfileSettings) -> dict:
    """A kind that decides in one graph (a planner): the decision timed whole. `forward_ms` is one decoder pass
    in torch, where the passes are torch's to call; an engine runs them inside its one graph. The scenes are drawn
    at random inside the normaliser's range, far from any road a planner was trained on, so its plans may leave
    the action guard's bounds: the decision is timed inside the guard (whose check costs a few tensor ops)."""
    policy, model, backend = runtime.policy.inner, runtime.model, runtime.backend
    g = torch.Generator().manual_seed(0)
    obs = raw_observation(policy.spec, model.normalizer, g)

    def decide():
        policy.predict_chunk(obs, generator=g).action.cpu()

    forward = None
    if backend is None:
        inputs = model.graph_inputs(obs, g)
        scene = model.encode(*(inputs[k] for k in ("ego", "agents", "bev")))
        x = model.anchors[None].clone()
        t = torch.tensor([model.timesteps[0]])

        def forward():
            model.decode(x, t, scene)

    with torch.no_grad():
        _time(decide, settings.warmup)
        decision = _time(decide, settings.iters)
        call = None
        if forward is not None:
            _time(forward, settings.warmup)
            call = percentiles(_time(forward, max(settings.iters, 50)), ("p50", "p99"))
    nfe = len(model.timesteps)
    return {"backend": backend.name if backend is not None else "torch", "device": _device(backend),
            "nfe_per_decision": nfe, "engine_calls_per_decision": 1 if backend is not None else nfe,
            "latency_ms": percentiles(decision), "forward_ms": call,
            "p99_over_p50": float(np.percentile(decision, 99) / np.percentile(decision, 50)),
            "samples_ms": decision.tolist()}


def profile_backend(runtime, settings: ProfileSettings, fused: bool = False) -> dict:
    if hasattr(runtime.model, "decision_graph"):
        return profile_graph_decisions(runtime, settings)
    policy, model, backend = runtime.policy, runtime.model, runtime.backend
    inner = policy.inner  # under the action guard: the denoising policy whose step list a decision runs
    g = torch.Generator().manual_seed(0)
    obs = raw_observation(policy.spec, model.normalizer, g)
    shape = model.chunk_shape(1)
    cond = inner.condition(obs)
    on_cuda = str(cond.device).startswith("cuda")
    # A timed step ends when the device has finished its work, not when the host has queued it.
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    if fused:
        spec = backend.manifest["graphs"]["fused"]
        if (spec["method"], spec["timesteps"]) != (inner.method, inner.timesteps):
            raise BackendUnavailable(f"the fused graph runs {spec['method']} over {spec['timesteps'][:3]}..., "
                                     f"not the profiled {inner.method} over {inner.timesteps[:3]}...; export it "
                                     f"for these")
        x_init = torch.randn(shape, generator=g)
        step_noise = torch.randn(len(inner.timesteps), *shape, generator=g)

        def decide():
            x0 = backend.fused(inner.condition(obs), x_init, step_noise)
            model.to_chunk(Denoised(x0, 1)).action.cpu()
            sync()
        nfe = 1
    else:
        policy.reset()
        policy.predict_chunk(obs, generator=g)  # RTI: the episode's full denoise; every timed decision is warm

        def decide():
            policy.predict_chunk(obs, generator=g).action.cpu()
            sync()
        nfe = len(inner.timesteps)

    denoise = backend.denoise if backend is not None else model.denoise
    t = torch.tensor([inner.timesteps[0]], device=cond.device)
    x_dev = torch.randn(shape, generator=g).to(cond.device)

    def forward():
        denoise(x_dev, t, cond)
        sync()

    with torch.no_grad():
        _time(decide, settings.warmup)
        decision = _time(decide, settings.iters)
        _time(forward, settings.warmup)
        call = _time(forward, max(settings.iters, 50))
    name = backend.name if backend is not None else "torch"
    return {"backend": name + ("-fused" if fused else ""), "device": _device(backend),
            "nfe_per_decision": nfe, "engine_calls_per_decision": 1 if fused else nfe,
            "latency_ms": percentiles(decision), "forward_ms": percentiles(call, ("p50", "p99")),
            "p99_over_p50": float(np.percentile(decision, 99) / np.percentile(decision, 50)),
            "samples_ms": decision.tolist()}


def _device(backend) -> str:
    if backend is not None and str(backend.device).startswith("cuda"):
        return torch.cuda.get_device_name(0)
    if getattr(backend, "providers", ["CPUExecutionProvider"])[0] != "CPUExecutionProvider":
        return f"{backend.providers[0]} (host I/O)"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def profile(settings: ProfileSettings, progress: bool = True) -> dict:
    if settings.iters < 1 or settings.warmup < 0:
        raise ValueError(f"profile needs iters >= 1 and warmup >= 0, got {settings.iters}, {settings.warmup}")
    torch.set_num_threads(settings.threads)
    model, run_cfg = load_model(settings.runtime("torch"))
    names = settings.backends or [b for b in BACKENDS if "compile" not in b
                                  and (not hasattr(model, "decision_graph") or b in GRAPH_BACKENDS)]
    results, skipped = [], {}
    for name in names:
        with PeakMemory() as memory:
            try:
                runtime = build_policy(settings.runtime(name), model, run_cfg, fused_graph=settings.fused)
            except (BackendUnavailable, ExportError, FileNotFoundError) as e:
                if settings.backends:  # asked for by name: its absence is an error
                    raise
                skipped[name] = str(e)
                continue
            if progress:
                print(f"profiling {name} ...", flush=True)
            measured = [profile_backend(runtime, settings)]
            backend = runtime.backend
            if settings.fused and isinstance(backend, OnnxRuntimeBackend) and "fused" in backend.sessions:
                try:
                    measured.append(profile_backend(runtime, settings, fused=True))
                except BackendUnavailable as e:
                    skipped[name + "-fused"] = str(e)
        del runtime, backend  # the next backend's peak starts without this one's sessions
        gc.collect()
        for r in measured:
            r["precision"] = settings.precision
            r["memory"] = memory.result()
            r["reaction_ms"] = reaction_times(np.asarray(r["samples_ms"]), settings.rate_hz)
        results.extend(measured)
    if not results:
        raise BackendUnavailable(f"no backend could run: {skipped}")
    report = {k: v for k, v in results[0].items() if k != "samples_ms"}
    report.update(checkpoint=str(settings.checkpoint), iters=settings.iters, threads=settings.threads,
                  sampler=model.method, rti_k0=settings.rti_k0,
                  date=datetime.date.today().isoformat(), machine=platform.node(),
                  backends=[{k: v for k, v in r.items() if k != "samples_ms"} for r in results], skipped=skipped)
    if settings.plot:
        plot_profile(results, Path(settings.plot))
    return report


def reaction_times(decision_ms: np.ndarray, rate_hz: float) -> dict:
    """From reading an observation to sending the first action computed from it, in a fixed-rate loop at
    `rate_hz` that reads at a tick and adopts a chunk at the first tick after its decision finishes: each decision
    rounded up to whole periods (`rtdp control` measures the same on the loop itself)."""
    period = 1e3 / rate_hz
    return {"rate_hz": rate_hz, **percentiles(np.ceil(decision_ms / period) * period, ("p50", "p99"))}


def comparison_table(report: dict) -> str:
    rows = [f"{'backend':<24}{'device':<34}{'calls':>6}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
            f"{'call p50':>10}{'react p99':>10}{'peak MB':>9}"]
    for r in report["backends"]:
        lat = r["latency_ms"]
        rows.append(f"{r['backend']:<24}{r['device'][:33]:<34}{r['engine_calls_per_decision']:>6}{lat['p50']:>9.2f}"
                    f"{lat['p90']:>9.2f}{lat['p99']:>9.2f}{lat['max']:>9.2f}"
                    + (f"{r['forward_ms']['p50']:>10.3f}" if r["forward_ms"] else f"{'-':>10}")
                    + (f"{r['reaction_ms']['p99']:>10.1f}" if r.get("reaction_ms") else f"{'-':>10}")
                    + (f"{r['memory']['peak_rss_mb']:>9.0f}" if r.get("memory") else f"{'-':>9}"))
    for name, why in report.get("skipped", {}).items():
        rows.append(f"{name:<24}skipped: {why[:90]}")
    return "\n".join(rows)


def plot_profile(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    hi = max(np.percentile(r["samples_ms"], 99.5) for r in results)
    bins = np.linspace(0, hi * 1.05, 80)
    for r in results:
        ax.hist(np.clip(r["samples_ms"], 0, bins[-1]), bins=bins, alpha=0.5,
                label=f"{r['backend']} p50 {r['latency_ms']['p50']:.2f} ms, p99 {r['latency_ms']['p99']:.2f} ms")
    ax.set_xlabel("decision latency (ms)")
    ax.set_ylabel("decisions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
