"""Interactive motion synthesis with a motion model (AAMDM, AMDM): frame after frame from a start frame, steered by
a user's commands, decoded to a character whose root path is integrated on the ground.

    commands = parse_control("walk 1.2 m/s, turn left at 5 s")
    run = synthesize(policy, autoencoder, start_frame, skeleton, seconds=20, commands=commands)
    run.joints         # (N, J, 3) world joint positions;  run.root_path (N, 3);  run.commanded_yaw (N,)
    motion_report(run, ...)   # fps, nfe_per_frame, guidance error, foot skating

The commands become the embedding's 12 control features every frame (motion matching's desired trajectory: the
root 1/3, 2/3 and 1 s ahead along the commanded direction at the commanded speed, facing it), which guidance
pulls each frame toward; without guidance the same run is free synthesis, so the report can say what guidance
buys.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from envs.motion import CONTROL_HORIZON, FPS, Skeleton

COMMAND = re.compile(
    r"^(?:(?P<walk>walk|run|speed)\s+(?P<speed>[\d.]+)\s*m/s|turn\s+(?P<side>left|right)(?:\s+by\s+(?P<deg>[\d.]+)"
    r"\s*deg)?|face\s+(?P<face>-?[\d.]+)\s*deg)(?:\s+at\s+(?P<at>[\d.]+)\s*s)?$")


@dataclass
class Command:
    at: float  # seconds
    speed: float | None = None  # m/s from then on
    turn: float | None = None  # radians, relative (left is positive: counter-clockwise seen from above)
    face: float | None = None  # radians, absolute


def parse_control(text: str) -> list[Command]:
    """"walk 1.2 m/s, turn left at 5 s, turn right by 45 deg at 9 s, face 180 deg at 12 s, speed 0.8 m/s at 15 s"
    -> commands in time order; a clause that does not parse is named."""
    out = []
    for clause in (c.strip().lower() for c in text.split(",") if c.strip()):
        m = COMMAND.match(clause)
        if not m:
            raise ValueError(f"cannot read the control clause {clause!r}: expected 'walk V m/s', 'turn left|right "
                             f"[by D deg]', 'face D deg' or 'speed V m/s', each optionally followed by 'at T s'")
        at = float(m["at"] or 0.0)
        if m["walk"]:
            out.append(Command(at, speed=float(m["speed"])))
        elif m["side"]:
            sign = 1.0 if m["side"] == "left" else -1.0
            out.append(Command(at, turn=sign * np.radians(float(m["deg"] or 90.0))))
        else:
            out.append(Command(at, face=np.radians(float(m["face"]))))
    return sorted(out, key=lambda c: c.at)


def commanded(commands: list[Command], frames: int, start_yaw: float, fps: float = FPS
              ) -> tuple[np.ndarray, np.ndarray]:
    """Commanded yaw (radians) and speed (m/s) at every frame."""
    yaw, speed = np.full(frames, start_yaw), np.zeros(frames)
    y, v = start_yaw, 0.0
    for c in commands:
        k = int(round(c.at * fps))
        if c.speed is not None:
            v = c.speed
            speed[k:] = v
        if c.turn is not None:
            y = y + c.turn
            yaw[k:] = y
        if c.face is not None:
            y = c.face
            yaw[k:] = y
    return yaw, speed


def control_target(yaw_error: float, speed: float, fps: float = FPS) -> np.ndarray:
    """The 12 control features for walking at `speed` toward a direction `yaw_error` radians from the current
    heading (envs.motion.control_features' layout: per horizon, ground offset x, z and facing x, z)."""
    direction = np.array([np.cos(yaw_error), -np.sin(yaw_error)])
    return np.concatenate([np.concatenate([speed * h / fps * direction, direction]) for h in CONTROL_HORIZON])


@dataclass
class MotionRun:
    frames: np.ndarray  # (N, D) generated embedding frames
    poses: np.ndarray  # (N, P) decoded
    joints: np.ndarray  # (N, J, 3) world positions
    root_path: np.ndarray  # (N, 3) the root's ground point
    yaw: np.ndarray  # (N,) the root's heading
    commanded_yaw: np.ndarray
    commanded_speed: np.ndarray
    frame_ms: list[float] = field(default_factory=list)  # generation time per frame (model only)
    nfe: dict = field(default_factory=dict)
    guided: bool = True


def integrate(poses: np.ndarray, joints: int, fps: float = FPS, start_yaw: float = 0.0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Root ground path, heading and world joint positions from decoded poses (heading-frame velocities)."""
    n = len(poses)
    yaw = start_yaw + np.concatenate([[0.0], np.cumsum(poses[:-1, 3] / fps)])
    cos, sin = np.cos(yaw), np.sin(yaw)
    vx, vz = poses[:, 1], poses[:, 2]
    # a rotation by yaw about +y takes the heading frame's x to (cos, 0, -sin) and z to (sin, 0, cos)
    step = np.stack([cos * vx + sin * vz, np.zeros(n), -sin * vx + cos * vz], axis=1) / fps
    root = np.concatenate([np.zeros((1, 3)), np.cumsum(step[:-1], axis=0)])
    rel = poses[:, 4 + 6 * joints:4 + 9 * joints].reshape(n, joints, 3)
    world = np.stack([cos[:, None] * rel[..., 0] + sin[:, None] * rel[..., 2], rel[..., 1],
                      -sin[:, None] * rel[..., 0] + cos[:, None] * rel[..., 2]], axis=-1) + root[:, None]
    return root, yaw, world


def synthesize(policy, decode, start_frame: np.ndarray, skeleton: Skeleton, seconds: float,
               commands: list[Command], guided: bool = True, seed: int = 0, progress: bool = False,
               fps: float = FPS) -> MotionRun:
    """`policy`: the decision contract of a motion model (observes 'frame', optionally 'control'); `decode`: embedding
    frames (N, D) -> poses (N, P)."""
    from tqdm import tqdm

    n = int(round(seconds * fps))
    want_yaw, want_speed = commanded(commands, n, 0.0, fps)
    g = torch.Generator().manual_seed(seed)
    prev = torch.as_tensor(start_frame, dtype=torch.float32).reshape(1, 1, -1)
    frames, times, nfe, yaw = [], [], {}, 0.0
    policy.reset()
    for k in tqdm(range(n), desc="motion", disable=not progress, dynamic_ncols=True):
        obs = {"frame": prev}
        if guided:
            target = control_target(want_yaw[k] - yaw, want_speed[k], fps)
            obs["control"] = torch.as_tensor(target, dtype=torch.float32).reshape(1, 1, -1)
        t0 = time.perf_counter()
        chunk = policy.predict_chunk(obs, generator=g)
        times.append((time.perf_counter() - t0) * 1e3)
        prev = chunk.action
        frame = chunk.action[0, 0].numpy()
        frames.append(frame)
        yaw += float(decode(frame[None])[0, 3]) / fps  # the heading the next control target is relative to
        nfe = {"total": chunk.nfe, **{k: v for k, v in chunk.extras.items() if k.endswith("_calls")}}
    frames = np.stack(frames)
    poses = decode(frames)
    root, yaws, joints = integrate(poses, len(skeleton.names), fps)
    return MotionRun(frames, poses, joints, root, yaws, want_yaw, want_speed, times, nfe, guided)


def travel_direction(root: np.ndarray, k: int, window: int) -> float:
    d = root[min(len(root) - 1, k + window // 2)] - root[max(0, k - window // 2)]
    return float(np.arctan2(-d[2], d[0]))


def wrap(angle):
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


def guidance_error(run: MotionRun, commands: list[Command], after: float = 2.0, fps: float = FPS) -> dict:
    """The angle (degrees) between the commanded direction and the root's direction of travel (over 0.5 s)
    `after` seconds after each turn command, and over the whole run (after the first second)."""
    n = len(run.root_path)
    turns = [c.at for c in commands if c.turn is not None or c.face is not None]
    at = [int(round((t + after) * fps)) for t in turns if int(round((t + after) * fps)) < n]
    errors = [abs(float(wrap(travel_direction(run.root_path, k, fps // 2) - run.commanded_yaw[k]))) for k in at]
    every = [abs(float(wrap(travel_direction(run.root_path, k, fps // 2) - run.commanded_yaw[k])))
             for k in range(int(fps), n, int(fps) // 3)]
    return {"after_turn_s": after, "after_turn_deg": [float(np.degrees(e)) for e in errors],
            "after_turn_mean_deg": float(np.degrees(np.mean(errors))) if errors else None,
            "mean_deg": float(np.degrees(np.mean(every))) if every else None}


def foot_skating(joints: np.ndarray, feet: list[int], contact_height: float, fps: float = FPS) -> float:
    """Mean horizontal speed (m/s) of the feet while in contact (below `contact_height`)."""
    speeds = []
    for f in feet:
        p = joints[:, f]
        v = np.linalg.norm(np.diff(p[:, [0, 2]], axis=0), axis=1) * fps
        contact = p[1:, 1] < contact_height
        speeds.append(v[contact])
    s = np.concatenate(speeds)
    return float(s.mean()) if len(s) else 0.0


def motion_report(run: MotionRun, commands: list[Command], skeleton: Skeleton, contact_height: float) -> dict:
    ms = np.asarray(run.frame_ms[5:] or run.frame_ms)
    return {"frames": len(run.frames), "seconds": len(run.frames) / FPS, "guided": run.guided,
            "fps": float(1e3 / ms.mean()), "frame_ms": {"p50": float(np.percentile(ms, 50)),
                                                      "p99": float(np.percentile(ms, 99))},
            "nfe_per_frame": run.nfe, "guidance_error": guidance_error(run, commands),
            "foot_skating_m_s": foot_skating(run.joints, skeleton.feet(), contact_height),
            "distance_m": float(np.linalg.norm(np.diff(run.root_path[:, [0, 2]], axis=0), axis=1).sum())}


def write_motion_video(run: MotionRun, skeleton: Skeleton, path: str, fps: float = FPS,
                       progress: bool = False) -> str:
    """The character as a stick figure (camera following the root) beside the commanded and actual root path
    seen from above, as mp4."""
    import imageio.v2 as imageio
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    fig = plt.figure(figsize=(10, 5), dpi=80)
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    ax2 = fig.add_subplot(1, 2, 2)
    root = run.root_path
    # the commanded path: the commanded direction at the commanded speed, integrated
    # seen from above with x right and -z up, so that a left turn (positive yaw) turns left on screen
    top = root[:, [0, 2]] * [1, -1]
    step = np.stack([np.cos(run.commanded_yaw), np.sin(run.commanded_yaw)], axis=1) * \
        (run.commanded_speed / fps)[:, None]
    cmd = np.concatenate([np.zeros((1, 2)), np.cumsum(step[:-1], axis=0)])
    lo = np.minimum(top.min(0), cmd.min(0)) - 1
    hi = np.maximum(top.max(0), cmd.max(0)) + 1
    bones = [(k, p) for k, p in enumerate(skeleton.parents) if p >= 0]
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1) as writer:
        for k in tqdm(range(len(root)), desc="video", disable=not progress, dynamic_ncols=True):
            ax3.cla()
            j = run.joints[k]
            for a, b in bones:
                ax3.plot([j[a, 0], j[b, 0]], [j[a, 2], j[b, 2]], [j[a, 1], j[b, 1]], color="k", lw=2)
            c = root[k]
            ax3.set_xlim(c[0] - 1, c[0] + 1)
            ax3.set_ylim(c[2] - 1, c[2] + 1)
            ax3.set_zlim(0, 2)
            ax3.set_title(f"t = {k / fps:5.2f} s, {'guided' if run.guided else 'unguided'}")
            ax2.cla()
            ax2.plot(cmd[:, 0], cmd[:, 1], "--", color="tab:blue", label="commanded")
            ax2.plot(top[:k + 1, 0], top[:k + 1, 1], color="tab:red", label="root")
            ax2.plot(top[k, 0], top[k, 1], "o", color="tab:red")
            ax2.set_xlim(lo[0], hi[0])
            ax2.set_ylim(lo[1], hi[1])
            ax2.set_aspect("equal")
            ax2.set_xlabel("x (m)")
            ax2.set_ylabel("-z (m)")
            ax2.legend(loc="upper left")
            fig.canvas.draw()
            writer.append_data(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    plt.close(fig)
    return path


@dataclass
class MotionSession:
    policy: object  # the decision contract
    decode: object  # embedding frames -> poses
    start_frame: np.ndarray
    skeleton: Skeleton
    contact_height: float  # feet below it are in contact (from the data's foot heights)
    config: dict


def open_motion_session(checkpoint: str, data: str | None = None, start_clip: str = "walk",
                        backend: str = "torch", guidance_scale: float | None = None) -> MotionSession:
    """A motion checkpoint with the autoencoder it was trained through (its weights checked against the recorded
    sha256), the skeleton, and a start frame: the first frame of the first clip of the dataset whose name contains
    `start_clip`."""
    from deploy.runtime import RuntimeSettings, build_policy
    from envs.datasets import ReplayBuffer
    from planners.motion_autoencoder import decode_frames, embed_frames, load_autoencoder
    from policy.checkpoint import weights_sha256

    runtime = build_policy(RuntimeSettings(checkpoint, backend=backend))
    if guidance_scale is not None:  # how hard the commands pull: a setting of synthesis, not of the weights
        if not guidance_scale >= 0:
            raise ValueError(f"guidance scale must be >= 0, got {guidance_scale}")
        runtime.model.cfg.guidance_scale = runtime.config["guidance_scale"] = guidance_scale
    d = runtime.run_cfg.data
    if not getattr(d, "autoencoder", None):
        raise ValueError(f"{checkpoint} was not trained through a motion autoencoder (data.autoencoder): it "
                         "generates raw frames, not poses to animate")
    if weights_sha256(d.autoencoder) != d.autoencoder_sha256:
        raise ValueError(f"the autoencoder at {d.autoencoder} is not the one {checkpoint} was trained through "
                         "(its weights changed)")
    ae, ae_cfg = load_autoencoder(d.autoencoder)
    data = data or d.path
    if not data:
        raise ValueError("pass --data: the motion dataset to take the start frame from")
    buffer = ReplayBuffer.load(data)
    ae.check_skeleton(buffer.attrs.get("skeleton", {}))
    names = list(buffer.attrs.get("clips", []))
    mirrored = buffer.n_episodes == 2 * len(names)
    episode = next((i * (2 if mirrored else 1) for i, n in enumerate(names) if start_clip in n), 0)
    start = 0 if episode == 0 else int(buffer.episode_ends[episode - 1])
    pose_key, control_key = ae_cfg.data.pose_key, ae_cfg.data.control_key
    start_frame = embed_frames(ae, buffer[pose_key][start:start + 1], buffer[control_key][start:start + 1])[0]
    sk = ae_cfg.planner.skeleton
    skeleton = Skeleton(tuple(sk["names"]), tuple(sk["parents"]), np.asarray(sk["offsets"]), tuple(sk["forward"]))
    j = len(skeleton.names)
    heights = buffer[pose_key][:, 4 + 6 * j:4 + 9 * j].reshape(-1, j, 3)[:, skeleton.feet(), 1]
    contact = float(np.percentile(heights, 5)) + 0.02
    return MotionSession(runtime.policy, lambda xz: decode_frames(ae, xz), start_frame, skeleton, contact,
                         runtime.config)
