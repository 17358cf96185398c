"""The procedural block-world generator: determinism, kinematics, revisits, layout, CLI and speed."""

import math
import time
from pathlib import Path

import numpy as np
import pytest

from decmem_jax.data import agent, generate_world, world
from decmem_jax.format import check_clip_arrays, load_clip_arrays, noop
from decmem_jax.video import probe, read_video


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def flat_world(pillar=None) -> world.World:
    """A 64 x 64 world of stone up to y = 5 (standing level 5), with an optional log pillar at column (x, z)."""
    blocks = np.zeros((64, 32, 64), np.uint8)
    blocks[:, :5] = world.STONE
    if pillar is not None:
        blocks[pillar[0], 5:10, pillar[1]] = world.LOG
    return world.World(blocks, np.full((64, 64), 5, np.int64), seed=0, water_level=0)


def act(fb=0, strafe=0, pitch=12, yaw=12):
    a = noop(1)[0]
    a[0], a[1], a[3], a[4] = fb, strafe, pitch, yaw
    return a


def test_same_seed_same_files_and_frames(tmp_path):
    runs = [generate_world.generate(tmp_path / name, 2, 40, (64, 64), seed=7, progress=False) for name in "ab"]
    assert [Path(m).relative_to(tmp_path / "a") for m, _ in runs[0]] == \
           [Path(m).relative_to(tmp_path / "b") for m, _ in runs[1]]
    for (mp4_a, npz_a), (mp4_b, npz_b) in zip(*runs):
        assert Path(npz_a).read_bytes() == Path(npz_b).read_bytes()
        a, b = read_video(mp4_a), read_video(mp4_b)  # the mpeg4 encoder is deterministic: identical decodes
        assert a.shape == (40, 64, 64, 3)
        np.testing.assert_array_equal(a, b)
    for index in range(2):
        clips = [generate_world.make_clip(index, 40, (64, 64), 7, False) for _ in range(2)]
        for x, y in zip(*clips):
            np.testing.assert_array_equal(x, y)


def test_different_seeds_different_worlds():
    a, b = world.build_world(0), world.build_world(1)
    assert (a.blocks != b.blocks).mean() > 0.05
    np.testing.assert_array_equal(a.blocks, world.build_world(0).blocks)
    clip0, clip1 = (generate_world.make_clip(0, 5, (32, 32), seed, False)[0] for seed in (0, 1))
    assert psnr(clip0[0], clip1[0]) < 20


def test_world_looks_like_a_block_world():
    w = world.build_world(3)
    pose = agent.random_start(w, np.random.default_rng(0))
    up, ahead, down = world.render(w, [(*pose[:3], p, pose[4]) for p in (-90.0, 0.0, 90.0)], (32, 48))
    assert up.shape == (32, 48, 3) and up.dtype == np.uint8
    assert (up[..., 2].astype(int) > up[..., 0] + 40).mean() > 0.5  # straight up: mostly blue sky
    assert (down[..., 2].astype(int) < down[..., 0] + 40).mean() > 0.9  # straight down: the ground, not sky
    assert len(np.unique(ahead.reshape(-1, 3), axis=0)) > 100  # textured, shaded terrain
    assert all((w.blocks == m).any() for m in (world.GRASS, world.DIRT, world.STONE, world.LOG, world.LEAVES))


