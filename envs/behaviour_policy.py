"""The behaviour policy D4RL's locomotion datasets come from: an RL agent (stable-baselines3) stopped early.

`train_behaviour(...)` trains PPO (default: on this 2-core CPU it reaches a medium return in minutes) or SAC (what
D4RL used; tens of minutes here) on a gymnasium env until its deterministic return, averaged over a few evaluation
episodes, reaches `target_return` (D4RL's "medium": about a third of the expert's), and records every transition it
took while training (D4RL's "medium-replay"). Nothing saved is pickled: the policy's weights as safetensors and
its settings as JSON (`policy.safetensors`, `behaviour.json`), the training stream in D4RL's HDF5 layout
(`replay.hdf5`). stable-baselines3 is the `behaviour` extra; only training and rolling out the policy need it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

POLICY_FILE, META_FILE, REPLAY_FILE = "policy.safetensors", "behaviour.json", "replay.hdf5"
ALGORITHMS = ("ppo", "sac")


@dataclass
class BehaviourSettings:
    target_return: float  # stop once the deterministic evaluation return reaches this
    algorithm: str = "ppo"  # ppo | sac
    max_steps: int = 1_000_000  # give up here (the policy and stream are kept, `reached` False)
    eval_every: int = 10_000
    eval_episodes: int = 5
    net_arch: list[int] | None = None  # None: the algorithm's default (PPO 64x64, SAC 256x256)
    learning_starts: int = 10_000  # SAC: uniform random actions first, as stable-baselines3's zoo trains Hopper
    seed: int = 0

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"behaviour algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")


def _require_sb3():
    try:
        import stable_baselines3
    except ImportError:
        raise ImportError("training or rolling out the behaviour policy needs stable-baselines3: "
                          "pip install -e .[behaviour]") from None
    return stable_baselines3


def _agent(env, settings: BehaviourSettings, buffer_size: int = 1):
    sb3 = _require_sb3()
    kwargs = {"policy_kwargs": {"net_arch": list(settings.net_arch)}} if settings.net_arch else {}
    if settings.algorithm == "sac":
        return sb3.SAC("MlpPolicy", env, seed=settings.seed, learning_starts=settings.learning_starts,
                       buffer_size=buffer_size, verbose=0, device="cpu", **kwargs)
    return sb3.PPO("MlpPolicy", env, seed=settings.seed, verbose=0, device="cpu", **kwargs)


def evaluate_return(act, make_env, episodes: int, seed: int) -> list[float]:
    """Undiscounted returns of `act(obs) -> action` over `episodes` episodes on seeds seed, seed + 1, ..."""
    env = make_env()
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


class _Stream:
    """Every transition the agent took while training, in order (one environment)."""

    def __init__(self):
        self.rows: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts",
                                                      "next_observations")}

    def add(self, obs, action, reward, done: bool, info: dict, new_obs) -> None:
        truncated = bool(info.get("TimeLimit.truncated", False))
        self.rows["observations"].append(np.asarray(obs, np.float32))
        self.rows["actions"].append(np.asarray(action, np.float32))
        self.rows["rewards"].append(float(reward))
        self.rows["terminals"].append(done and not truncated)
        self.rows["timeouts"].append(done and truncated)
        # at an episode's end the vectorised env has already reset: the real next observation is in the info
        self.rows["next_observations"].append(np.asarray(info["terminal_observation"] if done else new_obs,
                                                         np.float32))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {k: np.asarray(v) for k, v in self.rows.items()}
        out["rewards"] = out["rewards"].astype(np.float32)
        out["terminals"], out["timeouts"] = out["terminals"].astype(bool), out["timeouts"].astype(bool)
        if len(out["rewards"]):  # the episode training stopped in ends there
            out["timeouts"][-1] = out["timeouts"][-1] or not out["terminals"][-1]
        return out


def train_behaviour(make_env, settings: BehaviourSettings, out: str | Path, progress: bool = True) -> dict:
    """Train on `make_env()` until `settings.target_return`; save the policy, its record and the training stream in
    `out`. Returns the record (also `out/behaviour.json`)."""
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm import tqdm

    _require_sb3()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = make_env()
    agent = _agent(env, settings, buffer_size=settings.max_steps)
    stream, history = _Stream(), []
    bar = tqdm(total=settings.max_steps, desc=f"behaviour policy ({settings.algorithm.upper()})",
               disable=not progress, dynamic_ncols=True, mininterval=1.0)

    class RecordAndStop(BaseCallback):
        def _on_step(self) -> bool:
            loc = self.locals
            action = loc["clipped_actions"] if "clipped_actions" in loc else loc["actions"]
            stream.add(agent._last_obs[0], action[0], loc["rewards"][0], bool(loc["dones"][0]), loc["infos"][0],
                       loc["new_obs"][0])
            bar.update(1)
            if self.num_timesteps % settings.eval_every:
                return True
            returns = evaluate_return(lambda o: agent.predict(o, deterministic=True)[0], make_env,
                                      settings.eval_episodes, seed=10_000 + self.num_timesteps)
            history.append({"step": self.num_timesteps, "return": float(np.mean(returns))})
            bar.set_postfix(eval_return=f"{history[-1]['return']:.0f}")
            return history[-1]["return"] < settings.target_return

    t0 = time.perf_counter()
    agent.learn(total_timesteps=settings.max_steps, callback=RecordAndStop())
    seconds = time.perf_counter() - t0
    bar.close()
    from safetensors.torch import save_file

    from .datasets.d4rl import write_d4rl

    save_file({k: v.detach().contiguous() for k, v in agent.policy.state_dict().items()}, str(out / POLICY_FILE))
    arrays = stream.arrays()
    write_d4rl(out / REPLAY_FILE, arrays)
    record = {"algorithm": f"{settings.algorithm.upper()} (stable-baselines3)",
              "env": env.spec.id if env.spec else str(env), "settings": asdict(settings),
              "steps": int(agent.num_timesteps), "seconds": seconds, "evaluations": history,
              "reached": bool(history and history[-1]["return"] >= settings.target_return),
              "final_return": history[-1]["return"] if history else None,
              "replay_transitions": int(len(arrays["rewards"]))}
    (out / META_FILE).write_text(json.dumps(record, indent=1))
    env.close()
    return record


class BehaviourPolicy:
    """The saved policy as `obs -> action` (stochastic by default, as D4RL's datasets were sampled)."""

    def __init__(self, folder: str | Path, make_env, deterministic: bool = False, seed: int = 0):
        import torch
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path, weights = folder / META_FILE, folder / POLICY_FILE
        if not (meta_path.is_file() and weights.is_file()):
            raise FileNotFoundError(f"{folder} holds no behaviour policy ({META_FILE} and {POLICY_FILE}); train one "
                                    f"with `rtdp collect --task mujoco/hopper-medium --behaviour {folder}`")
        self.record = json.loads(meta_path.read_text())
        settings = BehaviourSettings(**self.record["settings"])
        env = make_env()
        self.model = _agent(env, settings)
        env.close()
        try:
            self.model.policy.load_state_dict(load_file(str(weights)))
        except RuntimeError as e:
            raise ValueError(f"{weights} does not fit a {settings.algorithm} policy {settings.net_arch}: {e}") from None
        self.deterministic = deterministic
        torch.manual_seed(seed)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.model.predict(obs, deterministic=self.deterministic)[0].astype(np.float32)
