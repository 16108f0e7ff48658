"""ONNX export and the onnxruntime backend: parity with torch for every graph (U-Net and transformer, a fused
full denoise, a fused RTI tail with a block-cache schedule), refusal of corrupt or foreign files, IO binding
that allocates nothing per call, and the profile and eval verbs on the exported graphs."""

import json
import shutil

import numpy as np
import pytest
import torch

from deploy.backends import BackendPolicy, BackendUnavailable, OnnxRuntimeBackend, TorchBackend, make_backend
from deploy.export import ExportError, ExportSettings, check_export, export_policy, load_manifest
from policy.checkpoint import load_policy, save_checkpoint
from policy.diffusion import sample
from policy.diffusion_policy import DiffusionPolicy
from rtdp.cli import main
from tests.conftest import tiny_config, tiny_normalizer


def saved_policy(directory, denoiser="unet"):
    cfg = tiny_config(denoiser)
    cfg.data.task = "point_mass/reach"
    policy = DiffusionPolicy(cfg.policy, tiny_normalizer()).eval()
    save_checkpoint(directory, cfg, policy)
    return directory


@pytest.fixture(scope="module")
def unet_export(tmp_path_factory):
    ckpt = saved_policy(tmp_path_factory.mktemp("unet") / "policy")
    export_policy(ExportSettings(checkpoint=str(ckpt), sampler="ddpm", rti_k0=3))
    return ckpt


def test_every_graph_matches_torch_and_the_manifest_describes_them(unet_export):
    errors = check_export(unet_export, unet_export / "onnx")
    assert set(errors) == {"encoder", "denoiser", "sampled_chunk", "fused"}
    assert max(errors.values()) <= 1e-4
    m = load_manifest(unet_export / "onnx", unet_export)
    assert m["opset"] == 17 and m["policy"]["horizon"] == 8
    assert [i["name"] for i in m["graphs"]["denoiser"]["inputs"]] == ["x", "t", "cond"]
    assert m["graphs"]["denoiser"]["inputs"][0]["shape"] == ["batch", 8, 2]
    assert m["graphs"]["fused"]["timesteps"] == [3, 2, 1, 0] and m["graphs"]["fused"]["entry"] == "warm"
    assert len(m["schedule"]["alphas_cumprod"]) == 100 and "action" in m["normalizer"]
    assert all(len(g["sha256"]) == 64 for g in m["graphs"].values())


def test_fused_rti_tail_equals_the_step_loop_with_the_same_noise(unet_export):
    policy, _ = load_policy(unet_export)
    backend = OnnxRuntimeBackend(unet_export / "onnx", threads=1)
    g = torch.Generator().manual_seed(3)
    cond = backend.encode({"state": torch.rand(5, 2, 4, generator=g) * 2 - 1})
    warm = torch.randn(5, 8, 2, generator=g)
    noise = torch.randn(4, 5, 8, 2, generator=g)
    with torch.no_grad():
        want = sample(lambda x, t: policy.denoise(x, t, cond), warm, policy.schedule, [3, 2, 1, 0], "ddpm",
                      step_noise=noise)
    np.testing.assert_allclose(backend.fused(cond, warm, noise).numpy(), want.numpy(), atol=1e-5)


def test_step_noise_reproduces_the_generators_draws():
    policy = DiffusionPolicy(tiny_config().policy, tiny_normalizer()).eval()
    cond = policy.condition({"state": torch.rand(2, 2, 4)})
    x = torch.randn(2, 8, 2)
    ts = [9, 5, 2, 0]
    with torch.no_grad():
        drawn = sample(lambda a, t: policy.denoise(a, t, cond), x, policy.schedule, ts, "ddpm",
                       generator=torch.Generator().manual_seed(7))
        g = torch.Generator().manual_seed(7)
        noise = torch.stack([torch.randn(x.shape, generator=g) for _ in range(3)] + [torch.zeros_like(x)])
        given = sample(lambda a, t: policy.denoise(a, t, cond), x, policy.schedule, ts, "ddpm", step_noise=noise)
    assert torch.equal(drawn, given)
    with pytest.raises(ValueError, match=r"step_noise must have shape \(4, 2, 8, 2\)"):
        sample(lambda a, t: a, x, policy.schedule, ts, "ddpm", step_noise=noise[:3])