def test_poses_follow_actions():
    w = flat_world()
    start = agent.eye_pose(w, 30.3, 30.6, 0.0, 37.0)
    assert start[1] == 5 + agent.EYE_HEIGHT
    moved, ok = agent.step_pose(w, start, act(fb=1))
    dx, dz = -math.sin(math.radians(37.0)) * agent.STEP, math.cos(math.radians(37.0)) * agent.STEP
    assert ok and moved[1] == start[1] and moved[3:] == start[3:]
    np.testing.assert_allclose([moved[0] - start[0], moved[2] - start[2]], [dx, dz], atol=1e-12)
    back = agent.step_pose(w, start, act(fb=2))[0]
    np.testing.assert_allclose([back[0] - start[0], back[2] - start[2]], [-dx, -dz], atol=1e-12)
    left = agent.step_pose(w, agent.eye_pose(w, 30.3, 30.6, 0.0, 0.0), act(strafe=1))[0]  # yaw 0 faces +z
    np.testing.assert_allclose(left[:3:2], [30.3 + agent.STEP, 30.6], atol=1e-12)  # ... so left is +x
    turned = agent.step_pose(w, start, act(yaw=13))[0]
    assert turned[:4] == start[:4] and turned[4] == 52.0
    assert agent.step_pose(w, start, act(yaw=11))[0][4] == 22.0
    pitched = agent.step_pose(w, start, act(pitch=13))[0]
    assert pitched[:3] == start[:3] and pitched[3] == 15.0 and pitched[4] == start[4]
    assert agent.step_pose(w, (*start[:3], 85.0, 0.0), act(pitch=14))[0][3] == 90.0  # clamped
    assert agent.step_pose(w, (*start[:3], 0.0, 175.0), act(yaw=13))[0][4] == -170.0  # wrapped to (-180, 180]
    assert agent.wrap_yaw(-180.0) == 180.0


def test_collisions_and_bounds():
    w = flat_world(pillar=(30, 31))
    facing_pillar = agent.eye_pose(w, 30.5, 30.5, 0.0, 0.0)  # the pillar block spans z in [31, 32)
    pose, moved = agent.step_pose(w, facing_pillar, act(fb=1))
    assert not moved and pose == facing_pillar
    edge = agent.eye_pose(w, 64 - agent.MARGIN - 0.1, 20.5, 0.0, -90.0)  # yaw -90 faces +x
    assert not agent.step_pose(w, edge, act(fb=1))[1]
    # y follows the ground: one block up is climbable, two are not
    w.blocks[40, 5, 20:23] = world.STONE
    w.ground[40, 20:23] = 6
    w.ground[41, 20:23] = 8
    w.blocks[41, 5:8, 20:23] = world.STONE
    pose = agent.eye_pose(w, 39.5, 21.5, 0.0, -90.0)
    for _ in range(6):
        pose = agent.step_pose(w, pose, act(fb=1))[0]
    assert pose[1] == 6 + agent.EYE_HEIGHT and pose[0] < 41 - agent.RADIUS + 1e-9


def test_random_explorer_is_a_valid_walk():
    w = world.build_world(5)
    actions, poses = agent.random_explorer(w, 299, np.random.default_rng(1))
    assert actions.shape == (300, 8) and poses.shape == (300, 5)
    assert check_clip_arrays(actions, poses.astype(np.float32)) == []
    np.testing.assert_array_equal(actions[0], noop(1)[0])
    np.testing.assert_array_equal(agent.run_actions(w, poses[0], actions[1:]), poses)  # poses = kinematics(actions)
    assert (actions[:, 0] == 1).mean() > 0.4 and (actions[:, 4] != 12).any() and (actions[:, 3] != 12).any()
    assert np.abs(poses[:, 3]).max() <= 60 and np.ptp(poses[:, [0, 2]], axis=0).max() > 5


