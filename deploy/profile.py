"""`rtdp profile`: decision latency and denoiser-call latency of a checkpoint on every backend available here,
in one run: warm-up, then N timed decisions each, percentiles, a histogram PNG and a comparison table.

A decision is what the control loop pays per chunk: validation and normalisation, the encoder, and the sampler's
denoiser calls (or one fused-graph call). Inputs are raw observations drawn inside the normaliser's range.
"""

from __future__ import annotations

import datetime
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backends import BACKENDS, BackendUnavailable, OnnxRuntimeBackend, make_backend
from .evaluation import percentiles


@dataclass
class ProfileSettings:
    checkpoint: str
    backends: list[str] = field(default_factory=list)  # empty: every backend that runs here
    iters: int = 200
    warmup: int = 20
    sampler: str | None = None
    steps: int | None = None
    rti_k0: int | None = None  # profile RTI's warm decision ([k0 .. 0]) instead of a full denoise
    threads: int = 1
    precision: str = "fp32"  # the network's: fp32 | fp16
    fused: bool = True  # also time the exported fused graph (one engine call per decision), when present
    plot: str | None = None


def _raw_obs(policy, generator: torch.Generator) -> dict[str, torch.Tensor]:
    cfg = policy.cfg
    norm = policy.normalizer["state"]
    lo = torch.tensor(norm.stats.get("min", [-1.0] * cfg.state_dim), dtype=torch.float32)
    hi = torch.tensor(norm.stats.get("max", [1.0] * cfg.state_dim), dtype=torch.float32)
    obs = {"state": lo + (hi - lo) * torch.rand(1, cfg.n_obs_steps, cfg.state_dim, generator=generator)}
    if cfg.image_shape is not None:
        obs["image"] = torch.randint(0, 256, (1, cfg.n_obs_steps, *cfg.image_shape, 3), generator=generator,
                                     dtype=torch.uint8)
    return obs


def _time(fn, n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def profile_backend(policy, backend, settings: ProfileSettings, fused: bool = False) -> dict:
    from policy.rti import rti_tail

    from .backends import BackendPolicy

    g = torch.Generator().manual_seed(0)
    wrapped = BackendPolicy(policy, backend)
    obs = _raw_obs(policy, g)
    method = settings.sampler or policy.cfg.inference.sampler
    if settings.rti_k0 is not None:
        timesteps = rti_tail(settings.rti_k0, policy.schedule)
    else:
        timesteps = policy.inference_timesteps(settings.steps).tolist()
    shape = policy.chunk_shape(1)
    x_init = torch.randn(shape, generator=g)
    cond = wrapped.condition(obs)
    step_noise = torch.randn(len(timesteps), *shape, generator=g)

    if fused:
        spec = backend.manifest["graphs"]["fused"]
        if (spec["method"], spec["timesteps"]) != (method, timesteps):
            raise BackendUnavailable(f"the fused graph runs {spec['method']} over {spec['timesteps'][:3]}..., "
                                     f"not the profiled {method} over {timesteps[:3]}...; export it for these")

        def chunk():
            return backend.fused(wrapped.condition(obs), x_init, step_noise)
        nfe = 1
    else:
        def chunk():
            return wrapped.sample_normalized(wrapped.condition(obs), x_init, timesteps, method, g)
        nfe = len(timesteps)

    t = torch.tensor([timesteps[0]], device=cond.device)
    x_dev = x_init.to(cond.device)
    # A timed step ends when the device has finished its work, not when the host has queued it.
    sync = torch.cuda.synchronize if str(cond.device).startswith("cuda") else (lambda: None)

    def decide():
        policy.to_actions(chunk()).get("action").cpu()
        sync()

    def forward():
        backend.denoise(x_dev, t, cond)
        sync()

    with torch.no_grad():
        _time(decide, settings.warmup)
        decision = _time(decide, settings.iters)
        _time(forward, settings.warmup)
        call = _time(forward, max(settings.iters, 50))
    return {"backend": backend.name + ("-fused" if fused else ""), "device": _device(backend),
            "nfe_per_decision": nfe, "engine_calls_per_decision": 1 if fused else nfe,
            "latency_ms": percentiles(decision), "forward_ms": percentiles(call, ("p50", "p99")),
            "p99_over_p50": float(np.percentile(decision, 99) / np.percentile(decision, 50)),
            "samples_ms": decision.tolist()}


def _device(backend) -> str:
    if str(backend.device).startswith("cuda"):
        return torch.cuda.get_device_name(0)
    if getattr(backend, "providers", ["CPUExecutionProvider"])[0] != "CPUExecutionProvider":
        return f"{backend.providers[0]} (host I/O)"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def profile(settings: ProfileSettings, progress: bool = True) -> dict:
    from policy.checkpoint import load_policy

    torch.set_num_threads(settings.threads)
    policy, _ = load_policy(settings.checkpoint)
    policy.eval()
    names = settings.backends or [b for b in BACKENDS if "compile" not in b]
    results, skipped = [], {}
    for name in names:
        try:
            backend = make_backend(name, policy, settings.checkpoint, settings.threads, settings.precision)
        except (BackendUnavailable, FileNotFoundError, ValueError) as e:
            if settings.backends:  # asked for by name: its absence is an error
                raise
            skipped[name] = str(e)
            continue
        if progress:
            print(f"profiling {name} ...", flush=True)
        results.append(profile_backend(policy, backend, settings))
        if settings.fused and isinstance(backend, OnnxRuntimeBackend) and "fused" in backend.sessions:
            try:
                results.append(profile_backend(policy, backend, settings, fused=True))
            except BackendUnavailable as e:
                skipped[name + "-fused"] = str(e)
    if not results:
        raise BackendUnavailable(f"no backend could run: {skipped}")
    report = {k: v for k, v in results[0].items() if k != "samples_ms"}
    report.update(checkpoint=str(settings.checkpoint), iters=settings.iters, threads=settings.threads,
                  sampler=settings.sampler or policy.cfg.inference.sampler, rti_k0=settings.rti_k0,
                  date=datetime.date.today().isoformat(), machine=platform.node(),
                  backends=[{k: v for k, v in r.items() if k != "samples_ms"} for r in results], skipped=skipped)
    if settings.plot:
        plot_profile(results, Path(settings.plot))
    return report


def comparison_table(report: dict) -> str:
    rows = [f"{'backend':<24}{'device':<34}{'calls':>6}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
            f"{'call p50':>10}"]
    for r in report["backends"]:
        lat = r["latency_ms"]
        rows.append(f"{r['backend']:<24}{r['device'][:33]:<34}{r['engine_calls_per_decision']:>6}{lat['p50']:>9.2f}"
                    f"{lat['p90']:>9.2f}{lat['p99']:>9.2f}{lat['max']:>9.2f}{r['forward_ms']['p50']:>10.3f}")
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
