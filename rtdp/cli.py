"""`rtdp <verb>`: wires the packages together; the work itself lives in policy/, envs/, deploy/ and evaluation/."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rtdp.collect import cmd_collect
from rtdp.report import write_report

BACKEND_CHOICES = ["torch", "torch-compile", "torch-cuda", "torch-compile-cuda", "onnxruntime", "onnxruntime-cuda",
                   "onnxruntime-tensorrt", "tensorrt"]  # deploy.backends.BACKENDS, without importing torch to parse


def _at_least(low: float, kind=int):
    """An argparse type: a number >= `low` (> 0 when low is 0.0 for floats), refused with a one-line error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a{'n integer' if kind is int else ' number'}, got {text!r}") \
                from None
        if (kind is float and low == 0.0 and not value > 0) or value < low or value != value:
            raise argparse.ArgumentTypeError(f"must be {'> 0' if kind is float and low == 0.0 else f'>= {low}'}, "
                                             f"got {text}")
        return value
    return parse


POSITIVE, NON_NEGATIVE, RATE = _at_least(1), _at_least(0), _at_least(0.0, float)


def _add_precision_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                        help=f"{what}; the sampler's arithmetic stays fp32 (int8: engine backends only)")


def cmd_train(args: argparse.Namespace) -> int:
    from deploy.kinds import kind_named
    from envs.datasets import PolicyDataset, ReplayBuffer
    from policy.config import load_config
    from policy.train import train

    kind = kind_named(_config_kind(args.config))
    cfg = load_config(args.config, args.overrides, kind.config_class)
    if kind.name != "diffusion_policy":
        return _train_planner(args, cfg, kind)
    d, p = cfg.data, cfg.policy
    keys = [*d.state_keys, d.action_key, *([d.image_key] if d.image_key else [])]
    buffer = ReplayBuffer.load(args.data, keys=keys)
    d.task = d.task or buffer.attrs.get("task")
    d.tasks = d.tasks or list(buffer.attrs.get("tasks") or [])
    if p.discrete_action_dims is None:
        from envs.tasks import discrete_action_dims

        p.discrete_action_dims = discrete_action_dims(d.task)
    data = PolicyDataset(buffer, p.horizon, p.n_obs_steps, p.n_action_steps, d.state_keys, d.action_key,
                         d.image_key, d.val_ratio, cfg.train.seed)
    try:
        summary = train(cfg, data, args.out, resume=args.resume, progress=not args.no_progress,
                        overwrite=args.overwrite)
    except KeyboardInterrupt:
        raise ValueError(f"interrupted; {_last_checkpoint(Path(args.out))}") from None
    report = {"data": str(Path(args.data).resolve()), "episodes": buffer.n_episodes, "windows": len(data),
              **summary.to_dict()}
    write_report(args.report, report)
    if int(os.environ.get("RANK", "0")) == 0:
        # The checkpoint keeps what it was trained on: `rtdp export --precision int8` calibrates on it.
        (Path(args.out) / "train_report.json").write_text(json.dumps(report, indent=2))
        print(f"trained {summary.steps} steps on {buffer.n_episodes} episodes in {summary.seconds:.1f} s "
              f"(world size {summary.world_size}); loss {report['loss_first']:.4f} -> {report['loss_last']:.4f}; "
              f"checkpoint in {args.out}")
    return 0


def _config_kind(path: str) -> str:
    """The model kind a run config names (`kind:`; none: a Diffusion Policy), read before it is parsed."""
    import yaml

    from policy.config import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return data.get("kind", "diffusion_policy") if isinstance(data, dict) else "diffusion_policy"


# Planner kinds trained on offline-RL data (state windows with returns), read from D4RL HDF5, zarr or Minari.
OFFLINE_RL_KINDS = ("trajectory_diffuser", "decision_diffuser", "diffuser")
# Motion kinds, trained on windows of consecutive frames (a zarr with `frame` per step, one episode per clip).
MOTION_KINDS = ("aamdm", "amdm")


def _planner_data(args: argparse.Namespace, cfg, kind):
    """(training data, the buffer it came from) for a planner kind."""
    from envs.datasets import ReplayBuffer

    if kind.name in OFFLINE_RL_KINDS:
        from envs.datasets.offline import load_offline
        from envs.datasets.trajectory_dataset import TrajectoryDataset

        buffer = load_offline(args.data)
        cfg.data.task = cfg.data.task or buffer.attrs.get("task")
        cfg.data.reference_returns = cfg.data.reference_returns or dict(buffer.attrs.get("reference_returns") or {})
        return TrajectoryDataset(buffer, cfg.planner.horizon, cfg.data.discount, cfg.planner.plan_stride), buffer
    if kind.name == "motion_autoencoder":
        from envs.datasets.motion_dataset import MotionDataset

        d = cfg.data
        buffer = ReplayBuffer.load(args.data)
        d.task = d.task or buffer.attrs.get("task")
        return MotionDataset(buffer, 1, d.pose_key, (d.pose_key, d.control_key)), buffer
    if kind.name in MOTION_KINDS:
        from envs.datasets.motion_dataset import MotionDataset

        d = cfg.data
        buffer = ReplayBuffer.load(args.data)
        d.task, d.path = d.task or buffer.attrs.get("task"), str(args.data)
        if d.autoencoder:
            buffer = _embedded(buffer, cfg)
        return MotionDataset(buffer, cfg.planner.rollout, d.key), buffer
    if kind.name == "pad":
        return _future_frame_data(args, cfg)
    from envs.datasets.plan_dataset import PlanDataset

    buffer = ReplayBuffer.load(args.data)
    cfg.data.task = cfg.data.task or buffer.attrs.get("task")
    return PlanDataset(buffer, cfg.data.branch_labels, cfg.data.val_ratio, cfg.train.seed), buffer


