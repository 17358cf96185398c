"""Generate WorldMem-format clips from the procedural block world (``decmem_jax.data.world`` / ``.agent``).

    python -m decmem_jax.data.generate_world --out DIR --clips 20 --frames 300 --size 64x64 --seed 0 [--revisit]

Writes ``DIR/<split>/0/<episode:06d>.mp4`` (H.264, 10 fps) + ``.npz`` pairs in the WorldMem layout
(``decmem_jax.format``): ``np.savez_compressed(actions=int32 [T, 8], poses=float32 [T, 5],
revisit_pairs=int32 [P, 2])``. ``revisit_pairs`` is an extra key (WorldMem readers ignore unknown keys): rows
``(i, j)``, frame j shows frame i's pose again (ground truth for revisit evaluation; see ``agent.find_revisits``).
Episodes are numbered within their split; the worker folder is always ``0`` (one generator; ``--jobs`` only
parallelises). Clip k of a run uses its own world and agent, seeded by ``(seed, k)``: a clip's content does not
depend on ``--clips``, ``--jobs`` or ``--split``, and the same arguments give byte-identical npz files and
identical decoded frames (mp4 bytes may differ: libx264 threading, see ``decmem_jax.video``).

Crash safety: each pair is written to a hidden staging folder under DIR (``.generate_world-*``, outside every
split), then the npz and, last, the mp4 are renamed into place: a visible mp4 always has its npz.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from decmem_jax import cli
from decmem_jax.data import agent as agent_lib
from decmem_jax.data import world as world_lib
from decmem_jax.format import FPS, SPLITS, check_clip_arrays
from decmem_jax.video import write_video

SPLIT_FRACTIONS = {"training": 0.8, "validation": 0.1, "test": 0.1}
WORKER = "0"


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W); both positive and even (H.264 yuv420p needs even sizes)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r}: size must look like HxW (e.g. 64x64, 352x640, 360x640)") from None
    if h <= 0 or w <= 0 or h % 2 or w % 2:
        raise ValueError(f"--size {h}x{w}: size must be positive and even in both dimensions (yuv420p video)")
    return h, w


def assign_splits(clips: int, seed: int, split: str) -> list[str]:
    """The split of each clip: all ``split``, or for 'all' a seeded 80/10/10 shuffle (validation and test get at
    least one clip each once there are 3 or more)."""
    if split != "all":
        return [split] * clips
    n_val = n_test = max(1, round(0.1 * clips)) if clips >= 3 else 0
    order = np.random.default_rng([seed, 0x5911]).permutation(clips)
    names = np.array(["training"] * clips, object)
    names[order[:n_val]] = "validation"
    names[order[n_val:n_val + n_test]] = "test"
    return names.tolist()


WAY_BACK_CHOICES = (*agent_lib.WAYS_BACK, "patrol", "any")


def is_revisit_clip(index: int, seed: int, revisit: float) -> bool:
    """Whether clip ``index`` follows a revisit script: always for revisit=1 (True), never for 0 (False), else
    with probability ``revisit``, drawn from (seed, index) alone."""
    if revisit >= 1 or revisit <= 0:
        return revisit >= 1
    return bool(np.random.default_rng([seed, index, 0x5EE]).random() < revisit)


def make_clip(index: int, frames: int, size, seed: int, revisit: bool | float, fog: bool = True,
              way_back: str | None = None):
    """Clip ``index`` of a run: (frames uint8 [T, H, W, 3], actions int32 [T, 8], poses float32 [T, 5],
    revisit_pairs int32 [P, 2]). ``revisit``: True/False, or the fraction of clips that follow a revisit script
    (the others explore at random); ``way_back``: how revisit scripts return (`agent.WAYS_BACK`; None = drawn per
    clip), "patrol" (`agent.patrol_trajectory`: walk out, then back and forth along the path), or "any" (one of
    those three drawn per clip from (seed, index), even odds)."""
    world_seed, agent_seed = np.random.SeedSequence([seed, index]).generate_state(2)
    if way_back == "any":  # its own stream: the world and the agent's draws are the same as with a fixed way back
        options = (*agent_lib.WAYS_BACK, "patrol")
        way_back = options[int(np.random.default_rng([seed, index, 0xBAC]).integers(len(options)))]
    world = world_lib.build_world(int(world_seed))
    rng = np.random.default_rng(int(agent_seed))
    if not is_revisit_clip(index, seed, float(revisit)):
        actions, poses = agent_lib.random_explorer(world, frames - 1, rng)
    elif way_back == "patrol":
        actions, poses, _ = agent_lib.patrol_trajectory(world, frames - 1, rng)
    else:
        actions, poses, _ = agent_lib.revisit_trajectory(world, frames - 1, rng, way_back=way_back)
    poses = poses.astype(np.float32)  # the stored poses are what gets rendered
    video = world_lib.render(world, poses.astype(np.float64), size, fog=fog)
    return video, actions, poses, agent_lib.find_revisits(poses)


def video_options(quantizer: int) -> dict:
    """VideoWriter settings: FFmpeg's own MPEG-4 Part 2 encoder (`mpeg4`, the `mp4v` codec WorldMem's clips were
    written with) at a constant quantizer (1 = best .. 31). Unlike the libx264 build in the PyAV wheel, whose output
    varied from run to run here, it is deterministic: the same seed gives the same decoded frames. Quantizer 1 keeps
    equal-pose frames of a revisit above 40 dB PSNR after the round trip (2 gives ~37 dB at 64x64, files ~40% smaller;
    a 300-frame 64x64 clip is ~0.6 MB at 1)."""
    if not 1 <= quantizer <= 31:
        raise ValueError(f"quantizer must be in 1..31, got {quantizer}")
    return dict(codec="mpeg4", crf=None, preset=None, options={"qmin": str(quantizer), "qmax": str(quantizer)})


def _write_clip(job) -> tuple[str, str]:
    out, split, episode, index, frames, size, seed, revisit, fog, quantizer, skip, way_back = job
    folder = Path(out) / split / WORKER
    mp4, npz = folder / f"{episode:06d}.mp4", folder / f"{episode:06d}.npz"
    if skip and mp4.exists() and npz.exists():
        return str(mp4), str(npz)
    video, actions, poses, pairs = make_clip(index, frames, size, seed, revisit, fog, way_back)
    problems = check_clip_arrays(actions, poses, len(video))
    if problems:
        raise RuntimeError(f"clip {index}: generated invalid arrays: {problems}")
    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".generate_world-", dir=out))
    try:
        write_video(stage / mp4.name, video, fps=FPS, **video_options(quantizer))
        with open(stage / npz.name, "wb") as f:
            np.savez_compressed(f, actions=actions, poses=poses, revisit_pairs=pairs)
        os.replace(stage / npz.name, npz)
        os.replace(stage / mp4.name, mp4)  # last: the pair becomes visible (mp4 discovery) only when complete
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return str(mp4), str(npz)


def check_args(clips, frames, size, revisit, split, jobs, quantizer: int = 1, seed: int = 0) -> tuple[int, int]:
    """Raise ValueError naming the argument for a bad one; returns the size as (H, W)."""
    if isinstance(size, str):
        size = parse_size(size)
    size = tuple(int(v) for v in size)
    parse_size(f"{size[0]}x{size[1]}")
    if not isinstance(clips, int) or clips < 1:
        raise ValueError(f"--clips {clips!r}: clips must be a positive int")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"--frames {frames!r}: frames must be a positive int")
    if not 0 <= float(revisit) <= 1:
        raise ValueError(f"--revisit-fraction {revisit}: the revisit fraction must be in [0, 1]")
    if revisit and frames < 27:
        raise ValueError(f"--frames {frames}: --revisit needs at least 27 frames (out, turn round, back, turn round)")
    if split not in (*SPLITS, "all"):
        raise ValueError(f"--split {split!r}: split must be one of {', '.join(SPLITS)} or all")
    if jobs < 1:
        raise ValueError(f"--jobs {jobs!r}: jobs must be >= 1")
    if not 1 <= quantizer <= 31:
        raise ValueError(f"--quantizer {quantizer!r}: the MPEG-4 quantizer must be in 1..31")
    if seed < 0:  # seeds numpy's SeedSequence, which takes no negative entropy
        raise ValueError(f"--seed {seed!r}: the seed must be >= 0")
    return size


def generate(out, clips: int, frames: int, size=(64, 64), seed: int = 0, revisit: bool | float = False,
             split: str = "training", *, fog: bool = True, quantizer: int = 1, jobs: int = 1,
             skip_existing: bool = False, progress: bool = True,
             way_back: str | None = None) -> list[tuple[str, str]]:
    """Write ``clips`` clips of ``frames`` frames (see the module docstring); returns the (mp4, npz) paths in clip
    order. ``size`` is (H, W) or 'HxW'; ``quantizer`` the MPEG-4 quantizer (see `video_options`); ``jobs`` worker
    processes;
    ``skip_existing`` keeps complete pairs; ``way_back`` fixes how revisit scripts return (None: drawn per clip)."""
    size = check_args(clips, frames, size, revisit, split, jobs, quantizer, seed)
    if way_back is not None and way_back not in WAY_BACK_CHOICES:
        raise ValueError(f"--way-back {way_back}: expected one of {WAY_BACK_CHOICES}")
    problem = cli.output_problem(out)
    if problem:  # before any clip is rendered
        raise ValueError(f"--out {os.fspath(out)}: {problem}")
    os.makedirs(out, exist_ok=True)
    counters = dict.fromkeys(SPLITS, 0)
    work = []
    for index, name in enumerate(assign_splits(clips, seed, split)):
        work.append((os.fspath(out), name, counters[name], index, frames, size, seed, revisit, fog, quantizer,
                     skip_existing, way_back))
        counters[name] += 1
    bar = tqdm(total=clips, unit="clip", desc="generate_world", disable=not progress)
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            results = stack.enter_context(ProcessPoolExecutor(jobs)).map(_write_clip, work)
        else:
            results = map(_write_clip, work)
        written = []
        for pair in results:
            written.append(pair)
            bar.update()
    bar.close()
    return written


def main(argv=None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m decmem_jax.data.generate_world",
        description="Generate WorldMem-format clips (mp4 at 10 fps + npz with MineDojo 'actions' int32 [T, 8] and "
                    "'poses' float32 [T, 5] = x, y, z, pitch, yaw degrees, plus 'revisit_pairs' int32 [P, 2]) from a "
                    "deterministic procedural block world: DIR/<split>/0/<episode:06d>.{mp4,npz}. Each clip has its "
                    "own world and random-explorer agent (or scripted revisit with --revisit), seeded by (seed, clip).")
    parser.add_argument("--out", required=True, help="data root to write into (created if missing)")
    parser.add_argument("--clips", type=int, required=True, help="number of clips (episodes) to write, >= 1")
    parser.add_argument("--frames", type=int, required=True,
                        help="frames per clip T (= 1 + number of actions), >= 1; >= 27 with --revisit")
    parser.add_argument("--size", default="64x64",
                        help="frame size HxW, both even (e.g. 64x64, 352x640, 360x640 = WorldMem); default 64x64")
    parser.add_argument("--seed", type=int, default=0, help="run seed; same seed and arguments, same clips")
    parser.add_argument("--revisit", action="store_true",
                        help="scripted trajectories that return to an earlier pose (look around, walk out, turn "
                             "round, walk back, turn round) instead of a pure random walk; needs --frames >= 27")
    parser.add_argument("--revisit-fraction", type=float, default=None, metavar="F",
                        help="a revisit script for a fraction F of the clips (chosen by seed and clip index), a "
                             "random walk for the others; overrides --revisit")
    parser.add_argument("--way-back", default=None, choices=WAY_BACK_CHOICES,
                        help="how revisit scripts return: 'turn' (turn round, walk back facing the other way), "
                             "'retrace' (step back facing as on the way out, so every outbound view is seen again) "
                             "or 'patrol' (look round, walk out, then back and forth along the path until the clip "
                             "ends: the memory benchmark's clips) or 'any' (one of those three, drawn per clip: the "
                             "world model's stage-3 clips); default: turn or retrace, drawn per clip")
    parser.add_argument("--split", default="training", choices=(*SPLITS, "all"),
                        help="split folder for every clip, or 'all' for a seeded 80/10/10 "
                             "training/validation/test assignment; default training")
    parser.add_argument("--fog", action=argparse.BooleanOptionalAction, default=True,
                        help="distance fog towards the sky colour (default on; --no-fog: hard cut at 48 blocks)")
    parser.add_argument("--quantizer", type=int, default=1,
                        help="MPEG-4 (mp4v) constant quantizer, 1 (best, default) .. 31; the encoder is deterministic")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (output does not depend on it)")
    parser.add_argument("--skip-existing", action="store_true", help="keep clips whose mp4 and npz both exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    revisit = args.revisit if args.revisit_fraction is None else args.revisit_fraction
    try:
        check_args(args.clips, args.frames, args.size, revisit, args.split, args.jobs, args.quantizer, args.seed)
    except ValueError as e:
        parser.error(str(e))
    problem = cli.output_problem(args.out)
    if problem:
        return cli.fail(f"--out {args.out}: {problem}")
    try:
        written = generate(args.out, args.clips, args.frames, args.size, args.seed, revisit, args.split,
                           fog=args.fog, quantizer=args.quantizer, jobs=args.jobs, skip_existing=args.skip_existing,
                           progress=not args.quiet, way_back=args.way_back)
    except OSError as e:  # e.g. the disk filled up: finished pairs stay, the clip being written left nothing
        return cli.fail(f"--out {args.out}: {e}")
    seconds = time.perf_counter() - start
    print(f"wrote {len(written)} clips x {args.frames} frames to {args.out} in {seconds:.1f} s "
          f"({seconds / len(written):.2f} s per clip)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
