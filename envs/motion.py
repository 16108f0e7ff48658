"""Motion capture as animators keep it, turned into per-frame features for motion synthesis (AAMDM).

    clips = deepmimic_clips()                       # the humanoid reference clips inside the pybullet wheel
    clip = read_bvh("lafan1/walk1_subject1.bvh")    # any BVH file (LaFAN1 ships as BVH), through bvhio
    write_bvh(clip, "out.bvh")
    buffer = motion_dataset(clips, mirror=True)     # ReplayBuffer: "frame" (N, 12 + pose_dim), one episode per clip

A clip is a skeleton (joint names, parents, rest offsets) and, per frame, the root position and every joint's local
rotation (quaternions, scipy's x-y-z-w order), resampled to `FPS`. The world is y-up, as BVH and DeepMimic are.

Per-frame features (`pose_features`, the autoencoder's y): in the frame of the root's heading (its facing direction
on the ground), the root's height, planar velocity and yaw rate, every joint's local rotation as 6-D (the first two
columns of its matrix; the root's relative to the heading), every joint's position relative to the root's ground
point and its velocity. `control_features` (the embedding's 12 hand features x, as in motion matching): the root's
position and facing direction 1/3, 2/3 and 1 s ahead, in the current heading frame.

The DeepMimic clips (Peng et al. 2018) ship in pybullet's wheel (zlib licence; the DeepMimic repository is MIT);
they are mocap-derived, about 45 s in all, and come without a licence file of their own.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from .datasets.replay_buffer import DatasetError, ReplayBuffer

FPS = 30
CONTROL_HORIZON = (10, 20, 30)  # frames ahead at FPS: 1/3, 2/3 and 1 s
N_CONTROL = 4 * len(CONTROL_HORIZON)


class MotionError(ValueError):
    """A motion file that cannot be read as a clip: named, with what was wrong."""


@dataclass(frozen=True)
class Skeleton:
    names: tuple[str, ...]
    parents: tuple[int, ...]  # -1 for the root, parents before children
    offsets: np.ndarray  # (J, 3) rest offset from the parent, metres
    forward: tuple[float, float, float] = (1.0, 0.0, 0.0)  # the root's facing axis in its own frame

    def __post_init__(self):
        if len(self.names) != len(self.parents) or np.shape(self.offsets) != (len(self.names), 3):
            raise MotionError(f"a skeleton needs one parent and one 3-D offset per joint: {len(self.names)} names, "
                              f"{len(self.parents)} parents, offsets {np.shape(self.offsets)}")
        for j, p in enumerate(self.parents):
            if (j == 0) != (p < 0) or p >= j:
                raise MotionError(f"joint {self.names[j]!r}: parent index {p} (the root comes first, parents before "
                                  "children)")

    def to_dict(self) -> dict:
        return {"names": list(self.names), "parents": list(self.parents),
                "offsets": np.asarray(self.offsets).round(6).tolist(), "forward": list(self.forward)}

    def mirror_map(self) -> list[int]:
        """Each joint's left/right twin (itself for the spine), by name."""
        swaps = (("left", "right"), ("Left", "Right"), ("l_", "r_"), ("L_", "R_"))
        out = []
        for name in self.names:
            twin = name
            for a, b in swaps:
                if a in name:
                    twin = name.replace(a, b)
                elif b in name:
                    twin = name.replace(b, a)
                if twin != name:
                    break
            out.append(self.names.index(twin) if twin in self.names else self.names.index(name))
        return out

    def feet(self) -> list[int]:
        return [j for j, n in enumerate(self.names) if any(k in n.lower() for k in ("ankle", "foot", "toe"))]