def _future_frame_data(args: argparse.Namespace, cfg):
    """PAD's samples from an image dataset: a multi-task one (pose and task per step) or a single task's, whose
    pose is read from its state."""
    import numpy as np

    from envs.datasets import ReplayBuffer
    from envs.datasets.future_frames import FutureFrameDataset
    from envs.tasks import pose_dims

    d, p = cfg.data, cfg.policy
    buffer = ReplayBuffer.load(args.data)
    d.task = d.task or buffer.attrs.get("task")
    p.tasks = p.tasks or list(buffer.attrs.get("tasks") or [d.task])
    if d.pose_key not in buffer.data:
        if not d.task:
            raise ValueError(f"{args.data} has no {d.pose_key!r} and names no task to read the pose from")
        buffer = ReplayBuffer({**buffer.data, d.pose_key: np.asarray(buffer["state"])[:, pose_dims(d.task)]},
                              buffer.episode_ends, dict(buffer.attrs), source=buffer.source)
    data = FutureFrameDataset(buffer, p.frames, p.skip, p.position_dims, p.gripper_action_dim, d.image_key,
                              d.pose_key, d.task_key, d.action_key)
    return data, buffer


def _embedded(buffer, cfg):
    """A motion dataset (pose, control per frame) as frames of the autoencoder's embedding, which the motion model
    is trained on; the model's control dims become the embedding's control features."""
    from envs.datasets import ReplayBuffer
    from planners.motion_autoencoder import embed_frames, load_autoencoder
    from policy.checkpoint import weights_sha256

    ae, ae_cfg = load_autoencoder(cfg.data.autoencoder)
    if "skeleton" not in buffer.attrs:
        raise ValueError(f"{buffer.source} holds no skeleton: make it with rtdp collect --task motion/...")
    ae.check_skeleton(buffer.attrs["skeleton"])
    frames = embed_frames(ae, buffer[ae_cfg.data.pose_key], buffer[ae_cfg.data.control_key])
    cfg.data.autoencoder_sha256 = weights_sha256(cfg.data.autoencoder)
    cfg.planner.control_dims = cfg.planner.control_dims or list(range(ae_cfg.planner.control_dim))
    return ReplayBuffer({cfg.data.key: frames}, buffer.episode_ends, dict(buffer.attrs), source=buffer.source)


def _train_planner(args: argparse.Namespace, cfg, kind) -> int:
    """A planner on its dataset: a driving one on scene + plan samples, an offline-RL one on state windows."""
    from policy.train import train

    data, buffer = _planner_data(args, cfg, kind)
    try:
        summary = train(cfg, data, args.out, resume=args.resume, progress=not args.no_progress,
                        overwrite=args.overwrite, build=kind.build_for_training)
    except KeyboardInterrupt:
        raise ValueError(f"interrupted; {_last_checkpoint(Path(args.out))}") from None
    report = {"data": str(args.data), "episodes": buffer.n_episodes, "samples": len(data), **summary.to_dict()}
    write_report(args.report, report)
    print(f"trained {kind.name} {summary.steps} steps on {len(data)} samples ({buffer.n_episodes} episodes) in "
          f"{summary.seconds:.1f} s; loss {report['loss_first']:.4f} -> {report['loss_last']:.4f}; checkpoint in "
          f"{args.out}")
    return 0


def _last_checkpoint(out: Path) -> str:
    meta = out / "train_state.json"
    try:
        return f"the last checkpoint saved is step {json.loads(meta.read_text())['step']} in {out}"
    except (OSError, ValueError, KeyError):
        return f"no checkpoint was saved in {out}"


def cmd_motion(args: argparse.Namespace) -> int:
    import torch

    from evaluation.motion import motion_report, open_motion_session, parse_control, synthesize, write_motion_video

    commands = parse_control(args.control)  # refused before anything is loaded
    torch.set_num_threads(args.threads)
    session = open_motion_session(args.checkpoint, args.data, args.start_clip, guidance_scale=args.guidance_scale)
    run = synthesize(session.policy, session.decode, session.start_frame, session.skeleton, args.seconds, commands,
                     guided=not args.no_guidance, seed=args.seed, progress=not args.no_progress)
    report = {"checkpoint": args.checkpoint, "control": args.control, "threads": args.threads,
              **motion_report(run, commands, session.skeleton, session.contact_height), "config": session.config}
    if args.video:
        Path(args.video).parent.mkdir(parents=True, exist_ok=True)
        write_motion_video(run, session.skeleton, args.video, progress=not args.no_progress)
    write_report(args.report, report)
    err = report["guidance_error"]
    turn = "" if err["after_turn_mean_deg"] is None else \
        f", {err['after_turn_mean_deg']:.0f} deg {err['after_turn_s']:.0f} s after a turn"
    video = f"; video in {args.video}" if args.video else ""
    nfe = report["nfe_per_frame"]
    calls = f"{nfe['total']} calls per frame" + (f": {nfe['generator_calls']} generator + {nfe['polisher_calls']} "
                                                 "polisher" if "generator_calls" in nfe else "")
    print(f"{report['frames']} frames ({report['seconds']:.0f} s) at {report['fps']:.0f} frames/s ({calls}); "
          f"walked {report['distance_m']:.1f} m; direction error "
          f"{err['mean_deg']:.0f} deg on average{turn}{video}")
    return 0


