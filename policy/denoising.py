"""What a diffusion model kind offers the wrappers around it (RTI, the block cache, a backend), and the one
decision that turns it into the contract's `predict_chunk`: condition -> initial noise -> sample -> chunk.

A denoising policy has a `spec`, a `schedule`, a `normalizer`, the sampler it was built with (`method`,
`timesteps`), a `model` (the torch module: what a block cache hooks and what export traces), and

    condition(obs) -> cond                                   raw observations, validated, normalised, encoded
    sample_normalized(cond, x_init, timesteps, method, generator=None, denoiser=None, stop=None) -> Denoised
    to_chunk(denoised, kind="full", extras=None) -> Chunk    clean normalised chunk -> raw actions
    chunk_shape(batch), shift_chunk(x0, executed), inference_timesteps(steps), reset()

A wrapper (`DenoisingWrapper`) forwards all of it to the policy it wraps and replaces only what it changes: a
backend the encoder and the denoiser, a block cache the denoiser on its schedule's step list, RTI the decision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .contract import Chunk, PolicyWrapper
from .diffusion import METHODS, CallCounter, sample


@dataclass
class Denoised:
    x0: torch.Tensor  # the clean chunk, normalised
    nfe: int  # denoiser calls, counted
    block_evals: int | None = None  # residual-branch evaluations, where a block cache counted them


class DenoisingPolicy:
    """The contract's `predict_chunk` for any denoising policy: a full denoise with the build-time sampler. A kind
    brings `cfg.inference` (sampler, steps, spacing, eta), a `schedule`, `denoise(x, t, cond)`, `condition`,
    `chunk_shape` and `to_chunk`; the sampler plumbing below is shared."""

    # Wall time spent in sample_normalized, summed over the policy's life: a deadline-aware caller tells the
    # denoising steps' cost apart from the rest of a decision (policy.chunking.AnytimePolicy).
    sampling_ms: float = 0.0

    def configure_inference(self, sampler: str | None = None, steps: int | None = None):
        """Fix the sampler and step count every decision runs (build time: before any wrapper is put around)."""
        inf = self.cfg.inference
        if sampler is not None:
            inf.sampler = sampler
        if steps is not None:
            if steps < 1:
                raise ValueError(f"steps must be >= 1, got {steps}")
            inf.steps = steps
        if inf.sampler not in METHODS:
            raise ValueError(f"sampler must be one of {METHODS}, got {inf.sampler!r}")
        self.method = inf.sampler
        self.timesteps = self.inference_timesteps().tolist()
        return self

    def inference_timesteps(self, steps: int | None = None) -> torch.Tensor:
        return self.schedule.timesteps(steps or self.cfg.inference.steps, self.cfg.inference.spacing)

    @torch.no_grad()
    def sample_normalized(self, cond: torch.Tensor, x_init: torch.Tensor, timesteps, method: str,
                          generator: torch.Generator | None = None, denoiser=None, stop=None) -> Denoised:
        """Denoise `x_init` (normalised, at noise level timesteps[0]) to a clean normalised chunk, counting the
        denoiser calls. `denoiser` (x, t, cond) replaces `self.denoise` (a block cache, another backend); `stop`
        ends the chain early (the sampler's anytime stop)."""
        start = time.perf_counter()
        denoise = denoiser or self.denoise
        counter = CallCounter(lambda x, t: denoise(x, t, cond))
        x0 = sample(counter, x_init.to(cond), self.schedule, timesteps, method, generator=generator,
                    eta=self.cfg.inference.eta, stop=stop)
        self.sampling_ms += (time.perf_counter() - start) * 1e3
        return Denoised(x0, counter.calls)

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor], *, executed: int | None = None,
                      generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Chunk:
        """Raw observations -> a Chunk in raw units. `noise` fixes the initial sample (parity checks); `executed`
        is ignored: a full denoise keeps no state between decisions."""
        cond = self.condition(obs)
        x_init = self.initial_noise(cond, generator, noise)
        return self.to_chunk(self.sample_normalized(cond, x_init, self.timesteps, self.method, generator))

    def shift_chunk(self, x0: torch.Tensor, executed: int) -> torch.Tensor:
        """A clean normalised chunk advanced by `executed` actions, its last row repeated to fill it (RTI's warm
        start). A kind whose rows are not one action each (PAD's, `skip` env steps a row) replaces it."""
        if executed == 0:
            return x0.clone()
        return torch.cat([x0[:, executed:], x0[:, -1:].expand(-1, executed, -1)], dim=1)

    def initial_noise(self, cond: torch.Tensor, generator: torch.Generator | None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        shape = self.chunk_shape(cond.shape[0])
        if noise is None:
            return torch.randn(shape, generator=generator, dtype=cond.dtype)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        return noise


class DenoisingWrapper(PolicyWrapper, DenoisingPolicy):
    """Forwards the denoising surface to `inner` (the contract's part through PolicyWrapper); subclasses override
    what they change."""

    @property
    def model(self):
        return self.inner.model

    @property
    def schedule(self):
        return self.inner.schedule

    @property
    def normalizer(self):
        return self.inner.normalizer

    def condition(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.inner.condition(obs)

    def sample_normalized(self, cond, x_init, timesteps, method, generator=None, denoiser=None, stop=None
                          ) -> Denoised:
        return self.inner.sample_normalized(cond, x_init, timesteps, method, generator, denoiser, stop)

    def to_chunk(self, denoised: Denoised, kind: str = "full", extras: dict | None = None) -> Chunk:
        return self.inner.to_chunk(denoised, kind, extras)

    def chunk_shape(self, batch: int) -> tuple[int, ...]:
        return self.inner.chunk_shape(batch)

    def shift_chunk(self, x0: torch.Tensor, executed: int) -> torch.Tensor:
        return self.inner.shift_chunk(x0, executed)

    def inference_timesteps(self, steps: int | None = None) -> torch.Tensor:
        return self.inner.inference_timesteps(steps)
