"""The behaviour policy D4RL's locomotion datasets come from: SAC (stable-baselines3), stopped early at a return.

`train_behaviour(...)` trains SAC on a gymnasium env until its deterministic return, averaged over a few
evaluation episodes, reaches `target_return` (D4RL's "medium": about a third of the expert's), and keeps every
transition it saw (D4RL's "medium-replay"). What is saved is never pickled: the actor's weights as safetensors and
its architecture as JSON (`actor.safetensors`, `behaviour.json`), and the training stream in D4RL's HDF5 layout
(`replay.hdf5`). stable-baselines3 is the `behaviour` extra; only training and rolling out the policy need it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ACTOR_FILE, META_FILE, REPLAY_FILE = "actor.safetensors", "behaviour.json", "replay.hdf5"


@dataclass
class BehaviourSettings:
    target_return: float  # stop once the deterministic evaluation return reaches this
    max_steps: int = 300_000  # give up here (the policy and stream are kept, `reached` False)
    eval_every: int = 5_000
    eval_episodes: int = 5
    learning_starts: int = 10_000  # uniform random actions first, as stable-baselines3's zoo trains Hopper
    net_arch: list[int] = field(default_factory=lambda: [256, 256])
    seed: int = 0


def _require_sb3():
    try:
        import stable_baselines3
    except ImportError:
        raise ImportError("training or rolling out the behaviour policy needs stable-baselines3: "
                          "pip install -e .[behaviour]") from None
    return stable_baselines3


def _sac(env, settings: BehaviourSettings, buffer_size: int):
    sb3 = _require_sb3()
    return sb3.SAC("MlpPolicy", env, seed=settings.seed, learning_starts=settings.learning_starts,
                   buffer_size=buffer_size, policy_kwargs={"net_arch": list(settings.net_arch)}, verbose=0,
                   device="cpu")


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


def train_behaviour(make_env, settings: BehaviourSettings, out: str | Path, progress: bool = True) -> dict:
    """Train SAC on `make_env()` until `settings.target_return`; save the actor, its record and the training stream
    in `out`. Returns the record (also `out/behaviour.json`)."""
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm import tqdm

    _require_sb3()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = make_env()
    model = _sac(env, settings, buffer_size=settings.max_steps)
    history: list[dict] = []
    bar = tqdm(total=settings.max_steps, desc="behaviour policy (SAC)", disable=not progress, dynamic_ncols=True,
               mininterval=1.0)

    class StopAtReturn(BaseCallback):
        def _on_step(self) -> bool:
            bar.update(1)
            if self.num_timesteps % settings.eval_every or self.num_timesteps < settings.learning_starts:
                return True
            returns = evaluate_return(lambda o: model.predict(o, deterministic=True)[0], make_env,
                                      settings.eval_episodes, seed=10_000 + self.num_timesteps)
            history.append({"step": self.num_timesteps, "return": float(np.mean(returns))})
            bar.set_postfix(eval_return=f"{history[-1]['return']:.0f}")
            return history[-1]["return"] < settings.target_return

    t0 = time.perf_counter()
    model.learn(total_timesteps=settings.max_steps, callback=StopAtReturn())
    seconds = time.perf_counter() - t0
    bar.close()
    save_actor(model, out / ACTOR_FILE)
    stream = replay_stream(model)
    from .datasets.d4rl import write_d4rl

    write_d4rl(out / REPLAY_FILE, stream)
    record = {"algorithm": "SAC (stable-baselines3)", "env": env.spec.id if env.spec else str(env),
              "settings": asdict(settings), "steps": int(model.num_timesteps), "seconds": seconds,
              "evaluations": history, "reached": bool(history and history[-1]["return"] >= settings.target_return),
              "final_return": history[-1]["return"] if history else None,
              "replay_transitions": int(len(stream["rewards"]))}
    (out / META_FILE).write_text(json.dumps(record, indent=1))
    env.close()
    return record


def save_actor(model, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.actor.state_dict().items()}
    save_file(state, str(path))


def replay_stream(model) -> dict[str, np.ndarray]:
    """stable-baselines3's replay buffer, in order, as D4RL arrays. Its `dones` hold truncations too, marked apart in
    `timeouts`; the episode cut off by the end of training ends in a timeout."""
    rb = model.replay_buffer
    n = rb.buffer_size if rb.full else rb.pos
    done = rb.dones[:n, 0].astype(bool)
    timeout = rb.timeouts[:n, 0].astype(bool) if rb.handle_timeout_termination else np.zeros(n, bool)
    timeouts = done & timeout
    if n:
        timeouts[-1] = timeouts[-1] or not done[-1]
    return {"observations": rb.observations[:n, 0].astype(np.float32),
            "actions": rb.actions[:n, 0].astype(np.float32),
            "rewards": rb.rewards[:n, 0].astype(np.float32),
            "terminals": done & ~timeout, "timeouts": timeouts,
            "next_observations": rb.next_observations[:n, 0].astype(np.float32)}


class BehaviourPolicy:
    """The saved actor as `obs -> action` (stochastic by default, as D4RL's datasets were sampled)."""

    def __init__(self, folder: str | Path, make_env, deterministic: bool = False, seed: int = 0):
        import torch
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path, actor_path = folder / META_FILE, folder / ACTOR_FILE
        if not (meta_path.is_file() and actor_path.is_file()):
            raise FileNotFoundError(f"{folder} holds no behaviour policy ({META_FILE} and {ACTOR_FILE}); train one "
                                    f"with `rtdp collect --task mujoco/hopper-medium --behaviour {folder}`")
        self.record = json.loads(meta_path.read_text())
        settings = BehaviourSettings(**self.record["settings"])
        env = make_env()
        self.model = _sac(env, settings, buffer_size=1)
        env.close()
        state = load_file(str(actor_path))
        try:
            self.model.actor.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{actor_path} does not fit the actor {settings.net_arch}: {e}") from None
        self.deterministic = deterministic
        torch.manual_seed(seed)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.model.predict(obs, deterministic=self.deterministic)[0].astype(np.float32)
