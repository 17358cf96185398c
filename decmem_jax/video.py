"""Video I/O for DecMem clips (mp4/H.264, e.g. 640x360 at 10 fps), built on PyAV (FFmpeg bindings).

Frames are numpy ``uint8`` arrays ``[T, H, W, 3]`` in RGB order unless stated otherwise.

* Reading: :func:`probe`, :func:`read_video`, :func:`iter_frames`. Frames are decoded sequentially in presentation
  order and counted, so ``start``/``num_frames`` are frame-accurate (no timestamp seeking). Decoding fewer frames
  than the container promised (a truncated or corrupt file) is an error, never a silent prefix.
* Resizing (``size=(H, W)``) uses Pillow's antialiased ``BILINEAR`` filter (area-like when shrinking) on a source
  box: ``resize="crop"`` takes the largest centred box of the target aspect ratio (= scale to cover, then centre-crop,
  sub-pixel exact); ``"stretch"`` the whole frame. A crop without scaling (360x640 -> 352x640) is exact slicing.
* Colour: RGB <-> YUV uses swscale with accurate rounding and full-resolution chroma (the default path darkens by
  ~1/255), with the stream's tagged matrix (BT.601 if untagged; the writer tags BT.601, limited range).
* Writing: :class:`VideoWriter` / :func:`write_video` encode incrementally (libx264, yuv420p, CRF) into a temporary
  file next to the target, renamed into place only on a successful close; :class:`BackgroundWriter` runs a
  writer's encoding on a worker thread. libx264 (PyAV wheel) output is not reproducible at some widths (seen at
  96, 192, and with threads=1; not 128, 640): re-encodes of the same frames can decode to different pixels. Where
  reproducibility matters (the world generator), use FFmpeg's own deterministic ``codec="mpeg4"`` with a constant
  quantizer (see ``decmem_jax.data.generate_world.video_options``).
* Model range: :func:`to_model_range` / :func:`from_model_range` are the one place uint8 <-> [-1, 1] happens.

Every I/O problem raises :class:`VideoError` (a ``ValueError``) whose message starts with the file path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import queue
import secrets
import threading
from collections.abc import Iterable, Iterator
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from decmem_jax.errors import DecMemError
from decmem_jax.format import from_model_range, to_model_range  # re-exported: pixel ranges need no av

__all__ = ["VideoError", "VideoInfo", "probe", "read_video", "iter_frames", "VideoWriter", "write_video",
           "to_model_range", "from_model_range"]

RESAMPLE = Image.Resampling.BILINEAR  # Pillow filter used for every resize (antialiased when downscaling)
_R = av.video.reformatter
_I = _R.Interpolation
_TO_RGB = _I.BILINEAR | _I.ACCURATE_RND | _I.FULL_CHR_H_INT
_FROM_RGB = _I.BILINEAR | _I.ACCURATE_RND | _I.FULL_CHR_H_INP


class VideoError(DecMemError, ValueError):
    """A video file is missing, unreadable, truncated, empty, or used with invalid arguments."""


def _err(path, problem: str) -> VideoError:
    return VideoError(f"{os.fspath(path)}: {problem}")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """Metadata of a video's first video stream (as reported by the container, not by decoding)."""

    path: str
    num_frames: int
    fps: float
    height: int
    width: int
    codec: str | None
    duration_s: float


@contextlib.contextmanager
def _open_video(path):
    """Open ``path`` for reading; yields ``(container, first video stream)``; raises VideoError on any problem."""
    if not os.path.isfile(path):
        raise _err(path, "not a regular file" if os.path.exists(path) else "no such file")
    if os.path.getsize(path) == 0:
        raise _err(path, "empty file (0 bytes), not a video")
    try:
        container = av.open(path, "r")
    except (av.FFmpegError, OSError) as e:
        raise _err(path, f"not a readable video file (truncated, corrupt or not a video): {e}") from e
    try:
        if not container.streams.video:
            raise _err(path, "contains no video stream (no video frames)")
        yield container, container.streams.video[0]
    finally:
        container.close()


