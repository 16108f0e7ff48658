"""`rtdp collect`: a dataset for a task, by what the task's data is made from (expert demos, a driving expert, a
maze's continuing stream, a hopper behaviour policy, motion clips) and where it goes; nothing at --out is replaced
unless --overwrite says so."""

from __future__ import annotations

import argparse
from pathlib import Path

from rtdp.report import write_report


def cmd_collect(args: argparse.Namespace) -> int:
    from envs.collect import append_demos, check_appendable, collect_demos, next_seed
    from envs.datasets import ReplayBuffer

    if args.relabel and not args.task.startswith("highway/"):
        raise ValueError(f"--relabel is for driving tasks (highway/...), not {args.task}")
    if args.scene and not args.task.startswith("highway/"):
        raise ValueError(f"--scene is for driving tasks (highway/...), not {args.task}")
    if args.scene and args.relabel:
        raise ValueError("--scene with --relabel: the relabelled drives observe the layout the planner was trained on")
    if args.task.startswith("pointmaze/"):
        return _collect_maze(args)
    if args.task.startswith("mujoco/"):
        return _collect_hopper(args)
    if args.task.startswith("motion/"):
        return _collect_motion(args)
    if "," in args.task:
        return _collect_multitask(args)
    if args.append and args.overwrite:
        raise ValueError("--append adds to the dataset at --out and --overwrite replaces it: pass one")
    existing = None
    if args.append:
        existing = ReplayBuffer.load(args.out)  # read, and its layout checked, before any episode is collected
        check_appendable(existing, args.task, args.image, args.image_size)
    elif Path(args.out).exists() and not args.overwrite:  # refused before the episodes are collected, not after
        raise ValueError(f"{args.out} already exists; nothing was written (choose another --out, pass --append "
                         f"to add episodes to it, or --overwrite to replace it)")
    if args.relabel:
        from deploy.kinds import read_config

        trained_on = read_config(args.relabel).data.task
        if trained_on != args.task:
            raise ValueError(f"--relabel {args.relabel} drives {trained_on!r}, not --task {args.task}")
    seed = args.seed if args.seed is not None else (next_seed(existing) if existing is not None else 0)
    if args.task.startswith("highway/"):
        from envs.driving import SceneConfig
        from envs.driving_expert import collect_drives

        if args.image:
            raise ValueError(f"{args.task} records a bird's-eye raster and agent tokens, not camera images")
        if args.relabel:
            from evaluation.driving import relabel_drives

            buffer = relabel_drives(args.relabel, args.episodes, seed, args.label_every, progress=not args.no_progress)
        else:
            scene = SceneConfig.from_dict(dict(args.scene), "--scene") if args.scene else None
            recorded = existing.attrs.get("scene") if existing is not None else None
            if recorded is not None and scene is not None and recorded != scene.to_dict():
                raise ValueError(f"--scene {dict(args.scene)} is not the layout of the dataset at {args.out}: "
                                 f"{recorded}")
            if recorded is not None and scene is None:  # appended drives observe as the dataset's did
                scene = SceneConfig.from_dict(recorded, str(args.out))
            buffer = collect_drives(args.task, args.episodes, seed=seed, branch_every=args.branch_every,
                                    scene=scene, progress=not args.no_progress)
    else:
        buffer = collect_demos(args.task, args.episodes, seed=seed, image=args.image, image_size=args.image_size,
                               progress=not args.no_progress)
    added = buffer.n_episodes
    if existing is not None:
        buffer = append_demos(existing, buffer)
    buffer.save(args.out, overwrite=args.overwrite or existing is not None)
    a = buffer.attrs
    what = "planner episodes labelled by the expert" if args.relabel else "expert episodes"
    what = f"{added} {what} added, {a['episodes']} in all" if existing is not None else f"{a['episodes']} {what}"
    if args.relabel:
        r = a["relabelled"][-1] if isinstance(a["relabelled"], list) else a["relabelled"]
        outcome = (f"the planner collided in {r['planner_collision_rate']:.2f} and left the road in "
                   f"{r['planner_offroad_rate']:.2f} of them; {r['labels']} labels")
    else:
        outcome = f"expert success {a['expert_success_rate']:.2f}"
    print(f"{args.task}: {what} ({buffer.n_steps} steps) in {args.out}; {outcome}")
    write_report(args.report, {"out": str(args.out), "steps": buffer.n_steps, "added": added, **a})
    return 0


def _collect_multitask(args: argparse.Namespace) -> int:
    """`--task a,b,c`: one dataset over several tasks, each episode labelled with its task (envs.multitask)."""
    from envs.multitask import collect_multitask, parse_tasks

    if args.append:
        raise ValueError("--append adds to a single-task dataset; collect a multi-task one in one go")
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists; nothing was written (choose another --out, or pass "
                         f"--overwrite to replace it)")
    tasks = parse_tasks(args.task)
    buffer = collect_multitask(tasks, args.episodes, seed=args.seed or 0, image=args.image,
                               image_size=args.image_size, progress=not args.no_progress)
    buffer.save(args.out, overwrite=args.overwrite)
    print(f"{len(tasks)} tasks, {args.episodes} expert episodes each ({buffer.n_steps} steps) in {args.out}")
    write_report(args.report, {"out": str(args.out), "steps": buffer.n_steps, **buffer.attrs})
    return 0


