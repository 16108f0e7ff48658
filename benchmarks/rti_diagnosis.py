"""Why RTI falls short where a gripper moves: per-decision traces of the executed warm chunks against a full
denoise from the same observation (a shadow, never executed), on the evaluation's seeds.

    python benchmarks/rti_diagnosis.py --checkpoint benchmarks/results/closed_loop/runs/push-v3 --episodes 8 \
        --rti k0=3 --out benchmarks/results/rti_diagnosis/push-v3-clip.json [--shadow-every 2]

Every `--shadow-every`-th decision also runs the checkpoint's DDPM-100 from fresh noise on the same observation.
The trace records, per decision:
- the distance between the two chunks, over the position dims (RMS, normalised units) and the gripper;
- how far the warm tail moved its guess ("correction", the staleness signal RTI can measure without a shadow);
- the executed gripper level, the object's position, and where the two first actions disagree on the gripper.
`--plot` draws them per episode, failures first.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_rti(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def trace_episode(runtime, env, seed: int, shadow_every: int) -> dict:
    import torch

    model, rti = runtime.model, runtime.rti_policy
    norm = model.normalizer["action"]
    n_obs = model.spec.n_obs_steps
    discrete = rti.discrete_dims
    continuous = [d for d in range(model.spec.action_dim) if d not in discrete]
    g, g_shadow = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    runtime.policy.reset()
    obs, _ = env.reset(seed=seed)
    history = deque([obs] * n_obs, maxlen=n_obs)
    rows, success, t = [], False, 0
    done = False
    while not done:
        o = {k: torch.from_numpy(np.stack([h[k] for h in history]))[None] for k in obs}
        guess = rti.warm_guess(rti.cfg.n_exec)
        chunk = runtime.policy.predict_chunk(o, generator=g)
        row = {"t": t, "kind": chunk.kind, "nfe": chunk.nfe, "action": chunk.action[0, 0].tolist(),
               "hand": obs["state"][0:3].tolist(), "object": obs["state"][4:7].tolist()}
        warm = norm.normalize(chunk.action_pred)
        if guess is not None:
            row["correction"] = float((warm - guess)[..., continuous].pow(2).mean().sqrt())
            if discrete:
                row["guess_gripper"] = float(guess[0, model.spec.exec_start, discrete[0]])
        if shadow_every and t % shadow_every == 0:
            full = model.predict_chunk(o, generator=g_shadow)
            full_n = norm.normalize(full.action_pred)
            row["shadow_pos_rms"] = float((warm - full_n)[..., continuous].pow(2).mean().sqrt())
            if discrete:
                start = model.spec.exec_start
                w = rti.binarize(chunk.action_pred)[0, start:, discrete[0]]
                f = rti.binarize(full.action_pred)[0, start:, discrete[0]]
                row["shadow_gripper_disagree"] = int((w != f).sum())
                row["shadow_first_gripper"] = float(f[0])
        rows.append(row)
        for action in chunk.action[0].numpy():
            obs, _, terminated, truncated, info = env.step(action)
            history.append(obs)
            t += 1
            success = success or info["success"]
            done = success or terminated or truncated
            if done:
                break
    return {"seed": seed, "success": success, "steps": t, "decisions": rows}


def summarise(episodes: list[dict], discrete: bool) -> dict:
    def mean(key, eps, pred=lambda r: True):
        vals = [r[key] for e in eps for r in e["decisions"] if key in r and pred(r)]
        return float(np.mean(vals)) if vals else None

    out = {}
    for name, eps in (("success", [e for e in episodes if e["success"]]),
                      ("failure", [e for e in episodes if not e["success"]])):
        flips = []
        for e in eps:
            g = [r["action"][-1] for r in e["decisions"]] if discrete else []
            flips.append(int(np.sum(np.diff(np.sign(np.array(g) - np.mean(g))) != 0)) if len(g) > 1 else 0)
        out[name] = {"episodes": len(eps), "shadow_pos_rms": mean("shadow_pos_rms", eps),
                     "correction": mean("correction", eps),
                     "gripper_disagree_steps": mean("shadow_gripper_disagree", eps),
                     "executed_gripper_flips": float(np.mean(flips)) if flips else None}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted(result["episodes"], key=lambda e: e["success"])[:6]
    fig, axes = plt.subplots(len(eps), 1, figsize=(9, 2.2 * len(eps)), sharex=True, squeeze=False)
    for ax, e in zip(axes[:, 0], eps, strict=True):
        rows = e["decisions"]
        t = [r["t"] for r in rows]
        ax.plot(t, [r.get("correction", np.nan) for r in rows], lw=0.8, label="warm correction (pos RMS)")
        st = [r["t"] for r in rows if "shadow_pos_rms" in r]
        ax.plot(st, [r["shadow_pos_rms"] for r in rows if "shadow_pos_rms" in r], ".", ms=3,
                label="warm vs full denoise (pos RMS)")
        ax2 = ax.twinx()
        ax2.step(t, [r["action"][-1] for r in rows], where="post", color="k", lw=0.8, label="executed gripper")
        sg = [(r["t"], r["shadow_first_gripper"]) for r in rows if "shadow_first_gripper" in r]
        if sg:
            ax2.plot(*zip(*sg, strict=True), "x", color="r", ms=3, label="full denoise's gripper")
        ax.set_ylabel(f"seed {e['seed']}\n{'success' if e['success'] else 'FAIL'}")
    axes[0, 0].legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("env step")
    fig.suptitle(result["label"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rti", nargs="*", default=["k0=3"], help="RTI settings, key=value")
    ap.add_argument("--shadow-every", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args()

    import torch
    from tqdm import tqdm

    from deploy.runtime import RuntimeSettings, build_policy
    from evaluation.episodes import episode_seeds
    from evaluation.tasks import open_env

    torch.set_num_threads(2)
    runtime = build_policy(RuntimeSettings(args.checkpoint, rti=parse_rti(args.rti)))
    runtime.model.configure_inference("ddpm", 100)
    env = open_env(args.checkpoint, runtime.run_cfg, runtime.run_cfg.data.task)
    episodes = []
    for seed in tqdm(episode_seeds(args.seed, args.episodes), desc="traces"):
        episodes.append(trace_episode(runtime, env, seed, args.shadow_every))
    result = {"checkpoint": args.checkpoint, "rti": runtime.config["rti"], "label": f"{args.checkpoint} "
              f"RTI {' '.join(args.rti)}", "success_rate": float(np.mean([e["success"] for e in episodes])),
              "summary": summarise(episodes, bool(runtime.rti_policy.discrete_dims)), "episodes": episodes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result))
    print(json.dumps({k: result[k] for k in ("success_rate", "summary")}, indent=1))
    if args.plot:
        plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