def probe(path) -> VideoInfo:
    """Read the metadata of ``path`` without decoding pixels.

    The frame count comes from the container index; if the container does not record it, the video packets
    are counted (demuxing only). Raises VideoError for a missing/unreadable file or one with no video frames.
    """
    path = os.fspath(path)
    with _open_video(path) as (container, stream):
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            try:
                num_frames = sum(1 for p in container.demux(stream) if p.size)
            except (av.FFmpegError, OSError) as e:
                raise _err(path, f"cannot read video packets (corrupt file?): {e}") from e
        if num_frames <= 0:
            raise _err(path, "video stream has no frames (empty video)")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or rate <= 0:
            raise _err(path, "cannot determine the frame rate")
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        else:
            duration_s = container.duration / av.time_base if container.duration else num_frames / float(rate)
        codec = stream.codec_context.name if stream.codec_context is not None else None
        return VideoInfo(path, num_frames, float(rate), int(stream.height), int(stream.width), codec, duration_s)


def _resize(frame: np.ndarray, size, resize: str) -> np.ndarray:
    """Resize one [h, w, 3] uint8 frame to ``size=(H, W)``; see the module docstring for the method."""
    h, w = frame.shape[:2]
    th, tw = size
    if resize == "stretch":
        box = (0.0, 0.0, float(w), float(h))
    elif w * th > tw * h:  # source is wider than the target aspect: crop columns
        bw = h * tw / th
        box = ((w - bw) / 2, 0.0, (w + bw) / 2, float(h))
    else:  # source is taller (or equal): crop rows
        bh = w * th / tw
        box = (0.0, (h - bh) / 2, float(w), (h + bh) / 2)
    x0, y0, x1, y1 = box
    if (x1 - x0, y1 - y0) == (tw, th) and x0.is_integer() and y0.is_integer():  # pure crop: exact slicing
        return frame[int(y0):int(y0) + th, int(x0):int(x0) + tw]
    return np.asarray(Image.fromarray(frame).resize((tw, th), RESAMPLE, box=box))


def _decode(path, start, count, size, resize) -> Iterator[np.ndarray]:
    """Decode frames [start, start + count) sequentially; raise VideoError if fewer come out."""
    got = 0
    with _open_video(path) as (container, stream):
        stream.thread_type = "AUTO"
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index < start:
                    continue  # skipped frames are decoded (needed for references) but never converted
                arr = frame.reformat(format="rgb24", interpolation=_TO_RGB).to_ndarray()
                if size is not None:
                    arr = _resize(arr, size, resize)
                got += 1
                yield arr
                if got == count:
                    return
        except (av.FFmpegError, OSError) as e:
            raise _err(path, f"decoding failed after {start + got} frames (truncated or corrupt file): {e}") from e
    raise _err(path, f"decoded only {start + got} frames but the container promised {start + count} or more "
                     f"(truncated or corrupt file)")


def _plan(path, start, num_frames, size, resize, batch):
    """Validate the reading arguments (probing the file); returns normalized ``(start, count, size)``."""
    if size is not None:
        ok = isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, (int, np.integer)) for s in size)
        if not ok or min(size) <= 0 or size[0] % 2 or size[1] % 2:
            raise _err(path, f"size must be a pair (H, W) of positive even ints, got {size!r}")
        size = (int(size[0]), int(size[1]))
    if resize not in ("crop", "stretch"):
        raise _err(path, f"resize must be 'crop' or 'stretch', got {resize!r}")
    if batch is not None and (not isinstance(batch, int) or batch <= 0):
        raise _err(path, f"batch must be a positive int or None, got {batch!r}")
    if not isinstance(start, (int, np.integer)) or start < 0:
        raise _err(path, f"start must be a non-negative int, got {start!r}")
    total = probe(path).num_frames
    if start >= total:
        raise _err(path, f"start={start} is beyond the end of the video ({total} frames)")
    if num_frames is None:
        num_frames = total - start
    elif not isinstance(num_frames, (int, np.integer)) or num_frames <= 0:
        raise _err(path, f"num_frames must be a positive int or None, got {num_frames!r}")
    elif start + num_frames > total:
        raise _err(path, f"requested frames [{start}, {start + num_frames}) but the video has only {total} "
                         f"frames (at most num_frames={total - start} from start={start})")
    return int(start), int(num_frames), size


def iter_frames(path, *, start: int = 0, num_frames: int | None = None, size=None, resize: str = "crop",
                batch: int | None = None) -> Iterator[np.ndarray]:
    """Stream frames ``[start, start + num_frames)`` of ``path`` without holding the whole video.

    Yields uint8 frames ``[H, W, 3]``, or with ``batch=B`` arrays ``[b, H, W, 3]`` (``b == B`` but for the last).
    ``num_frames=None`` means "to the end". ``size=(H, W)`` (positive, even) resizes each frame with
    ``resize="crop"`` (cover + centre-crop, aspect preserved) or ``"stretch"``. Arguments and the frame range are
    checked (and the file probed) eagerly, before the first frame; decode errors surface while iterating.
    """
    path = os.fspath(path)
    start, count, size = _plan(path, start, num_frames, size, resize, batch)
    frames = _decode(path, start, count, size, resize)
    return frames if batch is None else (np.stack(b) for b in itertools.batched(frames, batch))