def test_revisit_returns_to_start_and_frames_match(tmp_path):
    w = world.build_world(11)
    actions, poses, s0 = agent.revisit_trajectory(w, 299, np.random.default_rng(2))
    assert actions.shape == (300, 8)
    np.testing.assert_array_equal(agent.run_actions(w, poses[0], actions[1:]), poses)
    np.testing.assert_allclose(poses[-1], poses[s0], atol=1e-4)
    assert np.ptp(poses[s0:, [0, 2]], axis=0).max() > 5  # it really went somewhere
    pairs = agent.find_revisits(poses.astype(np.float32))
    assert len(pairs) >= 13 and [s0, 299] in pairs.tolist()
    frames = world.render(w, poses.astype(np.float32).astype(np.float64), (64, 64))
    for i, j in pairs:
        assert psnr(frames[i], frames[j]) == math.inf, (i, j)
    # Through the mp4, at the default bit rate.
    (mp4, npz), = generate_world.generate(tmp_path, 1, 300, (64, 64), seed=3, revisit=True, progress=False)
    video = read_video(mp4)
    stored = np.load(npz)["revisit_pairs"]
    assert len(stored) >= 13
    for i, j in stored:
        assert psnr(video[i], video[j]) > 40, (i, j)
        assert psnr(video[i], video[j - 1]) < 30  # a different view is far off: the check can fail


def test_layout_format_and_splits(tmp_path):
    pairs = generate_world.generate(tmp_path, 1, 30, "32x48", seed=0, progress=False)
    assert pairs == [(str(tmp_path / "training/0/000000.mp4"), str(tmp_path / "training/0/000000.npz"))]
    info = probe(pairs[0][0])
    assert (info.num_frames, info.height, info.width, info.fps) == (30, 32, 48, 10.0)
    with np.load(pairs[0][1]) as data:
        assert data["actions"].dtype == np.int32 and data["poses"].dtype == np.float32
        assert data["revisit_pairs"].dtype == np.int32 and data["revisit_pairs"].shape[1] == 2
    actions, poses = load_clip_arrays(pairs[0][1])
    assert check_clip_arrays(actions, poses, info.num_frames) == [] and len(actions) == info.num_frames
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["0", "000000.mp4", "000000.npz", "training"]
    assert generate_world.assign_splits(20, 0, "all").count("training") == 16
    assert generate_world.assign_splits(20, 0, "all") == generate_world.assign_splits(20, 0, "all")
    out = generate_world.generate(tmp_path / "all", 10, 2, (16, 16), seed=0, split="all", progress=False)
    splits = [Path(m).relative_to(tmp_path / "all").parts[0] for m, _ in out]
    assert sorted(set(splits)) == ["test", "training", "validation"] and splits.count("training") == 8


def test_cli(tmp_path, capsys):
    assert generate_world.main(["--out", str(tmp_path), "--clips", "2", "--frames", "30", "--size", "16x32",
                                "--seed", "1", "--revisit", "--no-fog", "--quiet", "--split", "test"]) == 0
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.*")) == [
        "test/0/000000.mp4", "test/0/000000.npz", "test/0/000001.mp4", "test/0/000001.npz"]
    for bad, message in [(["--size", "63x64"], "even"), (["--size", "64"], "HxW"), (["--frames", "0"], "frames"),
                         (["--frames", "20", "--revisit"], "27 frames"), (["--clips", "0"], "clips"),
                         (["--split", "train"], "invalid choice")]:
        args = {"--clips": "1", "--frames": "30", "--size": "16x16"}
        args.update(dict(zip(bad[::2], bad[1::2])))
        argv = ["--out", str(tmp_path / "x")] + [v for kv in args.items() for v in kv] + \
               [b for b in bad if b == "--revisit"]
        with pytest.raises(SystemExit) as e:
            generate_world.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        generate_world.main(["--help"])
    assert e.value.code == 0 and "--revisit" in capsys.readouterr().out


def test_speed_64x64(tmp_path):
    start = time.perf_counter()
    generate_world.generate(tmp_path, 2, 300, (64, 64), seed=0, revisit=True, progress=False)
    per_clip = (time.perf_counter() - start) / 2
    print(f"\n64x64, 300 frames: {per_clip:.2f} s per clip (render + mp4)")
    assert per_clip * 2 < 10


