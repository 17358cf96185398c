"""decmem_jax.video: write -> read round trips, frame-accurate ranges, streaming, resizing, model-range
conversion, the VAE frame rule, and every error path (all on generated videos; a few seconds on 2 cores)."""

import os

import av
import numpy as np
import pytest
from PIL import Image

from decmem_jax import video as V
from decmem_jax.video import VideoError

T, FPS = 21, 10
SIZES = [(64, 96), (360, 640)]
# Codec tolerance for libx264 at crf=18, yuv420p, on the synthetic clip below (mean |error| in uint8 units).
# Measured: 64x96 -> 2.27 overall / 2.92 worst frame; 360x640 -> 0.72 / 0.81 (the small clip is dominated by
# 4:2:0 chroma smearing at the saturated square's edges). Bounds keep ~25-35% margin.
MAE_BOUND = {(64, 96): 3.0, (360, 640): 1.0}
FRAME_MAE_BOUND = {(64, 96): 3.8, (360, 640): 1.1}


def synth(t, h, w):
    """Smooth, moving colour gradients plus a saturated square sliding diagonally: compresses well, not trivial."""
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    out = np.empty((t, h, w, 3), np.uint8)
    s = max(4, h // 5)
    for i in range(t):
        ph = i / t
        r = 255 * (0.5 + 0.5 * np.sin(2 * np.pi * (x + ph))) * np.ones_like(y)
        g = 255 * (0.3 + 0.6 * y * (1 - x / 2))
        b = 255 * (0.5 + 0.4 * np.cos(2 * np.pi * (x * y + 0.5 * ph)))
        f = np.stack(np.broadcast_arrays(r, g, b), -1)
        y0, x0 = i * h // (2 * t), (i * w // t) % (w - s)
        f[y0:y0 + s, x0:x0 + s] = (240, 30, 60)
        out[i] = np.clip(np.rint(f), 0, 255)
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """{(h, w): (path, source frames, decoded frames)}; written in mixed single-frame / batch chunks."""
    d = tmp_path_factory.mktemp("clips")
    out = {}
    for h, w in SIZES:
        frames, path = synth(T, h, w), d / f"clip_{h}x{w}.mp4"
        with V.VideoWriter(path, fps=FPS, crf=18) as wr:
            wr.write(frames[0])  # one [H, W, 3] frame
            wr.write(frames[1:8])  # a batch
            for f in frames[8:]:
                wr.write(f)
        assert wr.num_frames == T
        out[(h, w)] = (path, frames, V.read_video(path))
    assert sorted(os.listdir(d)) == sorted(f"clip_{h}x{w}.mp4" for h, w in SIZES)  # no temp files left behind
    umask = os.umask(0o22)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p, _, _ in out.values())  # normal file permissions
    return out


@pytest.mark.parametrize("hw", SIZES)
def test_round_trip(clips, hw):
    path, src, dec = clips[hw]
    info = V.probe(path)
    assert (info.num_frames, info.fps, info.height, info.width, info.codec) == (T, FPS, *hw, "h264")
    assert info.duration_s == pytest.approx(T / FPS, abs=0.11) and info.path == str(path)
    assert dec.shape == (T, *hw, 3) and dec.dtype == np.uint8
    err = dec.astype(np.int16) - src
    assert np.abs(err).mean() < MAE_BOUND[hw]
    assert np.abs(err).mean(axis=(1, 2, 3)).max() < FRAME_MAE_BOUND[hw]
    assert np.all(np.abs(err.mean(axis=(0, 1, 2))) < 0.5)  # no colour-conversion bias per channel


@pytest.mark.parametrize("start,n", [(0, 1), (5, 8), (13, None), (20, 1), (0, None)])
def test_frame_range_equals_slice(clips, start, n):
    path, _, full = clips[(64, 96)]
    got = V.read_video(path, start=start, num_frames=n)
    np.testing.assert_array_equal(got, full[start:None if n is None else start + n])


def test_iter_frames_equals_read(clips):
    path, _, full = clips[(360, 640)]
    frames = list(V.iter_frames(path))
    assert len(frames) == T and frames[0].shape == (360, 640, 3)
    np.testing.assert_array_equal(np.stack(frames), full)
    batches = list(V.iter_frames(path, start=3, num_frames=17, batch=4))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 1]
    np.testing.assert_array_equal(np.concatenate(batches), full[3:20])
    resized = np.concatenate(list(V.iter_frames(path, start=2, num_frames=5, size=(176, 320), batch=3)))
    np.testing.assert_array_equal(resized, V.read_video(path, size=(176, 320))[2:7])


