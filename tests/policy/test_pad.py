"""PAD (algorithms.md section 4.5): one network call per step predicts frames and poses together at one t; the
image tokens cannot read the action token; RTI shifts the joint state by whole frames, the block cache runs on the
DiT's branches, the step exports to ONNX with parity; bad inputs are refused by name. Trained on a small task
(the point-mass reach, rendered top-down; `slow`, 3,000 steps), the predicted frames beat copy-last-frame by
>= 30% MSE on held-out episodes and the effector's displacement in the predicted frame follows the predicted pose
delta (correlation >= 0.8)."""

import numpy as np
import pytest
import torch

from deploy.export import ExportSettings, check_export, export_policy
from deploy.runtime import RuntimeSettings, build_policy
from envs.collect import collect_demos
from envs.datasets import ReplayBuffer
from envs.datasets.future_frames import FutureFrameDataset
from envs.point_mass import effector_pixel
from policy.cache import CachedPolicy, make_schedule
from policy.checkpoint import save_checkpoint
from policy.config import load_config
from policy.pad import PADConfig, PADRunConfig, build_for_training, load_pad, track_targets
from policy.rti import RTIConfig, RTIPolicy
from policy.train import train

TOY = ["policy.image_shape=[24,24]", "policy.position_dims=[0,1]", "policy.position_action_dims=[0,1]",
       "policy.gripper_action_dim=null", "policy.controller.units_per_action=0.1", "policy.latent.kind=pixels",
       "policy.dit.patch=3", "policy.dit.hidden=128", "policy.dit.depth=3", "train.warmup_steps=50",
       "train.checkpoint_every=100000"]


def toy_data(episodes: int, seed: int) -> FutureFrameDataset:
    buffer = collect_demos("point_mass/reach", episodes, seed=seed, image=True, image_size=24, progress=False)
    buffer = ReplayBuffer({**buffer.data, "pose": buffer["state"][:, :2]}, buffer.episode_ends, buffer.attrs)
    return FutureFrameDataset(buffer, frames=3, skip=4, position_dims=[0, 1], gripper_action_dim=None)


