"""A planar point mass that must reach a goal: a small, exact task for fast tests.

Observation {"state": [x, y, goal_x, goal_y]}; action a desired velocity in [-1, 1]^2, applied for `dt` seconds.
Success is coming within `tolerance` of the goal. The scripted expert drives straight at the goal, saturating.
With `image=True` it also observes a top-down frame (H, W, 3 uint8): the effector a red blob and the goal a green
one on grey, each a Gaussian of `BLOB_SIGMA` world units, so an effector's pixel position can be read back from a
frame (its red centroid) to sub-pixel accuracy.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

BLOB_SIGMA = 0.07  # world units; the arena spans [-1, 1]
POSE_DIMS = [0, 1]  # the effector's position in the state


def draw_scene(effector: np.ndarray, goal: np.ndarray, size: int) -> np.ndarray:
    """A top-down frame (size, size, 3) uint8; image row 0 is y = +1, column 0 is x = -1."""
    centres = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    xs, ys = centres[None, :], -centres[:, None]

    def blob(p):
        return np.exp(-((xs - p[0]) ** 2 + (ys - p[1]) ** 2) / (2 * BLOB_SIGMA**2))

    frame = np.full((size, size, 3), 0.4)
    red, green = blob(effector), blob(goal)
    frame[..., 0] += 0.6 * red
    frame[..., 1] += 0.6 * green - 0.4 * red
    frame[..., 2] -= 0.4 * (red + green)
    return (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)


def effector_pixel(frame: np.ndarray) -> np.ndarray:
    """The effector's (x, y) in world units, read from a frame: the centroid of its red excess over the grey."""
    f = np.asarray(frame, dtype=np.float64) / 255.0
    weight = np.clip(f[..., 0] - 0.4, 0.0, None)
    size = f.shape[0]
    centres = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    total = weight.sum() + 1e-12
    return np.array([(weight * centres[None, :]).sum() / total, (weight * -centres[:, None]).sum() / total])


class PointMassReach(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, max_episode_steps: int = 40, dt: float = 0.1, tolerance: float = 0.05, image: bool = False,
                 image_size: int = 32):
        spaces = {"state": gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)}
        if image:
            spaces["image"] = gym.spaces.Box(0, 255, shape=(image_size, image_size, 3), dtype=np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self.image, self.image_size = image, image_size
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.max_episode_steps, self.dt, self.tolerance = max_episode_steps, dt, tolerance
        self._pos = np.zeros(2)
        self._goal = np.zeros(2)
        self._t = 0

    def _obs(self) -> dict[str, np.ndarray]:
        obs = {"state": np.concatenate([self._pos, self._goal]).astype(np.float32)}
        if self.image:
            obs["image"] = draw_scene(self._pos, self._goal, self.image_size)
        return obs

    def render_frame(self, size: int = 240) -> np.ndarray:
        return draw_scene(self._pos, self._goal, size)

    def distance(self) -> float:
        return float(np.linalg.norm(self._pos - self._goal))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._pos = self.np_random.uniform(-0.8, 0.8, size=2)
        self._goal = self.np_random.uniform(-0.8, 0.8, size=2)
        self._t = 0
        return self._obs(), {"success": False}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(2)
        self._pos = np.clip(self._pos + self.dt * np.clip(action, -1.0, 1.0), -1.0, 1.0)
        self._t += 1
        success = self.distance() < self.tolerance
        return self._obs(), -self.distance(), False, self._t >= self.max_episode_steps, {"success": success}

    def expert(self, gain: float = 4.0):
        return lambda state: np.clip(gain * (state[2:4] - state[0:2]), -1.0, 1.0).astype(np.float32)
