"""Grain input pipeline: random clips of WorldMem-format videos (or of cached VAE latents) with aligned conditioning.

    cfg = DataConfig(csv="data/train.csv", batch_size=4, seed=0, num_epochs=None)
    it = make_iterator(cfg)
    batch = next(it)                       # dict of numpy arrays, leading batch axis B
    state = it.get_state()                 # small dict (JSON-serialisable): store it with the model checkpoint
    it2 = make_iterator(cfg); it2.set_state(state)   # continues with exactly the batches `it` would yield next

(`grain.checkpoint.CheckpointHandler` saves the same state through Orbax.)

Dataset graph (grain 0.2.x `MapDataset` / `IterDataset`): `CsvSource` (a `RandomAccessDataSource` over the CSV rows)
-> this host's shard `[shard_index::shard_count]` -> `shuffle(seed)` -> `repeat(num_epochs)` (each epoch reshuffled)
-> `map_with_index(ClipLoader)` -> `to_iter_dataset` (`num_threads` reader threads, `prefetch` elements ahead)
-> corrupt-clip filter (counts in the iterator state) -> `batch(batch_size)`. Every element is a pure function of
(seed, position), so the iterator state is just the next position (plus the skip count).

Per example (`source="video"`), T = clip_frames (1 + 4k), L = (T - 1) / 4 + 1 latents:

    video        uint8 [T, H, W, 3] RGB (default; `video_dtype="float32"` gives [-1, 1] via video.to_model_range).
                 uint8 is 4x smaller on the host and in host->device copies (237x352x640x3 float32 = 640 MB per
                 clip); convert on the device: x / 127.5 - 1.
    actions      int32 [T, 8] raw MineDojo vectors (decmem_jax.format); row 0 is replaced by the no-op vector
                 [0,0,0,12,12,0,0,0] (`first_action="noop"`, the raw-space meaning of WorldMem's zeroed first action;
                 literal zeros would read as a -180 degree camera turn) or by zeros (`first_action="zeros"`).
    poses        float32 [T, 5] [x, y, z, pitch, yaw] in WorldMem's convention: x, y, z minus the clip's first
                 frame's (so row 0 starts with three zeros); yaw negated; pitch and yaw taken mod 360 (absolute
                 angles, in [0, 360): positions stay in world axes, so angles stay in world axes too). A (T-1)-row
                 pose array is left-padded with a zero row first (format.load_clip_arrays).
    latent_index int32 [T]: frame t belongs to latent 0 if t == 0, else ceil(t / 4) (latent j >= 1 <-> frames
                 4j-3 .. 4j); `decmem_jax.models.conditioning.group_by_latent` gives the per-latent view.
    start        int32: index in the source video of the clip's frame 0; index int32: the CSV row.

The clip start is uniform in [skip_frames, N - clip_frames] (N = min(video frames, npz rows)), drawn from
`np.random.default_rng([seed, epoch, row])`: the same clip for the same (seed, epoch, row) on every host and run.

`source="latents"` reads a latents.csv written by `decmem_jax.data.encode_latents` (column `latent_path`): each file
holds normalised latents [F, h, w, 16] encoded from frames frame_start.. of the video, plus the raw per-frame
actions/poses of those frames. A window of L latents starts at j0 uniform in [0, F - L] (same RNG); the conditioning is
that of frames f0 .. f0 + T - 1 of the encoded range, f0 = 0 for j0 = 0 and 4 * j0 otherwise (the last frame of latent
j0, standing for it, then 4 frames per latent). Outputs `latents` float32 [L, h, w, 16] instead of `video`; the rest
as above (skip_frames was applied when encoding). With F == L (clips encoded with --clip-frames) the window is the
whole clip and equals `WanVAE.encode` of it; windows with j0 >= 1 cut a longer causal encoding (--all-frames).

Errors: a clip that cannot be read (corrupt/truncated video, bad npz, too short for clip_frames + skip_frames) raises
`ClipError` (a ValueError) naming the file; with `skip_corrupt=True` it is skipped, logged and counted:
`num_skipped(iterator)` (part of the iterator state, so it survives a restore).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os

import grain
import numpy as np

from decmem_jax import video as video_io
from decmem_jax.errors import DecMemError
from decmem_jax.format import last_frame_of_latent, latent_of_frame, latents_for_frames, load_clip_arrays, noop

log = logging.getLogger(__name__)

SOURCES = ("video", "latents")
_CORRUPT = "__corrupt__"  # key of the marker element a skipped clip turns into


class ClipError(DecMemError, ValueError):
    """A clip cannot be used (unreadable, inconsistent or too short); the message starts with the file."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    csv: str  # train.csv / test.csv (source="video") or latents.csv (source="latents")
    clip_frames: int = 237  # 1 + 4k
    skip_frames: int = 100  # video source: clips start at or after this frame
    size: tuple[int, int] = (352, 640)  # (H, W); video.read_video(resize="crop")
    batch_size: int = 1
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1  # None: repeat forever (each epoch reshuffled)
    drop_remainder: bool = True
    skip_corrupt: bool = False
    source: str = "video"  # "video" | "latents"
    video_dtype: str = "uint8"  # "uint8" | "float32" ([-1, 1])
    first_action: str = "noop"  # "noop" | "zeros"
    num_threads: int = 4  # grain reader threads
    prefetch: int = 8  # elements read ahead (each a whole clip: mind the host memory)
    # source="latents": keep every file's arrays in host memory after its first read (small latent sets: a clip of
    # 60 64x64 latents is 120 KB; re-reading its npz for every example made the input pipeline the bottleneck)
    cache_latents: bool = False
    shard_index: int | None = None  # default jax.process_index()
    shard_count: int | None = None  # default jax.process_count()

    def __post_init__(self):
        if self.shard_index is None or self.shard_count is None:
            import jax
            object.__setattr__(self, "shard_index", jax.process_index() if self.shard_index is None
                               else self.shard_index)
            object.__setattr__(self, "shard_count", jax.process_count() if self.shard_count is None
                               else self.shard_count)
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        try:
            latents_for_frames(self.clip_frames)
        except ValueError as e:
            raise ValueError(f"DataConfig.clip_frames={self.clip_frames}: {e}") from None
        checks = [(self.source in SOURCES, f"source={self.source!r}; expected one of {SOURCES}"),
                  (self.video_dtype in ("uint8", "float32"), f"video_dtype={self.video_dtype!r}"),
                  (self.first_action in ("noop", "zeros"), f"first_action={self.first_action!r}"),
                  (self.skip_frames >= 0, f"skip_frames={self.skip_frames} < 0"),
                  (self.batch_size >= 1, f"batch_size={self.batch_size} < 1"),
                  (self.num_epochs is None or self.num_epochs >= 1, f"num_epochs={self.num_epochs}"),
                  (0 <= self.shard_index < self.shard_count, f"shard {self.shard_index} of {self.shard_count}"),
                  (len(self.size) == 2 and min(self.size) > 0, f"size={self.size}")]
        for ok, problem in checks:
            if not ok:
                raise ValueError(f"DataConfig: {problem}")

    @property
    def clip_latents(self) -> int:
        return latents_for_frames(self.clip_frames)