def _parse_k0(value: str) -> int | str:
    if value == "auto":
        return value
    if value == "default":  # --rti alone
        from policy.rti import RTIConfig

        return RTIConfig().k0
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--rti takes an entry step k0 (an integer) or 'auto', got {value!r}") from None


def _tail_steps(text: str) -> int | str:
    return text if text == "all" else POSITIVE(text)


def _rti_settings(args: argparse.Namespace) -> dict | None:
    if args.rti is None:
        return None
    fields = {"k0": _parse_k0(args.rti), "n_exec": args.rti_exec, "discrete": args.rti_discrete,
              "factor": args.rti_factor}
    if args.rti_steps is not None:
        fields["steps"] = None if args.rti_steps == "all" else args.rti_steps
    if args.rti_refresh is not None:
        fields["refresh"] = [] if args.rti_refresh == "none" else args.rti_refresh.split(",")
    optional = {"mode": args.rti_mode, "sampler": args.rti_sampler, "refresh_drift": args.rti_refresh_drift,
                "refresh_every": args.rti_refresh_every,
                "refresh_sampler": args.rti_refresh_sampler,
                "refresh_steps": args.rti_refresh_steps, "full_sampler": args.rti_full_sampler,
                "full_steps": args.rti_full_steps}
    return {**fields, **{k: v for k, v in optional.items() if v is not None}}


