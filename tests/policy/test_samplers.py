"""The samplers agree with diffusers' schedulers given the same timesteps, and call the denoiser once a step."""

import math

import pytest
import torch

from policy.diffusion import CallCounter, NoiseSchedule, sample

diffusers = pytest.importorskip("diffusers")

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
SHAPE = (3, 16, 4)


def toy_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear function of (x, t): enough to exercise every coefficient of a step."""
    tt = t.to(x.dtype).reshape(-1, 1, 1) / 100.0
    return 0.7 * torch.tanh(x) * torch.cos(3.0 * tt) + 0.3 * torch.sin(x.roll(1, dims=1) + tt)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def reference_loop(scheduler, timesteps, x, **step_kwargs):
    for t in timesteps:
        t = int(t)
        x = scheduler.step(toy_denoiser(x, torch.tensor([t] * x.shape[0])), t, x, **step_kwargs).prev_sample
    return x


def x_init(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", [100, 10, 3])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddpm_matches_diffusers(beta_schedule, prediction_type, steps, clip_sample):
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=100, beta_schedule=beta_schedule, prediction_type=prediction_type,
        variance_type="fixed_small", clip_sample=clip_sample,
    )
    # diffusers steps DDPM in float32, where 1 - alpha_bar_t / alpha_bar_prev loses ~1e-3 of beta at small t
    # for the linear schedules; in float64 on both sides the comparison measures the update rule itself.
    ref.alphas_cumprod, ref.one = ref.alphas_cumprod.double(), ref.one.double()
    ours = NoiseSchedule(100, beta_schedule, prediction_type, clip_sample=clip_sample)
    timesteps = ours.timesteps(steps)
    ref.set_timesteps(timesteps=timesteps.tolist())
    x = x_init().double()
    expected = reference_loop(ref, ref.timesteps, x, generator=torch.Generator().manual_seed(7))
    got = sample(toy_denoiser, x, ours, timesteps, "ddpm", generator=torch.Generator().manual_seed(7))
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
# diffusers' DDIM steps to t - T // n rather than to the next listed timestep: equal when n divides T.
@pytest.mark.parametrize("steps", [100, 10, 5, 4])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers(beta_schedule, prediction_type, steps, spacing):
    ref = diffusers.DDIMScheduler(
        num_train_timesteps=100, beta_schedule=beta_schedule, prediction_type=prediction_type,
        clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing,
    )
    ref.set_timesteps(steps)
    ours = NoiseSchedule(100, beta_schedule, prediction_type)
    assert ours.timesteps(steps, spacing).tolist() == ref.timesteps.tolist()
    expected = reference_loop(ref, ref.timesteps, x_init(), eta=0.0)
    got = sample(toy_denoiser, x_init(), ours, ref.timesteps, "ddim")
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_with_eta_and_clipping_matches_diffusers(prediction_type):
    ref = diffusers.DDIMScheduler(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
        clip_sample=True, set_alpha_to_one=True,
    )
    ref.set_timesteps(10)
    expected = reference_loop(ref, ref.timesteps, x_init(), eta=0.5, generator=torch.Generator().manual_seed(3))
    ours = NoiseSchedule(100, "squaredcos_cap_v2", prediction_type, clip_sample=True)
    got = sample(toy_denoiser, x_init(), ours, ref.timesteps, "ddim", eta=0.5,
                 generator=torch.Generator().manual_seed(3))
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", [20, 10, 5, 3, 2])
def test_dpmpp_2m_matches_diffusers(beta_schedule, prediction_type, steps):
    ref = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=100, beta_schedule=beta_schedule, prediction_type=prediction_type,
        algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
    )
    ref.set_timesteps(steps)
    expected = reference_loop(ref, ref.timesteps, x_init())
    got = sample(toy_denoiser, x_init(), NoiseSchedule(100, beta_schedule, prediction_type), ref.timesteps, "dpmpp_2m")
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp_2m"])
def test_warm_start_tail_matches_diffusers_custom_timesteps(method):
    """A short tail entered at k0 from a given sample: the RTI / anchor use of the sampler."""
    tail = [3, 2, 1, 0]
    sched = NoiseSchedule(100, "squaredcos_cap_v2", "epsilon")
    if method == "ddpm":
        ref = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False)
        ref.set_timesteps(timesteps=tail)
        kw = dict(generator=torch.Generator().manual_seed(1))
    elif method == "ddim":
        # diffusers' DDIM steps by num_train_timesteps // num_inference_steps; 100 steps gives t -> t-1.
        ref = diffusers.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False)
        ref.set_timesteps(100)
        kw = {}
    else:
        ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
        ref.set_timesteps(timesteps=tail)
        kw = {}
    expected = reference_loop(ref, tail, x_init(5), **kw)
    got = sample(toy_denoiser, x_init(5), sched, tail, method, generator=kw.get("generator") and
                 torch.Generator().manual_seed(1))
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("timesteps", [list(range(99, -1, -1)), [90, 50, 10], [3, 2, 1, 0], [0], [42]])
def test_one_denoiser_call_per_timestep(method, timesteps):
    counter = CallCounter(toy_denoiser)
    out = sample(counter, x_init(), NoiseSchedule(100), timesteps, method, generator=torch.Generator().manual_seed(0))
    assert counter.calls == len(timesteps)
    assert out.shape == SHAPE and torch.isfinite(out).all()


def test_model_sees_tensor_timesteps_of_batch_size():
    seen = []

    def spy(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    sample(spy, x_init(), NoiseSchedule(100), [9, 4, 0], "ddim")
    assert all(t.dtype == torch.long and t.shape == (SHAPE[0],) for t in seen)
    assert [int(t[0]) for t in seen] == [9, 4, 0]


def test_lands_on_clean_sample_with_an_oracle_denoiser():
    """With an exact x0 predictor every deterministic method returns that x0 after any step list."""
    sched = NoiseSchedule(100, "squaredcos_cap_v2", "sample")
    target = torch.linspace(-0.9, 0.9, math.prod(SHAPE)).reshape(SHAPE)
    for method in ("ddim", "dpmpp_2m"):
        for ts in ([99, 50, 0], [5], list(range(99, -1, -1))):
            out = sample(lambda x, t: target, x_init(), sched, ts, method)
            assert torch.allclose(out, target, atol=1e-5)


def test_float64_sampling_keeps_dtype():
    out = sample(toy_denoiser, x_init().double(), NoiseSchedule(100), [50, 20, 0], "dpmpp_2m")
    assert out.dtype == torch.float64


@pytest.mark.parametrize(
    "timesteps,match",
    [([5, 5, 0], "strictly descending"), ([0, 5], "strictly descending"), ([100, 0], r"\[0, 99\]"),
     ([-1], r"\[0, 99\]"), ([], "empty"), ([2.5, 1.0], "integers")],
)
def test_bad_timesteps_are_refused_with_the_numbers(timesteps, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sample(toy_denoiser, x_init(), NoiseSchedule(100), torch.tensor(timesteps, dtype=torch.long)
               if timesteps and isinstance(timesteps[0], int) else timesteps, "ddim")


def test_unknown_method_and_schedule_are_named():
    with pytest.raises(ValueError, match="euler"):
        sample(toy_denoiser, x_init(), NoiseSchedule(100), [1, 0], "euler")
    with pytest.raises(ValueError, match="cosine"):
        NoiseSchedule(100, beta_schedule="cosine")
    with pytest.raises(ValueError, match="x0"):
        NoiseSchedule(100, prediction_type="x0")


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_a_chain_stopped_at_until_and_resumed_is_the_whole_chain(method):
    """`until` hands the chain over at a noise level (AAMDM: a GAN for the noisy steps, a polisher for the last):
    stopping after [9, 6, 3] at level 1 and going on with [1, 0] is exactly the chain [9, 6, 3, 1, 0]."""
    sched = NoiseSchedule(10, "squaredcos_cap_v2", "sample")
    noise = torch.randn((5, *SHAPE), generator=torch.Generator().manual_seed(3))
    whole = sample(toy_denoiser, x_init(), sched, [9, 6, 3, 1, 0], method, eta=1.0, step_noise=noise)
    head = sample(toy_denoiser, x_init(), sched, [9, 6, 3], method, eta=1.0, step_noise=noise[:3], until=1)
    tail = sample(toy_denoiser, head, sched, [1, 0], method, eta=1.0, step_noise=noise[3:])
    assert torch.allclose(tail, whole, atol=1e-6)
    with pytest.raises(ValueError, match="below the last timestep 3"):
        sample(toy_denoiser, x_init(), sched, [9, 6, 3], method, until=3)
