"""Metaworld 3.x tasks behind rtdp's task interface.

Every task observes {"state": (39,) float32} and, with images on, {"image": (H, W, 3) uint8} rendered offscreen
by MuJoCo (`MUJOCO_GL=egl`) with shadows and reflections off. The goal is observable (metaworld's
"goal_observable" variants). `reset(seed=s)` draws the task variation (object and goal positions) from `s`, so
demonstrations and evaluation use disjoint seeds and the same seed replays the same episode.
"""

from __future__ import annotations

import os
import warnings

import gymnasium as gym
import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")
# Metaworld's scripted policies warn on every call that their gains exceed the action bounds; the task clips.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)

STATE_DIM = 39
EPISODE_LIMIT = 500  # metaworld's max_path_length
GRIPPER_DIM = 3  # actions are [dx, dy, dz, grip]; grip > 0 closes
POSE_DIMS = (0, 1, 2, 3)  # the state's hand position (x, y, z) and gripper opening
# The hand's mocap target moves by action * ACTION_SCALE metres a step (metaworld's SawyerXYZEnv.action_scale).
ACTION_SCALE = 1.0 / 100


def _metaworld():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import metaworld.env_dict as env_dict
        from metaworld.policies import ENV_POLICY_MAP
    return env_dict.ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE, ENV_POLICY_MAP


def metaworld_task_names() -> list[str]:
    _, policies = _metaworld()
    return sorted(policies)


class MetaWorldTask(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, name: str, image: bool = False, image_size: int = 96, camera: str = "corner2",
                 max_episode_steps: int = EPISODE_LIMIT):
        envs, policies = _metaworld()
        if name not in policies:
            raise ValueError(f"unknown metaworld task {name!r}; known: {sorted(policies)}")
        if not 1 <= max_episode_steps <= EPISODE_LIMIT:
            raise ValueError(f"max_episode_steps must be in [1, {EPISODE_LIMIT}], got {max_episode_steps}")
        self.name = name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._env = envs[f"{name}-goal-observable"]()
        # Metaworld's documented switch for a new variation on every reset; seeded_rand_vec makes it follow
        # the env's seeded generator rather than numpy's global one.
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True
        self._expert_cls = policies[name]
        self.max_episode_steps = max_episode_steps
        self.image, self.image_size, self.camera = image, image_size, camera
        spaces = {"state": gym.spaces.Box(-np.inf, np.inf, shape=(STATE_DIM,), dtype=np.float32)}
        if image:
            spaces["image"] = gym.spaces.Box(0, 255, shape=(image_size, image_size, 3), dtype=np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
        self._renderers: dict[int, object] = {}
        self._t = 0

    def _render(self, size: int) -> np.ndarray:
        import mujoco

        if size not in self._renderers:
            self._renderers[size] = mujoco.Renderer(self._env.model, size, size)
        r = self._renderers[size]
        r.update_scene(self._env.data, camera=self.camera)
        r.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        r.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        return np.ascontiguousarray(r.render()[::-1])  # metaworld's cameras render upside down

    def render_frame(self, size: int = 240) -> np.ndarray:
        return self._render(size)

    def _obs(self, state: np.ndarray) -> dict[str, np.ndarray]:
        obs = {"state": np.asarray(state, dtype=np.float32)}
        if self.image:
            obs["image"] = self._render(self.image_size)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(seed)
        state, info = self._env.reset()
        self._t = 0
        return self._obs(state), {"success": False}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(4)
        state, reward, _, _, info = self._env.step(np.clip(action, -1.0, 1.0))
        self._t += 1
        success = bool(info.get("success", 0.0))
        return self._obs(state), float(reward), False, self._t >= self.max_episode_steps, {"success": success}

    def expert(self):
        """Metaworld's scripted policy for this task: state (39,) -> action (4,)."""
        policy = self._expert_cls()
        return lambda state: np.asarray(policy.get_action(np.asarray(state, dtype=np.float64)), dtype=np.float32)

    def close(self):
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()