@dataclass(frozen=True)
class Clip:
    name: str
    skeleton: Skeleton
    fps: float
    root_position: np.ndarray  # (N, 3)
    rotations: np.ndarray  # (N, J, 4) local, x-y-z-w; [:, 0] is the root's world rotation

    def __post_init__(self):
        n, j = len(self.root_position), len(self.skeleton.names)
        if self.rotations.shape != (n, j, 4) or np.shape(self.root_position) != (n, 3):
            raise MotionError(f"{self.name}: {n} root positions, rotations {self.rotations.shape}; expected "
                              f"({n}, {j}, 4)")
        if n < 2:
            raise MotionError(f"{self.name}: a clip needs at least 2 frames, got {n}")
        if not (np.isfinite(self.root_position).all() and np.isfinite(self.rotations).all()):
            raise MotionError(f"{self.name}: holds NaN or Inf")

    def __len__(self) -> int:
        return len(self.root_position)

    @property
    def seconds(self) -> float:
        return (len(self) - 1) / self.fps


# -- forward kinematics -----------------------------------------------------------------------------------------


def forward_kinematics(skeleton: Skeleton, root_position: np.ndarray, rotations: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """World joint positions (N, J, 3) and rotation matrices (N, J, 3, 3) from local rotations (N, J, 4)."""
    n, j = rotations.shape[:2]
    local = Rotation.from_quat(rotations.reshape(-1, 4)).as_matrix().reshape(n, j, 3, 3)
    world_r = np.empty_like(local)
    world_p = np.empty((n, j, 3))
    offsets = np.asarray(skeleton.offsets)
    for k, parent in enumerate(skeleton.parents):
        if parent < 0:
            world_r[:, k], world_p[:, k] = local[:, k], root_position
        else:
            world_r[:, k] = world_r[:, parent] @ local[:, k]
            world_p[:, k] = world_p[:, parent] + world_r[:, parent] @ offsets[k]
    return world_p, world_r


def headings(skeleton: Skeleton, root_rotation: np.ndarray) -> np.ndarray:
    """The yaw (about +y) of the root's facing axis projected on the ground, per frame (N,)."""
    fwd = Rotation.from_quat(root_rotation).apply(np.asarray(skeleton.forward))
    return np.arctan2(-fwd[:, 2], fwd[:, 0])


def yaw_rotation(yaw: np.ndarray) -> Rotation:
    return Rotation.from_rotvec(np.asarray(yaw)[:, None] * np.array([[0.0, 1.0, 0.0]]))


# -- reading and writing ----------------------------------------------------------------------------------------


def resample(clip: Clip, fps: float = FPS, times: np.ndarray | None = None) -> Clip:
    """The clip at `fps`: root positions interpolated linearly, rotations by slerp. `times`: each source frame's
    time, where the source's frames are not evenly spaced."""
    if times is None and abs(clip.fps - fps) < 1e-6:
        return clip
    t_src = np.arange(len(clip)) / clip.fps if times is None else np.asarray(times, np.float64)
    t_dst = np.arange(0.0, t_src[-1] + 1e-9, 1.0 / fps)
    root = np.stack([np.interp(t_dst, t_src, clip.root_position[:, k]) for k in range(3)], axis=1)
    rots = np.stack([Slerp(t_src, Rotation.from_quat(clip.rotations[:, k]))(t_dst).as_quat()
                     for k in range(clip.rotations.shape[1])], axis=1)
    return Clip(clip.name, clip.skeleton, fps, root, rots)


DEEPMIMIC_JOINTS = (  # the motion file's order after root position and rotation: (name, degrees of freedom)
    ("chest", 4), ("neck", 4), ("right_hip", 4), ("right_knee", 1), ("right_ankle", 4), ("right_shoulder", 4),
    ("right_elbow", 1), ("left_hip", 4), ("left_knee", 1), ("left_ankle", 4), ("left_shoulder", 4), ("left_elbow", 1))
DEEPMIMIC_SCALE = 0.25  # pybullet loads humanoid.urdf with globalScaling 0.25 for these clips


def pybullet_data_dir() -> Path:
    try:
        import pybullet_data
    except ImportError:
        raise ImportError("the DeepMimic clips ship inside the pybullet wheel: pip install -e .[motion]") from None
    return Path(pybullet_data.getDataPath())


def deepmimic_skeleton(urdf: str | Path | None = None) -> Skeleton:
    """The humanoid's joints and rest offsets from its URDF (revolute knees and elbows turn about z)."""
    urdf = Path(urdf) if urdf else pybullet_data_dir() / "humanoid" / "humanoid.urdf"
    try:
        root = ET.fromstring(urdf.read_bytes().rstrip(b"\x00\r\n"))  # pybullet's copy ends in a NUL byte
    except (OSError, ET.ParseError) as e:
        raise MotionError(f"{urdf}: not a readable URDF: {e}") from None
    names, parents, offsets = ["root"], [-1], [np.zeros(3)]
    for joint in root.findall("joint"):
        child, parent = joint.find("child").get("link"), joint.find("parent").get("link")
        if child == "root":
            continue
        names.append(child)
        parents.append(names.index(parent))
        offsets.append(np.array([float(v) for v in joint.find("origin").get("xyz").split()]) * DEEPMIMIC_SCALE)
    return Skeleton(tuple(names), tuple(parents), np.stack(offsets))


def read_deepmimic(path: str | Path, skeleton: Skeleton | None = None) -> tuple[Clip, bool]:
    """A DeepMimic motion file -> (clip at FPS, whether it loops)."""
    path = Path(path)
    skeleton = skeleton or deepmimic_skeleton()
    try:
        doc = json.loads(path.read_text())
        frames = np.asarray(doc["Frames"], np.float64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MotionError(f"{path}: not a DeepMimic motion file: {e}") from None
    width = 1 + 3 + 4 + sum(d for _, d in DEEPMIMIC_JOINTS)
    if frames.ndim != 2 or frames.shape[1] != width:
        raise MotionError(f"{path}: frames must be rows of {width} numbers, got shape {frames.shape}")
    n = len(frames)
    rots = np.tile(np.array([0.0, 0.0, 0.0, 1.0]), (n, len(skeleton.names), 1))
    wxyz_to_xyzw = [1, 2, 3, 0]
    rots[:, 0] = frames[:, 4:8][:, wxyz_to_xyzw]
    col = 8
    for name, dof in DEEPMIMIC_JOINTS:
        k = skeleton.names.index(name)
        if dof == 4:
            rots[:, k] = frames[:, col:col + 4][:, wxyz_to_xyzw]
        else:
            rots[:, k] = Rotation.from_rotvec(frames[:, col:col + 1] * np.array([[0.0, 0.0, 1.0]])).as_quat()
        col += dof
    rots /= np.linalg.norm(rots, axis=-1, keepdims=True)
    dt = frames[:-1, 0]
    if (dt <= 0).any():
        raise MotionError(f"{path}: every frame but the last needs a positive duration, got {dt.min()}")
    clip = Clip(path.stem, skeleton, 1.0 / float(dt.mean()), frames[:, 1:4], rots)
    return resample(clip, times=np.concatenate([[0.0], np.cumsum(dt)])), doc.get("Loop") == "wrap"


def loop(clip: Clip, cycles: int) -> Clip:
    """A looping clip played `cycles` times, each cycle continuing from where the last one ended on the ground
    (DeepMimic's wrap mode): the ground displacement and turn of one cycle composed again and again."""
    n = len(clip) - 1  # the last frame is the first frame of the next cycle
    yaw = headings(clip.skeleton, clip.rotations[:, 0])
    turn = yaw[n] - yaw[0]
    shift = clip.root_position[n] - clip.root_position[0]
    shift[1] = 0.0
    roots, rots = [], []
    offset, spin = np.zeros(3), 0.0
    for _ in range(cycles):
        r = yaw_rotation(np.array([spin]))
        roots.append(r.apply(clip.root_position[:n] - clip.root_position[0] * [1, 0, 1]) + offset +
                     clip.root_position[0] * [1, 0, 1])
        cycle_rots = clip.rotations[:n].copy()
        cycle_rots[:, 0] = (r * Rotation.from_quat(cycle_rots[:, 0])).as_quat()
        rots.append(cycle_rots)
        offset = offset + r.apply(shift)[0]
        spin += turn
    return Clip(clip.name, clip.skeleton, clip.fps, np.concatenate(roots), np.concatenate(rots))


def deepmimic_clips(names: list[str] | None = None, seconds: float = 10.0) -> list[Clip]:
    """The humanoid3d clips in pybullet's data, at FPS; looping ones played to about `seconds`."""
    folder = pybullet_data_dir() / "data" / "motions"
    skeleton = deepmimic_skeleton()
    paths = sorted(folder.glob("humanoid3d_*.txt"))
    if names:
        paths = [p for p in paths if p.stem.removeprefix("humanoid3d_") in names]
        missing = set(names) - {p.stem.removeprefix("humanoid3d_") for p in paths}
        if missing:
            raise MotionError(f"no DeepMimic clip named {sorted(missing)} in {folder}")
    clips = []
    for path in paths:
        clip, wraps = read_deepmimic(path, skeleton)
        if wraps:
            clip = loop(clip, max(1, int(np.ceil(seconds / clip.seconds))))
        clips.append(clip)
    return clips


def read_bvh(path: str | Path) -> Clip:
    """A BVH file (any skeleton) -> a clip at FPS. Offsets are taken as metres when the skeleton is under 3 units
    tall, else as centimetres (LaFAN1's)."""
    import bvhio

    path = Path(path)
    _check_bvh_structure(path)
    try:
        bvh = bvhio.readAsBvh(str(path))
    except Exception as e:  # bvhio raises bare exceptions on malformed files
        raise MotionError(f"{path}: not a readable BVH file: {type(e).__name__}: {e}") from None
    layout = [joint for joint, _, _ in bvh.Root.layout()]
    index = {id(j): k for k, j in enumerate(layout)}
    parents = [-1] + [index[id(p)] for j in layout for p in layout if j in p.Children]
    frames = bvh.FrameCount
    if frames < 2 or any(len(j.Keyframes) != frames for j in layout):
        raise MotionError(f"{path}: declares {frames} frames but holds {[len(j.Keyframes) for j in layout][:3]}... "
                          "keyframes per joint (a truncated file?)")
    offsets = np.array([[j.Offset.x, j.Offset.y, j.Offset.z] for j in layout])
    root = np.array([[k.Position.x, k.Position.y, k.Position.z] for k in bvh.Root.Keyframes])
    rots = np.array([[[k.Rotation.x, k.Rotation.y, k.Rotation.z, k.Rotation.w] for k in j.Keyframes]
                     for j in layout]).transpose(1, 0, 2)
    rest = np.zeros_like(offsets)
    for k, parent in enumerate(parents[1:], start=1):
        rest[k] = rest[parent] + offsets[k]
    scale = 0.01 if np.ptp(rest, axis=0).max() > 3.0 else 1.0
    skeleton = Skeleton(tuple(j.Name for j in layout), tuple(parents), offsets * scale, _bvh_forward(layout))
    return resample(Clip(path.stem, skeleton, 1.0 / bvh.FrameTime, root * scale, rots))


def _check_bvh_structure(path: Path) -> None:
    """What bvhio's parser does not check before reading (at the end of a file it reads empty lines forever): a
    closed hierarchy, a MOTION header, and as many frame lines as it declares, each with one value per channel."""
    try:
        lines = [line.split() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise MotionError(f"{path}: not a readable BVH file: {e}") from None
    lines = [t for t in lines if t]
    if not lines or lines[0] != ["HIERARCHY"]:
        raise MotionError(f"{path}: not a readable BVH file: it does not start with HIERARCHY")
    motion = next((k for k, t in enumerate(lines) if t == ["MOTION"]), None)
    hierarchy = [tok for t in lines[1:motion] for tok in t]
    if motion is None or hierarchy.count("{") != hierarchy.count("}") or "{" not in hierarchy:
        raise MotionError(f"{path}: not a readable BVH file: the hierarchy is not closed or no MOTION section "
                          "follows it")
    head = lines[motion + 1:motion + 3]
    if len(head) < 2 or head[0][:1] != ["Frames:"] or head[1][:2] != ["Frame", "Time:"]:
        raise MotionError(f"{path}: not a readable BVH file: MOTION must be followed by 'Frames: N' and "
                          "'Frame Time: dt'")
    try:
        declared = int(head[0][1])
    except (IndexError, ValueError):
        raise MotionError(f"{path}: not a readable BVH file: cannot read the frame count {head[0]}") from None
    channels = sum(int(t[1]) for t in lines[1:motion] if t[0] == "CHANNELS" and len(t) > 1 and t[1].isdigit())
    rows = lines[motion + 3:]
    short = [k for k, row in enumerate(rows) if len(row) != channels]
    if len(rows) < declared or short:
        raise MotionError(f"{path}: declares {declared} frames of {channels} channels but holds {len(rows)} frame "
                          f"lines{f', line {short[0] + 1} with {len(rows[short[0]])} values' if short else ''} "
                          "(a truncated file?)")


def _bvh_forward(layout) -> tuple[float, float, float]:
    """The facing axis of a BVH root at rest: perpendicular to the hips' left-right axis, on the ground."""
    names = [j.Name.lower() for j in layout]
    left = next((k for k, n in enumerate(names) if "left" in n and ("upleg" in n or "hip" in n)), None)
    right = next((k for k, n in enumerate(names) if "right" in n and ("upleg" in n or "hip" in n)), None)
    if left is None or right is None:
        return (0.0, 0.0, 1.0)
    lr = np.array([layout[left].Offset.x - layout[right].Offset.x, 0.0, layout[left].Offset.z - layout[right].Offset.z])
    fwd = np.cross(lr, [0.0, 1.0, 0.0])
    return tuple(float(v) for v in fwd / (np.linalg.norm(fwd) or 1.0))


def write_bvh(clip: Clip, path: str | Path, precision: int = 6) -> Path:
    """The clip as BVH (root: position + rotation channels, other joints: rotation), offsets in metres."""
    import bvhio
    import glm
    from SpatialTransform import Pose

    joints = [bvhio.BvhJoint(name, glm.vec3(*map(float, off))) for name, off in
              zip(clip.skeleton.names, clip.skeleton.offsets, strict=True)]
    for k, parent in enumerate(clip.skeleton.parents):
        joints[k].Channels = (["Xposition", "Yposition", "Zposition"] if parent < 0 else []) + \
            ["Zrotation", "Xrotation", "Yrotation"]
        if parent >= 0:
            joints[parent].Children.append(joints[k])
        for f in range(len(clip)):
            x, y, z, w = map(float, clip.rotations[f, k])
            position = glm.vec3(*map(float, clip.root_position[f])) if parent < 0 else glm.vec3(joints[k].Offset)
            joints[k].Keyframes.append(Pose(position, glm.quat(w, x, y, z)))
    bvh = bvhio.BvhContainer(joints[0], len(clip), 1.0 / clip.fps)
    bvhio.writeBvh(str(path), bvh, percision=precision)
    return Path(path)


def mirror(clip: Clip) -> Clip:
    """Left and right swapped: the motion reflected through the character's sagittal plane (the rest pose's
    left-right axis is z for DeepMimic, x for a BVH facing +z), twin joints exchanged."""
    lateral = 2 if abs(clip.skeleton.forward[0]) > abs(clip.skeleton.forward[2]) else 0
    flip = np.ones(3)
    flip[lateral] = -1.0
    twins = clip.skeleton.mirror_map()
    quats = clip.rotations[:, twins].copy()
    # a reflection M turns a rotation about axis a into one about -M a by the same angle
    quats[..., :3] *= -flip
    offsets = np.asarray(clip.skeleton.offsets)[twins] * flip
    skeleton = replace(clip.skeleton, offsets=np.asarray(clip.skeleton.offsets))
    if not np.allclose(offsets, skeleton.offsets, atol=1e-4):
        raise MotionError(f"{clip.name}: the skeleton is not left-right symmetric; it cannot be mirrored")
    return Clip(clip.name + "_mirror", skeleton, clip.fps, clip.root_position * flip, quats)


# -- features ---------------------------------------------------------------------------------------------------


def pose_dim(skeleton: Skeleton) -> int:
    return 4 + 12 * len(skeleton.names)


def pose_features(clip: Clip) -> np.ndarray:
    """(N, 4 + 12 J): root height, planar velocity (2) and yaw rate in the heading frame; J 6-D local rotations
    (the root's relative to the heading); J positions relative to the root's ground point; J velocities."""
    sk = clip.skeleton
    pos, _ = forward_kinematics(sk, clip.root_position, clip.rotations)
    yaw = headings(sk, clip.rotations[:, 0])
    to_local = yaw_rotation(yaw).inv()
    n, j = len(clip), len(sk.names)
    ground = clip.root_position * [1, 0, 1]
    vel = np.gradient(pos, axis=0) * clip.fps
    root_vel = to_local.apply(vel[:, 0])
    yaw_rate = np.gradient(np.unwrap(yaw)) * clip.fps
    local = clip.rotations.copy()
    local[:, 0] = (to_local * Rotation.from_quat(local[:, 0])).as_quat()
    six = Rotation.from_quat(local.reshape(-1, 4)).as_matrix()[..., :2].reshape(n, j * 6)
    rel = np.stack([to_local.apply(pos[:, k] - ground) for k in range(j)], axis=1).reshape(n, j * 3)
    v = np.stack([to_local.apply(vel[:, k]) for k in range(j)], axis=1).reshape(n, j * 3)
    return np.concatenate([clip.root_position[:, 1:2], root_vel[:, [0, 2]], yaw_rate[:, None], six, rel, v],
                          axis=1).astype(np.float32)


def control_features(clip: Clip, horizon: tuple[int, ...] = CONTROL_HORIZON) -> np.ndarray:
    """(N, 4 per horizon): the root's ground position (x, z) and facing direction (x, z) `horizon` frames ahead,
    in the current heading frame (held at the clip's last frame past its end)."""
    yaw = headings(clip.skeleton, clip.rotations[:, 0])
    to_local = yaw_rotation(yaw).inv()
    ground = clip.root_position * [1, 0, 1]
    n = len(clip)
    out = []
    for h in horizon:
        ahead = np.minimum(np.arange(n) + h, n - 1)
        d = to_local.apply(ground[ahead] - ground)
        facing = to_local.apply(np.stack([np.cos(yaw[ahead]), np.zeros(n), -np.sin(yaw[ahead])], axis=1))
        out.append(np.stack([d[:, 0], d[:, 2], facing[:, 0], facing[:, 2]], axis=1))
    return np.concatenate(out, axis=1).astype(np.float32)


def motion_dataset(clips: list[Clip], mirrored: bool = True) -> ReplayBuffer:
    """Every clip (and its mirror) as one episode: `pose` (N, 4 + 12 J) and `control` (N, 12) per frame. The
    skeleton goes into the attributes, so a model trained on it can refuse another."""
    if not clips:
        raise DatasetError("no clips to make a motion dataset from")
    skeleton = clips[0].skeleton
    buffer = ReplayBuffer()
    for clip in clips:
        if clip.skeleton.names != skeleton.names or not np.allclose(clip.skeleton.offsets, skeleton.offsets):
            raise DatasetError(f"{clip.name}: its skeleton differs from {clips[0].name}'s; one dataset holds one "
                               "skeleton")
        for c in (clip, mirror(clip)) if mirrored else (clip,):
            buffer.add_episode({"pose": pose_features(c), "control": control_features(c)})
    buffer.attrs["skeleton"] = skeleton.to_dict()
    buffer.attrs["clips"] = [c.name for c in clips]
    buffer.attrs["fps"] = FPS
    return buffer
