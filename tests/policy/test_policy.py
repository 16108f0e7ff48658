import numpy as np
import pytest
import torch

from policy.diffusion_policy import DiffusionPolicy
from policy.ema import EMA
from policy.normalizer import FieldNormalizer, Normalizer
from tests.conftest import tiny_config, tiny_normalizer


def make_policy(denoiser="unet"):
    return DiffusionPolicy(tiny_config(denoiser).policy, tiny_normalizer()).eval()


def obs(batch=3):
    return {"state": torch.rand(batch, 2, 4) * 2 - 1}


@pytest.mark.parametrize("denoiser", ["unet", "transformer"])
def test_chunk_shapes_and_chi_step_convention(denoiser):
    p = make_policy(denoiser)
    out = p.predict_chunk(obs(), generator=torch.Generator().manual_seed(0))
    assert out.action_pred.shape == (3, 8, 2) and out.action.shape == (3, 4, 2)
    # Executed actions start at the current step: index n_obs_steps - 1 of the predicted chunk.
    assert torch.equal(out.action, out.action_pred[:, 1:5])


def test_injected_noise_makes_prediction_deterministic():
    p = make_policy()
    noise = torch.randn(3, 8, 2)
    o = obs()
    p.configure_inference("ddim", 5)
    a = p.predict_chunk(o, noise=noise).action_pred
    b = p.predict_chunk(o, noise=noise).action_pred
    c = p.predict_chunk(o, noise=torch.randn(3, 8, 2)).action_pred
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 100), ("ddim", 10), ("dpmpp_2m", 5), ("ddim", 1)])
def test_denoiser_calls_per_decision(sampler, steps):
    p = make_policy()
    chunk = p.configure_inference(sampler, steps).predict_chunk(obs())
    assert chunk.nfe == steps


def test_config_sampler_is_the_default():
    cfg = tiny_config().policy
    cfg.inference.sampler, cfg.inference.steps = "dpmpp_2m", 7
    p = DiffusionPolicy(cfg, tiny_normalizer()).eval()
    chunk = p.predict_chunk(obs())
    assert chunk.nfe == 7 and p.method == "dpmpp_2m"


@pytest.mark.parametrize(
    "bad,err,match",
    [({"state": torch.rand(3, 3, 4)}, ValueError, r"shape \(B, 2, 4\)"),
     ({"state": torch.rand(3, 2, 5)}, ValueError, r"got \(3, 2, 5\)"),
     ({"state": torch.full((1, 2, 4), float("nan"))}, ValueError, "NaN or Inf"),
     ({"state": torch.full((1, 2, 4), float("inf"))}, ValueError, "NaN or Inf"),
     ({"pos": torch.rand(1, 2, 4)}, KeyError, "missing 'state'")],
)
def test_bad_observations_are_refused_with_a_reason(bad, err, match):
    with pytest.raises(err, match=match):
        make_policy().predict_chunk(bad)


def test_wrong_noise_shape_is_refused():
    with pytest.raises(ValueError, match=r"noise must have shape \(3, 8, 2\)"):
        make_policy().predict_chunk(obs(), noise=torch.randn(3, 16, 2))


def test_config_inconsistencies_are_named():
    cfg = tiny_config().policy
    cfg.horizon = 7
    with pytest.raises(ValueError, match="divisible by 2"):
        DiffusionPolicy(cfg, tiny_normalizer())
    cfg = tiny_config().policy
    cfg.n_action_steps = 8
    with pytest.raises(ValueError, match="horizon 8 cannot hold"):
        DiffusionPolicy(cfg, tiny_normalizer())


def test_loss_falls_when_fitting_a_fixed_action_map():
    """A few hundred steps on a deterministic obs -> chunk map bring the denoising loss well down."""
    torch.manual_seed(0)
    p = DiffusionPolicy(tiny_config().policy, tiny_normalizer()).train()
    opt = torch.optim.AdamW(p.parameters(), lr=3e-3)
    state = torch.rand(64, 2, 4) * 2 - 1
    action = torch.tanh(state[:, -1:, :2] * 2).expand(64, 8, 2).contiguous()
    losses = []
    for _ in range(150):
        loss = p.compute_loss({"state": state, "action": action})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-20:]) < 0.35 * np.mean(losses[:5])


def test_normalizer_maps_data_range_to_unit_interval_and_back():
    # the last two dims barely move (spans 0 and 0.003): they are centred, not stretched
    data = np.random.default_rng(1).uniform([-5, 0, 3, 0.0], [5, 10, 3, 0.003], size=(200, 4))
    f = FieldNormalizer.fit_minmax(data)
    y = f.normalize(data)
    assert np.allclose(y[:, :2].min(0), -1, atol=1e-6) and np.allclose(y[:, :2].max(0), 1, atol=1e-6)
    assert np.allclose(y[:, 2], 0.0) and np.abs(y[:, 3]).max() <= 0.0016
    # a 0.01 excursion of the near-constant dim at run time stays a 0.01 change, not a 7x jump
    assert abs(f.normalize(np.array([0, 5, 3, 0.0115]))[3] - f.normalize(np.array([0, 5, 3, 0.0015]))[3]) \
        == pytest.approx(0.01, abs=1e-6)
    assert np.allclose(f.unnormalize(y), data, atol=1e-4)
    t = torch.from_numpy(data).float()
    assert torch.allclose(f.unnormalize(f.normalize(t)), t, atol=1e-4)


def test_normalizer_json_roundtrip_and_corruption(tmp_path):
    n = tiny_normalizer()
    n.save(tmp_path / "n.json")
    m = Normalizer.load(tmp_path / "n.json")
    assert np.array_equal(m["state"].scale, n["state"].scale)
    (tmp_path / "bad.json").write_text('{"version": 1, "fields": {"state": {"kind": "minmax", "scale": [1, 0]')
    with pytest.raises(ValueError, match="bad.json"):
        Normalizer.load(tmp_path / "bad.json")
    (tmp_path / "zero.json").write_text('{"fields": {"s": {"kind": "minmax", "scale": [0.0], "offset": [1.0]}}}')
    with pytest.raises(ValueError, match="scale non-zero"):
        Normalizer.load(tmp_path / "zero.json")


def test_ema_follows_chi_decay_warmup():
    m = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(m, power=0.75, max_decay=0.9999)
    decays = []
    for _ in range(4):
        decays.append(ema.decay())
        ema.update(m)
    assert decays[:2] == [0.0, 0.0]
    assert decays[2] == pytest.approx(1 - 2**-0.75) and decays[3] == pytest.approx(1 - 3**-0.75)
    with torch.no_grad():
        m.weight.fill_(1.0)
        ema.averaged.weight.fill_(0.0)
    d = ema.decay()
    ema.update(m)
    assert float(ema.averaged.weight) == pytest.approx(1 - d)
