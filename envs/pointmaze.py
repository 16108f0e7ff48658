"""PointMaze (gymnasium-robotics) as D4RL's maze2d tasks were made: `pointmaze/umaze|medium|large`.

The observation is `state` = (x, y, vx, vy, goal x, goal y): the planner sees where it must go, so one dataset
serves every goal. The reward is gymnasium-robotics' sparse one (1 within 0.45 m of the goal). Evaluation runs the
whole episode (300, 600 or 800 steps, as D4RL's maze2d) on a goal that stays put, so the return counts the steps
spent at the goal; `success` is reaching it at all.

The expert is a waypoint controller: the shortest path over the maze's grid (breadth-first search on
`maze.maze_map`) to the goal's cell, and a PD controller to the next cell's centre (the goal itself in the goal's
cell). Datasets are one continuing episode whose goal is resampled when reached, cut into one episode per goal.
"""

from __future__ import annotations

import datetime
from collections import deque

import gymnasium as gym
import numpy as np

MAZES = {"umaze": "PointMaze_UMaze-v3", "medium": "PointMaze_Medium-v3", "large": "PointMaze_Large-v3"}
STATE_DIM = 6  # x, y, vx, vy, goal x, goal y
GOAL_DIM = 2
GOAL_RADIUS = 0.45  # gymnasium-robotics' success distance


def _register() -> None:
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)


class WaypointExpert:
    """Shortest path over the maze grid, PD to the next cell. `noise`: the std of Gaussian action noise."""

    def __init__(self, maze, kp: float = 10.0, kd: float = 1.0, noise: float = 0.0, seed: int = 0):
        self.maze, self.kp, self.kd, self.noise = maze, kp, kd, noise
        self.grid = np.asarray(maze.maze_map)
        self.rng = np.random.default_rng(seed)

    def cell(self, xy: np.ndarray) -> tuple[int, int]:
        row, col = self.maze.cell_xy_to_rowcol(np.asarray(xy, dtype=np.float64))
        return int(row), int(col)

    def next_cell(self, start: tuple[int, int], goal: tuple[int, int]) -> tuple[int, int]:
        """The first cell after `start` on a shortest path to `goal` (breadth-first search from the goal)."""
        if start == goal:
            return goal
        parent = {goal: goal}
        queue = deque([goal])
        while queue:
            r, c = queue.popleft()
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                n = (r + dr, c + dc)
                if n in parent or not (0 <= n[0] < self.grid.shape[0] and 0 <= n[1] < self.grid.shape[1]):
                    continue
                if self.grid[n] == 1:
                    continue
                parent[n] = (r, c)
                if n == start:
                    return parent[n]
                queue.append(n)
        return goal  # walled off (cannot happen in these mazes): head straight for it

    def __call__(self, state: np.ndarray) -> np.ndarray:
        pos, vel, goal = state[:2], state[2:4], state[4:6]
        here, there = self.cell(pos), self.cell(goal)
        target = goal if here == there else np.asarray(self.maze.cell_rowcol_to_xy(np.array(self.next_cell(here,
                                                                                                           there))))
        action = self.kp * (target - pos) - self.kd * vel
        if self.noise > 0:
            action = action + self.rng.normal(0.0, self.noise, size=2)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