def cmd_eval(args: argparse.Namespace) -> int:
    from evaluation.evaluate import EvalSettings, evaluate
    from evaluation.report import summary_line

    settings = EvalSettings(checkpoint=args.checkpoint, episodes=args.episodes, seed=args.seed, sampler=args.sampler,
                            steps=args.steps, task=args.task, workers=args.workers, video_dir=args.video,
                            video_episodes=args.video_episodes, plot=args.plot, rti=_rti_settings(args),
                            rti_calibration_episodes=args.rti_calibration_episodes, cache=args.cache,
                            backend=args.backend, precision=args.precision, export=args.export, ort=_ort(args),
                            target_return=args.target_return, clearance=_clearance(args))
    report = evaluate(settings, progress=not args.no_progress)
    print(summary_line(report))
    write_report(args.report, report)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from evaluation.calibration import CacheSettings, calibrate_cache, result_dict

    try:
        budgets = [int(b) for b in args.budget.split(",")]
    except ValueError:
        raise ValueError(f"--budget takes update budgets per block, e.g. 10 or 5,10,20; got {args.budget!r}") from None
    settings = CacheSettings(checkpoint=args.checkpoint, budgets=budgets, sampler=args.sampler, steps=args.steps,
                             rti=_rti_settings(args), episodes=args.episodes, samples=args.samples,
                             bubble_n=args.bubble, seed=args.seed, kind=args.kind)
    result = calibrate_cache(settings, progress=not args.no_progress)
    for s in result.schedules:
        if s["kind"] == "error":
            print(f"error:{s['budget']} for {s['method']}-{s['steps']}: {s['block_evals_per_decision']} of "
                  f"{s['uncached_block_evals']} branch evaluations per decision, placed by final-chunk error")
            continue
        print(f"bac:{s['budget']} for {s['method']}-{s['steps']}: {s['block_evals_per_decision']} of "
              f"{s['uncached_block_evals']} branch evaluations per decision "
              f"({s['uncached_block_evals'] / s['block_evals_per_decision']:.1f}x fewer); bubbling union on "
              f"{', '.join(s['selected'])}")
    print(f"schedules saved in {result.path}")
    write_report(args.report, result_dict(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from deploy.artifacts import TOLERANCE
    from deploy.export import ExportSettings, check_export, export_dir, export_policy

    settings = ExportSettings(checkpoint=args.checkpoint, out=args.out, opset=args.opset, fused=not args.no_fused,
                              sampler=args.sampler, steps=args.steps,
                              rti_k0=_rti_k0(args), cache=args.cache, precision=args.precision,
                              calibration_data=args.calibration_data, calibration_windows=args.calibration_windows,
                              reduce_range=args.reduce_range)
    if args.precision == "int8":
        from evaluation.quantisation_data import export_int8

        manifest = export_int8(settings)
    else:
        manifest = export_policy(settings)
    out = args.out or str(export_dir(args.checkpoint, args.precision))
    graphs = manifest["graphs"]
    print(f"exported {', '.join(graphs)} to {out} (opset {args.opset})"
          + (f"; fused: {graphs['fused']['method']} over {len(graphs['fused']['timesteps'])} steps, "
             f"{graphs['fused']['entry']} entry" if "fused" in graphs else ""))
    report = {"out": out, "graphs": {k: {"file": v["file"], "sha256": v["sha256"]} for k, v in graphs.items()}}
    if args.check:
        if args.precision == "int8":
            from evaluation.quantisation_data import check_int8

            errors = check_int8(args.checkpoint, out)
        else:
            errors = check_export(args.checkpoint, out)
        report["max_abs_error"] = errors
        print("parity with torch: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
              + (f" (max abs, tolerance {TOLERANCE[args.precision]:.0e})" if args.precision != "int8" else
                 f" (on held-out windows of the calibration data; the means are held to {TOLERANCE['int8']:.0e})"))
    write_report(args.report, report)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from deploy.profile import ProfileSettings, comparison_table, profile

    settings = ProfileSettings(checkpoint=args.checkpoint, backends=args.backend or [], iters=args.iters,
                               warmup=args.warmup, sampler=args.sampler, steps=args.steps,
                               rti_k0=_rti_k0(args), threads=args.threads, plot=args.plot,
                               precision=args.precision, export=args.export, ort=_ort(args),
                               rate_hz=args.rate, rti_steps=None if args.rti_steps in (None, "all") else args.rti_steps,
                               rti_every_step=args.rti_steps == "all", predicted_frames=args.predicted_frames)
    report = profile(settings, progress=not args.no_progress)
    print(comparison_table(report))
    write_report(args.report, report)
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from evaluation.control import ControlSettings, control_summary, run_control

    _rti_k0(args)  # the loop needs a fixed entry step

    settings = ControlSettings(checkpoint=args.checkpoint, rate_hz=args.rate, episodes=args.episodes,
                               min_ticks=args.min_ticks, seed=args.seed, sampler=args.sampler, steps=args.steps,
                               rti=_rti_settings(args), cache=args.cache, backend=args.backend,
                               replan_every=args.replan_every, inference_delay_ms=args.inference_delay_ms,
                               bad_obs_every=args.bad_obs_every, worker=args.worker, precision=args.precision,
                               export=args.export, ort=_ort(args), chunking=args.chunking, anytime=args.anytime,
                               anytime_mode=args.anytime_mode, anytime_budget_ms=args.anytime_budget_ms,
                               inference_nice=args.inference_nice, inference_cpus=args.inference_cpus,
                               target_return=args.target_return, clearance=_clearance(args))
    report = run_control(settings, progress=not args.no_progress)
    print(control_summary(report))
    write_report(args.report, report)
    if report["decisions"] == 0:
        print("rtdp control: error: no decision succeeded; every tick held the safe action", file=sys.stderr)
        return 1
    return 0


def _zenoh_settings(args: argparse.Namespace):
    from deploy.zenoh_graph import ZenohSettings

    return ZenohSettings(router=None if args.router == "none" else args.router, listen=args.listen or [],
                         multicast_scouting=args.multicast_scouting, domain=args.domain)


def _add_zenoh_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", default="tcp/127.0.0.1:7447", help="the Zenoh router to connect to (rmw_zenohd's "
                   "default endpoint by default; `rtdp router` runs one without ROS 2); none: listen only")
    p.add_argument("--listen", action="append", metavar="ENDPOINT", help="also accept connections here, e.g. "
                   "tcp/127.0.0.1:7448 (repeat for several)")
    p.add_argument("--domain", type=NON_NEGATIVE, default=0, help="ROS_DOMAIN_ID")
    p.add_argument("--multicast-scouting", action="store_true", help="discover peers by UDP multicast (off: a "
                   "robot's bus has explicit endpoints)")


def cmd_router(args: argparse.Namespace) -> int:
    from deploy.zenoh_graph import ZenohSettings, router

    session = router(ZenohSettings(router=None, listen=args.listen or [], multicast_scouting=args.multicast_scouting))
    print(f"rtdp router: listening on {', '.join(args.listen or ['tcp/127.0.0.1:7447'])} (zid {session.zid()})",
          flush=True)
    _wait_for_signal()
    session.close()
    return 0


def _wait_for_signal(stop=None) -> None:
    """Blocks until SIGINT/SIGTERM, or until `stop()` returns True."""
    import signal
    import threading

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.2):
        if stop is not None and stop():
            return


def cmd_node(args: argparse.Namespace) -> int:
    from deploy.node import ControlNode, NodeSettings
    from deploy.runtime import RuntimeSettings

    _rti_k0(args)  # the loop needs a fixed entry step
    runtime = RuntimeSettings(checkpoint=args.checkpoint, sampler=args.sampler, steps=args.steps,
                              rti=_rti_settings(args), cache=args.cache, backend=args.backend,
                              precision=args.precision, export=args.export, threads=args.threads,
                              ort=_ort(args), clearance=_clearance(args))
    settings = NodeSettings(runtime=runtime, rate_hz=args.rate, name=args.name, namespace=args.namespace,
                            zenoh=_zenoh_settings(args), robot_node=args.robot_node,
                            max_observation_age_ms=args.max_observation_age_ms,
                            inference_delay_ms=args.inference_delay_ms, threads=args.threads, record=args.record,
                            inference_nice=args.inference_nice, inference_cpus=args.inference_cpus)
    node = ControlNode(settings)
    try:
        print(f"rtdp node: {args.name} on the bus (state unconfigured); lifecycle by "
              f"{args.namespace.rstrip('/')}/{args.name}/change_state", flush=True)
        for transition in ("configure", "activate")[: {"none": 0, "configure": 1, "activate": 2}[args.start]]:
            if not node.transition(transition):
                raise RuntimeError(f"{transition} failed: {node.last_error}")
            print(f"rtdp node: {transition}d", flush=True)
        _wait_for_signal(stop=lambda: node.wait_finalized(0))
    finally:
        node.close()
        report = node.report()
        write_report(args.report, report)
    print(f"rtdp node: finalized after {report.get('ticks', 0)} ticks, {report.get('deadline_misses', 0)} deadline "
          f"misses, {report.get('inference_restarts', 0)} inference restarts")
    return 0


def cmd_robot_sim(args: argparse.Namespace) -> int:
    from evaluation.robot_sim import RobotSimSettings, parse_faults, robot_sim_summary, run_robot_sim

    settings = RobotSimSettings(checkpoint=args.checkpoint, task=args.task, episodes=args.episodes,
                                min_ticks=args.min_ticks, seed=args.seed, node=args.node, namespace=args.namespace,
                                zenoh=_zenoh_settings(args), faults=parse_faults(args.faults),
                                kill_inference_after=args.kill_inference_after, shutdown_node=args.shutdown_node,
                                max_episode_steps=args.max_episode_steps)
    report = run_robot_sim(settings, progress=not args.no_progress)
    print(robot_sim_summary(report))
    write_report(args.report, report)
    return 0


def _add_export_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export", metavar="DIR", help="the export folder an engine backend reads (what `rtdp export "
                   "--out DIR` wrote); default: <checkpoint>/onnx, or onnx-fp16 / onnx-int8")
    p.add_argument("--ort", metavar="KEY=VALUE", action="append", type=_key_value, default=None,
                   help="an onnxruntime session setting, repeatable: optimization=disabled|basic|extended|all, "
                        "spinning=on|off, memory_pattern=on|off (defaults: all, on, on)")


def _ort(args: argparse.Namespace) -> dict | None:
    return dict(args.ort) if args.ort else None


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _field_value(text: str) -> tuple[str, object]:
    """FIELD=VALUE with the value read as YAML: numbers, booleans, lists ([2,1])."""
    import yaml

    key, value = _key_value(text)
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{key}: cannot read {value!r} as a value") from None


def _add_inference_nice_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inference-nice", type=NON_NEGATIVE, default=0, metavar="N",
                   help="run the inference process N POSIX nice levels (0-19) below the loop, so that ticks and "
                        "transport callbacks take a busy core first")
    p.add_argument("--inference-cpus", type=_cpu_list, metavar="C[,C...]",
                   help="pin the inference process to these CPUs (Linux), e.g. 1 with the loop started under "
                        "`taskset -c 0`, so that decisions never share the loop's core")