def test_resize(clips):
    path, _, full = clips[(360, 640)]
    crop = V.read_video(path, size=(352, 640))  # cover scale is 1: a pure centre crop of 4 rows top and bottom
    assert crop.shape == (T, 352, 640, 3)
    np.testing.assert_array_equal(crop, full[:, 4:356])
    np.testing.assert_array_equal(V.read_video(path, size=(360, 360)), full[:, :, 140:500])
    # Downscale + crop vs Pillow's "resize to cover, then crop" on the decoded frames: same up to filter edges.
    small = V.read_video(path, num_frames=3, size=(176, 320))
    ref = np.stack([np.asarray(Image.fromarray(f).resize((320, 180), Image.Resampling.BILINEAR))[2:178]
                    for f in full[:3]])
    assert small.shape == (3, 176, 320, 3)
    assert np.abs(small.astype(np.int16) - ref).mean() < 1.0
    # Stretch is a plain Pillow resize of the whole frame.
    st = V.read_video(path, start=4, num_frames=1, size=(100, 100), resize="stretch")
    np.testing.assert_array_equal(st[0], np.asarray(Image.fromarray(full[4]).resize((100, 100),
                                                                                   Image.Resampling.BILINEAR)))
    up = V.read_video(clips[(64, 96)][0], num_frames=2, size=(352, 640))  # 3:2 source upscaled, rows cropped
    assert up.shape == (2, 352, 640, 3) and abs(float(up.mean()) - float(clips[(64, 96)][2][:2].mean())) < 3


def test_model_range(tmp_path, clips):
    u = np.arange(256, dtype=np.uint8).reshape(16, 16)
    f = V.to_model_range(u)
    assert f.dtype == np.float32 and f.min() == -1.0 and f.max() == 1.0
    np.testing.assert_array_equal(V.from_model_range(f), u)
    np.testing.assert_array_equal(V.from_model_range(np.array([-3.0, -1.0, 0.0, 1.0, 7.0])), [0, 0, 128, 255, 255])
    with pytest.raises(ValueError):
        V.to_model_range(f)
    with pytest.raises(ValueError):
        V.from_model_range(np.array([np.nan]))
    # Float frames in [-1, 1] are written as the same uint8 frames (compared within codec tolerance, not bit for
    # bit: libx264's output is not byte-reproducible run to run at some widths, e.g. 96; see video.py).
    hw = (64, 96)
    src = clips[hw][1]
    V.write_video(tmp_path / "f.mp4", V.to_model_range(src), fps=FPS)
    back = V.read_video(tmp_path / "f.mp4")
    assert back.shape == src.shape and np.abs(back.astype(np.int16) - src).mean() < MAE_BOUND[hw]
    # A generator of float frames works too.
    assert V.write_video(tmp_path / "g.mp4", (V.to_model_range(x) for x in src[:5]), fps=FPS) == 5
    assert np.abs(V.read_video(tmp_path / "g.mp4").astype(np.int16) - src[:5]).mean() < MAE_BOUND[hw]


# ------------------------------------------------------------------------------------------------ error paths
def _raises(fn, path, match=None):
    """fn() raises VideoError whose message names ``path``."""
    with pytest.raises(VideoError, match=match) as e:
        fn()
    assert str(path) in str(e.value), str(e.value)
    return e.value


def _readers(path):
    return [lambda: V.probe(path), lambda: V.read_video(path), lambda: V.iter_frames(path)]


