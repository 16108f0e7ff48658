"""`rtdp demo`: collect expert demos, train a small policy, evaluate it closed-loop under two samplers.

Wiring only: the task and expert come from envs/, training and sampling from policy/.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "policy" / "unet_lowdim.yaml"
EVAL_SEED_OFFSET = 10_000  # evaluation episodes never reuse a demonstration's seed


def _evaluate(policy, sampler: str, steps: int, episodes: int, seed: int) -> dict:
    from envs.point_mass import PointMassReach
    from envs.rollout import run_episode

    env = PointMassReach()
    latencies, results = [], []
    gen = torch.Generator().manual_seed(seed)

    def act(history: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = policy.predict_chunk({"state": torch.from_numpy(history)[None]}, sampler=sampler, steps=steps,
                                   generator=gen)
        latencies.append((time.perf_counter() - t0) * 1e3)
        return out["action"][0].numpy()

    for ep in tqdm(range(episodes), desc=f"eval {sampler}-{steps}", leave=False):
        results.append(run_episode(env, act, policy.cfg.n_obs_steps, seed=EVAL_SEED_OFFSET + seed + ep))
    lat = np.asarray(latencies)
    return {"sampler": sampler, "steps": steps, "success_rate": float(np.mean([r.success for r in results])),
            "nfe_per_decision": policy.last_nfe,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}}


def run_demo(workdir: Path, steps: int = 1000, episodes: int = 50, seed: int = 0) -> dict:
    from envs.datasets import PolicyDataset
    from envs.point_mass import collect_point_mass
    from policy.checkpoint import load_policy
    from policy.config import load_config
    from policy.train import train

    t_start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    print("1/3 collecting 100 expert episodes of point_mass_reach")
    buffer = collect_point_mass(100, seed=seed)
    buffer.save(workdir / "point_mass.zarr")
    cfg = load_config(CONFIG, [f"train.steps={steps}", "train.checkpoint_every=100000", f"train.seed={seed}",
                               "train.warmup_steps=100"])
    p = cfg.policy
    data = PolicyDataset(buffer, p.horizon, p.n_obs_steps, p.n_action_steps, ["obs"], "action")
    print(f"2/3 training a {CONFIG.name} policy for {steps} steps")
    summary = train(cfg, data, workdir / "policy")
    policy, _ = load_policy(workdir / "policy")
    print(f"3/3 evaluating closed-loop on {episodes} held-out episodes per sampler")
    rows = [_evaluate(policy, "ddpm", 100, episodes, seed), _evaluate(policy, "ddim", 10, episodes, seed)]
    print(f"\n{'sampler':<10} {'success':>8} {'p50 ms':>8} {'p99 ms':>8} {'calls':>6}")
    for r in rows:
        print(f"{r['sampler'] + '-' + str(r['steps']):<10} {r['success_rate']:>8.2f} {r['latency_ms']['p50']:>8.2f} "
              f"{r['latency_ms']['p99']:>8.2f} {r['nfe_per_decision']:>6}")
    total = time.perf_counter() - t_start
    print(f"\ndemo took {total / 60:.1f} min (training {summary.seconds / 60:.1f} min); files in {workdir}")
    return {"task": "point_mass_reach", "train": summary.to_dict(), "eval": rows, "seconds": total}