def test_transformer_fused_graph_carries_a_cache_schedule(tmp_path):
    ckpt = saved_policy(tmp_path / "tf", "transformer")
    export_policy(ExportSettings(checkpoint=str(ckpt), sampler="ddim", steps=10, cache="uniform:4"))
    m = load_manifest(ckpt / "onnx")
    assert m["graphs"]["fused"]["block_evals"] == 2 * 3 * 5  # 2 layers x 3 branches x {0, 2, 5, 8, 9}
    errors = check_export(ckpt, ckpt / "onnx")
    assert errors["fused"] <= 1e-4
    from policy.cache import CachedDenoiser, make_schedule

    policy, _ = load_policy(ckpt)
    backend = OnnxRuntimeBackend(ckpt / "onnx", threads=1)
    cond = backend.encode({"state": torch.rand(3, 2, 4)})
    x = torch.randn(3, 8, 2)
    ts = m["graphs"]["fused"]["timesteps"]
    cached = CachedDenoiser(policy, make_schedule("uniform", 4, "ddim", ts, list(
        policy.denoiser.residual_branches()), ""))
    with torch.no_grad():
        want = sample(lambda a, t: cached(a, t, cond), x, policy.schedule, ts, "ddim")
        uncached = sample(lambda a, t: policy.denoise(a, t, cond), x, policy.schedule, ts, "ddim")
    got = backend.fused(cond, x, torch.zeros(len(ts), 3, 8, 2)).numpy()
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert not np.allclose(got, uncached.numpy(), atol=1e-5)  # the schedule really is in the graph


