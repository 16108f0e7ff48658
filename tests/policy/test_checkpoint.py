import pytest
import torch

from policy.checkpoint import CheckpointError, load_policy, record_checksums, save_checkpoint
from policy.diffusion_policy import DiffusionPolicy
from tests.conftest import tiny_config, tiny_normalizer


@pytest.fixture
def ckpt(tmp_path):
    cfg = tiny_config()
    policy = DiffusionPolicy(cfg.policy, tiny_normalizer()).eval()
    save_checkpoint(tmp_path / "ckpt", cfg, policy)
    return tmp_path / "ckpt", cfg, policy


def test_roundtrip_gives_identical_actions(ckpt):
    folder, cfg, policy = ckpt
    assert sorted(p.name for p in folder.iterdir()) == ["checksums.json", "config.yaml", "model.safetensors",
                                                         "normalizer.json"]
    loaded, loaded_cfg = load_policy(folder)
    assert loaded_cfg == cfg
    o, noise = {"state": torch.rand(2, 2, 4)}, torch.randn(2, 8, 2)
    assert torch.equal(policy.predict_chunk(o, noise=noise).action, loaded.predict_chunk(o, noise=noise).action)


@pytest.mark.parametrize("name", ["config.yaml", "model.safetensors", "normalizer.json"])
def test_missing_file_is_named(ckpt, name):
    folder = ckpt[0]
    (folder / name).unlink()
    with pytest.raises(CheckpointError, match=f"missing {name}"):
        load_policy(folder)


def test_weights_of_another_shape_are_named(ckpt):
    folder, cfg, _ = ckpt
    cfg.policy.unet.down_dims = [16, 48]
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text().replace("- 32", "- 48"))
    record_checksums(folder, ["config.yaml"])  # past the checksum: the shape check behind it names the tensor
    with pytest.raises(CheckpointError, match=r"model.safetensors does not fit .*tensors of another shape: "
                                              r"denoiser\.\S+: file \(32"):
        load_policy(folder)


def test_corrupt_weights_file_is_named(ckpt):
    folder = ckpt[0]
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    record_checksums(folder, ["model.safetensors"])  # past the checksum: the reader behind it names the file
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_policy(folder)


def test_unknown_config_key_in_checkpoint_is_named(ckpt):
    folder = ckpt[0]
    text = (folder / "config.yaml").read_text().replace("  horizon: 8", "  horizon: 8\n  horizn: 8")
    (folder / "config.yaml").write_text(text)
    record_checksums(folder, ["config.yaml"])
    with pytest.raises(CheckpointError, match=r"config.yaml.*'policy.horizn'"):
        load_policy(folder)


def test_no_pickle_in_the_weights_file(ckpt):
    assert (ckpt[0] / "model.safetensors").read_bytes()[8:9] == b"{"  # a JSON header, then raw tensors


@pytest.mark.parametrize("name", ["config.yaml", "model.safetensors", "normalizer.json"])
def test_a_flipped_byte_in_any_file_is_refused_naming_it(ckpt, name):
    folder = ckpt[0]
    data = bytearray((folder / name).read_bytes())
    data[len(data) - 5] ^= 0x01  # a tensor byte, a config digit: the file still parses
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name} does not match the sha256 recorded"):
        load_policy(folder)