class PointMazeTask(gym.Env):
    """A PointMaze maze as an rtdp task: dict observation with `state`, `info["success"]` when at the goal.

    `continuing=True` resamples the goal when reached (data collection); evaluation keeps it fixed and runs to
    the step limit (`stops_at_success = False`), as D4RL's maze2d evaluation does."""

    stops_at_success = False

    def __init__(self, name: str, max_episode_steps: int | None = None, continuing: bool = False):
        if name not in MAZES:
            raise ValueError(f"unknown maze {name!r}; known: {sorted(MAZES)}")
        _register()
        self.name = name
        self.env = gym.make(MAZES[name], continuing_task=True, reset_target=continuing,
                            max_episode_steps=max_episode_steps)
        self.max_episode_steps = self.env.spec.max_episode_steps
        self.observation_space = gym.spaces.Dict(
            {"state": gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32)})
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    @property
    def maze(self):
        return self.env.unwrapped.maze

    def _obs(self, raw: dict) -> dict:
        # The goal now in force: gymnasium-robotics returns the goal from before a continuing task resampled it.
        goal = self.env.unwrapped.goal
        return {"state": np.concatenate([raw["observation"], goal]).astype(np.float32)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        raw, info = self.env.reset(seed=seed, options=options)
        return self._obs(raw), info

    def step(self, action):
        action = np.asarray(action, dtype=np.float32)
        raw, reward, terminated, truncated, info = self.env.step(action)
        info = dict(info)
        info["success"] = bool(info.get("success", reward > 0))
        return self._obs(raw), float(reward), terminated, truncated, info

    def expert(self, noise: float = 0.0, seed: int = 0) -> WaypointExpert:
        return WaypointExpert(self.maze, noise=noise, seed=seed)

    def close(self) -> None:
        self.env.close()


REFERENCE_SEED_OFFSET = 300_000  # reference returns run on seeds neither demos (0...) nor evaluation (100000...) use


def collect_maze(task: str, steps: int, seed: int = 0, noise: float = 0.3, progress: bool = True):
    """`steps` of one continuing episode driven by the noisy waypoint expert, its goal resampled when reached, cut
    into one episode per goal (the goal's last step flagged as a timeout, D4RL-style). Fields `obs` (state),
    `action`, `reward`, `terminal` (never set: a maze does not end)."""
    from tqdm import tqdm

    from .datasets import ReplayBuffer

    name = maze_name(task)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    env = PointMazeTask(name, max_episode_steps=steps, continuing=True)
    expert = env.expert(noise=noise, seed=seed)
    obs, _ = env.reset(seed=seed)
    fields = {"obs": np.empty((steps, STATE_DIM), np.float32), "action": np.empty((steps, 2), np.float32),
              "reward": np.empty(steps, np.float32)}
    ends = []
    for i in tqdm(range(steps), desc=f"collect {task}", disable=not progress, dynamic_ncols=True, mininterval=1.0):
        action = expert(obs["state"])
        fields["obs"][i], fields["action"][i] = obs["state"], action
        obs, reward, _, _, _ = env.step(action)
        fields["reward"][i] = reward
        if not np.array_equal(obs["state"][4:], fields["obs"][i, 4:]):  # reached: a new goal from the next step
            ends.append(i + 1)
    env.close()
    if not ends or ends[-1] != steps:
        ends.append(steps)
    fields["terminal"] = np.zeros(steps, bool)
    refs = reference_returns(task)
    attrs = {"task": task, "steps": steps, "seed": seed, "action_noise": noise, "goals_reached": len(ends) - 1,
             "reference_returns": refs, "expert": "waypoint (BFS over maze_map) + PD, Gaussian action noise",
             "created": datetime.datetime.now().isoformat(timespec="seconds")}
    return ReplayBuffer(fields, ends, attrs)


def reference_returns(task: str, episodes: int = 20) -> dict:
    """D4RL's normalisation references on the evaluation setting (fixed goal, the whole episode): the mean return
    of uniform random actions and of the noise-free expert."""
    env = PointMazeTask(maze_name(task))
    expert = env.expert()
    rng = np.random.default_rng(0)
    out = {}
    for who, act in (("random", lambda s: rng.uniform(-1, 1, 2).astype(np.float32)), ("expert", expert)):
        returns = []
        for i in range(episodes):
            obs, _ = env.reset(seed=REFERENCE_SEED_OFFSET + i)
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(act(obs["state"]))
                total += reward
                done = terminated or truncated
            returns.append(total)
        out[who] = float(np.mean(returns))
    env.close()
    out["episodes"] = episodes
    return out


def maze_name(task: str) -> str:
    family, _, name = task.partition("/")
    if family != "pointmaze" or name not in MAZES:
        raise ValueError(f"{task!r} is not a maze task; known: {[f'pointmaze/{n}' for n in MAZES]}")
    return name