def test_retrace_revisits_every_outbound_view_facing_the_same_way():
    w = world.build_world(11)
    for way_back in agent.WAYS_BACK:
        actions, poses, s0 = agent.revisit_trajectory(w, 299, np.random.default_rng(2), way_back=way_back)
        assert actions.shape == (300, 8)
        np.testing.assert_array_equal(agent.run_actions(w, poses[0], actions[1:]), poses)
        np.testing.assert_allclose(poses[-1], poses[s0], atol=1e-4)
        pairs = agent.find_revisits(poses.astype(np.float32))
        if way_back == "retrace":
            # Every outbound frame (after the look-around) is seen again on the way back, the farthest ~2 x 137 later
            # (the last ones before the turning point come back within find_revisits' 20-frame minimum gap).
            out = 299 - s0 - 24
            assert len(pairs) >= 0.8 * (out // 2) and (pairs[:, 1] - pairs[:, 0]).max() > out
            assert (actions[s0 + 25 + out // 2:, 0] != 1).all()  # no forward step on the way back
        else:
            assert len(pairs) >= 13
    with pytest.raises(ValueError, match="way_back"):
        agent.revisit_trajectory(w, 299, np.random.default_rng(2), way_back="fly")


def test_way_back_flag_fixes_the_return(tmp_path, capsys):
    """--way-back retrace: the earlier main job's clip layout (look round 0-24, out 24-92, back 92-160), every
    way-back frame the pose of an outbound frame; --way-back turn differs; a bad value is one argparse error."""
    poses = {}
    for way in agent.WAYS_BACK:
        assert generate_world.main(["--out", str(tmp_path / way), "--clips", "1", "--frames", "161", "--size",
                                    "16x16", "--seed", "0", "--revisit", "--way-back", way, "--quiet",
                                    "--split", "test"]) == 0
        poses[way] = load_clip_arrays(tmp_path / way / "test/0/000000.npz")[1]
    back = poses["retrace"]
    for t in range(92, 161):
        np.testing.assert_allclose(back[t], back[184 - t], atol=1e-3)
    assert not np.allclose(poses["turn"][120], back[120], atol=1e-3)
    with pytest.raises(SystemExit) as e:
        generate_world.main(["--out", str(tmp_path / "x"), "--clips", "1", "--frames", "40", "--revisit",
                             "--way-back", "fly"])
    assert e.value.code == 2 and "--way-back" in capsys.readouterr().err


def test_patrol_walks_the_path_back_and_forth():
    """Every frame after the outbound path has the exact pose of a frame of the look-round or the path."""
    w = world.build_world(11)
    actions, poses, end = agent.patrol_trajectory(w, 600, np.random.default_rng(3))
    assert actions.shape == (601, 8) and end == 24 + 160
    np.testing.assert_array_equal(agent.run_actions(w, poses[0], actions[1:]), poses)
    seen = poses[:end + 1]
    for t in range(end + 1, 601):
        assert np.abs(seen - poses[t]).max(axis=1).min() < 1e-6, t
    np.testing.assert_allclose(poses[end + 160], poses[24], atol=1e-6)  # one lap back: the start of the path
    np.testing.assert_allclose(poses[end + 320], poses[end], atol=1e-6)  # and out again
    assert agent.patrol_trajectory(w, 100, np.random.default_rng(3))[2] == 24 + 38
    with pytest.raises(ValueError, match="26 steps"):
        agent.patrol_trajectory(w, 20, np.random.default_rng(3))


def test_way_back_any_draws_each_clip_one_of_the_three():
    """--way-back any: each clip is exactly the clip of the way back drawn for it (same world, same agent draws), and
    over a few clips more than one way back occurs."""
    drawn = []
    for index in range(6):
        _, _, poses, _ = generate_world.make_clip(index, 81, (16, 16), 4, True, way_back="any")
        same = [way for way in (*agent.WAYS_BACK, "patrol")
                if np.array_equal(generate_world.make_clip(index, 81, (16, 16), 4, True, way_back=way)[2], poses)]
        assert len(same) >= 1
        drawn.append(same[0])
    assert len(set(drawn)) > 1