def _cpu_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CPU numbers separated by commas, got {text!r}") from None


def _add_sampler_arguments(p: argparse.ArgumentParser, what: str = "default: the checkpoint's config") -> None:
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp_2m"], help=what)
    p.add_argument("--steps", type=NON_NEGATIVE, help=f"denoising steps; {what} (0: a Trajectory Diffuser's draft "
                   "alone)")


def _add_clearance_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clearance", nargs="*", type=_field_value, metavar="FIELD=VALUE", help="a driving planner: "
                   "execute the best-ranked candidate that stays clear of every other vehicle's constant-velocity "
                   "forecast and on the road, not the planner's own top candidate (planners/clearance.py); "
                   "FIELD=VALUE sets a ClearanceConfig field, e.g. keep_on_road=false")


def _clearance(args: argparse.Namespace) -> dict | None:
    return None if args.clearance is None else dict(args.clearance)


def _add_target_return_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-return", type=float, metavar="R", help="a return-conditioned planner's target return, "
                   "x the data's highest initial return-to-go (default: the checkpoint's planner.target_return)")


def _rti_k0(args: argparse.Namespace) -> int | None:
    """--rti for verbs that need a fixed entry step (export, profile)."""
    k0 = _parse_k0(args.rti) if args.rti is not None else None
    if k0 == "auto":
        raise ValueError(f"rtdp {args.verb} takes a fixed --rti K0; find one with rtdp eval --rti auto")
    return k0


def _add_rti_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rti", nargs="?", const="default", metavar="K0|auto", help="RTI warm start entered at step K0 "
                   "(--rti alone: the default, 27), --rti-steps calls per decision after a full denoise at the "
                   "episode start; auto calibrates K0 from rollouts first")
    p.add_argument("--rti-steps", type=_tail_steps, metavar="N|all", help="the tail's calls, K0 .. 0 evenly strided "
                   "(default 4; 1: one call at K0, its clean prediction); all: every step K0, K0-1, ..., 0 "
                   "(the paper's)")
    p.add_argument("--rti-mode", choices=["direct", "renoise"], help="warm-start entry (default renoise: the guess "
                   "forward-noised to K0)")
    p.add_argument("--rti-sampler", choices=["ddpm", "ddim", "dpmpp_2m"], help="the tail's sampler (default ddim)")
    p.add_argument("--rti-exec", type=POSITIVE, default=1, help="actions executed per RTI decision")
    p.add_argument("--rti-discrete", choices=["auto", "scale", "clip", "none"], default="auto",
                   help="gripper handling in the warm start; auto: scale if trained scaled, else clip")
    p.add_argument("--rti-factor", type=float, default=10.0, help="clip: the guess's gripper is +-1/factor")
    p.add_argument("--rti-full-sampler", choices=["ddpm", "ddim", "dpmpp_2m"],
                   help="the full denoise at an episode start, a fallback or a refresh (default ddpm)")
    p.add_argument("--rti-full-steps", type=POSITIVE, help="its steps (default: every training timestep)")
    p.add_argument("--rti-refresh", metavar="SIGNALS", help="redo a warm decision as a full denoise when it looks "
                   "stale: discrete (the gripper command changes), drift (the tail moved its guess by more than "
                   "--rti-refresh-drift), age (every --rti-refresh-every warm decisions), comma-separated, or none")
    p.add_argument("--rti-refresh-drift", type=RATE, help="drift: the tail's correction, in units of the noise level "
                   "it entered at, that refreshes (default 1.5)")
    p.add_argument("--rti-refresh-every", type=POSITIVE, help="age: warm decisions in a row after which to refresh")
    p.add_argument("--rti-refresh-sampler", choices=["ddpm", "ddim", "dpmpp_2m"],
                   help="a refresh's sampler (default: the full denoise's)")
    p.add_argument("--rti-refresh-steps", type=POSITIVE, help="a refresh's steps (default: the full denoise's)")


