"""Motion data (AAMDM's section 6 data): the DeepMimic clips read from the pybullet wheel with forward kinematics
from the humanoid's URDF, mirroring, BVH read/write round trips through bvhio, clear errors on a truncated BVH, and
the Squ-9 toy's transitions."""

import numpy as np
import pytest

pytest.importorskip("pybullet_data")
pytest.importorskip("bvhio")

from envs.motion import (  # noqa: E402
    FPS,
    MotionError,
    control_features,
    deepmimic_clips,
    forward_kinematics,
    mirror,
    motion_dataset,
    pose_features,
    read_bvh,
    write_bvh,
)
from envs.squ9 import nearest_cell, squ9_chain  # noqa: E402


@pytest.fixture(scope="module")
def walk():
    return deepmimic_clips(["walk"], seconds=3.0)[0]


def test_deepmimic_clips_load_at_30_fps_with_feet_on_the_ground(walk):
    clips = deepmimic_clips(seconds=3.0)
    assert len(clips) == 15 and all(c.fps == FPS for c in clips)
    sk = walk.skeleton
    assert len(sk.names) == 15 and [sk.names[f] for f in sk.feet()] == ["right_ankle", "left_ankle"]
    pos, _ = forward_kinematics(sk, walk.root_position, walk.rotations)
    ankles = pos[:, sk.feet(), 1]
    assert 0.0 < ankles.min() < 0.12, ankles.min()  # the ankle joint sits a few cm above the sole
    assert 0.75 < walk.root_position[:, 1].mean() < 0.95
    speed = np.linalg.norm(np.diff(walk.root_position[:, [0, 2]], axis=0), axis=1).mean() * FPS
    assert 0.8 < speed < 1.6, speed  # a walk, looped: the cycles continue on the ground


def test_pose_features_hold_forward_kinematics_and_the_control_features_see_ahead(walk):
    y = pose_features(walk)
    j = len(walk.skeleton.names)
    assert y.shape == (len(walk), 4 + 12 * j)
    pos, _ = forward_kinematics(walk.skeleton, walk.root_position, walk.rotations)
    heights = y[:, 4 + 6 * j:4 + 9 * j].reshape(-1, j, 3)[..., 1]
    np.testing.assert_allclose(heights, pos[..., 1], atol=1e-5)  # the heading frame keeps heights
    x = control_features(walk)
    assert x.shape == (len(walk), 12)
    # walking forward: 1 s ahead lies about 1 s of speed ahead, along the heading, facing it
    np.testing.assert_allclose(np.linalg.norm(x[:60, 10:12], axis=1), 1.0, atol=1e-5)
    assert (x[:60, 8] > 0.8).all() and (np.abs(x[:60, 9]) < 0.4).all()


def test_mirroring_reflects_the_motion_and_twice_is_the_clip(walk):
    m = mirror(walk)
    sk = walk.skeleton
    twins = sk.mirror_map()
    assert [sk.names[t] for t in twins][3] == "left_hip"
    pos, _ = forward_kinematics(sk, walk.root_position, walk.rotations)
    pm, _ = forward_kinematics(sk, m.root_position, m.rotations)
    np.testing.assert_allclose(pm[:, twins] * [1, 1, -1], pos, atol=1e-9)
    back = mirror(m)
    np.testing.assert_allclose(np.abs((back.rotations * walk.rotations).sum(-1)), 1.0, atol=1e-9)
    buffer = motion_dataset([walk])
    assert buffer.n_episodes == 2 and buffer.attrs["skeleton"]["names"][0] == "root"


def test_bvh_round_trip_keeps_every_joint_position(walk, tmp_path):
    path = write_bvh(walk, tmp_path / "walk.bvh")
    back = read_bvh(path)
    assert back.fps == FPS and len(back) == len(walk)
    order = [back.skeleton.names.index(n) for n in walk.skeleton.names]
    pos, _ = forward_kinematics(walk.skeleton, walk.root_position, walk.rotations)
    pb, _ = forward_kinematics(back.skeleton, back.root_position, back.rotations)
    np.testing.assert_allclose(pb[:, order], pos, atol=1e-5)
    np.testing.assert_allclose(pose_features(back)[:, :4], pose_features(walk)[:, :4], atol=1e-3)


def test_a_truncated_or_garbled_bvh_is_refused_by_name(walk, tmp_path):
    text = write_bvh(walk, tmp_path / "walk.bvh").read_text().splitlines()
    (tmp_path / "cut.bvh").write_text("\n".join(text[: len(text) - 40]) + "\n")
    with pytest.raises(MotionError, match="cut.bvh"):
        read_bvh(tmp_path / "cut.bvh")
    (tmp_path / "junk.bvh").write_text("HIERARCHY\nROOT hips\n{ OFFSET 0 0\n")
    with pytest.raises(MotionError, match="junk.bvh: not a readable BVH file"):
        read_bvh(tmp_path / "junk.bvh")


def test_squ9_jumps_uniformly_to_another_cell_and_never_stays():
    points = squ9_chain(20_000, seed=1)["frame"]
    cells = nearest_cell(points)
    assert not (cells[1:] == cells[:-1]).any()
    jumps = (cells[1:] - cells[:-1]) % 9
    counts = np.bincount(jumps, minlength=9)[1:]
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()
