"""Hopper (gymnasium MuJoCo) as D4RL's hopper datasets were made: `mujoco/hopper-medium|hopper-medium-replay`.

Both tasks run gymnasium's `Hopper-v5` (1,000 steps, ended early when the hopper falls); they differ in the data
`rtdp collect` makes for them. A behaviour policy is trained first (PPO by default, or SAC as D4RL used; stopped
once its return reaches about a third of the expert's reference: envs/behaviour_policy.py); "medium" is `steps`
transitions sampled from it, "medium-replay" every transition it took while training. The observation is `state`,
the 11-d joint positions and velocities; `info["success"]` is set on an episode that runs to its step limit without
falling, so an evaluation's success rate is the share of episodes the hopper stayed up.

Normalised return: the random reference is measured here (uniform actions); the expert reference is D4RL's
(3234.3, its SAC expert on Hopper-v3), since no expert policy is trained here; the dataset's metadata says so.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import gymnasium as gym
import numpy as np

ENV_ID = "Hopper-v5"
DATASETS = ("medium", "medium-replay")
TASK_NAMES = tuple(f"hopper-{d}" for d in DATASETS)  # under the mujoco/ family
STATE_DIM, ACTION_DIM = 11, 3
D4RL_EXPERT_RETURN = 3234.3  # D4RL's REF_MAX_SCORE for hopper
MEDIUM_FRACTION = 1 / 3  # D4RL's medium policies reach about a third of the expert's return
REFERENCE_SEED_OFFSET = 300_000  # neither the data's seeds (0...) nor evaluation's (100000...)


class HopperTask(gym.Env):
    """Hopper-v5 as an rtdp task: dict observation with `state`; `info["success"]` when it ends upright at the step
    limit. Runs to the limit or the fall (`stops_at_success = False`), as D4RL scores it by its return."""

    stops_at_success = False

    def __init__(self, max_episode_steps: int | None = None):
        self.env = gym.make(ENV_ID, max_episode_steps=max_episode_steps)
        self.max_episode_steps = self.env.spec.max_episode_steps
        self.observation_space = gym.spaces.Dict(
            {"state": gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32)})
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        raw, info = self.env.reset(seed=seed, options=options)
        return {"state": raw.astype(np.float32)}, info

    def step(self, action):
        raw, reward, terminated, truncated, info = self.env.step(np.asarray(action, dtype=np.float32))
        info = dict(info)
        info["success"] = bool(truncated and not terminated)
        return {"state": raw.astype(np.float32)}, float(reward), terminated, truncated, info

    def close(self) -> None:
        self.env.close()


def dataset_name(task: str) -> str:
    family, _, name = task.partition("/")
    kind = name.removeprefix("hopper-")
    if family != "mujoco" or not name.startswith("hopper-") or kind not in DATASETS:
        raise ValueError(f"{task!r} is not a hopper task; known: {[f'mujoco/hopper-{d}' for d in DATASETS]}")
    return kind


def _make_raw_env() -> gym.Env:
    return gym.make(ENV_ID)


def collect_hopper(task: str, steps: int, behaviour: str | Path, seed: int = 0, target_return: float | None = None,
                   algorithm: str = "ppo", behaviour_steps: int = 1_000_000, progress: bool = True):
    """The task's dataset as a ReplayBuffer. The behaviour policy in folder `behaviour` is trained there first when
    the folder holds none (`algorithm`, to `target_return`, default a third of D4RL's expert reference, within
    `behaviour_steps`). "medium": `steps` transitions sampled from it, episode after episode on seeds seed, seed + 1,
    ...; "medium-replay": its whole training stream (`steps` does not apply)."""
    from .behaviour_policy import POLICY_FILE, REPLAY_FILE, BehaviourPolicy, BehaviourSettings, train_behaviour
    from .datasets.d4rl import read_d4rl
    from .datasets.offline import d4rl_buffer

    kind = dataset_name(task)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    folder = Path(behaviour)
    if not (folder / POLICY_FILE).is_file():
        target = D4RL_EXPERT_RETURN * MEDIUM_FRACTION if target_return is None else target_return
        train_behaviour(_make_raw_env, BehaviourSettings(target_return=target, algorithm=algorithm,
                                                         max_steps=behaviour_steps, seed=seed), folder,
                        progress=progress)
    policy = BehaviourPolicy(folder, _make_raw_env, seed=seed)
    if kind == "medium-replay":
        data = read_d4rl(folder / REPLAY_FILE)
    else:
        data = rollout_stream(policy, steps, seed, progress)
    attrs = {"task": task, "steps": int(len(data["rewards"])), "seed": seed, "env": ENV_ID,
             "behaviour": {k: policy.record[k] for k in ("algorithm", "steps", "seconds", "final_return", "reached")},
             "expert": f"{policy.record['algorithm']} behaviour policy, stopped at return "
                       f"{policy.record['final_return']}",
             "reference_returns": reference_returns(),
             "created": datetime.datetime.now().isoformat(timespec="seconds")}
    return d4rl_buffer(data, str(folder), attrs)


def rollout_stream(act, steps: int, seed: int, progress: bool = True) -> dict[str, np.ndarray]:
    """`steps` transitions of `act(obs)` on Hopper-v5, episode after episode; the last one cut off is a timeout."""
    from tqdm import tqdm

    env = _make_raw_env()
    obs_rows = np.empty((steps, STATE_DIM), np.float32)
    next_rows = np.empty((steps, STATE_DIM), np.float32)
    actions = np.empty((steps, ACTION_DIM), np.float32)
    rewards = np.empty(steps, np.float32)
    terminals, timeouts = np.zeros(steps, bool), np.zeros(steps, bool)
    episode = 0
    obs, _ = env.reset(seed=seed)
    for i in tqdm(range(steps), desc="rollouts", disable=not progress, dynamic_ncols=True, mininterval=1.0):
        action = act(obs)
        nxt, reward, terminated, truncated, _ = env.step(action)
        obs_rows[i], next_rows[i], actions[i], rewards[i] = obs, nxt, action, reward
        terminals[i], timeouts[i] = terminated, truncated and not terminated
        if terminated or truncated:
            episode += 1
            nxt, _ = env.reset(seed=seed + episode)
        obs = nxt
    env.close()
    timeouts[-1] = timeouts[-1] or not terminals[-1]
    return {"observations": obs_rows, "actions": actions, "rewards": rewards, "terminals": terminals,
            "timeouts": timeouts, "next_observations": next_rows}


def reference_returns(episodes: int = 20) -> dict:
    """D4RL's normalisation references: uniform random actions measured here, the expert's taken from D4RL."""
    from .behaviour_policy import evaluate_return

    rng = np.random.default_rng(0)
    random = evaluate_return(lambda o: rng.uniform(-1, 1, ACTION_DIM).astype(np.float32), _make_raw_env, episodes,
                             REFERENCE_SEED_OFFSET)
    return {"random": float(np.mean(random)), "expert": D4RL_EXPERT_RETURN, "episodes": episodes,
            "expert_source": "D4RL's hopper reference (its SAC expert, Hopper-v3); not measured here"}
