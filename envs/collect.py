"""Expert demonstrations into a ReplayBuffer: successful episodes only, with their provenance."""

from __future__ import annotations

import datetime

import numpy as np
from tqdm import tqdm

from .datasets import DatasetError, ReplayBuffer
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


def next_seed(dataset: ReplayBuffer) -> int:
    """The first seed after every one a dataset has tried, so appended episodes are new ones."""
    tried = [*dataset.attrs.get("seeds", []), *dataset.attrs.get("failed_seeds", [])]
    return max(tried) + 1 if tried else 0


def check_appendable(dataset: ReplayBuffer, task: str, image: bool, image_size: int | None) -> None:
    """Refuse, before anything is collected, episodes of another task or observation layout than the dataset's."""
    for key, value in (("task", task), ("image", image), ("image_size", image_size if image else None)):
        if dataset.attrs.get(key) != value:
            raise DatasetError(f"{dataset.source} holds {key} {dataset.attrs.get(key)!r}, the new episodes "
                               f"{value!r}: append only to a dataset of the same task and layout")


def append_demos(dataset: ReplayBuffer, new: ReplayBuffer) -> ReplayBuffer:
    """`dataset` with `new`'s episodes after its own, refused unless both hold the same task, observation layout
    and image settings, and no seed twice (the same seed is the same episode: duplicated data, not more)."""
    old_a, new_a = dataset.attrs, new.attrs
    check_appendable(dataset, new_a.get("task"), new_a.get("image"), new_a.get("image_size"))
    if dataset.keys != new.keys:
        raise DatasetError(f"{dataset.source} has keys {dataset.keys}, the new episodes {new.keys}")
    repeated = sorted(set(old_a.get("seeds", [])) & set(new_a["seeds"]))
    if repeated:
        raise DatasetError(f"{dataset.source} already holds the episodes of seeds {repeated[:5]}: start --seed "
                           f"at {next_seed(dataset)} or later")
    merged = ReplayBuffer(dataset.data, dataset.episode_ends, dict(old_a), source=dataset.source)
    for i in range(new.n_episodes):
        merged.add_episode(new.episode(i))
    tried = len(old_a.get("seeds", [])) + len(old_a.get("failed_seeds", [])) + len(new_a["seeds"]) \
        + len(new_a["failed_seeds"])
    seeds = [*old_a.get("seeds", []), *new_a["seeds"]]
    merged.attrs.update({
        "episodes": len(seeds), "seeds": seeds, "failed_seeds": [*old_a.get("failed_seeds", []),
                                                                 *new_a["failed_seeds"]],
        "appended": [*old_a.get("appended", []), new_a["created"]],
    })
    if "relabelled" in new_a:  # a planner drove these, the expert only labelled them: not the expert's figures
        merged.attrs["relabelled"] = [*old_a.get("relabelled", []), new_a["relabelled"]]
    else:
        merged.attrs["expert_success_rate"] = len(seeds) / tried if tried else None
    return merged
