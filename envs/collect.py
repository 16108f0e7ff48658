"""Expert demonstrations into a ReplayBuffer: successful episodes only, with their provenance."""

from __future__ import annotations

import datetime

import numpy as np
from tqdm import tqdm

from .datasets import ReplayBuffer
from .tasks import make_env

# Steps recorded after the expert first succeeds, so the policy also learns to hold the goal.
STEPS_AFTER_SUCCESS = 10


def collect_demos(task: str, episodes: int, seed: int = 0, image: bool = False, image_size: int = 96,
                  max_attempts: int | None = None, max_episode_steps: int | None = None,
                  progress: bool = True) -> ReplayBuffer:
    """Run the task's scripted expert on seeds seed, seed + 1, ... until `episodes` of them succeed."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    max_attempts = max_attempts or 3 * episodes
    env = make_env(task, image=image, image_size=image_size, max_episode_steps=max_episode_steps)
    expert = env.expert()
    low, high = env.action_space.low, env.action_space.high
    buffer = ReplayBuffer()
    kept, failed = [], []
    bar = tqdm(total=episodes, desc=f"collect {task}", disable=not progress, dynamic_ncols=True)
    attempt = 0
    while len(kept) < episodes and attempt < max_attempts:
        ep_seed = seed + attempt
        attempt += 1
        obs, _ = env.reset(seed=ep_seed)
        steps: dict[str, list] = {k: [] for k in [*obs, "action"]}
        after = None
        for _ in range(env.max_episode_steps):
            # Record what the task executes: scripted experts may exceed the action bounds the task clips to.
            action = np.clip(expert(obs["state"]), low, high).astype(np.float32)
            for k, v in obs.items():
                steps[k].append(v)
            steps["action"].append(action)
            obs, _, terminated, truncated, info = env.step(action)
            if info["success"] and after is None:
                after = STEPS_AFTER_SUCCESS
            if after is not None:
                after -= 1
                if after == 0:
                    break
            if terminated or truncated:
                break
        if after is None:
            failed.append(ep_seed)
            continue
        buffer.add_episode({k: np.stack(v) for k, v in steps.items()})
        kept.append(ep_seed)
        bar.update(1)
    bar.close()
    env.close()
    if len(kept) < episodes:
        raise RuntimeError(f"{task}: the expert succeeded on only {len(kept)} of {attempt} episodes; "
                           f"{episodes} were asked for")
    buffer.attrs.update({
        "task": task, "episodes": len(kept), "seeds": kept, "failed_seeds": failed,
        "expert_success_rate": len(kept) / attempt, "image": image, "image_size": image_size if image else None,
        "steps_after_success": STEPS_AFTER_SUCCESS, "created": datetime.datetime.now().isoformat(timespec="seconds"),
    })
    return buffer