class CsvSource:
    """grain `RandomAccessDataSource` over a CSV index: element i = (i, {column: value}) with the `*_path` columns
    made absolute (relative paths are relative to the CSV's folder). Columns are looked up by name; unknown columns
    are carried along and ignored."""

    def __init__(self, path, required=("video_path", "action_path")):
        self.path = os.path.abspath(os.fspath(path))
        base = os.path.dirname(self.path)
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or ())]
            if missing:
                raise ValueError(f"{self.path}: CSV lacks column(s) {missing} (has {reader.fieldnames})")
            self.rows = [{k: os.path.join(base, v) if k.endswith("_path") else v for k, v in row.items()}
                         for row in reader]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return index, self.rows[index]

    def __repr__(self) -> str:
        return f"CsvSource({self.path!r})"


def latent_index(num_frames: int) -> np.ndarray:
    """int32 [T]: the latent of each frame (0 for frame 0, then ceil(t / 4))."""
    return latent_of_frame(np.arange(num_frames)).astype(np.int32)


def clip_conditioning(actions: np.ndarray, poses: np.ndarray, first_action: str = "noop"):
    """Per-clip normalisation (see the module docstring): (actions int32 with row 0 replaced, poses float32)."""
    actions = np.array(actions, np.int32)
    actions[0] = noop(1)[0] if first_action == "noop" else 0
    poses = np.array(poses, np.float32)
    poses[:, :3] -= poses[0, :3]
    poses[:, 4] = -poses[:, 4]
    poses[:, 3:] = np.mod(poses[:, 3:], np.float32(360.0))
    return actions, poses