def read_video(path, *, start: int = 0, num_frames: int | None = None, size=None,
               resize: str = "crop") -> np.ndarray:
    """Decode frames ``[start, start + num_frames)`` of ``path`` into one uint8 array ``[T, H, W, 3]``.

    Same arguments and checks as :func:`iter_frames`; returns exactly the requested number of frames or raises.
    """
    path = os.fspath(path)
    start, count, size = _plan(path, start, num_frames, size, resize, None)
    out = None
    for i, frame in enumerate(_decode(path, start, count, size, resize)):
        if out is None:
            out = np.empty((count, *frame.shape), np.uint8)
        out[i] = frame
    return out


def _as_uint8_frames(path, frames) -> np.ndarray:
    """One frame [H, W, 3] or a batch [T, H, W, 3], uint8 or float in [-1, 1] -> uint8 [T, H, W, 3]."""
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise _err(path, f"frames must be [H, W, 3] or [T, H, W, 3] RGB, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        try:
            return from_model_range(arr)
        except ValueError as e:
            raise _err(path, str(e)) from None
    if arr.dtype != np.uint8:
        raise _err(path, f"frames must be uint8 or float in [-1, 1], got dtype {arr.dtype}")
    return arr


class VideoWriter:
    """Incremental video writer; use as a context manager::

        with VideoWriter("clip.mp4", fps=10) as w:
            for chunk in chunks:          # [H, W, 3] or [T, H, W, 3]; uint8, or float in [-1, 1]
                w.write(chunk)

    Frames are encoded as they arrive (bounded memory) into a hidden temporary file in the target's directory,
    renamed onto ``path`` only when :meth:`close` succeeds. On an exception in the ``with`` block, any failed
    :meth:`write` (e.g. a frame whose size differs from the first), or a close with zero frames, the temporary
    file is deleted and ``path`` is left untouched (no file, or the previous one).

    Frames are stored as yuv420p (BT.601, limited range): height and width must be even. ``crf`` is the
    constant-rate-factor quality (lower is better, 18 ~ visually lossless; ``None``: codec default), ``preset``
    libx264's speed/size trade-off, ``options`` extra codec options; ``faststart`` puts the mp4 index first.
    """

    def __init__(self, path, *, fps, codec: str = "libx264", crf: int | None = 18, preset: str | None = "medium",
                 options: dict | None = None, faststart: bool = False):
        self.path = os.fspath(path)
        try:
            self.fps = Fraction(fps).limit_denominator(1_000_000)
        except (TypeError, ValueError, OverflowError):
            self.fps = Fraction(0)
        if self.fps <= 0:
            raise _err(self.path, f"fps must be a positive number, got {fps!r}")
        self.codec, self.faststart = codec, faststart
        self.options = {k: str(v) for k, v in {"crf": crf, "preset": preset, **(options or {})}.items()
                        if v is not None}
        self.num_frames = 0
        self.shape = None  # (H, W) fixed by the first frame
        self._container = self._stream = self._tmp = None
        self._closed = False

    def _start(self, h: int, w: int):
        if h % 2 or w % 2:
            raise _err(self.path, f"{self.codec} with yuv420p needs an even height and width, got {h}x{w} "
                                  f"(crop or pad the frames to even dimensions)")
        directory, name = os.path.split(os.path.abspath(self.path))
        # Reserve a hidden name next to the target (same filesystem: atomic rename); mode 0o666 honours the umask.
        self._tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp{os.path.splitext(name)[1]}")
        try:
            os.close(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            self._container = av.open(self._tmp, "w", options={"movflags": "faststart"} if self.faststart else {})
            self._stream = self._container.add_stream(self.codec, rate=self.fps, options=self.options)
            self._stream.width, self._stream.height, self._stream.pix_fmt = w, h, "yuv420p"
            cc = self._stream.codec_context
            cc.time_base = 1 / self.fps
            # Tag the colour matrix swscale used (BT.601, limited range) so other players decode it the same way.
            cc.colorspace, cc.color_range = int(_R.Colorspace.ITU601), int(_R.ColorRange.MPEG)
        except (av.FFmpegError, OSError, ValueError) as e:
            raise _err(self.path, f"cannot open {self.codec} writer: {e}") from e
        self.shape = (h, w)

    def write(self, frames) -> None:
        """Append one frame ``[H, W, 3]`` or a batch ``[T, H, W, 3]`` (uint8, or float in [-1, 1])."""
        if self._closed:
            raise _err(self.path, "write() on a closed VideoWriter")
        try:
            arr = _as_uint8_frames(self.path, frames)
            if self.shape is None:
                self._start(*arr.shape[1:3])
            if arr.shape[1:3] != self.shape:
                raise _err(self.path, f"frame size {arr.shape[1]}x{arr.shape[2]} differs from the first frame's "
                                      f"{self.shape[0]}x{self.shape[1]}")
            for f in arr:
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
                vf = vf.reformat(format="yuv420p", interpolation=_FROM_RGB)
                vf.pts = self.num_frames
                self._container.mux(self._stream.encode(vf))
                self.num_frames += 1
        except BaseException as e:
            self._fail(e, f"encoding frame {self.num_frames}")

    def close(self) -> None:
        """Flush the encoder and move the finished file onto ``path``; raises VideoError if no frames were written."""
        if self._closed:
            return
        if self.num_frames == 0:
            self.abort()
            raise _err(self.path, "no frames were written; refusing to create an empty video")
        try:
            self._container.mux(self._stream.encode(None))
            self._container.close()
            self._container = None
            os.replace(self._tmp, self.path)
        except BaseException as e:
            self._fail(e, "finishing the video")
        self._tmp, self._closed = None, True

    def _fail(self, e: BaseException, what: str):
        """Abort, then re-raise ``e`` (FFmpeg/OS errors as a VideoError naming the file)."""
        self.abort()
        if isinstance(e, (av.FFmpegError, OSError)):
            raise _err(self.path, f"{what} failed: {e}") from e
        raise e

    def abort(self) -> None:
        """Discard everything written so far (deletes the temporary file; ``path`` is untouched)."""
        self._closed = True
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(self._tmp)
            self._tmp = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close() if exc_type is None else self.abort()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.abort()


class BackgroundWriter:
    """A writer (e.g. :class:`VideoWriter`) whose ``write`` calls run in order on a worker thread, so that the caller
    goes on while frames are encoded: the rollout CLI dispatches the next chunk, and a GPU chunk step's call returns
    only when the device is nearly done, so encoding in the caller's thread would leave the GPU idle meanwhile.

    At most ``pending`` batches wait (``write`` blocks beyond that); the caller must not modify an array after
    passing it. The worker's first exception (the wrapped writer aborts itself on a failed write) is raised again by
    the next ``write`` or by ``close``; batches after it are dropped. A context manager like the writer: on an
    exception in the ``with`` block the wrapped writer is aborted, otherwise closed once the queue is drained.
    """

    def __init__(self, writer, *, pending: int = 2):
        if pending < 1:
            raise ValueError(f"BackgroundWriter: pending={pending!r}; expected a positive number of batches")
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=f"write {getattr(writer, 'path', '')}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (frames := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.write(frames)
                except BaseException as e:  # raised in the caller's thread by write or close
                    self._error = e

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def write(self, frames) -> None:
        """Queue one frame or a batch (as the wrapped writer's ``write`` takes them)."""
        if not self._thread.is_alive():
            raise _err(getattr(self.writer, "path", "?"), "write() on a closed BackgroundWriter")
        if self._error is not None:
            raise self._error
        self._queue.put(frames)

    @property
    def num_frames(self) -> int:
        """Frames encoded so far (those still queued not counted)."""
        return self.writer.num_frames

    def close(self) -> None:
        """Wait for the queued batches, then close the wrapped writer (or raise the worker's exception)."""
        self._stop()
        if self._error is not None:
            self.writer.abort()
            raise self._error
        self.writer.close()

    def abort(self) -> None:
        """Drop what is queued (after the batch being encoded) and abort the wrapped writer."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._stop()
        self.writer.abort()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close() if exc_type is None else self.abort()


def write_video(path, frames: np.ndarray | Iterable[np.ndarray], *, fps, **writer_kwargs) -> int:
    """Write an array ``[T, H, W, 3]`` or an iterable of frames/batches to ``path``; returns the frame count.

    ``writer_kwargs`` go to :class:`VideoWriter` (codec, crf, preset, options, faststart).
    """
    with VideoWriter(path, fps=fps, **writer_kwargs) as w:
        for chunk in [frames] if isinstance(frames, np.ndarray) else frames:
            w.write(chunk)
    return w.num_frames