def _collect_motion(args: argparse.Namespace) -> int:
    """Motion clips as a per-frame dataset: motion/deepmimic (the clips in the pybullet wheel) or motion/bvh with
    --bvh DIR (every .bvh file in it, one skeleton), each clip also mirrored."""
    from envs.motion import deepmimic_clips, motion_dataset, read_bvh

    if args.append or args.image:
        raise ValueError(f"{args.task} turns whole clips into frames: --append and --image do not apply")
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists; nothing was written (choose another --out, or --overwrite)")
    source = args.task.split("/", 1)[1]
    if source == "deepmimic":
        clips = deepmimic_clips()
    elif source == "bvh":
        if not args.bvh or not sorted(Path(args.bvh).glob("*.bvh")):
            raise ValueError("motion/bvh reads every .bvh file in --bvh DIR; none was found"
                             + (f" in {args.bvh}" if args.bvh else " (pass --bvh)"))
        clips = [read_bvh(p) for p in sorted(Path(args.bvh).glob("*.bvh"))]
    else:
        raise ValueError(f"unknown motion source {source!r}: motion/deepmimic or motion/bvh (with --bvh DIR)")
    buffer = motion_dataset(clips)
    buffer.attrs["task"] = args.task
    buffer.save(args.out, overwrite=args.overwrite)
    print(f"{args.task}: {len(clips)} clips, mirrored: {buffer.n_episodes} episodes, {buffer.n_steps} frames "
          f"({buffer.n_steps / buffer.attrs['fps']:.0f} s) in {args.out}")
    write_report(args.report, {"out": str(args.out), "frames": buffer.n_steps, "episodes": buffer.n_episodes,
                                "clips": buffer.attrs["clips"]})
    return 0


def _collect_maze(args: argparse.Namespace) -> int:
    """A maze dataset as D4RL's maze2d was made: one continuing noisy-expert episode, one goal per episode."""
    from envs.datasets.offline import save_offline
    from envs.pointmaze import GOAL_DIM, MAZES, collect_maze, maze_name

    if args.append or args.image:
        raise ValueError(f"{args.task} makes one continuing stream of --steps steps: --append and --image do not "
                         f"apply")
    name = maze_name(args.task)  # refused before anything is collected
    buffer = collect_maze(args.task, args.steps, seed=args.seed or 0, noise=args.action_noise,
                          progress=not args.no_progress)
    import gymnasium as gym

    spec = gym.spec(MAZES[name]) if args.out.startswith("minari:") else None
    out = save_offline(buffer, args.out, overwrite=args.overwrite, minari_dir=args.minari_dir, env_spec=spec,
                       goal_dim=GOAL_DIM)
    refs = buffer.attrs["reference_returns"]
    print(f"{args.task}: {buffer.n_steps} steps, {buffer.attrs['goals_reached']} goals reached, in {out}; "
          f"reference returns random {refs['random']:.1f}, expert {refs['expert']:.1f}")
    write_report(args.report, {"out": out, "steps": buffer.n_steps, "episodes": buffer.n_episodes, **buffer.attrs})
    return 0


def _collect_hopper(args: argparse.Namespace) -> int:
    """A hopper dataset as D4RL's was made: a behaviour policy stopped at a third of the expert's return, then its
    samples (medium) or its training stream (medium-replay)."""
    from envs.datasets.offline import save_offline
    from envs.hopper import ENV_ID, collect_hopper, dataset_name

    if args.append or args.image:
        raise ValueError(f"{args.task} makes one dataset from its behaviour policy: --append and --image do not "
                         f"apply")
    dataset_name(args.task)  # refused before anything is trained
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists; nothing was written (choose another --out or pass "
                         f"--overwrite)")
    behaviour = args.behaviour or str(Path(args.out).with_name("hopper-behaviour"))
    buffer = collect_hopper(args.task, args.steps, behaviour, seed=args.seed or 0,
                            target_return=args.behaviour_return, algorithm=args.behaviour_algorithm,
                            behaviour_steps=args.behaviour_steps,
                            progress=not args.no_progress)
    import gymnasium as gym

    spec = gym.spec(ENV_ID) if args.out.startswith("minari:") else None
    out = save_offline(buffer, args.out, overwrite=args.overwrite, minari_dir=args.minari_dir, env_spec=spec)
    refs, b = buffer.attrs["reference_returns"], buffer.attrs["behaviour"]
    reached = "" if b["reached"] else " (short of its target: raise --behaviour-steps or lower --behaviour-return)"
    print(f"{args.task}: {buffer.n_steps} steps in {buffer.n_episodes} episodes, in {out}; behaviour policy "
          f"(in {behaviour}) return {b['final_return']} after {b['steps']} steps{reached}; reference returns random "
          f"{refs['random']:.1f}, expert {refs['expert']:.1f} (D4RL's)")
    write_report(args.report, {"out": out, "steps": buffer.n_steps, "episodes": buffer.n_episodes, **buffer.attrs})
    return 0