def test_corrupt_missing_or_foreign_graphs_are_refused_before_running(unet_export, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(unet_export, broken)
    data = bytearray((broken / "onnx" / "denoiser.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "onnx" / "denoiser.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="does not match its manifest hash"):
        OnnxRuntimeBackend(broken / "onnx")
    (broken / "onnx" / "denoiser.onnx").unlink()
    with pytest.raises(ExportError, match="denoiser graph .* is missing"):
        load_manifest(broken / "onnx")
    (broken / "onnx" / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="not a valid export manifest"):
        load_manifest(broken / "onnx")
    torch.manual_seed(1)  # weights that differ from the export's, whatever the module fixture drew
    other = saved_policy(tmp_path / "other")
    with pytest.raises(ExportError, match="made from other weights"):
        load_manifest(unet_export / "onnx", other)
    with pytest.raises(ExportError, match="has no manifest.json: run `rtdp export` first"):
        load_manifest(tmp_path)


def test_io_binding_reuses_one_output_buffer_per_shape(unet_export):
    backend = OnnxRuntimeBackend(unet_export / "onnx", threads=1)
    cond = backend.encode({"state": torch.rand(1, 2, 4)})
    x = torch.randn(1, 8, 2)
    ptrs = {backend.denoise(x, torch.tensor([t]), cond).data_ptr() for t in range(20)}
    assert len(ptrs) == 1 and len([k for k in backend._outputs if k[0] == "denoiser"]) == 1


def test_backend_policy_predicts_what_the_torch_policy_predicts(unet_export):
    policy, _ = load_policy(unet_export)
    onnx = BackendPolicy(policy, make_backend("onnxruntime", policy, unet_export, threads=1))
    torch_backend = BackendPolicy(policy, TorchBackend(policy))
    obs = {"state": torch.rand(3, 2, 4) * 2 - 1}
    noise = torch.randn(3, 8, 2)
    policy.configure_inference("ddim", 10)
    want = policy.predict_chunk(obs, noise=noise).action
    for wrapped in (onnx, torch_backend):
        got = wrapped.predict_chunk(obs, noise=noise).action
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)
    with pytest.raises(BackendUnavailable, match="no CUDAExecutionProvider"):
        make_backend("onnxruntime-cuda", policy, unet_export)


def test_profile_cli_compares_backends_and_writes_the_design_report(unet_export, tmp_path, capsys):
    report_path, plot = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["profile", "--checkpoint", str(unet_export), "--iters", "20", "--warmup", "2", "--sampler", "ddpm",
                 "--rti", "3", "--report", str(report_path), "--plot", str(plot), "--no-progress"]) == 0
    report = json.loads(report_path.read_text())
    for key in ("backend", "device", "nfe_per_decision", "latency_ms", "forward_ms"):
        assert key in report
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "max"} and set(report["forward_ms"]) >= {"p50", "p99"}
    names = [b["backend"] for b in report["backends"]]
    assert names == ["torch", "onnxruntime", "onnxruntime-fused"]
    assert [b["engine_calls_per_decision"] for b in report["backends"]] == [4, 4, 1]
    assert "onnxruntime-cuda" in report["skipped"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "onnxruntime-fused" in capsys.readouterr().out
    for b in report["backends"]:  # reaction at 50 Hz: each decision rounded up to whole 20 ms periods
        assert b["reaction_ms"]["rate_hz"] == 50
        assert b["latency_ms"]["p50"] <= b["reaction_ms"]["p50"] <= b["latency_ms"]["p50"] + 20
    for b in report["backends"]:  # each backend's peak resident memory, reset between backends
        m = b["memory"]
        assert m["peak_since"] == "backend build" and m["peak_rss_mb"] >= m["rss_before_mb"] > 50
        assert m["peak_added_mb"] == pytest.approx(m["peak_rss_mb"] - m["rss_before_mb"], abs=0.2)


def test_onnxruntime_session_settings_are_applied_recorded_and_checked(unet_export, tmp_path):
    from deploy.backends import OrtOptions
    from deploy.runtime import RuntimeSettings, build_policy

    options = OrtOptions.parse({"optimization": "basic", "spinning": "off", "memory_pattern": "0"})
    assert options == OrtOptions("basic", False, False)
    session = options.session_options(threads=2)
    assert session.intra_op_num_threads == 2 and not session.enable_mem_pattern
    assert session.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    runtime = build_policy(RuntimeSettings(checkpoint=str(unet_export), backend="onnxruntime",
                                           ort={"optimization": "basic", "spinning": "off"}))
    assert runtime.config["ort"] == {"optimization": "basic", "spinning": False, "memory_pattern": True}
    # a runtime decides through the step graphs: the fused graph's copy of the weights is never loaded
    assert set(runtime.backend.sessions) == {"encoder", "denoiser"}
    for bad, match in (({"spinning": "maybe"}, "on or off"), ({"optimization": "max"}, "must be one of"),
                       ({"threads": 4}, "unknown onnxruntime option")):
        with pytest.raises(ValueError, match=match):
            build_policy(RuntimeSettings(checkpoint=str(unet_export), backend="onnxruntime", ort=bad))
    with pytest.raises(ValueError, match="has none"):
        build_policy(RuntimeSettings(checkpoint=str(unet_export), ort={"spinning": "off"}))


def test_export_cli_check_and_eval_on_onnxruntime(tmp_path, capsys):
    ckpt = saved_policy(tmp_path / "policy")
    code = main(["eval", "--checkpoint", str(ckpt), "--episodes", "1", "--workers", "1", "--no-progress",
                 "--backend", "onnxruntime"])
    assert code == 2 and "has no manifest.json: run `rtdp export` first" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--check", "--report", str(tmp_path / "x.json")]) == 0
    assert "parity with torch: encoder" in capsys.readouterr().out
    assert max(json.loads((tmp_path / "x.json").read_text())["max_abs_error"].values()) <= 1e-4
    assert main(["eval", "--checkpoint", str(ckpt), "--episodes", "2", "--workers", "1", "--no-progress",
                 "--backend", "onnxruntime", "--report", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["config"]["backend"] == "onnxruntime"
