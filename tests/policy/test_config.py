from pathlib import Path

import pytest

from policy.config import ConfigError, RunConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "policy"


@pytest.mark.parametrize("name", ["unet_lowdim.yaml", "transformer_lowdim.yaml", "unet_image.yaml"])
def test_shipped_configs_load_as_typed_dataclasses(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, RunConfig)
    assert cfg.policy.denoiser in ("unet", "transformer")
    assert cfg.policy.horizon == 16 and cfg.policy.n_obs_steps == 2 and cfg.policy.n_action_steps == 8


def test_transformer_config_is_chi_size():
    t = load_config(CONFIGS / "transformer_lowdim.yaml").policy.transformer
    assert (t.n_layer, t.n_emb, t.n_head) == (8, 256, 4)


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIGS / "unet_lowdim.yaml",
                      ["train.steps=12", "policy.unet.down_dims=[8,16]", "policy.inference.sampler=dpmpp_2m"])
    assert cfg.train.steps == 12 and cfg.policy.unet.down_dims == [8, 16]
    assert cfg.policy.inference.sampler == "dpmpp_2m"


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy:\n  horizon: 16\n  n_obs_stepz: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: bad key 'policy.n_obs_stepz'"):
        load_config(bad)


@pytest.mark.parametrize("override,match", [
    ("train.stepz=3", r"'train.stepz'.*Did you mean: 'steps'"),
    ("train.steps=many", r"'train.steps'.*could not be converted to Integer"),
    ("train.steps", "key=value"),
])
def test_bad_overrides_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "m.yaml").write_text("policy: [unclosed\n")
    with pytest.raises(ConfigError, match="m.yaml"):
        load_config(tmp_path / "m.yaml")