def test_unreadable_inputs(tmp_path, clips):
    missing = tmp_path / "missing.mp4"
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    zero = tmp_path / "zero.mp4"
    zero.write_bytes(b"")
    # An mp4 container with a video stream but zero frames (PyAV writes only the header).
    empty = tmp_path / "noframes.mp4"
    with av.open(str(empty), "w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        c.start_encoding()
        c.mux(s.encode(None))
    assert empty.stat().st_size > 0
    for path, match in [(missing, "no such file"), (text, "not a readable video"), (zero, "0 bytes"),
                        (empty, "no video stream|no frames")]:
        for fn in _readers(path):
            _raises(fn, path, match)


def test_truncated(tmp_path, clips):
    src = clips[(360, 640)][1]
    # Default mp4 layout (index at the end): cutting the file at 50% loses the index; nothing opens.
    data = clips[(360, 640)][0].read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    for fn in _readers(cut):
        _raises(fn, cut)
    # faststart layout (index first): the container still promises 21 frames, decoding stops early -> error.
    fs = tmp_path / "fs.mp4"
    V.write_video(fs, src, fps=FPS, faststart=True)
    data = fs.read_bytes()
    assert data[4:8] == b"ftyp" and b"moov" in data[:64]
    cut_fs = tmp_path / "cut_fs.mp4"
    cut_fs.write_bytes(data[: len(data) // 2])
    assert V.probe(cut_fs).num_frames == T
    _raises(lambda: V.read_video(cut_fs), cut_fs, "truncated or corrupt")
    _raises(lambda: list(V.iter_frames(cut_fs, batch=4)), cut_fs, "truncated or corrupt")
    assert V.read_video(cut_fs, num_frames=2).shape == (2, 360, 640, 3)  # the intact prefix is still readable


def test_bad_read_arguments(clips):
    path = clips[(64, 96)][0]
    _raises(lambda: V.read_video(path, num_frames=22), path, "only 21 frames")
    _raises(lambda: V.read_video(path, start=15, num_frames=7), path, "at most num_frames=6")
    _raises(lambda: V.iter_frames(path, start=21), path, "beyond the end")
    _raises(lambda: V.read_video(path, start=-1), path, "start")
    _raises(lambda: V.read_video(path, num_frames=0), path, "num_frames")
    for size in [(0, 640), (351, 640), (352, 641), (-2, 4), (352,), (352.0, 640), 352]:
        _raises(lambda size=size: V.read_video(path, size=size), path, "size")
    _raises(lambda: V.read_video(path, size=(352, 640), resize="pad"), path, "resize")
    _raises(lambda: V.iter_frames(path, batch=0), path, "batch")


def test_writer_errors_leave_nothing(tmp_path):
    frames = synth(3, 32, 48)
    p = tmp_path / "out.mp4"
    # Zero frames: refuses on close, nothing created.
    _raises(lambda: V.VideoWriter(p, fps=FPS).close(), p, "no frames")
    _raises(lambda: V.write_video(p, [], fps=FPS), p, "no frames")
    # Odd size for H.264 / yuv420p.
    _raises(lambda: V.write_video(p, synth(2, 33, 48), fps=FPS), p, "even")
    # A frame of a different size than the first one.
    def mismatch():
        with V.VideoWriter(p, fps=FPS) as w:
            w.write(frames)
            w.write(synth(1, 64, 96))
    _raises(mismatch, p, "differs from the first")
    # Bad dtype / shape / non-finite floats / bad fps.
    _raises(lambda: V.write_video(p, frames.astype(np.int32), fps=FPS), p, "dtype")
    _raises(lambda: V.write_video(p, frames[..., :2], fps=FPS), p, "shape")
    _raises(lambda: V.write_video(p, np.full((1, 32, 48, 3), np.nan, np.float32), fps=FPS), p, "non-finite")
    _raises(lambda: V.VideoWriter(p, fps=0), p, "fps")
    assert os.listdir(tmp_path) == []
    # An exception inside the with-block: nothing written; an existing file is left untouched.
    class Boom(Exception):
        pass
    with pytest.raises(Boom), V.VideoWriter(p, fps=FPS) as w:
        w.write(frames)
        raise Boom
    assert os.listdir(tmp_path) == []
    V.write_video(p, frames, fps=FPS)
    before = p.read_bytes()
    with pytest.raises(Boom), V.VideoWriter(p, fps=FPS) as w:
        w.write(frames[::-1])
        raise Boom
    assert os.listdir(tmp_path) == ["out.mp4"] and p.read_bytes() == before
    # A failed write poisons the writer: later writes refuse, close publishes nothing.
    q = tmp_path / "q.mp4"
    w = V.VideoWriter(q, fps=FPS)
    w.write(frames)
    with pytest.raises(VideoError):
        w.write(synth(1, 16, 16))
    _raises(lambda: w.write(frames), q, "closed")
    w.close()
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_background_writer_writes_what_the_writer_writes(tmp_path):
    """BackgroundWriter (the rollout CLI's mp4 path): the same batches, encoded on a worker thread behind a queue of
    one, give the same decoded video as VideoWriter in the caller's thread (FFmpeg's deterministic mpeg4 encoder)."""
    from decmem_jax.data.generate_world import video_options

    batches = [synth(5, 64, 96), synth(4, 64, 96)[::-1], synth(1, 64, 96)]
    opts = video_options(2)
    with V.VideoWriter(tmp_path / "plain.mp4", fps=FPS, **opts) as w:
        for b in batches:
            w.write(b)
    with V.BackgroundWriter(V.VideoWriter(tmp_path / "bg.mp4", fps=FPS, **opts), pending=1) as bw:
        for b in batches:
            bw.write(b)
    assert bw.num_frames == w.num_frames == 10
    np.testing.assert_array_equal(V.read_video(tmp_path / "bg.mp4"), V.read_video(tmp_path / "plain.mp4"))
    with pytest.raises(ValueError, match="pending=0"):
        V.BackgroundWriter(V.VideoWriter(tmp_path / "x.mp4", fps=FPS), pending=0)


def test_background_writer_errors_leave_nothing(tmp_path):
    """The worker's failure (a batch of another size) comes back as the writer's VideoError at the next write or at
    close, later batches are dropped, and nothing is published; an exception in the with-block aborts likewise."""
    p = tmp_path / "out.mp4"

    def mismatch_then_close():
        with V.BackgroundWriter(V.VideoWriter(p, fps=FPS)) as bw:
            bw.write(synth(2, 32, 48))
            bw.write(synth(1, 64, 96))  # fails on the worker
    _raises(mismatch_then_close, p, "differs from the first")

    bw = V.BackgroundWriter(V.VideoWriter(p, fps=FPS))
    bw.write(synth(2, 32, 48))
    bw.write(synth(1, 64, 96))
    with pytest.raises(VideoError, match="differs from the first"):
        for _ in range(50):  # the next write after the worker failed raises it
            bw.write(synth(1, 32, 48))
        bw.close()
    bw.abort()
    _raises(lambda: bw.write(synth(1, 32, 48)), p, "closed")

    class Boom(Exception):
        pass
    with pytest.raises(Boom), V.BackgroundWriter(V.VideoWriter(p, fps=FPS)) as bw:
        bw.write(synth(3, 32, 48))
        raise Boom
    assert os.listdir(tmp_path) == []