def cmd_demo(args: argparse.Namespace) -> int:
    from rtdp.demo import run_demo

    report = run_demo(Path(args.workdir), task=args.task, steps=args.steps, episodes=args.episodes, seed=args.seed)
    write_report(args.report, report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtdp", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train a diffusion policy on a zarr dataset")
    t.add_argument("--config", required=True, help="YAML run config, e.g. configs/policy/unet_lowdim.yaml")
    t.add_argument("--data", required=True, help="zarr store in diffusion_policy's layout")
    t.add_argument("--out", required=True, help="checkpoint folder")
    t.add_argument("--resume", action="store_true", help="continue from the training state in --out")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--report", help="write a JSON summary here")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=500")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("collect", help="record scripted-expert demonstrations into a zarr dataset")
    c.add_argument("--task", required=True, help="e.g. metaworld/push-v3 or point_mass/reach; several, comma-"
                   "separated, make one multi-task dataset whose episodes carry their task's index")
    c.add_argument("--episodes", type=POSITIVE, default=50, help="successful episodes to keep (driving tasks: "
                   "every episode is kept, a crash cut from its labels)")
    c.add_argument("--out", required=True, help="zarr store to write (maze and hopper tasks: also .hdf5 for D4RL's "
                   "layout, or minari:<id> for a Minari dataset)")
    c.add_argument("--seed", type=int, help="first episode seed (tasks vary with the seed); default 0, or with "
                   "--append the seed after the dataset's last")
    c.add_argument("--image", action="store_true", help="also record rendered RGB frames")
    c.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    c.add_argument("--append", action="store_true", help="add episodes to the dataset at --out (same task and "
                   "layout; written to a temporary copy and swapped in when complete)")
    c.add_argument("--image-size", type=POSITIVE, default=96)
    c.add_argument("--branch-every", type=NON_NEGATIVE, default=40, help="driving tasks: record the lane-choice "
                   "branch futures every N steps (0: none)")
    c.add_argument("--relabel", metavar="CHECKPOINT", help="driving tasks: this planner drives and the expert labels "
                   "its states with the future it would drive from there (a DAgger round; append to the planner's "
                   "training data and train again)")
    c.add_argument("--label-every", type=POSITIVE, default=1, help="with --relabel: label every N-th step")
    c.add_argument("--scene", nargs="+", type=_field_value, metavar="FIELD=VALUE", help="driving tasks: the "
                   "observation layout (envs.driving.SceneConfig), e.g. bev_cell=[2,1] for a raster of 2 m x 1 m "
                   "cells; a planner trained on the data records it, and its evaluation observes the same")
    c.add_argument("--steps", type=POSITIVE, default=1_000_000, help="maze tasks: steps of the continuing expert "
                   "stream; mujoco/hopper-medium: transitions sampled from the behaviour policy")
    c.add_argument("--behaviour", metavar="DIR", help="hopper tasks: the behaviour policy's folder (trained there "
                   "first if empty; default: hopper-behaviour beside --out)")
    c.add_argument("--behaviour-return", type=float, help="hopper tasks: train the behaviour policy until this "
                   "return (default: a third of D4RL's expert reference, 1078)")
    c.add_argument("--behaviour-algorithm", choices=("ppo", "sac"), default="ppo", help="hopper tasks: how the "
                   "behaviour policy is trained (PPO: minutes on a CPU; SAC: as D4RL, much longer)")
    c.add_argument("--behaviour-steps", type=POSITIVE, default=1_000_000, help="hopper tasks: the behaviour "
                   "policy's most training steps")
    c.add_argument("--action-noise", type=float, default=0.3, help="maze tasks: std of the expert's action noise")
    c.add_argument("--bvh", metavar="DIR", help="motion/bvh: the folder of .bvh files (e.g. LaFAN1's)")
    c.add_argument("--minari-dir", help="maze and hopper tasks with --out minari:<id>: the Minari datasets folder "
                   "(default: MINARI_DATASETS_PATH or ~/.minari/datasets)")
    c.add_argument("--report", help="write a JSON summary here")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_collect)

    e = sub.add_parser("eval", help="closed-loop success and decision latency of a checkpoint on its task")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--episodes", type=POSITIVE, default=50)
    e.add_argument("--seed", type=int, default=0, help="episodes use held-out seeds 100000 + seed + i")
    _add_sampler_arguments(e)
    _add_target_return_argument(e)
    _add_clearance_argument(e)
    e.add_argument("--task", help="default: the task the checkpoint was trained on")
    e.add_argument("--workers", type=NON_NEGATIVE, default=0, help="worker processes; 0: one per core")
    e.add_argument("--video", metavar="DIR", help="write the first --video-episodes rollouts as mp4 here")
    e.add_argument("--video-episodes", type=NON_NEGATIVE, default=3)
    _add_rti_arguments(e)
    e.add_argument("--rti-calibration-episodes", type=POSITIVE, default=2)
    e.add_argument("--backend", default="torch", choices=BACKEND_CHOICES,
                   help="onnxruntime backends run the graphs `rtdp export` wrote to <checkpoint>/onnx")
    _add_export_argument(e)
    _add_precision_argument(e, "the network's precision (fp16 engines read <checkpoint>/onnx-fp16)")
    e.add_argument("--cache", metavar="bac:S|error:S|uniform:S",
                   help="transformer block caching with update budget S per block; bac and error need a schedule "
                        "made by `rtdp cache [--kind error]` for the same step list")
    e.add_argument("--report", help="write the JSON report here")
    e.add_argument("--plot", metavar="FILE.png", help="latency histogram and per-episode outcomes")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    k = sub.add_parser("cache", help="calibrate BAC block-cache schedules for a transformer checkpoint")
    k.add_argument("--checkpoint", required=True)
    k.add_argument("--kind", choices=("bac", "error"), default="bac",
                   help="bac: the paper's ACS and bubbling union; error: Uniform's evaluations at the same budget, "
                        "each block's steps and count chosen to minimise the final chunk's error")
    k.add_argument("--budget", required=True, help="update budget per block, or several: 5,10,20")
    _add_sampler_arguments(k)
    _add_rti_arguments(k)
    k.add_argument("--episodes", type=POSITIVE, default=2, help="calibration rollouts (on calibration seeds)")
    k.add_argument("--samples", type=POSITIVE, default=64, help="calibration observations taken from the rollouts")
    k.add_argument("--bubble", type=NON_NEGATIVE, default=3, help="blocks the bubbling union extends")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--report", help="write a JSON summary here")
    k.add_argument("--no-progress", action="store_true")
    k.set_defaults(func=cmd_cache)

    x = sub.add_parser("export", help="ONNX graphs (encoder, denoiser step, fused sampler) and manifest.json")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", help="default: <checkpoint>/onnx, or onnx-fp16 / onnx-int8")
    _add_precision_argument(x, "the network's precision in the graphs (their inputs and outputs are fp32)")
    x.add_argument("--calibration-data", help="int8: the dataset to calibrate on (default: the one the checkpoint "
                                              "was trained on, from its train_report.json)")
    x.add_argument("--calibration-windows", type=POSITIVE, default=64,
                   help="int8: observation windows drawn from it")
    x.add_argument("--reduce-range", choices=["auto", "on", "off"], default="auto",
                   help="int8: 7-bit weights, which onnxruntime's x86 kernels without VNNI need to not saturate; "
                        "auto: where the exporting CPU lacks VNNI")
    x.add_argument("--check", action="store_true", help="parity against torch on seeded inputs; fails loudly")
    x.add_argument("--opset", type=POSITIVE, default=17)
    x.add_argument("--no-fused", action="store_true", help="skip the fused graph")
    _add_sampler_arguments(x, "for the fused graph; default: the checkpoint's config")
    x.add_argument("--rti", metavar="K0", help="fuse the RTI tail [K0 .. 0], entered from a warm start")
    x.add_argument("--cache", metavar="bac:S|error:S|uniform:S", help="fuse a block-cache schedule (transformers)")
    x.add_argument("--report", help="write a JSON summary here")
    x.set_defaults(func=cmd_export)

    f = sub.add_parser("profile", help="decision and denoiser-call latency on every available backend")
    f.add_argument("--checkpoint", required=True)
    f.add_argument("--backend", action="append", choices=BACKEND_CHOICES,
                   help="repeat to compare several; default: every backend that runs here")
    f.add_argument("--iters", type=POSITIVE, default=200, help="timed decisions per backend")
    f.add_argument("--warmup", type=NON_NEGATIVE, default=20)
    _add_sampler_arguments(f)
    f.add_argument("--rti", metavar="K0", help="profile the RTI warm decision entered at K0")
    f.add_argument("--rti-steps", type=_tail_steps, metavar="N|all", help="the warm tail's calls, K0 .. 0 evenly "
                   "strided (default 4; all: every step)")
    f.add_argument("--threads", type=POSITIVE, default=1)
    f.add_argument("--rate", type=RATE, default=50.0, help="the control rate reaction times are given for (Hz)")
    f.add_argument("--predicted-frames", action="store_true", help="a frame-predicting model (PAD): also decode "
                   "the predicted frames each decision, as `rtdp eval --video` does")
    _add_export_argument(f)
    _add_precision_argument(f, "the network's precision")
    f.add_argument("--report", help="write the JSON report here")
    f.add_argument("--plot", metavar="FILE.png", help="latency histograms, one per backend")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=cmd_profile)

    c = sub.add_parser("control", help="run a checkpoint on its simulated task under the fixed-rate control loop")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--rate", type=RATE, default=50.0, help="control rate in Hz")
    c.add_argument("--episodes", type=POSITIVE, default=5)
    c.add_argument("--min-ticks", type=NON_NEGATIVE, default=0, help="keep running episodes until this many ticks")
    c.add_argument("--seed", type=int, default=0)
    _add_sampler_arguments(c)
    _add_target_return_argument(c)
    _add_clearance_argument(c)
    _add_rti_arguments(c)
    c.add_argument("--backend", default="torch", choices=BACKEND_CHOICES)
    _add_export_argument(c)
    _add_precision_argument(c, "the network's precision")
    c.add_argument("--cache", metavar="bac:S|error:S|uniform:S",
                   help="transformer block caching (see rtdp eval --cache)")
    c.add_argument("--replan-every", type=POSITIVE, help="ticks between decisions (default: n_action_steps; RTI: 1)")
    c.add_argument("--inference-delay-ms", type=float, default=0.0, help="add this to every decision (stress test)")
    c.add_argument("--chunking", choices=("naive", "ensemble", "inpaint", "guidance"), default="naive",
                   help="how a new chunk joins the one being executed: naive splice, ACT's temporal ensembling, or "
                        "denoised with the actions that run during the decision held (replacement inpainting, RTC "
                        "soft-masked guidance)")
    c.add_argument("--anytime", action="store_true", help="give each decision the denoising steps that fit before "
                   "the actions it has run out (at the measured step latency)")
    c.add_argument("--anytime-mode", choices=("truncate", "respace"), default="truncate",
                   help="truncate: stop the sampler's chain and use its clean prediction so far; respace: run a "
                        "shorter chain over the whole noise range, chosen when the decision starts")
    c.add_argument("--anytime-budget-ms", type=RATE, help="cap the budget of every decision made while a chunk runs "
                   "(an episode's first decision is made before the clock starts)")
    c.add_argument("--bad-obs-every", type=NON_NEGATIVE, default=0, help="corrupt every n-th observation with NaN")
    c.add_argument("--worker", choices=("process", "thread"), default="process",
                   help="run inference in its own process (default: the loop never waits for the GIL) or on a "
                        "thread of this one")
    _add_inference_nice_argument(c)
    c.add_argument("--report", help="write the JSON report here")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_control)

    n = sub.add_parser("node", help="the policy as a ROS 2 managed node over Zenoh (rmw_zenoh's layout)")
    n.add_argument("--checkpoint", required=True)
    n.add_argument("--rate", type=RATE, default=50.0, help="control rate in Hz")
    n.add_argument("--name", default="rtdp_policy", help="the node's name")
    n.add_argument("--namespace", default="")
    _add_zenoh_arguments(n)
    n.add_argument("--start", choices=("none", "configure", "activate"), default="none",
                   help="transitions to make at start; otherwise by the change_state service")
    n.add_argument("--robot-node", help="deactivate and hold when the node of this name leaves the graph")
    n.add_argument("--max-observation-age-ms", type=float, default=100.0,
                   help="an observation stamped earlier than this is refused as late; none younger: the loop holds")
    _add_sampler_arguments(n)
    _add_clearance_argument(n)
    _add_rti_arguments(n)
    n.add_argument("--backend", default="torch", choices=BACKEND_CHOICES)
    _add_export_argument(n)
    _add_precision_argument(n, "the network's precision")
    n.add_argument("--cache", metavar="bac:S|error:S|uniform:S",
                   help="transformer block caching (see rtdp eval --cache)")
    n.add_argument("--threads", type=POSITIVE, default=1, help="the inference process's threads")
    n.add_argument("--inference-delay-ms", type=float, default=0.0, help="add this to every decision (stress test)")
    _add_inference_nice_argument(n)
    n.add_argument("--record", metavar="FILE.mcap", help="every message in and out, as ROS 2 messages in MCAP")
    n.add_argument("--report", help="write the counters and timing as JSON here when the node finalizes")
    n.set_defaults(func=cmd_node)

    r = sub.add_parser("robot-sim", help="the simulator as the robot: publishes observations and applies the "
                       "actions of `rtdp node` over Zenoh, driving its lifecycle per episode")
    r.add_argument("--checkpoint", required=True, help="the policy the node runs (its observation layout)")
    r.add_argument("--task", help="default: the checkpoint's task")
    r.add_argument("--episodes", type=POSITIVE, default=5)
    r.add_argument("--min-ticks", type=NON_NEGATIVE, default=0, help="keep running episodes until this many steps")
    r.add_argument("--seed", type=int, default=0, help="episodes use rtdp control's seeds 300000 + seed + i")
    r.add_argument("--max-episode-steps", type=POSITIVE)
    r.add_argument("--node", default="rtdp_policy", help="the policy node to drive")
    r.add_argument("--namespace", default="")
    _add_zenoh_arguments(r)
    r.add_argument("--faults", help="inject faults into the observations sent, e.g. drop=0.1,reorder=0.05,"
                   "duplicate=0.01,garbage=0.01")
    r.add_argument("--kill-inference-after", type=POSITIVE, metavar="STEPS",
                   help="SIGKILL the node's inference process after this many steps (same machine)")
    r.add_argument("--shutdown-node", action="store_true", help="finalize the node when done")
    r.add_argument("--report", help="write the JSON report here")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_robot_sim)

    z = sub.add_parser("router", help="a Zenoh router for the node and the robot where ROS 2's rmw_zenohd is not "
                       "installed")
    z.add_argument("--listen", action="append", metavar="ENDPOINT", help="default tcp/127.0.0.1:7447")
    z.add_argument("--multicast-scouting", action="store_true")
    z.set_defaults(func=cmd_router)

    m = sub.add_parser("motion", help="synthesise a character's motion with a motion model, steered by commands")
    m.add_argument("--checkpoint", required=True, help="an aamdm or amdm checkpoint trained through an autoencoder")
    m.add_argument("--seconds", type=RATE, default=20.0)
    m.add_argument("--control", default="walk 1.2 m/s", help="e.g. 'walk 1.2 m/s, turn left at 5 s, turn right by "
                   "45 deg at 10 s, face 180 deg at 14 s, speed 0.5 m/s at 17 s'")
    m.add_argument("--no-guidance", action="store_true", help="free synthesis: the commands are only measured")
    m.add_argument("--guidance-scale", type=float, help="how hard the commands pull each frame (default: the "
                   "checkpoint's planner.guidance_scale)")
    m.add_argument("--data", help="the motion dataset the start frame comes from (default: the training data)")
    m.add_argument("--start-clip", default="walk", help="start from the first frame of the clip with this name")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--threads", type=POSITIVE, default=1)
    m.add_argument("--video", help="write an mp4 of the character and its root path here")
    m.add_argument("--report", help="write fps, nfe_per_frame, guidance error and foot skating as JSON here")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=cmd_motion)

    d = sub.add_parser("demo", help="collect, train and evaluate closed-loop on a metaworld task, end to end")
    d.add_argument("--workdir", default="runs/demo")
    d.add_argument("--task", default="metaworld/drawer-open-v3")
    d.add_argument("--steps", type=POSITIVE, default=1000, help="training steps")
    d.add_argument("--episodes", type=POSITIVE, default=50, help="evaluation episodes per sampler")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--report", help="write a JSON summary here")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:  # bad input, a failed run: one line
        print(f"rtdp {args.verb}: error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rtdp {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
