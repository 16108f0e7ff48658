"""Where Trajectory Diffuser's refinement moves the plan, away from the closed loop: on states the noiseless
waypoint expert visits (every 5th of the first 150 steps of six held-out seeds), each refinement setting's planned
first step and the action inverse dynamics makes of it, against the draft alone.

    python benchmarks/td_refinement_probe.py benchmarks/results/trajectory_diffuser/runs/medium-trajectory_diffuser

`inverse_on_expert_future_error`: the inverse model's own action error, given the states the expert really visits
next instead of a plan. Per setting: `plan_step_m` (mean distance from the current position to the planned next one:
a real step of the data is a few cm; `plan_stride` of them for a strided plan), `chosen_action_error` and
`candidate_action_error` (L2 to the expert's action, both clipped to the action box), `candidate_spread` (the 32
candidates' std per action dim) and `critic_range` (max - min of their values). Writes
benchmarks/results/trajectory_diffuser/refinement_probe/<checkpoint folder's name>.json.

    python benchmarks/td_refinement_probe.py RUN --target-returns 0.9 0.5 0.3 0.2

    python benchmarks/td_refinement_probe.py RUN --data DATA.hdf5 --retrain-inverse 1:0 8:0 8:0.03

asks the same of the draft alone and the default refinement at each target return (x the data's highest initial
return-to-go, as `planner.target_return`) instead, into <folder's name>-target-returns.json.

`--retrain-inverse CONTEXT:NOISE ...` retrains only the inverse model, on the checkpoint's frozen draft and U-Net,
once per `planner.inverse_context` and `planner.inverse_noise` given (3,000 steps at batch 256 on the training data
`--data`, no EMA), and probes the draft alone and the DDPM-5 and DDIM-5 refinements with each, into
<folder's name>-retrained-inverse.json: what the inverse model alone changes, everything else held.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "results" / "trajectory_diffuser"
# (name, sampler, refinement steps, entry); steps 0 is the draft alone
SETTINGS = (("draft alone", None, 0, "direct"), ("ddpm 5, direct (default)", "ddpm", 5, "direct"),
            ("ddim 5, direct", "ddim", 5, "direct"), ("ddpm 5, renoise", "ddpm", 5, "renoise"),
            ("ddim 5, renoise", "ddim", 5, "renoise"), ("ddpm 2, direct", "ddpm", 2, "direct"),
            ("ddim 2, direct", "ddim", 2, "direct"), ("ddim 1, direct", "ddim", 1, "direct"))


def expert_states(task: str, seeds: range, steps: int = 150, every: int = 5,
                  future: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The probed states, the expert's action at each, and the `future` states the expert visits after each."""
    from envs.pointmaze import PointMazeTask

    env = PointMazeTask(task.partition("/")[2])
    expert = env.expert()
    states, futures = [], []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        visited = [obs["state"].copy()]
        for _ in range(steps + future):
            obs, *_ = env.step(expert(obs["state"]))
            visited.append(obs["state"].copy())
        for i in range(0, steps, every):
            states.append(visited[i])
            futures.append(np.stack(visited[i + 1:i + 1 + future]))
    states = np.stack(states)
    return states, np.stack([expert(s) for s in states]), np.stack(futures)


def probe(model, states: np.ndarray, expert_actions: np.ndarray) -> dict:
    g = torch.Generator().manual_seed(0)
    rows = []
    for s, a in zip(states, np.clip(expert_actions, -1, 1), strict=True):
        chunk = model.predict_chunk({"state": torch.from_numpy(s[None, None])}, generator=g)
        chosen = np.clip(chunk.action[0, 0].numpy(), -1, 1)
        candidates = np.clip(chunk.extras["candidates"][0, :, 0].numpy(), -1, 1)
        scores = chunk.extras["scores"][0].numpy()
        plans = chunk.extras["plans"][0].numpy()
        rows.append((np.linalg.norm(plans[:, 1, :2] - s[:2], axis=-1).mean(), np.linalg.norm(chosen - a),
                     np.linalg.norm(candidates - a, axis=-1).mean(), candidates.std(0).mean(),
                     scores.max() - scores.min()))
    m = np.mean(rows, axis=0)
    return dict(zip(("plan_step_m", "chosen_action_error", "candidate_action_error", "candidate_spread",
                     "critic_range"), map(float, m), strict=True))


