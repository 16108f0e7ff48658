"""Trajectory Diffuser (algorithms.md section 5.5): the refinement starts from the autoregressive draft and makes
exactly 5 denoiser calls, against 200 from noise; on the toy mixture of cosines the refinement halves the draft's
MMD to the data, ends within 1.2x of full diffusion's and keeps the minor mode's share; the decision exports as one
graph with parity; bad observations are refused by name."""

import numpy as np
import pytest
import torch

from deploy.export import ExportSettings, check_export, export_policy
from deploy.kinds import kind_named
from deploy.runtime import RuntimeSettings, build_policy
from envs.datasets.trajectory_dataset import TrajectoryDataset
from envs.pointmaze import collect_maze
from planners.decision_diffuser import DecisionDiffuser
from planners.diffuser import Diffuser
from planners.trajectory_diffuser import (
    TrajectoryDiffuser,
    TrajectoryDiffuserConfig,
    TrajectoryDiffuserRunConfig,
    hold_first,
    load_planner,
)
from policy.diffusion import sample
from policy.normalizer import FieldNormalizer, Normalizer
from policy.train import train

TASK = "pointmaze/umaze"


def small(cfg: TrajectoryDiffuserRunConfig, steps: int, **planner) -> TrajectoryDiffuserRunConfig:
    p = cfg.planner
    p.draft_d_model, p.draft_d_ff, p.draft_layers, p.draft_heads = 32, 64, 2, 2
    p.down_dims, p.step_embed_dim, p.return_embed_dim, p.candidates = [16, 32, 64], 16, 16, 8
    for k, v in planner.items():
        setattr(p, k, v)
    t = cfg.train
    t.steps, t.checkpoint_every, t.warmup_steps, t.log_every, t.threads, t.batch_size = steps, steps, 10, 10, 1, 32
    cfg.data.task = TASK
    return cfg


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    root = tmp_path_factory.mktemp("maze")
    buffer = collect_maze(TASK, 4000, seed=0, progress=False)
    data = TrajectoryDataset(buffer, 32, 0.99)
    torch.manual_seed(0)
    for kind, extra in (("trajectory_diffuser", {}), ("decision_diffuser", {"train_timesteps": 200}),
                        ("diffuser", {"train_timesteps": 20, "condition_dropout": 1.0, "draft_weight": 0.0,
                                      "beta_schedule": "squaredcos_cap_v2", "value_hidden": 64})):
        cfg = small(TrajectoryDiffuserRunConfig(kind=kind), 60, **extra)
        cfg.data.reference_returns = dict(buffer.attrs["reference_returns"])
        train(cfg, data, root / kind, progress=False, build=kind_named(kind).build_for_training)
    return {"root": root, "buffer": buffer, "td": root / "trajectory_diffuser", "dd": root / "decision_diffuser",
            "diffuser": root / "diffuser"}


def observations(buffer, n: int = 3) -> dict:
    return {"state": torch.from_numpy(buffer["obs"][: n * 50 : 50, None])}


class UnetCalls:
    """Forward pre-hook on the U-Net: every call's input plans and timesteps."""

    def __init__(self, unet):
        self.inputs, self.timesteps = [], []
        self.handle = unet.register_forward_pre_hook(self)

    def __call__(self, module, args):
        x, t, _ = args
        self.inputs.append(x.detach().clone())
        self.timesteps.append(int(t[0]))


