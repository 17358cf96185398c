"""CSV builder, grain pipeline and latent cache on a tiny WorldMem-format tree: 6 + 2 clips (64x64, 41 frames) from
the procedural world generator (`decmem_jax.data.generate_world`) plus planted bad pairs."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

from decmem_jax import video as video_io
from decmem_jax.data import build_csv as build_csv_mod
from decmem_jax.data import encode_latents as enc
from decmem_jax.data import pipeline as pl
from decmem_jax.format import noop
from decmem_jax.models.conditioning import group_by_latent

T = 41
HW = (64, 64)
CLIP, SKIP, SIZE = 9, 2, (32, 64)
GOOD_TRAIN = [f"training/0/{i:06d}" for i in range(6)]
GOOD_TEST = ["test/0/000000", "test/0/000001"]
BAD = {  # stem -> a word the builder's problem list must contain
    "training/1/truncated": "video",
    "training/1/no_poses": "missing 'poses'",
    "training/1/wide_actions": "'actions' has shape",
    "training/1/length_mismatch": "frames but the npz has",
    "training/1/nan_poses": "NaN",
}
UNPAIRED = "training/1/lonely.mp4"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """6 training + 2 test clips from the procedural world generator, plus planted bad pairs derived from one."""
    from decmem_jax.data.generate_world import generate

    root = str(tmp_path_factory.mktemp("worldmem"))
    generate(root, clips=6, frames=T, size=HW, seed=0, progress=False)
    generate(root, clips=2, frames=T, size=HW, seed=1, split="test", progress=False)
    src = os.path.join(root, GOOD_TRAIN[0])
    with np.load(src + ".npz") as d:
        actions, poses = d["actions"], d["poses"]

    def plant(stem, frames=None, **arrays):
        path = os.path.join(root, stem)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if frames is None:
            shutil.copy(src + ".mp4", path + ".mp4")
        else:
            video_io.write_video(path + ".mp4", frames, fps=10)
        np.savez_compressed(path + ".npz", **arrays)

    plant("training/1/truncated", actions=actions, poses=poses)
    mp4 = os.path.join(root, "training/1/truncated.mp4")
    with open(mp4, "r+b") as f:
        f.truncate(os.path.getsize(mp4) // 2)
    plant("training/1/no_poses", actions=actions)
    plant("training/1/wide_actions", actions=actions[:, :7], poses=poses)
    plant("training/1/length_mismatch", video_io.read_video(src + ".mp4", num_frames=T - 5), actions=actions,
          poses=poses)
    nan = poses.copy()
    nan[7, 2] = np.nan
    plant("training/1/nan_poses", actions=actions, poses=nan)
    shutil.copy(src + ".mp4", os.path.join(root, UNPAIRED))
    return root


@pytest.fixture(scope="module")
def summary(root):
    return build_csv_mod.build_csv(root, progress=False)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------- build_csv

def test_build_csv_reports_and_excludes_bad_pairs(root, summary, capsys):
    invalid = summary.invalid
    assert set(invalid) == {s + ".mp4" for s in BAD}
    for stem, phrase in BAD.items():
        assert any(phrase in p for p in invalid[stem + ".mp4"]), (stem, invalid[stem + ".mp4"])
    assert summary.unpaired == [UNPAIRED]
    text = summary.format()
    for stem in BAD:
        assert stem + ".mp4" in text
    assert UNPAIRED in text
    train = _read_csv(os.path.join(root, "train.csv"))
    assert list(train[0]) == ["video_path", "action_path", "num_frames"]
    assert sorted(r["video_path"] for r in train) == [s + ".mp4" for s in GOOD_TRAIN]
    assert all(r["action_path"] == r["video_path"][:-4] + ".npz" and r["num_frames"] == str(T) for r in train)
    assert sorted(r["video_path"] for r in _read_csv(os.path.join(root, "test.csv"))) == \
        [s + ".mp4" for s in GOOD_TEST]
    assert not [f for f in os.listdir(root) if f.endswith(".tmp")]


def test_build_csv_strict_and_seeded_shuffle(root, tmp_path, capsys):
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("*.csv"))
    assert build_csv_mod.main(["--root", copy, "--strict", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "training/1/truncated.mp4" in out and "nothing written" in out
    assert not [f for f in os.listdir(copy) if f.endswith(".csv")]

    orders = []
    for seed in (42, 42, 7):
        assert build_csv_mod.main(["--root", copy, "--seed", str(seed), "--no-progress"]) == 0
        orders.append([r["video_path"] for r in _read_csv(os.path.join(copy, "train.csv"))])
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == sorted(orders[2])
    expected = sorted(s + ".mp4" for s in GOOD_TRAIN)
    assert orders[0] == [expected[i] for i in np.random.default_rng(42).permutation(6)]


# ----------------------------------------------------------------------------------------------------------- pipeline

def _cfg(csv_path, **kw):
    base = dict(csv=csv_path, clip_frames=CLIP, skip_frames=SKIP, size=SIZE, batch_size=2, seed=3, num_threads=2,
                prefetch=2, shard_index=0, shard_count=1)
    return pl.DataConfig(**{**base, **kw})


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_config_validates_clip_frames(root):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        _cfg(os.path.join(root, "train.csv"), clip_frames=10)


def test_pipeline_batches_are_aligned(root, summary):
    csv_path = os.path.join(root, "train.csv")
    rows = pl.CsvSource(csv_path).rows
    batches = list(pl.make_iterator(_cfg(csv_path)))
    assert len(batches) == 3
    assert sorted(np.concatenate([b["index"] for b in batches]).tolist()) == list(range(6))
    b = batches[0]
    assert b["video"].shape == (2, CLIP, *SIZE, 3) and b["video"].dtype == np.uint8
    assert b["actions"].shape == (2, CLIP, 8) and b["actions"].dtype == np.int32
    assert b["poses"].shape == (2, CLIP, 5) and b["poses"].dtype == np.float32
    np.testing.assert_array_equal(b["latent_index"][0], [0, 1, 1, 1, 1, 2, 2, 2, 2])
    for batch in batches:
        for i, start in zip(batch["index"], batch["start"]):
            assert SKIP <= start <= T - CLIP
            row = rows[i]
            ref = video_io.read_video(row["video_path"], start=int(start), num_frames=CLIP, size=SIZE)
            j = list(batch["index"]).index(i)
            np.testing.assert_array_equal(batch["video"][j], ref)
            with np.load(row["action_path"]) as d:
                actions, poses = d["actions"][start:start + CLIP], d["poses"][start:start + CLIP]
            np.testing.assert_array_equal(batch["actions"][j, 0], noop(1)[0])
            np.testing.assert_array_equal(batch["actions"][j, 1:], actions[1:])
            p = batch["poses"][j]
            np.testing.assert_allclose(p[:, :3], poses[:, :3] - poses[0, :3], atol=1e-5)
            np.testing.assert_array_equal(p[0, :3], 0)
            np.testing.assert_allclose(p[:, 3], np.mod(poses[:, 3], 360), atol=1e-4)
            np.testing.assert_allclose(p[:, 4], np.mod(-poses[:, 4], 360), atol=1e-4)
    f32 = next(pl.make_iterator(_cfg(csv_path, video_dtype="float32", first_action="zeros")))
    np.testing.assert_allclose(f32["video"], video_io.to_model_range(b["video"]))
    assert not f32["actions"][:, 0].any()
    # The model groups frames per latent (latent j >= 1 <-> frames 4j-3 .. 4j) consistently with latent_index.
    grouped = np.asarray(group_by_latent(b["actions"])).reshape(2, 3, 4, 8)
    np.testing.assert_array_equal(grouped[:, 2], b["actions"][:, 5:9])
    np.testing.assert_array_equal(grouped[:, 0, 3], b["actions"][:, 0])
    assert (b["latent_index"][0, 5:9] == 2).all()


def test_pipeline_determinism_sharding_and_resume(root, summary):
    csv_path = os.path.join(root, "train.csv")
    cfg = _cfg(csv_path, num_epochs=None)
    it = pl.make_iterator(cfg)
    first = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(it.get_state()))  # plain, serialisable
    expected = [next(it) for _ in range(4)]  # crosses into epoch 2 (3 batches per epoch)
    fresh = pl.make_iterator(cfg)  # same config -> same batches
    for a in first:
        _same(a, next(fresh))
    resumed = pl.make_iterator(cfg)
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(4)]):
        _same(a, b)
    # epoch 2 reshuffles and redraws the starts; another seed changes the order
    epoch1 = np.concatenate([b["index"] for b in first + expected[:1]])
    epoch2 = np.concatenate([b["index"] for b in expected[1:]])
    assert sorted(epoch1) == sorted(epoch2) == list(range(6))
    starts = [dict(zip(np.concatenate([b["index"] for b in bs]).tolist(),
                       np.concatenate([b["start"] for b in bs]).tolist())) for bs in (first + expected[:1], expected[1:])]
    assert starts[0] != starts[1]
    other = np.concatenate([b["index"] for b in pl.make_iterator(_cfg(csv_path, seed=4))])
    assert other.tolist() != epoch1.tolist()
    # shards partition the rows
    shards = [np.concatenate([b["index"] for b in pl.make_iterator(_cfg(csv_path, shard_index=k, shard_count=2,
                                                                         batch_size=1))]) for k in range(2)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(6)) and len(shards[0]) == 3


def test_pipeline_corrupt_clip(root, summary, tmp_path):
    bad_csv = os.path.join(root, "bad.csv")
    with open(bad_csv, "w") as f:
        f.write("video_path,action_path\n")
        for stem in GOOD_TRAIN[:3] + ["training/1/truncated"]:
            f.write(f"{stem}.mp4,{stem}.npz\n")
    cfg = _cfg(bad_csv, batch_size=1, shuffle=False)
    with pytest.raises(pl.ClipError, match="truncated.mp4"):
        list(pl.make_iterator(cfg))
    it = pl.make_iterator(_cfg(bad_csv, batch_size=1, skip_corrupt=True))
    assert sorted(int(b["index"][0]) for b in it) == [0, 1, 2]
    assert pl.num_skipped(it) == 1
    # too short for skip + clip: named too
    with pytest.raises(pl.ClipError, match=r"training/0/\d{6}\.mp4: too short"):
        next(pl.make_iterator(_cfg(os.path.join(root, "train.csv"), skip_frames=T - CLIP + 1)))


# ------------------------------------------------------------------------------------------------------ latent cache

@pytest.fixture(scope="module")
def vae():
    from flax import nnx

    from decmem_jax.models.vae import WanVAE, get_vae_config
    return WanVAE(get_vae_config("tiny"), rngs=nnx.Rngs(0))


def test_latent_cache_clip_mode(root, summary, vae, tmp_path):
    out = str(tmp_path / "latents")
    kw = dict(clip_frames=CLIP, skip_frames=SKIP, size=SIZE, dtype="float32", progress=False)
    s1 = enc.encode_latents(os.path.join(root, "train.csv"), vae, out, **kw)
    assert len(s1.encoded) == 6 and not s1.failed and not s1.existing
    mtimes = {p: os.stat(p).st_mtime_ns for p in s1.encoded}
    # rerun: everything finished is skipped; a removed output with a stale partial .tmp is redone
    victim = s1.encoded[0]
    os.remove(victim)
    with open(victim + ".tmp", "wb") as f:
        f.write(b"partial")
    s2 = enc.encode_latents(os.path.join(root, "train.csv"), vae, out, **kw)
    assert s2.encoded == [victim] and len(s2.existing) == 5 and not os.path.exists(victim + ".tmp")
    assert all(os.stat(p).st_mtime_ns == mtimes[p] for p in s2.existing)
    rows = _read_csv(s2.csv)
    assert len(rows) == 6 and rows[0]["latent_path"].endswith(".latents.npz")

    cfg = _cfg(s2.csv, source="latents")
    batch = next(pl.make_iterator(cfg))
    assert batch["latents"].shape == (2, 3, SIZE[0] // 8, SIZE[1] // 8, 16) and "video" not in batch
    video_rows = pl.CsvSource(os.path.join(root, "train.csv")).rows
    for j, i in enumerate(batch["index"]):
        assert batch["start"][j] == SKIP
        frames = video_io.read_video(video_rows[i]["video_path"], start=SKIP, num_frames=CLIP, size=SIZE)
        ref = np.asarray(vae.encode(video_io.to_model_range(frames)[None]))[0]
        np.testing.assert_allclose(batch["latents"][j], ref, atol=1e-4, rtol=1e-4)
        with np.load(video_rows[i]["action_path"]) as d:
            np.testing.assert_array_equal(batch["actions"][j, 1:], d["actions"][SKIP + 1:SKIP + CLIP])
            np.testing.assert_allclose(batch["poses"][j, :, :3], d["poses"][SKIP:SKIP + CLIP, :3]
                                       - d["poses"][SKIP, :3], atol=1e-5)


def test_latent_cache_all_frames_windows(root, summary, vae, tmp_path):
    out = str(tmp_path / "all")
    s = enc.encode_latents(os.path.join(root, "test.csv"), vae, out, all_frames=True, skip_frames=SKIP, size=SIZE,
                           progress=False)
    assert len(s.encoded) == 2
    with np.load(s.encoded[0]) as d:
        assert d["latents"].dtype == np.float16 and d["latents"].shape[0] == 10  # 37 of the 39 frames after skip
        assert d["actions"].shape == (37, 8) and int(d["frame_start"]) == SKIP
    cfg = _cfg(s.csv, source="latents", batch_size=1, num_epochs=3)
    rows = pl.CsvSource(s.csv).rows
    for b in pl.make_iterator(cfg):
        with np.load(rows[int(b["index"][0])]["latent_path"]) as d:
            f0 = int(b["start"][0]) - SKIP
            j0 = f0 // 4
            assert f0 == 0 or f0 % 4 == 0
            np.testing.assert_array_equal(b["latents"][0], d["latents"][j0:j0 + 3].astype(np.float32))
            np.testing.assert_array_equal(b["actions"][0, 1:], d["actions"][f0 + 1:f0 + CLIP])
    # With the in-memory cache every example is the same, and each file is read once.
    cached = _cfg(s.csv, source="latents", batch_size=1, num_epochs=3, cache_latents=True)
    plain = [b["latents"] for b in pl.make_iterator(cfg)]
    reads = []
    real_load = np.load
    try:
        np.load = lambda *a, **k: reads.append(a[0]) or real_load(*a, **k)
        got = [b["latents"] for b in pl.make_iterator(cached)]
    finally:
        np.load = real_load
    assert len(got) == len(plain) and all(np.array_equal(a, b) for a, b in zip(got, plain))
    assert sorted(set(reads)) == sorted(reads) and len(reads) == len(rows)
