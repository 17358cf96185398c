"""Minute-long action-conditioned rollout from a context clip, streamed into an mp4.

    python -m decmem_jax.rollout --config=configs/decmem.py --context=clip.mp4 --actions=clip.npz \\
        --num_frames=600 --out=world.mp4 --config.checkpoint=DIR --config.vae_checkpoint=VAE_DIR

1. The first `rollout.context_frames` frames of --context (221 by default, 1 + 4k) are VAE-encoded (streaming) and
   teacher-forced into the memory bank (KV cache) at t = 0, chunk by chunk.
2. Chunks of `rollout.chunk` latents are generated under the --actions that follow the context (`lax.scan` over
   `rollout.segment_chunks` chunks per call), each decoded by the streaming VAE as soon as its segment is done and
   appended to --out; a progress bar counts frames.
3. A sidecar JSON (--out with .json) records the settings, seed, inputs, timing and memory.

--actions is a WorldMem-format npz (actions int [T, 8], poses [T, 5]) covering at least context + num_frames frames
from the clip's first frame. Generation runs whole chunks and truncates the last one (docs/method.md §12).

Steps 1-2 are the library generator `decmem_jax.rollout.generate.generate`; this module checks the inputs before any
model work and writes what the generator yields.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from decmem_jax.cli import define_config_flag
from decmem_jax.errors import DecMemError
from decmem_jax.format import FRAMES_PER_LATENT, frames_for_latents, latents_for_frames, whole_latents
from decmem_jax.rollout import settings as settings_lib
from decmem_jax.rollout.load import RolloutError, build_models, weights_sha256

_CONFIG = define_config_flag("config", None, "run config file, e.g. configs/decmem.py or configs/tiny.py")
_CONTEXT = flags.DEFINE_string("context", None, "context clip (mp4); its first rollout.context_frames frames seed the "
                               "memory bank")
_ACTIONS = flags.DEFINE_string("actions", None, "WorldMem npz with actions [T, 8] (and poses [T, 5]) from the "
                               "context's first frame on")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 600, "frames to generate after the context")
_OUT = flags.DEFINE_string("out", None, "output mp4 (written incrementally; a .json sidecar is written next to it)")
_SEED = flags.DEFINE_integer("seed", 0, "noise seed")
_DIAGNOSTICS = flags.DEFINE_string("diagnostics", None, "optional .npz: the SGM blocks each query block retrieved "
                                   "(per chunk, layer, head, best score first) at the commit pass, for plotting; "
                                   "every field is described in docs/memory.md")
_TRUTH = flags.DEFINE_string("ground_truth", None, "optional mp4 holding the true continuation (normally the --context "
                             "clip itself, when it is longer than the context): the generated frames are scored "
                             "against it (PSNR/SSIM/LPIPS, and a copy-the-last-context-frame baseline) in the sidecar, "
                             "and OUT_vs_truth.mp4 (truth | generated) and OUT_strip.png (a contact sheet) are written")


def _fail(msg: str) -> None:
    raise RolloutError(msg)


def load_inputs(c, context: str, actions: str, num_frames: int, truth: str | None = None):
    """Validated (context frames uint8 [T, H, W, 3], actions int32 [N, 8], poses float32 [N, 5]) before any model
    work, so a bad input costs nothing."""
    from decmem_jax import video
    from decmem_jax.data.pipeline import clip_conditioning
    from decmem_jax.format import load_clip_arrays

    r = c.rollout
    if num_frames < 1:
        _fail(f"--num_frames={num_frames} must be >= 1")
    for flag, path in (("--context", context), ("--actions", actions)):
        if not path:
            _fail(f"{flag} is required")
        if not os.path.isfile(path):
            _fail(f"{flag} {path}: file not found")
    info = video.probe(context)  # raises VideoError naming the file for a non-video / truncated file
    if (info.height, info.width) != (r.height, r.width):
        _fail(f"--context {context}: frames are {info.height}x{info.width}, the config expects "
              f"{r.height}x{r.width} (rollout.height/width); resize the clip or change the config")
    if info.num_frames < r.context_frames:
        _fail(f"--context {context}: {info.num_frames} frames, fewer than rollout.context_frames={r.context_frames}")
    try:
        acts, poses = load_clip_arrays(actions)
    except (ValueError, KeyError, OSError) as e:  # the message names the npz
        _fail(f"--actions: {e}")
    # Whole chunks are generated (the last one's extra frames dropped), so the actions must cover them: the context's
    # encoded frames, then chunk * 4 frames per chunk.
    per_chunk = FRAMES_PER_LATENT * int(r.chunk)
    chunks = -(-num_frames // per_chunk)
    ctx_frames = frames_for_latents(whole_latents(r.context_frames))
    act_needed = max(r.context_frames + num_frames, ctx_frames + chunks * per_chunk)
    if acts.shape[0] < act_needed:
        _fail(f"--actions {actions}: {acts.shape[0]} frames of actions, but {act_needed} are needed: the context "
              f"({ctx_frames} encoded frames) + --num_frames ({num_frames}) rounded up to whole chunks of "
              f"{per_chunk} frames ({chunks} chunks)")
    needed = r.context_frames + num_frames  # what the ground truth must hold (frames past num_frames are dropped)
    if truth:
        if not os.path.isfile(truth):
            _fail(f"--ground_truth {truth}: file not found")
        t_info = video.probe(truth)
        if (t_info.height, t_info.width) != (r.height, r.width) or t_info.num_frames < needed:
            _fail(f"--ground_truth {truth}: {t_info.num_frames} frames of {t_info.height}x{t_info.width}; the "
                  f"comparison needs {needed} frames of {r.height}x{r.width} (context + --num_frames)")
    frames = video.read_video(context, num_frames=r.context_frames)
    acts, poses = clip_conditioning(acts, poses)
    return frames, acts, poses


def run(c, *, context: str, actions: str, num_frames: int, out: str, seed: int = 0,
        diagnostics: str | None = None, ground_truth: str | None = None) -> dict:
    """Validates the inputs, rolls out (`rollout.generate`) into --out, and writes the sidecar (returned as a dict),
    the diagnostics npz and the ground-truth comparison."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from decmem_jax import video
    from decmem_jax.models.conditioning import fixed_text_context
    from decmem_jax.rollout.generate import generate

    problems = settings_lib.check(c)
    if problems:
        _fail("bad config: " + "; ".join(problems))
    shard = settings_lib.placement(c)  # a bad rollout.mesh fails here, before inputs and models are loaded
    if not out:
        _fail("--out is required")
    r = c.rollout
    t_start = time.perf_counter()
    if not os.path.isdir(Path(out).absolute().parent):
        _fail(f"--out {out}: the folder {Path(out).absolute().parent} does not exist")
    frames, acts, poses = load_inputs(c, context, actions, num_frames, ground_truth)
    dit, vae, weights = build_models(c)
    cfg = dit.cfg
    if shard is not None:
        shard.shard_model(dit)
    chunk = int(r.chunk)
    frames_per_chunk = FRAMES_PER_LATENT * chunk
    n_chunks = -(-num_frames // frames_per_chunk)
    ctx_latents = latents_for_frames(r.context_frames)
    capacity = int(r.capacity) or ctx_latents + n_chunks * chunk
    if capacity < ctx_latents + n_chunks * chunk:
        _fail(f"rollout.capacity={capacity} < context latents {ctx_latents} + generated {n_chunks * chunk}")

    # 1. Memory bank: the first item `generate` yields, once the context is encoded and teacher-forced.
    with tqdm(total=ctx_latents, desc="memory bank", unit="latent") as bar:
        segments = generate(
            dit, vae, frames=frames[None], actions=acts[None], poses=poses[None], seeds=[seed],
            text=jnp.asarray(fixed_text_context(cfg.text_len, cfg.text_dim, r.text_context or None)),
            settings=settings_lib.sampler_settings(c), num_frames=num_frames, chunk=chunk,
            segment_chunks=int(r.segment_chunks), capacity=capacity, with_selection=bool(diagnostics),
            include_context=bool(r.include_context), progress=bar.update, shard=shard)
        ctx = next(segments)

    # 2. Generate segment by segment; append each to the mp4 as it lands, encoded on a worker thread so that the next
    # segment is dispatched meanwhile.
    selections, written = [], 0
    kept = []  # generated uint8 frames, kept only for the comparison with the ground truth
    t_gen = time.perf_counter()
    chunk_times = []
    with video.BackgroundWriter(video.VideoWriter(out, fps=r.fps)) as writer, \
            tqdm(total=num_frames, desc="rollout", unit="frame") as bar:
        if ctx.frames is not None:
            writer.write(ctx.frames[0])
        for segment in segments:
            if diagnostics:
                selections.append(segment.selection)
            chunk_times.append(segment.seconds_per_chunk)
            writer.write(segment.frames[0])
            if ground_truth:
                kept.append(segment.frames[0])
            written += segment.frames.shape[1]
            bar.update(segment.frames.shape[1])
    t_total = time.perf_counter() - t_start
    if diagnostics:
        ids = np.concatenate([s_[0] for s_ in selections])[:, :, 0]  # [chunks, L, H, C*M, K] (batch 1)
        cnt = np.concatenate([s_[1] for s_ in selections])[:, :, 0]
        _save_npz(diagnostics, ids=ids, counts=cnt, blocks_per_frame=cfg.memory.blocks_per_frame,
                  context_latents=ctx_latents, chunk=chunk)
    record = dict(
        out=str(out), frames=written, context=str(context), actions=str(actions), context_frames=int(r.context_frames),
        chunks=n_chunks, seed=seed, weights=weights, random_weights=bool(c.random_weights),
        weights_sha256={"dit": weights_sha256(dit), "vae": weights_sha256(vae)},
        model=json.loads(cfg.to_json()), rollout=r.to_dict(),
        devices=[str(d) for d in (shard.mesh.devices.flat if shard else jax.devices()[:1])], jax=jax.__version__,
        mesh=dict(shard.mesh.shape) if shard else None,
        timing=dict(total_s=t_total, prefill_s=ctx.seconds, generate_s=time.perf_counter() - t_gen,
                    per_chunk_s_first_segment=chunk_times[0], per_chunk_s_median=float(np.median(chunk_times)),
                    # The first segment includes compilation: with one segment there is no compile-free figure.
                    fps_excluding_compile=(frames_per_chunk / float(np.median(chunk_times[1:])) if len(chunk_times) > 1
                                           else None)),
        host_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    if ground_truth:
        record.update(_compare_to_truth(ground_truth, np.concatenate(kept), frames[-1], out, r))
    _write_json(Path(out).with_suffix(".json"), record)
    return record


def _compare_to_truth(truth_path: str, generated: np.ndarray, last_context: np.ndarray, out: str, r) -> dict:
    """Scores against the true continuation, the copy-last-frame baseline, and the side-by-side mp4 + contact
    sheet next to --out."""
    from decmem_jax import video
    from decmem_jax.eval import compare

    truth = video.read_video(truth_path, start=int(r.context_frames), num_frames=len(generated))
    result = compare.compare(generated, truth, last_context)
    stem = Path(out).with_suffix("")
    pair = Path(f"{stem}_vs_truth.mp4")
    video.write_video(pair, compare.side_by_side(truth, generated), fps=r.fps)
    strip = Path(f"{stem}_strip.png")
    sheet = compare.contact_sheet({"truth": truth, "generated": generated,
                                   "copy last": np.broadcast_to(last_context, truth.shape)}, every=8)
    tmp = strip.with_name(f".{strip.name}.tmp.png")
    sheet.save(tmp)
    os.replace(tmp, strip)
    result.update(ground_truth=str(truth_path), side_by_side=str(pair), contact_sheet=str(strip))
    return result


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _save_npz(path: str, **arrays) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Our own notes at INFO; libraries (jax's backend probing, Orbax's per-file lines) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("decmem_jax").setLevel(logging.INFO)
    logging.getLogger("pallas_kernels").setLevel(logging.INFO)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        record = run(_CONFIG.value, context=_CONTEXT.value, actions=_ACTIONS.value, num_frames=_NUM_FRAMES.value,
                     out=_OUT.value, seed=_SEED.value, diagnostics=_DIAGNOSTICS.value, ground_truth=_TRUTH.value)
    except (DecMemError, ValueError, FileNotFoundError) as e:  # plain ValueError: a config the dataclasses reject
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = record["timing"]
    print(f"wrote {record['out']}: {record['frames']} frames ({record['weights']}); {t['total_s']:.1f} s total, "
          f"{t['per_chunk_s_median']:.2f} s/chunk; sidecar {Path(record['out']).with_suffix('.json')}")
    if "metrics" in record:
        m, b = record["metrics"], record["baseline_metrics"]
        print(f"against the ground truth: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, LPIPS {m['lpips']:.3f}; "
              f"copy-last-frame baseline: PSNR {b['psnr']:.2f} dB, SSIM {b['ssim']:.3f}, LPIPS {b['lpips']:.3f}; "
              f"see {record['side_by_side']} and {record['contact_sheet']}")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    from decmem_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)  # one-line errors, "did you mean" for an unknown --config.x field