def train_toy(out, steps: int, *extra: str):
    cfg = load_config("configs/policy/pad.yaml", [*TOY, f"train.steps={steps}", *extra], PADRunConfig)
    cfg.policy.tasks = ["point_mass/reach"]
    train(cfg, toy_data(60, 0), out, progress=False, build=build_for_training)
    return load_pad(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A PAD trained on 60 point-mass episodes; held-out data from other seeds."""
    out = tmp_path_factory.mktemp("pad") / "run"
    return train_toy(out, 3000)[0], toy_data(12, 5000), out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A PAD of the toy's shape, trained a few steps and its zero-initialised modulation and heads then drawn at
    random, so that every path through the network carries signal (mechanics, not quality)."""
    out = tmp_path_factory.mktemp("pad_small") / "run"
    model, cfg = train_toy(out, 20, "policy.latent.kind=autoencoder", "policy.latent.channels=[8,8]",
                      "policy.latent.latent_channels=4", "policy.latent.steps=20", "policy.dit.patch=2",
                      "policy.dit.hidden=64")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "modulation" in name or "head" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    save_checkpoint(out, cfg, model)  # what export and the runtime load
    return model, toy_data(4, 5000), out


def decide(model, data: FutureFrameDataset, idx: np.ndarray, seed: int = 0):
    b = data.batch(idx)
    obs = {"image": torch.from_numpy(b["image"])[:, None], "pose": torch.from_numpy(b["pose"])[:, None],
           "task": torch.from_numpy(b["task"])[:, None]}
    return model.predict_chunk(obs, generator=torch.Generator().manual_seed(seed)), b


def moving_steps(data: FutureFrameDataset, n: int) -> np.ndarray:
    """Held-out steps whose next frame differs from the current one (the effector has not yet stopped)."""
    moving = np.flatnonzero(np.abs(data.targets[:, 0] - data.poses[:, :2]).max(axis=1) > 0.05)
    return np.random.default_rng(0).choice(moving, size=min(n, len(moving)), replace=False)


@pytest.mark.slow
def test_predicted_frames_beat_copy_last_frame_by_30_percent_on_held_out_episodes(trained):
    model, held, _ = trained
    idx = np.random.default_rng(1).choice(len(held), size=96, replace=False)
    chunk, b = decide(model, held, idx)
    truth = b["future_images"].astype(np.float64)
    predicted = chunk.extras["frames"].numpy().astype(np.float64)
    copy_last = np.repeat(b["image"][:, None].astype(np.float64), 3, axis=1)
    mse_pad, mse_copy = ((predicted - truth) ** 2).mean(), ((copy_last - truth) ** 2).mean()
    assert mse_pad <= 0.7 * mse_copy, (mse_pad, mse_copy)


@pytest.mark.slow
def test_effector_moves_in_the_predicted_frame_as_the_predicted_pose_does(trained):
    model, held, _ = trained
    idx = moving_steps(held, 96)
    chunk, b = decide(model, held, idx, seed=1)
    frames = chunk.extras["frames"].numpy()
    seen_move = np.stack([effector_pixel(f[0]) - effector_pixel(cur) for f, cur in zip(frames, b["image"],
                                                                                      strict=True)])
    pose_move = chunk.extras["targets"][:, 0].numpy() - b["pose"]
    r = np.corrcoef(seen_move.reshape(-1), pose_move.reshape(-1))[0, 1]
    assert r >= 0.8, r


def test_one_network_call_per_step_returns_both_predictions_at_one_t(small):
    model, held, _ = small
    calls = []
    handle = model.denoiser.register_forward_hook(lambda m, args, out: calls.append((args, out)))
    try:
        chunk, _ = decide(model, held, np.arange(2))
    finally:
        handle.remove()
    assert chunk.nfe == len(calls) == len(model.timesteps) == 10
    for (frames, poses, t, *_), (frame_out, pose_out) in calls:
        assert t.shape == (2,) and frames.shape == frame_out.shape == (2, 12, 6, 6)  # 3 latents of 4x6x6
        assert poses.shape == pose_out.shape == (2, 6)
    assert [int(c[0][2][0]) for c in calls] == model.timesteps


def test_image_tokens_do_not_read_the_action_token_and_the_action_token_reads_the_frames(small):
    model, held, _ = small
    net = model.denoiser
    g = torch.Generator().manual_seed(0)
    frames, poses = torch.randn(3, 12, 6, 6, generator=g), torch.randn(3, 6, generator=g)
    current, pose = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 2, generator=g)
    task_vector, t = net.task_embed(torch.zeros(3, dtype=torch.long)), torch.tensor([30, 30, 30])
    with torch.no_grad():
        img_a, act_a = net(frames, poses, t, current, pose, task_vector)
        img_b, act_b = net(frames, poses + 3.0, t, current, pose + 3.0, task_vector)
        img_c, act_c = net(frames + 1.0, poses, t, current, pose, task_vector)
    assert torch.equal(img_a, img_b)  # the mask holds exactly
    assert (act_a - act_b).abs().max() > 1e-3
    assert (act_a - act_c).abs().max() > 1e-3 and (img_a - img_c).abs().max() > 1e-3


