"""A checkpoint's task: which one it runs on, the environment for it, checked against the checkpoint's shapes."""

from __future__ import annotations

from envs.multitask import ConcatenatedState, MultiTaskObservation
from envs.tasks import make_env


def resolve_task(checkpoint: str, run_cfg, task: str | None = None) -> str:
    tasks = trained_tasks(run_cfg)
    task = task or run_cfg.data.task or (tasks[0] if tasks else None)
    if not task:
        raise ValueError(f"checkpoint {checkpoint} does not record its task: pass --task")
    return task


def check_scene(planner_cfg, env, checkpoint: str, task: str) -> None:
    """A driving planner runs only on the scene layout it was trained on."""
    trained, here = dict(planner_cfg.layout.scene), env.scene.to_dict()
    if trained != here:
        diff = {k: (trained.get(k), here.get(k)) for k in sorted(set(trained) | set(here))
                if trained.get(k) != here.get(k)}
        raise ValueError(f"checkpoint {checkpoint} was trained on another scene layout than task {task} gives "
                         f"(setting: checkpoint, task): {diff}")


def check_compatible(policy_cfg, env, checkpoint: str, task: str) -> None:
    state_dim = env.observation_space["state"].shape[0]
    action_dim = env.action_space.shape[0]
    want_image = getattr(policy_cfg, "image_shape", None) is not None
    has_image = "image" in env.observation_space.spaces
    if (policy_cfg.state_dim, policy_cfg.action_dim, want_image) != (state_dim, action_dim, has_image):
        raise ValueError(
            f"checkpoint {checkpoint} expects a {policy_cfg.state_dim}-d state, a {policy_cfg.action_dim}-d action"
            f"{' and images' if want_image else ''}; task {task} gives a {state_dim}-d state, a {action_dim}-d "
            f"action{' and images' if has_image else ''}"
        )


def trained_tasks(run_cfg) -> list[str]:
    """The tasks of a multi-task checkpoint, in the order of its task index (PAD's always; a Diffusion Policy's
    when its dataset held several); empty for a single-task one."""
    return list(getattr(run_cfg.policy, "tasks", None) or getattr(run_cfg.data, "tasks", None) or []) \
        if hasattr(run_cfg, "policy") else []


def _task_index(checkpoint: str, tasks: list[str], task: str) -> int:
    if task not in tasks:
        raise ValueError(f"checkpoint {checkpoint} was trained on {', '.join(tasks)}; it knows no {task}")
    return tasks.index(task)


def open_env(checkpoint: str, run_cfg, task: str, max_episode_steps: int | None = None):
    """The task's environment, rendering images at the checkpoint's size when it observes them, and observed as
    a multi-task checkpoint sees it (pose, task index) when it was trained on several tasks or is a PAD."""
    tasks = trained_tasks(run_cfg)
    if run_cfg.kind == "pad":
        p = run_cfg.policy
        env = make_env(task, image=True, image_size=p.image_shape[0], max_episode_steps=max_episode_steps)
        if env.action_space.shape[0] != p.action_dim:
            raise ValueError(f"checkpoint {checkpoint} commands a {p.action_dim}-d action; task {task} takes "
                             f"{env.action_space.shape[0]}")
        return MultiTaskObservation(env, _task_index(checkpoint, tasks, task), len(tasks), task)
    if hasattr(run_cfg, "planner"):
        layout = getattr(run_cfg.planner, "layout", None)
        # A driving planner's environment observes the scene the way its training data did (rtdp collect --scene).
        scene = dict(layout.scene) if layout is not None and task.startswith("highway/") else None
        env = make_env(task, max_episode_steps=max_episode_steps, scene=scene)
        if layout is not None:
            check_scene(run_cfg.planner, env, checkpoint, task)
        else:
            check_compatible(run_cfg.planner, env, checkpoint, task)
        return env
    p = run_cfg.policy
    image_size = p.image_shape[0] if p.image_shape else 96
    env = make_env(task, image=p.image_shape is not None, image_size=image_size, max_episode_steps=max_episode_steps)
    if tasks:
        env = MultiTaskObservation(env, _task_index(checkpoint, tasks, task), len(tasks), task)
    if list(run_cfg.data.state_keys) != ["state"]:
        env = ConcatenatedState(env, run_cfg.data.state_keys)
    check_compatible(p, env, checkpoint, task)
    return env
