"""A point mass that passes a round obstacle on the left or the right, then closes a gripper at the goal.

The task is bimodal by construction: start and goal sit on either side of the obstacle, nearly on its axis, and
the scripted expert picks a side at random each episode. A policy that re-decides its route at every step can
dither between the two; one that keeps its mode goes around cleanly. The gripper gives a discrete action that
must flip at a known moment (on arriving at the goal).

Observation {"state": [x, y, goal_x, goal_y, grip]}; action [vx, vy, grip] in [-1, 1]^3. The velocity is
applied for `dt` seconds and the mass cannot enter the obstacle; the gripper closes for grip > 0. Success is
being within `tolerance` of the goal with the gripper closed.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

OBSTACLE_CENTRE = np.array([0.0, 0.0])
OBSTACLE_RADIUS = 0.3
GRIPPER_DIM = 2
CLOSE_DISTANCE = 0.1  # the expert closes the gripper once this near the goal


class PointMassObstacle(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, max_episode_steps: int = 50, dt: float = 0.1, tolerance: float = 0.1):
        self.observation_space = gym.spaces.Dict(
            {"state": gym.spaces.Box(-1.0, 1.0, shape=(5,), dtype=np.float32)})
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)
        self.max_episode_steps, self.dt, self.tolerance = max_episode_steps, dt, tolerance
        self._pos = np.zeros(2)
        self._goal = np.zeros(2)
        self._grip = -1.0
        self._side = 1.0
        self._t = 0

    def _obs(self) -> dict[str, np.ndarray]:
        return {"state": np.concatenate([self._pos, self._goal, [self._grip]]).astype(np.float32)}

    def distance(self) -> float:
        return float(np.linalg.norm(self._pos - self._goal))

    @property
    def position(self) -> np.ndarray:
        return self._pos.copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        jitter = self.np_random.uniform(-0.05, 0.05, size=2)
        self._pos = np.array([jitter[0], -0.8])
        self._goal = np.array([jitter[1], 0.8])
        self._grip = -1.0
        self._side = float(self.np_random.choice([-1.0, 1.0]))
        self._t = 0
        return self._obs(), {"success": False}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(3), -1.0, 1.0)
        pos = np.clip(self._pos + self.dt * action[:2], -1.0, 1.0)
        offset = pos - OBSTACLE_CENTRE
        dist = float(np.linalg.norm(offset))
        if dist < OBSTACLE_RADIUS:  # slide along the obstacle's rim instead of entering it
            pos = OBSTACLE_CENTRE + offset / max(dist, 1e-9) * OBSTACLE_RADIUS
        self._pos = pos
        self._grip = 1.0 if action[GRIPPER_DIM] > 0 else -1.0
        self._t += 1
        success = self.distance() < self.tolerance and self._grip > 0
        return self._obs(), -self.distance(), False, self._t >= self.max_episode_steps, {"success": success}

    def expert(self, gain: float = 5.0):
        """Head for a waypoint beside the obstacle on this episode's side, then for the goal; close on arrival."""
        waypoint_x = OBSTACLE_RADIUS + 0.25

        def act(state: np.ndarray) -> np.ndarray:
            pos, goal = state[0:2], state[2:4]
            target = goal if pos[1] > OBSTACLE_CENTRE[1] - 0.05 else np.array([self._side * waypoint_x, 0.0])
            velocity = np.clip(gain * (target - pos), -1.0, 1.0)
            grip = 1.0 if np.linalg.norm(goal - pos) < CLOSE_DISTANCE else -1.0
            return np.array([*velocity, grip], dtype=np.float32)

        return act

