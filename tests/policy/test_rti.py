"""RTI warm-start mechanics on an untrained policy: call counts, the shift, both entry modes, discrete-action
handling, fallbacks, refusals and the k0 calibration rule. Closed-loop behaviour is in test_rti_toy.py."""

import numpy as np
import pytest
import torch

from policy.denoising import Denoised
from policy.diffusion import CallCounter, sample
from policy.diffusion_policy import DiffusionPolicy
from policy.normalizer import FieldNormalizer, Normalizer
from policy.rti import RTIConfig, RTIPolicy, calibrate_k0
from tests.conftest import tiny_config

H, TO, A = 8, 2, 3


def make_policy(discrete_dims=(2,), scale=1.0, grip_levels=(-1.0, 1.0)):
    cfg = tiny_config().policy
    cfg.action_dim = A
    cfg.discrete_action_dims, cfg.discrete_action_scale = list(discrete_dims), scale
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (64, A))
    actions[:, 2] = rng.choice(grip_levels, 64)
    action = FieldNormalizer.fit_minmax(actions)
    if scale != 1.0:
        action = action.shrink(list(discrete_dims), scale)
    norm = Normalizer({"state": FieldNormalizer.fit_minmax(rng.uniform(-1, 1, (64, 4))), "action": action})
    return DiffusionPolicy(cfg, norm).eval()