def test_rti_warm_start_shifts_the_joint_state_by_whole_frames_and_runs_its_tail(small):
    model, held, _ = small
    rti = RTIPolicy(model, RTIConfig(k0=30, steps=3, n_exec=4, full_steps=20, full_sampler="ddim"))
    rti.reset()
    b = held.batch(np.arange(1))
    obs = {"image": torch.from_numpy(b["image"])[:, None], "pose": torch.from_numpy(b["pose"])[:, None],
           "task": torch.from_numpy(b["task"])[:, None]}
    first = rti.predict_chunk(obs, generator=torch.Generator().manual_seed(0))
    assert (first.kind, first.nfe) == ("full", 20)
    state = rti.warm_guess(0)  # the stored state, unshifted
    guess = rti.warm_guess(4)  # one decision of 4 env steps = one predicted frame
    torch.testing.assert_close(guess[:, :2], state[:, 1:])
    torch.testing.assert_close(guess[:, 2], state[:, 2])
    torch.testing.assert_close(rti.warm_guess(8)[:, 0], state[:, 2])
    second = rti.predict_chunk(obs, executed=4, generator=torch.Generator().manual_seed(1))
    assert (second.kind, second.nfe) == ("warm", 3) and second.action.shape == (1, 4, 2)


def test_block_cache_runs_on_the_dit_branches_and_an_every_step_schedule_changes_nothing(small):
    model, held, _ = small
    blocks = list(model.denoiser.residual_branches())
    assert len(blocks) == 6  # 3 blocks x (attention, MLP)
    ts = model.timesteps
    b = held.batch(np.arange(2))
    obs = {"image": torch.from_numpy(b["image"])[:, None], "pose": torch.from_numpy(b["pose"])[:, None],
           "task": torch.from_numpy(b["task"])[:, None]}
    noise = torch.randn(model.chunk_shape(2), generator=torch.Generator().manual_seed(0))
    plain = model.predict_chunk(obs, noise=noise)
    every = CachedPolicy(model, make_schedule("uniform", len(ts), model.method, ts, blocks, "sha"))
    full = every.predict_chunk(obs, noise=noise)
    torch.testing.assert_close(full.action_pred, plain.action_pred, atol=0, rtol=0)
    assert full.block_evals == 6 * len(ts)
    sparse = CachedPolicy(model, make_schedule("uniform", 3, model.method, ts, blocks, "sha"))
    cached = sparse.predict_chunk(obs, noise=noise)
    assert cached.block_evals == 6 * 4  # steps 0, 3, 7 and the last
    assert cached.nfe == len(ts)


def test_onnx_export_of_the_dit_step_and_the_fused_graph_matches_torch(small):
    _, _, ckpt = small
    manifest = export_policy(ExportSettings(str(ckpt)))
    assert set(manifest["graphs"]) == {"encoder", "denoiser", "fused"}
    errors = check_export(ckpt, ckpt / "onnx")
    assert max(errors.values()) < 1e-4, errors
    runtime = build_policy(RuntimeSettings(checkpoint=str(ckpt), backend="onnxruntime"))
    assert runtime.policy.spec.observation("task").dtype == "int64"


def test_bad_inputs_are_refused_by_name(small):
    model, held, _ = small
    b = held.batch(np.arange(1))
    obs = {"image": torch.from_numpy(b["image"])[:, None], "pose": torch.from_numpy(b["pose"])[:, None],
           "task": torch.from_numpy(b["task"])[:, None]}
    with pytest.raises(ValueError, match=r"'image' must have shape \(B, 1, 24, 24, 3\)"):
        model.predict_chunk({**obs, "image": torch.zeros(1, 1, 16, 16, 3, dtype=torch.uint8)})
    with pytest.raises(TypeError, match="'image' must be uint8"):
        model.predict_chunk({**obs, "image": obs["image"].float() / 255})
    with pytest.raises(ValueError, match=r"task index \[3\] is not one this checkpoint knows.*0: point_mass/reach"):
        model.predict_chunk({**obs, "task": torch.tensor([[3]])})
    with pytest.raises(TypeError, match="'task' must be an integer"):
        model.predict_chunk({**obs, "task": torch.tensor([[0.0]])})
    with pytest.raises(ValueError, match="'pose' holds NaN"):
        model.predict_chunk({**obs, "pose": torch.full((1, 1, 2), float("nan"))})