def test_refinement_starts_from_the_draft_and_makes_exactly_5_calls_against_200_from_noise(maze):
    td, _ = load_planner(maze["td"])
    obs = observations(maze["buffer"])
    calls = UnetCalls(td.unet)
    drafts = []  # one state head call per draft step
    handle = td.draft.state_out.register_forward_hook(lambda m, a, out: drafts.append(out.detach()))
    chunk = td.predict_chunk(obs, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert chunk.nfe == 5 and calls.timesteps == [4, 3, 2, 1, 0]
    assert chunk.extras["draft_steps"] == len(drafts) == 31  # H - 1 draft passes, apart from the denoiser's calls
    # `entry: direct`: the U-Net's first input (conditional half) is the draft itself, the first state held
    state = td.normalize_obs(obs)
    draft = td.draft.rollout(state, td.target(len(state))).repeat_interleave(td.cfg.candidates, dim=0)
    first_input = calls.inputs[0][: len(draft)]
    torch.testing.assert_close(first_input, draft)
    assert chunk.action.shape == (3, 1, 2) and chunk.extras["candidates"].shape == (3, 8, 1, 2)
    assert chunk.extras["plans"].shape == (3, 8, 32, 6)
    # renoise: the same draft, forward-noised to t = 4 (sigma ~ 0.08 on the linear 1e-3..2e-2 schedule)
    td.cfg.entry = "renoise"
    calls.inputs.clear()
    td.predict_chunk(obs, generator=torch.Generator().manual_seed(0))
    offset = (calls.inputs[0][: len(draft), 1:] - draft[:, 1:]).detach().std()
    assert 0.05 < float(offset) < 0.12
    calls.handle.remove()

    dd, _ = load_planner(maze["dd"], DecisionDiffuser)
    dd_calls = UnetCalls(dd.unet)
    dd_chunk = dd.predict_chunk(obs)
    assert dd_chunk.nfe == len(dd_calls.timesteps) == 200 and dd_calls.timesteps[0] == 199
    assert dd_chunk.extras["draft_steps"] == 0 and not hasattr(dd, "draft")

    td.configure_inference(steps=0)  # the draft alone
    calls = UnetCalls(td.unet)
    assert td.predict_chunk(obs).nfe == 0 and calls.timesteps == []


def test_diffuser_style_denoises_from_noise_in_20_calls_and_its_value_guidance_raises_the_value(maze):
    planner, _ = load_planner(maze["diffuser"], Diffuser)
    obs = observations(maze["buffer"])
    calls = UnetCalls(planner.unet)
    value_steps = []
    handle = planner.value.register_forward_pre_hook(lambda m, args: value_steps.append(int(args[1][0])))
    chunk = planner.predict_chunk(obs, generator=torch.Generator().manual_seed(0))
    assert chunk.nfe == len(calls.timesteps) == 20 and calls.timesteps == list(range(19, -1, -1))
    assert value_steps == list(range(19, 1, -1))  # one value gradient per step down to t = 2, none below
    assert chunk.extras["draft_steps"] == 0 and not hasattr(planner, "draft")
    handle.remove()
    calls.handle.remove()

    def values(scale: float) -> torch.Tensor:
        planner.cfg.guide_scale = scale
        plans = planner.normalizer["state"].normalize(
            planner.predict_chunk(obs, generator=torch.Generator().manual_seed(1)).extras["plans"].flatten(0, 1))
        with torch.no_grad():
            return planner.value(plans, torch.zeros(len(plans), dtype=torch.long))

    # the same noise, steered further up the value's slope the stronger the guidance
    unguided, guided, strong = values(0.0), values(10.0), values(30.0)
    assert unguided.mean() < guided.mean() < strong.mean()
    assert strong.mean() - unguided.mean() > unguided.std(), (unguided.mean(), strong.mean(), unguided.std())
    with pytest.raises(ValueError, match="torch only"):
        export_policy(ExportSettings(str(maze["diffuser"])))


def test_the_drafts_cached_rollout_is_the_full_prefix_rerun():
    from planners.draft_transformer import DraftTransformer

    torch.manual_seed(0)
    draft = DraftTransformer(6, 16, d_model=32, heads=4, layers=2, d_ff=64).eval()
    state, prefix, target = torch.randn(3, 6), torch.randn(3, 4, 6), torch.rand(3)
    with torch.no_grad():
        for start in (state[:, None], prefix):
            states, returns = start, target[:, None].expand(-1, start.shape[1])
            while states.shape[1] < 16:  # re-read the whole prefix at every step
                next_states, next_returns = draft(states, returns)
                states = torch.cat([states, next_states[:, -1:]], dim=1)
                returns = torch.cat([returns, next_returns[:, -1:]], dim=1)
            torch.testing.assert_close(draft.rollout(start if start.dim() == 3 and start.shape[1] > 1 else state,
                                                     target), states, atol=1e-5, rtol=0)


def toy_trajectories(n: int, rng: np.random.Generator) -> np.ndarray:
    """cos(2 pi alpha x) on 64 points of [0, 1] + N(0, 0.1^2): alpha 5 for 80% of them, 3 for 20%."""
    x = np.linspace(0, 1, 64)
    alpha = np.where(rng.random(n) < 0.8, 5, 3)
    return (np.cos(2 * np.pi * alpha[:, None] * x[None]) + rng.normal(0, 0.1, (n, 64))).astype(np.float32)


def mmd(a: np.ndarray, b: np.ndarray, bandwidth: float) -> float:
    """Squared MMD with a Gaussian kernel."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    both = torch.cat([a, b])
    k = torch.exp(-torch.cdist(both, both) ** 2 / bandwidth)
    n = len(a)
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())


def minor_share(y: np.ndarray) -> float:
    """The share of trajectories whose spectrum peaks at alpha = 3 rather than 5."""
    spectrum = np.abs(np.fft.rfft(y, axis=1))
    return float(np.mean(spectrum[:, 3] > spectrum[:, 5]))


@pytest.mark.slow  # 1,200 training steps of the draft and U-Net: 4-5 minutes on 2 cores
def test_toy_refinement_halves_the_drafts_mmd_matches_full_diffusion_and_keeps_the_minor_mode():
    """The reference's toy (toy_exp.py) with the planner's own draft, U-Net and sampler: the draft continues each
    trajectory from its first 8 values (from the first value alone, the MSE-trained draft follows the major mode
    every time, and no refinement from t = 20 brings a mode back), then 21 DDPM steps from t = 20 refine it; full
    diffusion runs all 100 from noise. A cosine schedule, so that 100 steps from noise is a fair baseline."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = toy_trajectories(2000, rng)
    cfg = TrajectoryDiffuserConfig(state_dim=1, action_dim=1, horizon=64, draft_d_model=32, draft_heads=2,
                                   draft_layers=2, draft_d_ff=64, draft_dropout=0.0, down_dims=[16, 32, 64],
                                   step_embed_dim=32, return_embed_dim=8, return_scale=1.0, candidates=1,
                                   condition_dropout=0.0, guidance_weight=1.0, beta_schedule="squaredcos_cap_v2")
    normalizer = Normalizer({"state": FieldNormalizer.fit_minmax(data.reshape(-1, 1), 1e-2),
                             "action": FieldNormalizer.fit_minmax(np.array([[-1.0], [1.0]]), 1e-2)})
    planner = TrajectoryDiffuser(cfg, normalizer)
    opt = torch.optim.Adam(planner.parameters(), 2e-3)
    for _ in range(1200):
        states = torch.from_numpy(data[rng.integers(0, len(data), 64)])[..., None]
        loss = planner({"states": states, "actions": torch.zeros_like(states), "rtg": torch.zeros(64, 64),
                        "valid": torch.ones(64, 64, dtype=torch.bool)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    planner.eval()
    n = 1000
    test = toy_trajectories(n, np.random.default_rng(1))
    prefix = torch.from_numpy(toy_trajectories(n, np.random.default_rng(2))[:, :8, None])
    norm = planner.normalizer["state"]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        start = norm.normalize(prefix)
        returns = torch.zeros(n)
        draft = planner.draft.rollout(start, returns)
        denoiser = planner.guided_denoiser(start[:, 0], returns)
        refined = hold_first(sample(denoiser, draft, planner.schedule, list(range(20, -1, -1)), "ddpm",
                                    generator=generator), start[:, 0])
        full = hold_first(sample(denoiser, torch.randn(draft.shape, generator=generator), planner.schedule,
                                 list(range(99, -1, -1)), "ddpm", generator=generator), start[:, 0])
    bandwidth = float((torch.cdist(torch.from_numpy(data[:500]), torch.from_numpy(data[:500])) ** 2).median())
    figures = {name: (mmd(norm.unnormalize(x)[..., 0].numpy(), test, bandwidth),
                      minor_share(norm.unnormalize(x)[..., 0].numpy()))
               for name, x in (("draft", draft), ("refined", refined), ("full", full))}
    (d_mmd, d_minor), (r_mmd, r_minor), (f_mmd, _) = figures["draft"], figures["refined"], figures["full"]
    assert r_mmd <= 0.5 * d_mmd, figures
    assert r_mmd <= 1.2 * f_mmd, figures
    assert abs(r_minor - minor_share(test)) <= 0.05 and abs(r_minor - d_minor) <= 0.05, figures


def test_the_decision_exports_as_one_graph_with_parity(maze):
    ckpt = str(maze["td"])
    manifest = export_policy(ExportSettings(ckpt))
    assert set(manifest["graphs"]) == {"planner"}
    errors = check_export(ckpt, maze["td"] / "onnx")
    assert max(errors.values()) <= 1e-3, errors
    obs = observations(maze["buffer"])
    engine = build_policy(RuntimeSettings(ckpt, backend="onnxruntime")).policy.predict_chunk(
        obs, generator=torch.Generator().manual_seed(3))
    torch_chunk = build_policy(RuntimeSettings(ckpt)).policy.predict_chunk(
        obs, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(engine.action, torch_chunk.action, atol=1e-3, rtol=0)
    assert torch.equal(engine.extras["best"], torch_chunk.extras["best"])


def test_bad_observations_are_refused_by_name(maze):
    td, _ = load_planner(maze["td"])
    obs = observations(maze["buffer"])
    nan = obs["state"].clone()
    nan[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="'state' holds NaN or Inf"):
        td.predict_chunk({"state": nan})
    with pytest.raises(ValueError, match=r"'state' must have shape \(B, 1, 6\)"):
        td.predict_chunk({"state": obs["state"][..., :4]})
    with pytest.raises(KeyError, match="missing 'state'"):
        td.predict_chunk({"obs": obs["state"]})
    with pytest.raises(ValueError, match="holds a 'trajectory_diffuser' planner, not a 'decision_diffuser'"):
        load_planner(maze["td"], DecisionDiffuser)
    with pytest.raises(ValueError, match="RTI, the block cache"):
        build_policy(RuntimeSettings(str(maze["td"]), rti={"k0": 3}))
    with pytest.raises(ValueError, match="at least one step"):
        build_policy(RuntimeSettings(str(maze["dd"]), steps=0))


def test_eval_reports_normalized_return_and_draft_passes(maze):
    from evaluation.evaluate import EvalSettings, evaluate

    report = evaluate(EvalSettings(checkpoint=str(maze["td"]), episodes=2, workers=1, max_episode_steps=20),
                      progress=False)
    refs = maze["buffer"].attrs["reference_returns"]
    want = 100 * (report["mean_return"] - refs["random"]) / (refs["expert"] - refs["random"])
    assert report["normalized_return"] == pytest.approx(want)
    assert report["nfe_per_decision"] == 5 and report["draft_steps_per_decision"] == 31
    assert report["decisions"] == 40  # a maze runs to its step limit, one decision per step


def test_a_refiner_trained_on_low_noise_only_samples_t_below_the_bound_and_refuses_to_enter_above_it(maze):
    data = TrajectoryDataset(maze["buffer"], 32, 0.99)
    batch = {k: torch.from_numpy(v) for k, v in data.batch(np.arange(256)).items()}
    seen = {}
    for bound in (0, 5):
        cfg = small(TrajectoryDiffuserRunConfig(), 1, refine_train_timesteps=bound)
        td = kind_named("trajectory_diffuser").build_for_training(cfg, data)
        seen[bound] = []
        td.unet.register_forward_pre_hook(lambda module, args, into=seen[bound]: into.append(args[1].clone()))
        td.compute_loss(batch, generator=torch.Generator().manual_seed(0))
        seen[bound] = torch.cat(seen[bound])
    assert set(seen[5].tolist()) == {0, 1, 2, 3, 4}  # every t below the bound, nothing above it
    assert int(seen[0].max()) > 90  # the default trains on the whole 100-step schedule
    with pytest.raises(ValueError, match="trained on t < 5 only"):
        td.configure_inference(steps=8)
    assert td.configure_inference(steps=5).timesteps == [4, 3, 2, 1, 0]
    dd_cfg = small(TrajectoryDiffuserRunConfig(kind="decision_diffuser"), 1, refine_train_timesteps=5)
    with pytest.raises(ValueError, match="refine_train_timesteps"):
        kind_named("decision_diffuser").build_for_training(dd_cfg, data)


def test_the_target_return_is_a_runtime_setting_the_draft_is_conditioned_on(maze):
    obs = observations(maze["buffer"])
    plans = {}
    for target in (None, 0.9, 0.2):
        runtime = build_policy(RuntimeSettings(str(maze["td"]), steps=0, target_return=target))
        assert runtime.config["target_return"] == (0.9 if target is None else target)  # the config's default
        plans[target] = runtime.policy.predict_chunk(obs, generator=torch.Generator().manual_seed(0)).extras["plans"]
    torch.testing.assert_close(plans[None], plans[0.9])
    assert (plans[0.2] - plans[0.9]).abs().max() > 1e-3  # the draft reads the target at every position
    with pytest.raises(ValueError, match="a diffuser checkpoint is not conditioned on a return"):
        build_policy(RuntimeSettings(str(maze["diffuser"]), target_return=0.5))
    with pytest.raises(ValueError, match="target_return must be a finite number"):
        build_policy(RuntimeSettings(str(maze["td"]), target_return=float("nan")))
    with pytest.raises(ValueError, match="a clearance check needs a driving planner's candidates"):
        build_policy(RuntimeSettings(str(maze["td"]), clearance={}))


def test_inverse_dynamics_reads_exactly_the_states_its_context_names(maze):
    data = TrajectoryDataset(maze["buffer"], 32, 0.99)
    cfg = small(TrajectoryDiffuserRunConfig(), 1, inverse_context=4, actions_per_decision=2)
    td = kind_named("trajectory_diffuser").build_for_training(cfg, data).eval()
    plans = torch.rand(3, 32, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    base, _ = td.actions_and_values(plans)
    changed = {}
    for step in (4, 5, 6):
        moved = plans.clone()
        moved[:, step] += 0.5
        actions, _ = td.actions_and_values(moved)
        changed[step] = [bool((actions[:, j] - base[:, j]).abs().max() > 1e-6) for j in range(2)]
    # action 0 reads s_0 .. s_4, action 1 reads s_1 .. s_5
    assert changed == {4: [True, True], 5: [False, True], 6: [False, False]}
    for bad in ({"inverse_context": 0}, {"inverse_context": 31, "actions_per_decision": 2}, {"inverse_noise": -0.1}):
        with pytest.raises(ValueError, match="planner.inverse_"):
            kind_named("trajectory_diffuser").build_for_training(small(TrajectoryDiffuserRunConfig(), 1, **bad),
                                                                 data)


def test_a_strided_planner_trains_on_windows_of_its_own_stride_and_plans_one_action(maze):
    strided = TrajectoryDataset(maze["buffer"], 32, 0.99, stride=4)
    cfg = small(TrajectoryDiffuserRunConfig(), 1, plan_stride=4, inverse_context=2)
    td = kind_named("trajectory_diffuser").build_for_training(cfg, strided)
    windows = strided.batch(np.arange(64))
    rows, inside = np.arange(64)[:, None] + 4 * np.arange(32)[None], windows["valid"]
    np.testing.assert_array_equal(windows["states"][inside], maze["buffer"]["obs"][rows[inside]])
    assert torch.isfinite(td.compute_loss({k: torch.from_numpy(v) for k, v in windows.items()}))
    assert td.inference_config()["plan_stride"] == 4
    with pytest.raises(ValueError, match="every 1-th step, planner.plan_stride is 4"):
        kind_named("trajectory_diffuser").build_for_training(
            small(TrajectoryDiffuserRunConfig(), 1, plan_stride=4), TrajectoryDataset(maze["buffer"], 32, 0.99))
    with pytest.raises(ValueError, match="actions_per_decision must be 1"):
        kind_named("trajectory_diffuser").build_for_training(
            small(TrajectoryDiffuserRunConfig(), 1, plan_stride=4, actions_per_decision=2), strided)


def test_reading_further_along_a_rough_plan_recovers_the_action_better(maze):
    """The refiner's error lands on every planned state. On the noiseless expert's own paths roughened by 0.06
    (normalised; about 9 cm in UMaze, the size of the error measured on Medium), an inverse model reading 8 states
    ahead, trained on states as rough, recovers the expert's action with under 0.8x the error of f(s_0, s_1)."""
    from envs.pointmaze import PointMazeTask

    env = PointMazeTask(TASK.partition("/")[2])
    expert = env.expert()
    paths, expert_actions = [], []
    for seed in range(3):
        obs, _ = env.reset(seed=100 + seed)
        visited = [obs["state"].copy()]
        for _ in range(110):
            obs, *_ = env.step(expert(obs["state"]))
            visited.append(obs["state"].copy())
        for i in range(0, 100, 3):
            paths.append(np.stack(visited[i:i + 9]))
            expert_actions.append(np.clip(expert(visited[i]), -1, 1))
    paths, expert_actions = torch.from_numpy(np.stack(paths)), torch.from_numpy(np.stack(expert_actions))
    data = TrajectoryDataset(maze["buffer"], 32, 0.99)
    errors = {}
    for context, roughness in ((1, 0.0), (8, 0.06)):
        torch.manual_seed(0)
        cfg = small(TrajectoryDiffuserRunConfig(), 1, inverse_context=context, inverse_noise=roughness)
        td = kind_named("trajectory_diffuser").build_for_training(cfg, data)
        # the inverse model alone learns, on compute_loss's inverse term (the only one its weights reach)
        norm = td.normalizer
        opt = torch.optim.Adam(td.inverse.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(250):
            batch = data.batch(torch.randint(0, len(data), (64,), generator=g).numpy())
            opt.zero_grad()
            td.inverse_loss(norm["state"].normalize(torch.from_numpy(batch["states"])),
                            norm["action"].normalize(torch.from_numpy(batch["actions"])),
                            torch.from_numpy(batch["valid"]), g).backward()
            opt.step()
        with torch.no_grad():
            rough = td.normalizer["state"].normalize(paths.float())
            rough[:, 1:] += 0.06 * torch.randn(rough[:, 1:].shape, generator=torch.Generator().manual_seed(1))
            actions = td.inverse(td.inverse_inputs(rough, 1))[:, 0].clamp(-1, 1)
            actions = td.normalizer["action"].unnormalize(actions).clamp(-1, 1)
            errors[context] = float((actions - expert_actions).norm(dim=-1).mean())
    assert errors[8] < 0.8 * errors[1], errors
