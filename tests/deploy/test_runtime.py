"""The runtime: one place that turns a checkpoint and settings into a policy with the decision contract, whatever
is on (sampler, RTI, block cache, backend, an export elsewhere), and the kind table that checkpoints are read by."""

import numpy as np
import pytest
import torch
import yaml

from deploy.decider import ChunkDecider
from deploy.export import ExportSettings, export_policy
from deploy.kinds import KINDS, kind_of, load_checkpoint
from deploy.runtime import RuntimeSettings, build_policy
from policy.cache import CachedPolicy
from policy.checkpoint import CheckpointError
from policy.contract import Chunk, Policy
from policy.rti import RTIPolicy
from tests.deploy.test_export import saved_policy


def obs(batch=1, seed=0):
    return {"state": torch.rand(batch, 2, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1}


@pytest.fixture(scope="module")
def transformer_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return saved_policy(tmp_path_factory.mktemp("tf") / "policy", "transformer")


@pytest.mark.parametrize("extra", [dict(), dict(sampler="ddpm", steps=7), dict(rti={"k0": 2}),
                                   dict(cache="uniform:3", sampler="ddim", steps=6),
                                   dict(cache="uniform:2", rti={"k0": 3})])
def test_every_combination_keeps_the_contract_and_counts_its_cost(transformer_checkpoint, extra):
    runtime = build_policy(RuntimeSettings(checkpoint=str(transformer_checkpoint), **extra))
    policy = runtime.policy
    assert isinstance(policy, Policy)
    spec = policy.spec
    assert spec.kind == "diffusion_policy" and spec.n_action_steps == (1 if "rti" in extra else 4)
    policy.reset()
    chunks = [policy.predict_chunk(obs(seed=i), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for c in chunks:
        assert isinstance(c, Chunk)
        assert c.action.shape == (1, spec.n_action_steps, 2) and c.action_pred.shape == (1, 8, 2)
        assert c.action_ahead.shape == (1, 8 - spec.exec_start, 2)
        assert torch.equal(c.action, c.action_ahead[:, : spec.n_action_steps])
    steps = runtime.config["steps"]
    if "rti" in extra:
        assert [c.kind for c in chunks] == ["full", "warm", "warm"]
        assert chunks[0].nfe == 100 and [c.nfe for c in chunks[1:]] == [extra["rti"]["k0"] + 1] * 2
    else:
        assert [c.nfe for c in chunks] == [steps] * 3 and steps == extra.get("steps", 10)
    if "cache" in extra:
        # A warm (or plain) decision runs through the cache; RTI's full denoise at the episode start does not.
        cached = chunks[1:] if "rti" in extra else chunks
        assert all(c.block_evals == runtime.cache["block_evals_per_denoise"] for c in cached)
        assert runtime.cache["block_evals_per_denoise"] < runtime.branches_per_call * steps
        if "rti" in extra:
            assert chunks[0].block_evals is None
    else:
        assert all(c.block_evals is None for c in chunks)


def test_wrappers_compose_in_one_order_and_reuse_what_they_wrap(transformer_checkpoint):
    runtime = build_policy(RuntimeSettings(checkpoint=str(transformer_checkpoint), cache="uniform:2", rti={"k0": 3}))
    rti = runtime.policy.inner  # the outermost wrapper checks every chunk (policy.guard)
    assert isinstance(rti, RTIPolicy) and rti is runtime.rti_policy and isinstance(rti.inner, CachedPolicy)
    assert rti.inner.inner is runtime.model
    assert runtime.config["rti"]["tail"] == [3, 2, 1, 0] and runtime.config["cache"]["steps"] == 4


def test_a_plain_decision_is_bit_identical_to_the_model_sampled_by_hand(transformer_checkpoint):
    runtime = build_policy(RuntimeSettings(checkpoint=str(transformer_checkpoint), sampler="ddim", steps=5))
    model = runtime.model
    o = obs(batch=2)
    noise = torch.randn(2, 8, 2, generator=torch.Generator().manual_seed(3))
    got = runtime.policy.predict_chunk(o, noise=noise).action_pred
    from policy.diffusion import sample

    with torch.no_grad():
        cond = model.condition(o)
        x0 = sample(lambda x, t: model.denoise(x, t, cond), noise, model.schedule, model.timesteps, "ddim")
    assert torch.equal(got, model.normalizer["action"].unnormalize(x0))


@pytest.mark.parametrize("settings,message", [
    (dict(cache="uniform:2", backend="onnxruntime"), "--cache runs the transformer's branches in torch"),
    (dict(rti={"k0": "auto"}), "calibrate it first"),
    (dict(rti={"k0": 3, "speed": 2}), "bad RTI settings"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(sampler="euler"), "sampler must be one of"),
    (dict(cache="bac:0"), "S >= 1"),
    (dict(backend="torch", export="somewhere"), "--export names the folder an engine backend reads"),
    (dict(cache="bac:4", sampler="ddim", steps=6), "has no bac:4 cache schedule"),
])
def test_bad_combinations_are_refused_once_with_a_clear_message(transformer_checkpoint, settings, message):
    with pytest.raises(ValueError, match=message):
        build_policy(RuntimeSettings(checkpoint=str(transformer_checkpoint), **settings))


def test_an_export_written_elsewhere_is_what_the_engine_backend_runs(tmp_path):
    ckpt = saved_policy(tmp_path / "policy")
    elsewhere = tmp_path / "exports" / "v1"
    export_policy(ExportSettings(checkpoint=str(ckpt), out=str(elsewhere), fused=False))
    with pytest.raises(ValueError, match="run `rtdp export` first"):  # the checkpoint's own onnx/ does not exist
        build_policy(RuntimeSettings(checkpoint=str(ckpt), backend="onnxruntime"))
    onnx = build_policy(RuntimeSettings(checkpoint=str(ckpt), backend="onnxruntime", export=str(elsewhere)))
    torch_policy = build_policy(RuntimeSettings(checkpoint=str(ckpt))).policy
    noise = torch.randn(3, 8, 2)
    o = obs(batch=3)
    np.testing.assert_allclose(onnx.policy.predict_chunk(o, noise=noise).action.numpy(),
                               torch_policy.predict_chunk(o, noise=noise).action.numpy(), atol=1e-4)
    assert onnx.config["export"] == str(elsewhere) and onnx.backend.directory == elsewhere


def test_the_decider_runs_a_block_cache_too(transformer_checkpoint):
    decider = ChunkDecider(RuntimeSettings(checkpoint=str(transformer_checkpoint), cache="uniform:2", rti={"k0": 3}))
    decider.reset(0)
    history = {"state": np.zeros((2, 4), np.float32)}
    first, warm = decider(history, None), decider(history, 1)
    assert first.shape == warm.shape == (7, 2)
    assert decider.config["cache"]["kind"] == "uniform" and decider.spec.n_action_steps == 1


def test_checkpoints_name_their_kind_and_old_ones_without_it_still_load(tmp_path):
    ckpt = saved_policy(tmp_path / "policy")
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert config["kind"] == "diffusion_policy"
    del config["kind"]  # as every checkpoint written before the field (and before checksums) existed
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    (ckpt / "checksums.json").unlink()
    model, cfg = load_checkpoint(ckpt)
    assert kind_of(ckpt) is KINDS["diffusion_policy"] and model.spec.kind == "diffusion_policy"
    config["kind"] = "world_model"
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match="kind 'world_model'; this rtdp knows .*diffusion_policy"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
