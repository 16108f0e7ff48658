import pytest
import torch

from policy.nets import ConditionalUnet1D, ImageEncoder, TransformerForDiffusion
from policy.nets.encoders import SpatialSoftmax


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_unet_at_chi_size_has_their_parameter_count():
    # Chi et al.'s Push-T low-dim U-Net: down_dims 256/512/1024, 256-d step embedding, 2 obs steps of 20-d.
    m = ConditionalUnet1D(action_dim=2, global_cond_dim=2 * 20)
    assert 65.0e6 < n_params(m) < 66.5e6
    assert m(torch.randn(3, 16, 2), torch.tensor([0, 5, 99]), torch.randn(3, 40)).shape == (3, 16, 2)


def test_unet_refuses_a_horizon_it_cannot_downsample():
    m = ConditionalUnet1D(2, 8, 16, down_dims=(16, 32, 64))
    with pytest.raises(ValueError, match="divisible by 4"):
        m(torch.randn(1, 10, 2), torch.tensor([1]), torch.randn(1, 8))


def test_unet_film_conditioning_changes_the_output():
    m = ConditionalUnet1D(2, 8, 16, down_dims=(16, 32)).eval()
    x, t = torch.randn(2, 8, 2), torch.tensor([3, 3])
    a, b = m(x, t, torch.zeros(2, 8)), m(x, t, torch.ones(2, 8))
    assert (a - b).abs().max() > 1e-4
    assert (m(x, torch.tensor([50, 50]), torch.zeros(2, 8)) - a).abs().max() > 1e-4


def make_transformer(**kw):
    return TransformerForDiffusion(action_dim=3, cond_dim=5, horizon=8, n_obs_steps=2, n_layer=4, n_head=2,
                                   n_emb=32, p_drop_attn=0.0, **kw).eval()


def test_transformer_names_three_residual_branches_per_layer():
    m = make_transformer()
    names = list(m.residual_branches())
    assert len(names) == 12
    assert names[:3] == ["layers.0.self_attn", "layers.0.cross_attn", "layers.0.feed_forward"]
    assert all(isinstance(b, torch.nn.Module) for b in m.residual_branches().values())


def test_transformer_output_is_the_sum_of_its_named_branches():
    """Replaying the branch outputs recorded by hooks reproduces the output: the residual stream is exactly
    x + sum of branches, which is what a branch cache relies on."""
    m = make_transformer()
    x, t, cond = torch.randn(2, 8, 3), torch.tensor([10, 20]), torch.randn(2, 2, 5)
    recorded = {}
    hooks = [b.register_forward_hook(lambda mod, i, o, n=n: recorded.__setitem__(n, o))
             for n, b in m.residual_branches().items()]
    expected = m(x, t, cond)
    for h in hooks:
        h.remove()
    h = m.input_emb(x) + m.pos_emb
    for name in m.residual_branches():
        h = h + recorded[name]
    assert torch.allclose(m.head(m.ln_f(h)), expected, atol=1e-5)
    # Zeroing one branch through a hook changes the output: the branches are really on the path.
    handle = m.layers[1].feed_forward.register_forward_hook(lambda mod, i, o: torch.zeros_like(o))
    assert (m(x, t, cond) - expected).abs().max() > 1e-4
    handle.remove()


def test_transformer_is_causal_over_action_tokens():
    m = make_transformer()
    x, t, cond = torch.randn(1, 8, 3), torch.tensor([5]), torch.randn(1, 2, 5)
    y = m(x, t, cond)
    x2 = x.clone()
    x2[:, 5:] += 1.0
    y2 = m(x2, t, cond)
    assert torch.allclose(y[:, :5], y2[:, :5], atol=1e-6)
    assert (y[:, 5:] - y2[:, 5:]).abs().max() > 1e-4


def test_transformer_token_sees_only_observations_up_to_its_step():
    m = make_transformer()
    x, t, cond = torch.randn(1, 8, 3), torch.tensor([5]), torch.randn(1, 2, 5)
    cond2 = cond.clone()
    cond2[:, 1] += 1.0  # the second observation token (condition token 2) is visible from action token 1 on
    y, y2 = m(x, t, cond), m(x, t, cond2)
    assert torch.equal(y[:, :1], y2[:, :1])
    assert (y[:, 1:] - y2[:, 1:]).abs().amax(dim=-1).amin() > 1e-7  # every later token moves (small init)


def test_transformer_refuses_other_shapes():
    with pytest.raises(ValueError, match="horizon 8"):
        make_transformer()(torch.randn(1, 6, 3), torch.tensor([1]), torch.randn(1, 2, 5))


def test_spatial_softmax_finds_a_bright_spot():
    ss = SpatialSoftmax(1, 1)
    with torch.no_grad():
        ss.keypoints.weight.fill_(1.0)
        ss.keypoints.bias.zero_()
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 2, 6] = 50.0  # row 2 (y = -0.5), column 6 (x = 0.5)
    assert torch.allclose(ss(img), torch.tensor([[0.5, -0.5]]), atol=1e-4)


@pytest.mark.parametrize("size", [84, 96])
def test_image_encoder_shapes(size):
    enc = ImageEncoder(channels=(8, 16), num_kp=4, feature_dim=12)
    assert enc(torch.randn(2, 3, 3, size, size)).shape == (2, 3, 12)
