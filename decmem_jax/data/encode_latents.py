"""Latent cache: encode the videos of a CSV index with the Wan VAE once, so training never runs the encoder.

    python -m decmem_jax.data.encode_latents --csv DATA/train.csv --vae CONVERTED_VAE_DIR --out LATENTS_DIR
        [--clip-frames 237 | --all-frames] [--skip-frames 100] [--size 352x640] [--chunk 4] [--batch 1]
        [--dtype float16|float32]

For each CSV row (`video_path`, `action_path`), frames are decoded with the pipeline's crop/resize
(`video.iter_frames(size=..., resize="crop")`) and streamed through `vae_stream.stream_encode` (bounded memory: one
chunk of `chunk` frames plus the VAE's causal cache per clip, never the whole video). Encoded range:

* `--clip-frames N` (default 237, 1 + 4k): frames [skip_frames, skip_frames + N), one clip per video (its latents
  equal `WanVAE.encode` of that clip);
* `--all-frames`: frames [skip_frames, skip_frames + M) with M the largest 1 + 4k that fits the video (one long
  causal encoding; the pipeline samples windows from it).

Output `<out>/<video path relative to the CSV's folder, without .mp4>.latents.npz` (np.savez, uncompressed):
`latents` [F, h, w, 16] normalised (`dtype`, default float16), `actions` int32 [M, 8] and `poses` float32 [M, 5] (raw,
of the encoded frames, poses left-padded as format.load_clip_arrays does; the pipeline normalises per clip),
`latent_index` int32 [M], `frame_start` (video index of encoded frame 0), `num_latents`, `size` [H, W], `video`.
Each file is written to `<name>.tmp` and renamed into place, so an existing output is complete: a rerun skips it
(resumable), and a leftover `.tmp` from an interrupted run is overwritten. Finally `<out>/latents.csv` (columns
`latent_path,video_path,action_path,num_latents,frame_start`, paths relative to `<out>`, rows in the input CSV's
order) indexes every finished file; `pipeline.DataConfig(csv=".../latents.csv", source="latents")` reads it.
Clips that fail (unreadable, too short) are reported and left out; the CLI then exits with code 1, and when no
clip could be encoded nothing is written (no index of nothing). Before any of this the settings, the CSV (a video CSV
with a header, not a latents CSV nor a binary file), the VAE directory and the output folder are checked: a problem
there is one line `error: <file or setting>: ...` on stderr, exit code 2, nothing loaded or written.

On a tiny data set from `generate_world` (e.g. 64x64 clips of 61 frames), with the VAE that ships with the repository:

    python -m decmem_jax.data.encode_latents --csv data/world/train.csv --vae weights/world_tiny/vae \\
        --out data/latents --all-frames --skip-frames 0 --size 64x64
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import sys

import numpy as np

from decmem_jax import cli
from decmem_jax import video as video_io
from decmem_jax.format import (FRAMES_PER_LATENT, PIXELS_PER_LATENT, SKIP_FRAMES, check_index_csv, frames_for_latents,
                               latents_for_frames, load_clip_arrays, whole_latents)

LATENTS_CSV = "latents.csv"
LATENT_COLUMNS = ("latent_path", "video_path", "action_path", "num_latents", "frame_start")


@dataclasses.dataclass
class EncodeSummary:
    csv: str | None = None  # latents.csv written
    encoded: list[str] = dataclasses.field(default_factory=list)  # outputs written by this run
    existing: list[str] = dataclasses.field(default_factory=list)  # outputs found finished and skipped
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (video, problem)

    def format(self) -> str:
        lines = [f"encoded {len(self.encoded)}, already done {len(self.existing)}, failed {len(self.failed)}; "
                 + (f"index {self.csv}" if self.csv else "no clip encoded, no index written")]
        lines += [f"  FAILED {v}: {msg.removeprefix(v + ': ')}" for v, msg in self.failed]
        return "\n".join(lines)


@dataclasses.dataclass
class _Job:
    row: dict
    out: str
    actions: np.ndarray
    poses: np.ndarray
    start: int
    count: int


def output_path(out_dir: str, video_path: str, csv_dir: str) -> str:
    rel = os.path.relpath(video_path, csv_dir)
    if rel.startswith(".."):  # video outside the CSV's folder: mirror its absolute path
        rel = os.path.splitdrive(os.path.abspath(video_path))[1].lstrip("/\\")
    return os.path.join(out_dir, os.path.splitext(rel)[0] + ".latents.npz")


def _plan(row, out, clip_frames, all_frames, skip_frames) -> _Job:
    actions, poses = load_clip_arrays(row["action_path"])
    total = min(video_io.probe(row["video_path"]).num_frames, len(actions))
    avail = total - skip_frames
    count = frames_for_latents(whole_latents(avail)) if all_frames else clip_frames
    if avail < (1 if all_frames else clip_frames):
        raise ValueError(f"{row['video_path']}: too short: {total} usable frames, need {skip_frames} skipped + "
                         f"{1 if all_frames else clip_frames}; lower --skip-frames"
                         + ("" if all_frames else ", lower --clip-frames or pass --all-frames"))
    return _Job(row, out, actions, poses, skip_frames, count)


def _encode(vae, jobs: list[_Job], size, chunk: int) -> np.ndarray:
    """Stream-encode the same-length clips of `jobs` as one batch -> float32 [B, F, h, w, z]."""
    from decmem_jax.models.vae_stream import stream_encode

    readers = [video_io.iter_frames(j.row["video_path"], start=j.start, num_frames=j.count, size=size, batch=chunk)
               for j in jobs]
    pieces = (video_io.to_model_range(np.stack(parts)) for parts in zip(*readers))
    return np.concatenate([np.asarray(z) for z in stream_encode(vae, pieces, chunk=chunk)], axis=1)


def _save(job: _Job, latents: np.ndarray, size, dtype) -> None:
    from decmem_jax.data.pipeline import latent_index

    end = job.start + job.count
    arrays = dict(latents=latents.astype(dtype), actions=job.actions[job.start:end].astype(np.int32),
                  poses=job.poses[job.start:end].astype(np.float32), latent_index=latent_index(job.count),
                  frame_start=np.int64(job.start), num_latents=np.int64(len(latents)),
                  size=np.asarray(size, np.int64), video=np.asarray(job.row["video_path"]))
    os.makedirs(os.path.dirname(job.out), exist_ok=True)
    tmp = job.out + ".tmp"  # fixed name: a partial file from an interrupted run is simply overwritten
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, job.out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_settings(*, clip_frames: int | None, all_frames: bool, skip_frames: int, size, chunk: int, batch: int,
                   dtype: str) -> None:
    """Raises ValueError naming the setting for an impossible one (negative counts, a clip length the VAE cannot
    encode, a size it cannot downsample); nothing is read or written before this passes."""
    if not all_frames:
        if clip_frames is None:
            raise ValueError("clip_frames: pass a clip length (1 + 4k frames) or all_frames=True")
        try:
            latents_for_frames(clip_frames)
        except ValueError as e:
            raise ValueError(f"clip_frames={clip_frames}: {e}") from None
    if skip_frames < 0:
        raise ValueError(f"skip_frames={skip_frames}: must be >= 0 (frames skipped at the start of each video)")
    h, w = size
    if h < PIXELS_PER_LATENT or w < PIXELS_PER_LATENT or h % PIXELS_PER_LATENT or w % PIXELS_PER_LATENT:
        raise ValueError(f"size={h}x{w}: height and width must be positive multiples of {PIXELS_PER_LATENT} (the "
                         f"VAE downsamples by {PIXELS_PER_LATENT})")
    if chunk < FRAMES_PER_LATENT or chunk % FRAMES_PER_LATENT:
        raise ValueError(f"chunk={chunk}: must be a positive multiple of {FRAMES_PER_LATENT} (the VAE encodes "
                         f"{FRAMES_PER_LATENT} frames per latent)")
    if batch < 1:
        raise ValueError(f"batch={batch}: must be >= 1")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype={dtype!r}: expected float16 or float32")


def check_inputs(csv_path, vae, out_dir):
    """Checks the inputs and the output folder before any model is loaded or video decoded: `csv_path` must be a
    video CSV (`format.check_index_csv`), `vae` a converted VAE directory (when given as a path), `out_dir`
    a writable folder. Raises ValueError (ConvertError for the VAE) naming the file; returns the CSV's rows (a
    `pipeline.CsvSource`)."""
    from decmem_jax.data.pipeline import CsvSource  # grain and jax: imported once the arguments are known good

    check_index_csv(csv_path, "video")
    source = CsvSource(csv_path)
    if isinstance(vae, (str, os.PathLike)):
        from decmem_jax.convert.orbax_io import check_checkpoint_dir

        check_checkpoint_dir(vae, "vae")
    problem = cli.output_problem(out_dir)
    if problem:
        raise ValueError(f"{out_dir}: cannot write the latents here: {problem}")
    return source


def encode_latents(csv_path, vae, out_dir, *, clip_frames: int | None = 237, all_frames: bool = False,
                   skip_frames: int = SKIP_FRAMES, size=(352, 640), chunk: int = 4, batch: int = 1,
                   dtype: str = "float16", progress: bool = True, vae_dtype: str | None = None) -> EncodeSummary:
    """Encode every row of `csv_path` (see the module docstring). `vae`: a `WanVAE` or a converted-VAE directory
    (`decmem_jax.convert.vae.load_vae`, with compute dtype `vae_dtype`), loaded only once some clip is known to
    need encoding. Settings and inputs are checked first (`check_settings`, `check_inputs`); nothing is written
    when they fail, or when no clip could be encoded."""
    size = tuple(int(v) for v in size)
    check_settings(clip_frames=clip_frames, all_frames=all_frames, skip_frames=skip_frames, size=size, chunk=chunk,
                   batch=batch, dtype=dtype)
    source = check_inputs(csv_path, vae, out_dir)
    return _encode_all(source, vae, out_dir, clip_frames=clip_frames, all_frames=all_frames, skip_frames=skip_frames,
                       size=size, chunk=chunk, batch=batch, dtype=dtype, progress=progress, vae_dtype=vae_dtype)


def _finished(path: str) -> tuple[int, int] | None:
    """(num_latents, frame_start) of a finished output, or None when it cannot be read (it is then redone: outputs
    are renamed into place complete, so only damage after the fact gets here)."""
    try:
        with np.load(path) as data:
            return int(data["num_latents"]), int(data["frame_start"])
    except Exception:  # noqa: BLE001 -- any unreadable file is simply encoded again
        return None


def _encode_all(source, vae, out_dir, *, clip_frames, all_frames, skip_frames, size, chunk, batch, dtype,
                progress, vae_dtype) -> EncodeSummary:
    from tqdm.auto import tqdm

    csv_dir, out_dir = os.path.dirname(source.path), os.path.abspath(os.fspath(out_dir))
    summary, done, pending = EncodeSummary(), {}, []
    for _, row in (source[i] for i in range(len(source))):
        out = output_path(out_dir, row["video_path"], csv_dir)
        finished = _finished(out) if os.path.isfile(out) else None
        if finished is not None:
            done[out] = finished
            summary.existing.append(out)
        else:
            pending.append((row, out))

    # Plan every clip first (an npz and a video header each): clips that cannot be encoded are known before the
    # VAE is loaded, and when none can be, it is never loaded.
    jobs = []
    for row, out in pending:
        try:
            jobs.append(_plan(row, out, clip_frames, all_frames, skip_frames))
        except Exception as e:  # noqa: BLE001 -- any unreadable clip is reported and left out
            summary.failed.append((row["video_path"], str(e)))
    if jobs and isinstance(vae, (str, os.PathLike)):
        from decmem_jax.convert.vae import load_vae

        vae = load_vae(vae, dtype=vae_dtype)

    bar = tqdm(total=len(pending), desc="encoding", unit="clip", disable=not progress)
    bar.update(len(pending) - len(jobs))
    group: list[_Job] = []

    def flush():
        if not group:
            return
        try:
            results = list(zip(group, _encode(vae, group, size, chunk)))
        except Exception as e:
            if len(group) > 1:  # isolate the clip that failed
                results = []
                for job in group:
                    try:
                        results.append((job, _encode(vae, [job], size, chunk)[0]))
                    except Exception as e1:
                        summary.failed.append((job.row["video_path"], str(e1)))
            else:
                summary.failed.append((group[0].row["video_path"], str(e)))
                results = []
        for job, z in results:
            _save(job, z, size, dtype)
            done[job.out] = (len(z), job.start)
            summary.encoded.append(job.out)
        bar.update(len(group))
        group.clear()

    for job in jobs:
        if group and (job.count != group[0].count or len(group) >= batch):
            flush()
        group.append(job)
    flush()
    bar.close()
    if not done:  # an index of nothing would read as a finished (empty) data set
        return summary

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LATENT_COLUMNS)
    for _, row in (source[i] for i in range(len(source))):
        out = output_path(out_dir, row["video_path"], csv_dir)
        if out in done:
            rel = [os.path.relpath(p, out_dir) for p in (out, row["video_path"], row["action_path"])]
            writer.writerow([*rel, *done[out]])
    os.makedirs(out_dir, exist_ok=True)
    summary.csv = os.path.join(out_dir, LATENTS_CSV)
    with open(summary.csv + ".tmp", "w", newline="") as f:
        f.write(buf.getvalue())
    os.replace(summary.csv + ".tmp", summary.csv)
    return summary


def _vae_frames(text: str) -> int:
    value = cli.positive_int(text)
    try:
        latents_for_frames(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _chunk(text: str) -> int:
    value = cli.positive_int(text)
    if value % FRAMES_PER_LATENT:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of {FRAMES_PER_LATENT} (the VAE encodes "
                                         f"{FRAMES_PER_LATENT} frames per latent)")
    return value


def _size(text: str) -> tuple[int, int]:
    h, w = cli.frame_size(text)
    if h % PIXELS_PER_LATENT or w % PIXELS_PER_LATENT:
        raise argparse.ArgumentTypeError(f"{text!r}: height and width must be multiples of {PIXELS_PER_LATENT} (the "
                                         f"VAE downsamples by {PIXELS_PER_LATENT}), e.g. 64x64 or 352x640")
    return h, w


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m decmem_jax.data.encode_latents", description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", required=True, help="train.csv / test.csv from decmem_jax.data.build_csv")
    p.add_argument("--vae", required=True, help="converted VAE directory (decmem_jax.convert.vae), e.g. "
                   "weights/world_tiny/vae")
    p.add_argument("--out", required=True, help="output folder (mirrors the CSV's relative paths)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--clip-frames", type=_vae_frames, default=237,
                      help="encode one clip of N = 1 + 4k frames per video (default 237)")
    mode.add_argument("--all-frames", action="store_true", help="encode every frame after --skip-frames")
    p.add_argument("--skip-frames", type=cli.non_negative_int, default=SKIP_FRAMES,
                   help=f"frames skipped at the start of each video (default {SKIP_FRAMES}, WorldMem's)")
    p.add_argument("--size", type=_size, default=(352, 640), help="HxW (default 352x640, crop as the pipeline)")
    p.add_argument("--chunk", type=_chunk, default=4, help="pixel frames per streaming VAE step (multiple of 4)")
    p.add_argument("--batch", type=cli.positive_int, default=1, help="clips of equal length encoded together")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype of latents")
    p.add_argument("--vae-dtype", default=None, help="compute dtype for load_vae (e.g. bfloat16)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    settings = dict(clip_frames=args.clip_frames, all_frames=args.all_frames, skip_frames=args.skip_frames,
                    size=args.size, chunk=args.chunk, batch=args.batch, dtype=args.dtype)
    try:
        check_settings(**settings)
        source = check_inputs(args.csv, args.vae, args.out)
    except ValueError as e:  # ConvertError (the VAE) is one
        return cli.fail(e)
    from decmem_jax.convert.orbax_io import ConvertError

    try:
        summary = _encode_all(source, args.vae, args.out, **settings, progress=not args.no_progress,
                              vae_dtype=args.vae_dtype)
    except (ConvertError, OSError) as e:  # unloadable VAE weights; a full disk
        return cli.fail(e)
    print(summary.format())
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