def obs(batch=1, seed=0):
    return {"state": torch.rand(batch, TO, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1}


def full_cfg(**kw):
    # The paper's tail mechanics (every step from k0, DDPM, direct entry) unless a test says otherwise.
    for key, value in (("steps", None), ("sampler", "ddpm"), ("mode", "direct"), ("refresh", [])):
        kw.setdefault(key, value)
    return RTIConfig(full_steps=20, **kw)  # a cheaper full denoise keeps these tests fast


@pytest.mark.parametrize("k0", [0, 2, 3, 7])
def test_calls_per_decision_are_k0_plus_one_after_a_full_denoise(k0):
    rti = RTIPolicy(make_policy(), full_cfg(k0=k0))
    rti.reset()
    g = torch.Generator().manual_seed(0)
    calls, kinds = [], []
    for i in range(4):
        chunk = rti.predict_chunk(obs(seed=i), generator=g)
        calls.append(chunk.nfe)
        kinds.append(chunk.kind)
    assert calls == [20, k0 + 1, k0 + 1, k0 + 1] and kinds == ["full", "warm", "warm", "warm"]
    rti.reset()
    chunk = rti.predict_chunk(obs(), generator=g)
    assert chunk.nfe == 20 and chunk.kind == "full"
    assert rti.stats == {"full": 1, "warm": 0, "refresh": 0, "nan_fallbacks": 0, "gap_fallbacks": 0,
                         "discrete_refreshes": 0, "drift_refreshes": 0, "age_refreshes": 0}


def test_an_explicit_tail_runs_its_listed_steps():
    rti = RTIPolicy(make_policy(), full_cfg(tail=[7, 5, 3, 1, 0]))
    rti.predict_chunk(obs())
    chunk = rti.predict_chunk(obs())
    assert rti.k0 == 7 and chunk.nfe == 5


def test_shift_drops_executed_actions_and_repeats_the_last():
    rti = RTIPolicy(make_policy(), full_cfg(n_exec=2))
    chunk = torch.arange(H * A, dtype=torch.float32).reshape(1, H, A)
    rti._chunk = chunk
    shifted = rti.shifted_guess(2)
    assert torch.equal(shifted[:, : H - 2], chunk[:, 2:])
    assert torch.equal(shifted[:, H - 2 :], chunk[:, -1:].expand(-1, 2, -1))
    assert torch.equal(rti.shifted_guess(0), chunk)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_direct_entry_feeds_the_shifted_chunk_to_the_tail(sampler):
    policy = make_policy(discrete_dims=())
    rti = RTIPolicy(policy, full_cfg(k0=3, sampler=sampler))
    rti.predict_chunk(obs(seed=0))
    guess = rti.shifted_guess(1)
    got = rti.predict_chunk(obs(seed=1)).action_pred
    with torch.no_grad():
        cond = policy.condition(obs(seed=1))
        want = sample(lambda x, t: policy.denoise(x, t, cond), guess, policy.schedule, [3, 2, 1, 0], sampler)
    torch.testing.assert_close(got, policy.normalizer["action"].unnormalize(want), rtol=0, atol=1e-6)


def test_renoise_entry_forward_noises_the_guess_to_k0():
    policy = make_policy(discrete_dims=())
    rti = RTIPolicy(policy, full_cfg(k0=5, sampler="ddim", mode="renoise"))
    rti.predict_chunk(obs(seed=0))
    guess = rti.shifted_guess(1)
    got = rti.predict_chunk(obs(seed=1), generator=torch.Generator().manual_seed(9)).action_pred
    ab = policy.schedule.alphas_cumprod[5]
    eps = torch.randn(guess.shape, generator=torch.Generator().manual_seed(9))
    x5 = (ab.sqrt() * guess + (1 - ab).sqrt() * eps).float()
    with torch.no_grad():
        cond = policy.condition(obs(seed=1))
        want = sample(lambda x, t: policy.denoise(x, t, cond), x5, policy.schedule, range(5, -1, -1), "ddim")
    torch.testing.assert_close(got, policy.normalizer["action"].unnormalize(want), rtol=0, atol=1e-6)


def test_clip_sets_the_guess_gripper_to_plus_minus_one_over_factor_and_executes_binary():
    policy = make_policy()
    rti = RTIPolicy(policy, full_cfg(k0=3, factor=10.0))
    assert rti.discrete == "clip" and rti.discrete_dims == [2]
    out = rti.predict_chunk(obs(batch=4))
    grip = rti._chunk[..., 2]
    torch.testing.assert_close(grip.abs(), torch.full_like(grip, 0.1))
    assert set(torch.unique(out.action[..., 2]).tolist()) <= {-1.0, 1.0}
    # The sign follows the raw prediction.
    torch.testing.assert_close(torch.sign(grip), torch.where(out.action_pred[..., 2] > 0, 1.0, -1.0))


def test_scale_variant_keeps_the_trained_scale_and_maps_back_to_the_data_levels():
    policy = make_policy(scale=10.0, grip_levels=(0.0, 0.6))
    rti = RTIPolicy(policy, full_cfg(k0=3))
    assert rti.discrete == "scale" and rti.describe()["factor"] == 10.0
    out = rti.predict_chunk(obs(batch=4))
    grip = rti._chunk[..., 2]
    torch.testing.assert_close(grip.abs(), torch.full_like(grip, 0.1))
    executed = out.action[..., 2]
    assert bool(((executed == 0.0) | (executed - 0.6).abs().lt(1e-6)).all())


def test_a_policy_trained_with_scaled_discrete_dims_keeps_them_inside_their_training_range():
    policy = make_policy(scale=10.0, grip_levels=(0.0, 0.6))
    x0 = torch.zeros(2, H, A)
    x0[0, :, 2], x0[1, :, 2] = -0.13, 0.12  # 0.03 and 0.02 past the +-0.1 band: -0.09 and 0.66 raw unclamped
    chunk = policy.to_chunk(Denoised(x0, 1))
    torch.testing.assert_close(chunk.action_pred[0, :, 2], torch.zeros(H))
    torch.testing.assert_close(chunk.action_pred[1, :, 2], torch.full((H,), 0.6))
    torch.testing.assert_close(chunk.action_pred[..., :2], policy.normalizer["action"].unnormalize(x0)[..., :2])
    unscaled = make_policy(grip_levels=(0.0, 0.6))  # trained without the scale: the prediction is left as it is
    x0[0, :, 2] = -1.2
    assert float(unscaled.to_chunk(Denoised(x0, 1)).action_pred[0, 0, 2]) == pytest.approx(-0.06)


def test_a_gripper_constant_in_the_data_is_left_alone():
    policy = make_policy(grip_levels=(0.0,))
    rti = RTIPolicy(policy, full_cfg(k0=3))
    assert rti.discrete == "none" and rti.discrete_dims == [] and rti.constant_dims == [2]


def test_nan_in_the_warm_start_and_a_gap_fall_back_to_a_full_denoise():
    rti = RTIPolicy(make_policy(), full_cfg(k0=3))
    rti.predict_chunk(obs())
    rti._chunk[0, 4, 0] = float("nan")
    out = rti.predict_chunk(obs())
    assert out.kind == "full" and out.nfe == 20 and torch.isfinite(out.action).all()
    assert out.extras["fallback"] == "nan"
    gap = rti.predict_chunk(obs(), executed=H - TO + 1)  # the previous chunk no longer covers the current step
    assert gap.kind == "full" and gap.extras["fallback"] == "gap"
    assert rti.predict_chunk(obs(), executed=H - TO).kind == "warm"
    assert rti.stats == {"full": 3, "warm": 1, "refresh": 0, "nan_fallbacks": 1, "gap_fallbacks": 1,
                         "discrete_refreshes": 0, "drift_refreshes": 0, "age_refreshes": 0}


@pytest.mark.parametrize("kw,message", [
    (dict(k0=100), "k0=100 is outside the schedule's steps [0, 99]"),
    (dict(k0=-1), "k0=-1 is outside the schedule's steps [0, 99]"),
    (dict(tail=[3, 2, 1]), "must end at step 0"),
    (dict(tail=[2, 3, 0]), "strictly descending"),
    (dict(n_exec=7), "n_exec=7: a horizon of 8 with 2 observation steps covers 1 to 6"),
    (dict(n_exec=0), "n_exec=0"),
    (dict(mode="noisy"), "mode must be one of"),
    (dict(sampler="euler"), "sampler must be one of"),
    (dict(discrete="scale"), "needs a policy trained with policy.discrete_action_scale > 1"),
    (dict(discrete_dims=[5]), "discrete dims [5] are outside the 3-d action"),
])
def test_bad_settings_are_refused_naming_the_numbers(kw, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RTIPolicy(make_policy(), full_cfg(**kw))


def test_negative_executed_count_is_refused():
    rti = RTIPolicy(make_policy(), full_cfg())
    rti.predict_chunk(obs())
    with pytest.raises(ValueError, match="executed must be >= 0 actions, got -1"):
        rti.predict_chunk(obs(), executed=-1)


def test_calibration_records_guess_and_full_denoise_pairs_and_executes_the_full_result():
    rti = RTIPolicy(make_policy(), full_cfg(k0=0), record_pairs=True)
    counter = []
    for i in range(3):
        counter.append(rti.predict_chunk(obs(seed=i)).nfe)
    assert counter == [20, 20, 20] and len(rti.pairs) == 2
    guess, full = rti.pairs[-1]
    assert guess.shape == full.shape == (1, H, A)


def test_k0_rule_picks_the_first_step_where_forward_noise_covers_the_guess_error():
    policy = make_policy()
    ab = policy.schedule.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    a0 = torch.rand(200, H, A, generator=g) * 2 - 1
    delta = 0.1 * torch.randn(200, H, A, generator=g)
    pairs = [(a0[i : i + 1] + delta[i : i + 1], a0[i : i + 1]) for i in range(200)]
    cal = calibrate_k0(pairs, policy.schedule, margin=1)
    dev = [float(((a0 + delta).double() - ab[k].sqrt() * a0.double()).pow(2).mean()) for k in range(100)]
    want = next(k for k in range(100) if dev[k] <= 1 - float(ab[k]))
    assert cal.k_min == want and cal.k0 == want + 1 and cal.pairs == 200
    assert 1 <= want <= 10  # RMS 0.1 error sits around noise level sigma ~ 0.1: a few steps in
    exact = calibrate_k0([(a0, a0)], policy.schedule, margin=0)
    assert exact.k_min == 0 and exact.k0 == 0
    with pytest.raises(ValueError, match="at least one"):
        calibrate_k0([], policy.schedule)


def test_shrunk_normalizer_trains_discrete_dims_at_one_over_factor():
    data = np.array([[0.0, -1.0], [1.0, 1.0], [0.5, -1.0]])
    norm = FieldNormalizer.fit_minmax(data).shrink([1], 10.0)
    y = norm.normalize(data)
    np.testing.assert_allclose(y[:, 1], [-0.1, 0.1, -0.1], atol=1e-6)
    np.testing.assert_allclose(norm.unnormalize(y), data, atol=1e-6)


def test_counter_and_policy_agree_on_calls():
    policy = make_policy()
    rti = RTIPolicy(policy, full_cfg(k0=4))
    rti.predict_chunk(obs())
    counter = CallCounter(lambda x, t: x)
    sample(counter, torch.zeros(1, H, A), policy.schedule, rti.tail, "ddpm")
    assert rti.predict_chunk(obs()).nfe == counter.calls == 5


def test_a_changed_gripper_command_refreshes_the_decision_with_a_full_denoise_counted_in_its_calls():
    import copy

    policy = make_policy()
    rti = RTIPolicy(policy, full_cfg(k0=3, refresh=["discrete"], refresh_sampler="ddim", refresh_steps=5))
    rti.predict_chunk(obs(), generator=torch.Generator().manual_seed(0))
    same, other = rti, copy.deepcopy(rti)
    plain = copy.deepcopy(rti)
    plain.refresh = []
    warm = plain.predict_chunk(obs(seed=1), generator=torch.Generator().manual_seed(5))
    command = warm.action[:, 0, plain.discrete_dims]
    # The command the warm tail gives is the one executed last: a plain warm decision, the same chunk.
    same._executed_discrete = command.clone()
    out = same.predict_chunk(obs(seed=1), generator=torch.Generator().manual_seed(5))
    assert out.kind == "warm" and out.nfe == 4 and same.stats["refresh"] == 0
    torch.testing.assert_close(out.action_ahead, warm.action_ahead)
    # The other command was executed last: the gripper changes, and the decision is redone from fresh noise.
    other._executed_discrete = -command  # the levels are -1 and 1
    calls = []
    net = other.inner.model.denoiser.forward
    other.inner.model.denoiser.forward = lambda *a, **k: calls.append(1) or net(*a, **k)
    out = other.predict_chunk(obs(seed=1), generator=torch.Generator().manual_seed(5))
    assert out.kind == "refresh" and out.extras["refresh"] == "discrete"
    assert out.nfe == 4 + 5 == len(calls)
    assert other.stats["refresh"] == 1 and other.stats["discrete_refreshes"] == 1


def test_drift_refreshes_only_above_its_threshold():
    far = RTIPolicy(make_policy(), full_cfg(k0=3, refresh=["drift"], refresh_drift=1e-9, refresh_steps=6,
                                             refresh_sampler="ddim"))
    near = RTIPolicy(make_policy(), full_cfg(k0=3, refresh=["drift"], refresh_drift=1e9))
    for rti in (far, near):
        rti.predict_chunk(obs())
    assert far.predict_chunk(obs(seed=1)).kind == "refresh" and far.stats["drift_refreshes"] == 1
    assert near.predict_chunk(obs(seed=1)).kind == "warm" and near.stats["drift_refreshes"] == 0


def test_age_refreshes_every_n_warm_decisions_without_running_the_tail_first():
    rti = RTIPolicy(make_policy(), full_cfg(k0=3, refresh=["age"], refresh_every=3, refresh_sampler="ddim",
                                            refresh_steps=5))
    kinds, calls = [], []
    for i in range(9):
        out = rti.predict_chunk(obs(seed=i))
        kinds.append(out.kind)
        calls.append(out.nfe)
    assert kinds == ["full", "warm", "warm", "warm", "refresh", "warm", "warm", "warm", "refresh"]
    assert calls == [20, 4, 4, 4, 5, 4, 4, 4, 5] and rti.stats["age_refreshes"] == 2


@pytest.mark.parametrize("kw, message", [
    (dict(refresh=["gripper"]), "refresh signals must be among"),
    (dict(refresh=["age"]), "needs refresh_every >= 1"),
    (dict(refresh=["drift"], refresh_drift=0.0), "refresh_drift must be > 0"),
    (dict(refresh=["discrete"], discrete="none"), "needs a discrete action dim"),
    (dict(refresh_sampler="euler"), "refresh_sampler must be one of"),
])
def test_bad_refresh_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        RTIPolicy(make_policy(), full_cfg(k0=3, **kw))


def test_the_default_enters_at_27_through_renoise_and_runs_a_4_step_ddim_tail_without_refreshes():
    rti = RTIPolicy(make_policy(), RTIConfig(full_steps=20))
    assert rti.tail == [27, 18, 9, 0] and rti.method == "ddim" and rti.cfg.mode == "renoise" and rti.refresh == []
    rti.predict_chunk(obs())
    assert rti.predict_chunk(obs()).nfe == 4


@pytest.mark.parametrize("k0, steps, tail", [(3, None, [3, 2, 1, 0]), (3, 4, [3, 2, 1, 0]), (10, 4, [10, 7, 3, 0]),
                                             (27, 4, [27, 18, 9, 0]), (9, 2, [9, 0]), (0, 1, [0]),
                                             (2, 4, [2, 1, 0]), (27, 1, [27])])
def test_a_strided_tail_runs_k0_to_0_in_its_steps(k0, steps, tail):
    rti = RTIPolicy(make_policy(), full_cfg(k0=k0, steps=steps))
    assert rti.tail == tail
    rti.predict_chunk(obs())
    assert rti.predict_chunk(obs()).nfe == len(tail)


def test_a_tail_without_calls_is_refused():
    with pytest.raises(ValueError, match="at least one call"):
        RTIPolicy(make_policy(), full_cfg(k0=5, steps=0))