def test_controller_reaches_each_target_in_skip_steps_and_holds_the_gripper_command():
    cfg = PADConfig(tasks=["t"], pose_dim=4, action_dim=4)
    targets = torch.tensor([[[0.02, 0.0, -0.04, 1.0], [0.02, 0.08, -0.04, -1.0], [0.0, 0.0, 0.0, 1.0]]])
    actions = track_targets(torch.zeros(1, 3), targets, cfg)
    assert actions.shape == (1, 12, 4)
    expected = [[0.5, 0.0, -1.0, 1.0]] * 4 + [[0.0, 1.0, 0.0, -1.0]] * 4 + [[-0.5, -1.0, 1.0, 1.0]] * 4
    torch.testing.assert_close(actions[0], torch.tensor(expected))
    fast = track_targets(torch.zeros(1, 3), targets * 10, cfg)
    assert float(fast.abs().max()) == 1.0  # clipped to the action space


def test_future_frame_samples_clamp_at_the_episode_end_and_take_the_gripper_command_before_each_frame():
    n = 10
    buffer = ReplayBuffer({"image": np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2)
                           .repeat(3, 3), "pose": np.stack([np.arange(n), -np.arange(n)], 1).astype(np.float32),
                           "action": np.stack([np.zeros(n), np.arange(n) * 10.0], 1).astype(np.float32)},
                          [6, 10])
    data = FutureFrameDataset(buffer, frames=3, skip=2, position_dims=[0], gripper_action_dim=1)
    assert data.future[0].tolist() == [2, 4, 5] and data.future[6].tolist() == [8, 9, 9]
    np.testing.assert_array_equal(data.targets[0], [[2, 10], [4, 30], [5, 40]])
    b = data.batch(np.array([7]))
    assert b["future_images"][0, :, 0, 0, 0].tolist() == [9, 9, 9] and b["task"].tolist() == [0]


def test_command_line_trains_a_pad_and_its_video_shows_the_predicted_frames(tmp_path):
    import json

    import imageio.v3 as iio

    from rtdp.cli import main

    data, run = tmp_path / "pm.zarr", tmp_path / "run"
    assert main(["collect", "--task", "point_mass/reach", "--episodes", "8", "--image", "--image-size", "24",
                 "--out", str(data), "--no-progress"]) == 0
    overrides = [*TOY, "policy.latent.kind=autoencoder", "policy.latent.channels=[8,8]", "policy.latent.steps=5",
                 "policy.dit.patch=2", "policy.dit.hidden=32", "policy.dit.depth=1", "train.steps=5"]
    assert main(["train", "--config", "configs/policy/pad.yaml", "--data", str(data), "--out", str(run),
                 "--no-progress", *overrides]) == 0
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--episodes", "1", "--workers", "1", "--video",
                 str(tmp_path / "videos"), "--report", str(report), "--no-progress"]) == 0
    r = json.loads(report.read_text())
    assert r["nfe_per_decision"] == 10 and r["actions_per_decision"] == 4 and r["config"]["kind"] == "pad"
    frames = iio.imread(next((tmp_path / "videos").iterdir()))
    assert frames.shape[2] == 240 + 80  # the rollout, and beside it 3 predicted frames of 80 px stacked
    assert r["config"]["decode_frames"] is True

    # without a viewer the runtime acts on the poses alone: the same actions, no frames decoded
    from deploy.profile import raw_observation
    from deploy.runtime import RuntimeSettings, build_policy

    chunks = {}
    for shown in (False, True):
        runtime = build_policy(RuntimeSettings(checkpoint=str(run), predicted_frames=shown))
        obs = raw_observation(runtime.policy.spec, runtime.model.normalizer, torch.Generator().manual_seed(0))
        chunks[shown] = runtime.policy.predict_chunk(obs, generator=torch.Generator().manual_seed(1))
    assert "frames" not in chunks[False].extras and chunks[True].extras["frames"].shape == (1, 3, 24, 24, 3)
    torch.testing.assert_close(chunks[False].action, chunks[True].action, rtol=0, atol=0)
