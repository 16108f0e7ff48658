"""`rtdp demo`: collect expert demos on a metaworld task, train a small policy, and evaluate it closed-loop with
DDPM-100 and DDIM-10 on the same checkpoint. Wiring only: the work is in envs/, policy/ and evaluation/.
"""

from __future__ import annotations

import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "policy" / "unet_lowdim.yaml"
DEMOS = 50


def run_demo(workdir: Path, task: str = "metaworld/drawer-open-v3", steps: int = 1000, episodes: int = 50,
             seed: int = 0) -> dict:
    from envs.collect import collect_demos
    from envs.datasets import PolicyDataset
    from evaluation.evaluate import EvalSettings, evaluate
    from policy.config import load_config
    from policy.train import train

    t_start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"1/3 collecting {DEMOS} expert demonstrations of {task}")
    buffer = collect_demos(task, DEMOS, seed=seed)
    buffer.save(workdir / "demos.zarr", overwrite=True)  # the demo's own folder, made by an earlier demo
    cfg = load_config(CONFIG, [f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.seed={seed}",
                               f"data.task={task}"])
    p = cfg.policy
    data = PolicyDataset(buffer, p.horizon, p.n_obs_steps, p.n_action_steps, cfg.data.state_keys,
                         cfg.data.action_key)
    print(f"2/3 training the {CONFIG.name} policy for {steps} steps")
    summary = train(cfg, data, workdir / "policy")
    print(f"3/3 evaluating closed-loop on {episodes} held-out episodes per sampler")
    rows = []
    for sampler, k in (("ddpm", 100), ("ddim", 10)):
        rows.append(evaluate(EvalSettings(checkpoint=str(workdir / "policy"), episodes=episodes, seed=seed,
                                          sampler=sampler, steps=k)))
    print(f"\n{task}, {DEMOS} demos, {steps} training steps, {episodes} held-out episodes\n")
    print(f"{'sampler':<10} {'success':>8} {'95% CI':>13} {'p50 ms':>8} {'p99 ms':>8} {'calls':>6}")
    for r in rows:
        lo, hi = r["success_ci95"]
        c = r["config"]
        print(f"{c['sampler'] + '-' + str(c['steps']):<10} {r['success_rate']:>8.2f} {f'[{lo:.2f}, {hi:.2f}]':>13} "
              f"{r['latency_ms']['p50']:>8.1f} {r['latency_ms']['p99']:>8.1f} {r['nfe_per_decision']:>6.0f}")
    total = time.perf_counter() - t_start
    print(f"\ndemo took {total / 60:.1f} min (training {summary.seconds / 60:.1f} min); files in {workdir}")
    return {"task": task, "demos": DEMOS, "train": summary.to_dict(),
            "eval": [{k: v for k, v in r.items() if k != "per_episode"} for r in rows], "seconds": total}
