"""The task registry: `make_env("metaworld/push-v3")` and friends.

Every manipulation task is a gymnasium env whose observation is a dict with `state` (float32 vector) and, for
image tasks, `image` (H, W, 3 uint8); `info["success"]` flags success; `max_episode_steps` is its episode limit;
`expert()` returns its scripted policy (state -> action). Driving tasks (`highway/<scenario>`, envs/driving.py)
observe a scene (`ego`, `agents`, `bev`) and take a plan; their expert drives the simulator itself
(envs/driving_expert.py). Maze tasks (`pointmaze/<maze>`, envs/pointmaze.py) run to their step limit
(`stops_at_success = False`): their return counts the steps spent at the goal, as D4RL scores it. Hopper tasks
(`mujoco/hopper-medium|hopper-medium-replay`, envs/hopper.py) likewise run to the step limit or the fall.
"""

from __future__ import annotations

import gymnasium as gym


def known_tasks() -> list[str]:
    from .driving import SCENARIOS
    from .hopper import TASK_NAMES as HOPPER_TASKS
    from .metaworld_env import metaworld_task_names
    from .pointmaze import MAZES

    return (["point_mass/reach", "point_mass/obstacle"] + [f"metaworld/{n}" for n in metaworld_task_names()]
            + [f"highway/{n}" for n in SCENARIOS] + [f"pointmaze/{n}" for n in MAZES]
            + [f"mujoco/{n}" for n in HOPPER_TASKS])


def discrete_action_dims(task: str | None) -> list[int]:
    """The action dimensions that are binary commands (a gripper) rather than continuous targets."""
    if task and task.startswith("metaworld/"):
        from .metaworld_env import GRIPPER_DIM

        return [GRIPPER_DIM]
    if task == "point_mass/obstacle":
        from .obstacle import GRIPPER_DIM

        return [GRIPPER_DIM]
    return []


def pose_dims(task: str) -> list[int]:
    """The state dims that are the robot's own pose (an effector's position, a gripper's opening): what a visual
    policy that sees the scene only through its camera is given besides the image."""
    if task.startswith("metaworld/"):
        from .metaworld_env import POSE_DIMS

        return list(POSE_DIMS)
    if task == "point_mass/reach":
        from .point_mass import POSE_DIMS

        return list(POSE_DIMS)
    raise ValueError(f"{task} names no pose in its state; tasks with one: metaworld/*, point_mass/reach")


def make_env(task: str, image: bool = False, image_size: int = 96, max_episode_steps: int | None = None,
             scene: dict | None = None) -> gym.Env:
    """`scene`: a driving task's observation layout (envs.driving.SceneConfig fields; a driving checkpoint records
    the one it was trained on), the default where None."""
    family, _, name = task.partition("/")
    if scene is not None and family != "highway":
        raise ValueError(f"{task} has no scene layout to set; only highway/ tasks do")
    if family == "metaworld":
        from .metaworld_env import EPISODE_LIMIT, MetaWorldTask, metaworld_task_names

        if name in metaworld_task_names():
            return MetaWorldTask(name, image=image, image_size=image_size,
                                 max_episode_steps=max_episode_steps or EPISODE_LIMIT)
    elif family == "highway":
        if image:
            raise ValueError(f"{task} observes a bird's-eye raster and agent tokens, not camera images")
        from .driving import SCENARIOS, DrivingTask, SceneConfig

        if name in SCENARIOS:
            layout = SceneConfig.from_dict(scene) if scene is not None else None
            return DrivingTask(name, layout, max_episode_steps=max_episode_steps)
    elif family == "pointmaze":
        if image:
            raise ValueError(f"{task} observes a state vector (position, velocity, goal), not camera images")
        from .pointmaze import MAZES, PointMazeTask

        if name in MAZES:
            return PointMazeTask(name, max_episode_steps=max_episode_steps)
    elif family == "mujoco":
        from .hopper import TASK_NAMES, HopperTask

        if name in TASK_NAMES:
            if image:
                raise ValueError(f"{task} observes a state vector (joint positions and velocities), not camera "
                                 f"images")
            return HopperTask(max_episode_steps=max_episode_steps)
    elif task == "point_mass/reach":
        from .point_mass import PointMassReach

        return PointMassReach(**({"max_episode_steps": max_episode_steps} if max_episode_steps else {}),
                              image=image, image_size=image_size)
    elif task == "point_mass/obstacle":
        if image:
            raise ValueError("point_mass/obstacle has no image observation")
        from .obstacle import PointMassObstacle

        return PointMassObstacle(**({"max_episode_steps": max_episode_steps} if max_episode_steps else {}))
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(known_tasks())}")
