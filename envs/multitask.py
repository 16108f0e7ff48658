"""Several tasks in one dataset and one policy: each episode carries its task's index, and the observations a
visual multi-task policy sees (the camera frame, the robot's own pose, the task) are named the same on every task.

    buffer = collect_multitask(["metaworld/push-v3", "metaworld/reach-v3"], episodes=40, image=True,
                               image_size=64)              # data: state, pose, image, action, task, task_onehot
    env = MultiTaskObservation(make_env("metaworld/push-v3", image=True, image_size=64), index=0, n_tasks=2)

`task` is the index into the dataset's `tasks` attribute (int64 per step), `task_onehot` the same as a float
vector (for a policy that only takes float features), `pose` the state's pose dims (envs.tasks.pose_dims).
"""

from __future__ import annotations

import datetime

import gymnasium as gym
import numpy as np

from .collect import collect_demos
from .datasets import ReplayBuffer
from .tasks import pose_dims


def parse_tasks(text: str) -> list[str]:
    """`a,b,c` -> the task names, refused when one repeats."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise ValueError(f"tasks {repeated} are named twice")
    return tasks


def task_features(index: int, n_tasks: int, pose: np.ndarray) -> dict[str, np.ndarray]:
    onehot = np.zeros(n_tasks, dtype=np.float32)
    onehot[index] = 1.0
    return {"pose": np.asarray(pose, dtype=np.float32), "task": np.int64(index), "task_onehot": onehot}


def collect_multitask(tasks: list[str], episodes: int, seed: int = 0, image: bool = False, image_size: int = 96,
                      progress: bool = True) -> ReplayBuffer:
    """`episodes` successful expert episodes of each task, task after task, each step labelled with its task."""
    if len(tasks) < 2:
        raise ValueError(f"a multi-task dataset needs at least two tasks, got {tasks}")
    dims = {t: pose_dims(t) for t in tasks}  # every task is checked before anything is collected
    if len({len(d) for d in dims.values()}) != 1:
        raise ValueError(f"the tasks' poses differ in size ({dims}); a multi-task policy needs one pose layout")
    merged = ReplayBuffer()
    per_task = {}
    for index, task in enumerate(tasks):
        buffer = collect_demos(task, episodes, seed=seed, image=image, image_size=image_size, progress=progress)
        for i in range(buffer.n_episodes):
            ep = buffer.episode(i)
            n = len(ep["action"])
            extra = task_features(index, len(tasks), ep["state"][:, dims[task]])
            merged.add_episode({**ep, "pose": extra["pose"], "task": np.full(n, index, dtype=np.int64),
                                "task_onehot": np.tile(extra["task_onehot"], (n, 1))})
        per_task[task] = {k: buffer.attrs[k] for k in ("seeds", "failed_seeds", "expert_success_rate")}
    merged.attrs.update({
        "task": tasks[0], "tasks": list(tasks), "per_task": per_task, "episodes": merged.n_episodes,
        "image": image, "image_size": image_size if image else None, "pose_dims": dims[tasks[0]],
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    })
    return merged


class MultiTaskObservation(gym.ObservationWrapper):
    """A task's env observed as a multi-task policy trained on `n_tasks` tasks sees it, this one at `index`."""

    def __init__(self, env: gym.Env, index: int, n_tasks: int, task: str):
        super().__init__(env)
        if not 0 <= index < n_tasks:
            raise ValueError(f"task index {index} is outside the {n_tasks} tasks")
        self.index, self.n_tasks, self.dims = index, n_tasks, pose_dims(task)
        spaces = dict(env.observation_space.spaces)
        spaces["pose"] = gym.spaces.Box(-np.inf, np.inf, shape=(len(self.dims),), dtype=np.float32)
        spaces["task"] = gym.spaces.Box(0, n_tasks - 1, shape=(), dtype=np.int64)
        spaces["task_onehot"] = gym.spaces.Box(0.0, 1.0, shape=(n_tasks,), dtype=np.float32)
        self.observation_space = gym.spaces.Dict(spaces)

    def observation(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**obs, **task_features(self.index, self.n_tasks, obs["state"][self.dims])}

    def __getattr__(self, name):  # the task's own extras (render_frame, expert, max_episode_steps)
        return getattr(self.env, name)


class ConcatenatedState(gym.ObservationWrapper):
    """The `state` a policy trained with `data.state_keys` sees: those observation keys concatenated, in order
    (a multi-task Diffusion Policy on pose and task_onehot, say, instead of the task's full state)."""

    def __init__(self, env: gym.Env, keys: list[str]):
        super().__init__(env)
        spaces = dict(env.observation_space.spaces)
        missing = [k for k in keys if k not in spaces]
        if missing:
            raise ValueError(f"the task observes no {missing}; it observes {sorted(spaces)}")
        self.keys = list(keys)
        dim = sum(int(np.prod(spaces[k].shape)) for k in keys)
        spaces["state"] = gym.spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)
        self.observation_space = gym.spaces.Dict(spaces)

    def observation(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        state = np.concatenate([np.asarray(obs[k], np.float32).reshape(-1) for k in self.keys])
        return {**{k: v for k, v in obs.items() if k not in self.keys}, "state": state}

    def __getattr__(self, name):
        return getattr(self.env, name)