def retrain_inverse(model, data, context: int, noise: float, steps: int, batch: int = 256) -> float:
    """A fresh inverse model reading `context` planned states, trained alone (the model's inverse_loss) with
    `noise` roughening; the rest of `model` stays as trained. Returns the last batch's loss."""
    from planners.trajectory_diffuser import mlp

    torch.manual_seed(0)
    cfg, norm = model.cfg, model.normalizer
    cfg.inverse_context, cfg.inverse_noise = context, noise
    model.inverse = mlp((1 + context) * cfg.state_dim, cfg.inverse_hidden, cfg.action_dim)
    opt = torch.optim.Adam(model.inverse.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        windows = data.batch(torch.randint(0, len(data), (batch,), generator=g).numpy())
        loss = model.inverse_loss(norm["state"].normalize(torch.from_numpy(windows["states"])),
                                  norm["action"].normalize(torch.from_numpy(windows["actions"])),
                                  torch.from_numpy(windows["valid"]), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.inverse.eval()
    return float(loss.detach())


@torch.no_grad()
def inverse_on_expert_future(model, states: np.ndarray, expert_actions: np.ndarray, futures: np.ndarray) -> float:
    """The inverse model's action error given the states the expert really visits next: its own error, with no plan
    in between."""
    norm = model.normalizer
    stride, context = model.cfg.plan_stride, model.cfg.inverse_context
    ahead = futures[:, stride - 1::stride][:, :context]  # the states the inverse model reads, plan_stride apart
    if ahead.shape[1] < context:
        raise ValueError(f"the probe follows the expert {futures.shape[1]} steps; the inverse model reads "
                         f"{context * stride}")
    plans = torch.cat([torch.from_numpy(states[:, None]), torch.from_numpy(ahead)], 1)
    actions = model.inverse(model.inverse_inputs(norm["state"].normalize(plans), 1))[:, 0].clamp(-1, 1)
    actions = norm["action"].unnormalize(actions).numpy()
    clipped = np.clip(expert_actions, -1, 1)
    return float(np.linalg.norm(np.clip(actions, -1, 1) - clipped, axis=-1).mean())


def main() -> None:
    from deploy.kinds import read_config
    from deploy.runtime import RuntimeSettings, build_policy

    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--target-returns", nargs="*", type=float, default=[],
                    help="sweep the target return (draft alone and the default refinement at each)")
    ap.add_argument("--retrain-inverse", nargs="*", default=[], metavar="CONTEXT:NOISE",
                    help="retrain only the inverse model at each setting and probe with it")
    ap.add_argument("--retrain-steps", type=int, default=3000)
    ap.add_argument("--data", help="the checkpoint's training data (for --retrain-inverse)")
    args = ap.parse_args()
    if args.retrain_inverse and not args.data:
        ap.error("--retrain-inverse needs --data, the checkpoint's training data")
    torch.set_num_threads(2)
    task = read_config(args.checkpoint).data.task
    if not task.startswith("pointmaze/"):
        sys.exit(f"the probe follows the maze expert; {args.checkpoint} was trained on {task}")
    states, actions, futures = expert_states(task, range(100_000, 100_000 + args.seeds))
    model = build_policy(RuntimeSettings(args.checkpoint)).model
    result = {"checkpoint": args.checkpoint, "task": task, "states": len(states),
              "expert_action_abs_mean": float(np.abs(actions).mean()),
              "inverse_context": model.cfg.inverse_context, "inverse_noise": model.cfg.inverse_noise,
              "plan_stride": model.cfg.plan_stride,
              "inverse_on_expert_future_error": inverse_on_expert_future(model, states, actions, futures),
              "settings": {}}
    print("inverse dynamics on the expert's own next states:", round(result["inverse_on_expert_future_error"], 3))
    name = Path(args.checkpoint).resolve().name
    if args.retrain_inverse:
        from envs.datasets.offline import load_offline
        from envs.datasets.trajectory_dataset import TrajectoryDataset

        data = TrajectoryDataset(load_offline(args.data), model.cfg.horizon, read_config(args.checkpoint).data.discount,
                                 model.cfg.plan_stride)
        result["retrained_inverse"] = {}
        for item in args.retrain_inverse:
            context, _, noise = item.partition(":")
            row = {"loss": retrain_inverse(model, data, int(context), float(noise or 0), args.retrain_steps)}
            row["inverse_on_expert_future_error"] = inverse_on_expert_future(model, states, actions, futures)
            for setting, sampler, steps, entry in SETTINGS[:3]:
                model.configure_inference(sampler, steps)
                model.cfg.entry = entry
                row[setting] = probe(model, states, actions)
            result["retrained_inverse"][item] = row
            print(item, json.dumps(row), flush=True)
        name += "-retrained-inverse"
    elif args.target_returns:
        result["by_target_return"] = {}
        for target in args.target_returns:
            model.cfg.target_return = target
            for setting, sampler, steps, entry in SETTINGS[:2]:
                model.configure_inference(sampler, steps)
                model.cfg.entry = entry
                row = probe(model, states, actions)
                result["by_target_return"].setdefault(str(target), {})[setting] = row
                print(target, setting, {k: round(v, 3) for k, v in row.items()}, flush=True)
        name += "-target-returns"
    else:
        for setting, sampler, steps, entry in SETTINGS:
            model.configure_inference(sampler, steps)
            model.cfg.entry = entry
            result["settings"][setting] = probe(model, states, actions)
            print(setting, {k: round(v, 3) for k, v in result["settings"][setting].items()}, flush=True)
    out = OUT / "refinement_probe" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(out)


if __name__ == "__main__":
    main()