class ClipLoader:
    """`map_with_index` transform: (position, (row, record)) -> example dict (or a corrupt marker)."""

    def __init__(self, cfg: DataConfig, epoch_len: int):
        self.cfg, self.epoch_len = cfg, epoch_len
        self.cache: dict[str, tuple] = {}  # path -> arrays of a latent file (cfg.cache_latents)

    def __call__(self, position: int, element):
        row, record = element
        rng = np.random.default_rng([self.cfg.seed, position // self.epoch_len, row])
        try:
            load = self._video if self.cfg.source == "video" else self._latents
            example = load(record, rng)
        except Exception as e:  # anything that stops this clip from loading
            paths = [p for k, p in record.items() if k.endswith("_path")]
            msg = str(e) if any(p in str(e) for p in paths) else f"{paths[0]}: {type(e).__name__}: {e}"
            if not self.cfg.skip_corrupt:
                raise ClipError(msg) from e
            return {_CORRUPT: msg}
        example["index"] = np.int32(row)
        return example

    def _window(self, path, total: int, lo: int, rng) -> int:
        hi = total - self.cfg.clip_frames
        if hi < lo:
            raise ClipError(f"{path}: too short: {total} usable frames, a {self.cfg.clip_frames}-frame clip after "
                            f"skipping {lo} needs {lo + self.cfg.clip_frames}")
        return int(rng.integers(lo, hi + 1))

    def _video(self, record, rng) -> dict:
        cfg, path = self.cfg, record["video_path"]
        actions, poses = load_clip_arrays(record["action_path"])
        total = min(video_io.probe(path).num_frames, len(actions))
        start = self._window(path, total, cfg.skip_frames, rng)
        frames = video_io.read_video(path, start=start, num_frames=cfg.clip_frames, size=cfg.size)
        if cfg.video_dtype == "float32":
            frames = video_io.to_model_range(frames)
        end = start + cfg.clip_frames
        actions, poses = clip_conditioning(actions[start:end], poses[start:end], cfg.first_action)
        return dict(video=frames, actions=actions, poses=poses, latent_index=latent_index(cfg.clip_frames),
                    start=np.int32(start))

    def _read_latents(self, path: str) -> tuple:
        arrays = self.cache.get(path)
        if arrays is None:
            with np.load(path) as data:
                arrays = (data["latents"], data["actions"], data["poses"], int(data["frame_start"]))
            if self.cfg.cache_latents:
                self.cache[path] = arrays  # a race between reader threads only loads a file twice
        return arrays

    def _latents(self, record, rng) -> dict:
        cfg, path = self.cfg, record["latent_path"]
        z, actions, poses, frame_start = self._read_latents(path)
        num_latents = cfg.clip_latents
        if len(z) < num_latents:
            raise ClipError(f"{path}: too short: {len(z)} latents, a {cfg.clip_frames}-frame clip needs "
                            f"{num_latents}")
        j0 = int(rng.integers(0, len(z) - num_latents + 1))
        f0 = last_frame_of_latent(j0)
        if len(actions) < f0 + cfg.clip_frames or len(poses) < f0 + cfg.clip_frames:
            raise ClipError(f"{path}: {len(actions)} action / {len(poses)} pose rows do not cover frames "
                            f"[{f0}, {f0 + cfg.clip_frames}) of the encoded range")
        end = f0 + cfg.clip_frames
        actions, poses = clip_conditioning(actions[f0:end], poses[f0:end], cfg.first_action)
        return dict(latents=np.asarray(z[j0:j0 + num_latents], np.float32), actions=actions, poses=poses,
                    latent_index=latent_index(cfg.clip_frames), start=np.int32(frame_start + f0))


class _SkipCorruptIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)
        self.num_skipped = 0

    def __next__(self):
        while True:
            element = next(self._parent)
            if _CORRUPT not in element:
                return element
            self.num_skipped += 1
            log.warning("skipping corrupt clip (%d so far): %s", self.num_skipped, element[_CORRUPT])

    def get_state(self):
        return {"parent": self._parent.get_state(), "num_skipped": self.num_skipped}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.num_skipped = int(state["num_skipped"])


class _SkipCorrupt(grain.IterDataset):
    """Drops the markers of skipped clips and counts them (in the iterator state)."""

    def __iter__(self):
        return _SkipCorruptIterator(self._parent.__iter__())


def make_dataset(cfg: DataConfig) -> grain.IterDataset:
    """The grain dataset of batches described in the module docstring."""
    required = ("video_path", "action_path") if cfg.source == "video" else ("latent_path",)
    source = CsvSource(cfg.csv, required)
    ds = grain.MapDataset.source(source)[cfg.shard_index::cfg.shard_count]
    if len(ds) == 0:
        raise ValueError(f"{source.path}: no rows for shard {cfg.shard_index} of {cfg.shard_count} "
                         f"({len(source)} rows in all)")
    epoch_len = len(ds)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs).map_with_index(ClipLoader(cfg, epoch_len))
    read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=max(cfg.prefetch, cfg.num_threads))
    ds = _SkipCorrupt(ds.to_iter_dataset(read))
    return ds.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder)


def make_iterator(cfg: DataConfig) -> grain.DatasetIterator:
    """A fresh iterator over `make_dataset(cfg)` (checkpoint with get_state()/set_state())."""
    return iter(make_dataset(cfg))


def num_skipped(iterator: grain.DatasetIterator) -> int:
    """How many corrupt clips an iterator of `make_dataset` has skipped so far (skip_corrupt=True)."""
    return int(iterator.get_state()["num_skipped"])
