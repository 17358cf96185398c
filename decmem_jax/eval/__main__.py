"""Memory fidelity benchmark: does the memory keep revisited places consistent? (docs/memory.md)

    python -m decmem_jax.eval --csv=runs/memory_eval/test.csv --num_frames=600 \\
        --out=docs/results/memory_fidelity.json

Every clip of --csv (WorldMem format: mp4 + npz with actions and poses, e.g. from `python -m
decmem_jax.data.generate_world --revisit`) is rolled out under its own actions from its first
rollout.context_frames frames, for --num_frames frames, by five variants on the same seeds:
decmem (stage 3), alm_only (the same weights with SGM off), dense_full (stage 2, whole history),
dense_window (stage 2 in ALM's window), copy_last (the last context frame). Generated frames are
scored against the clip's truth: PSNR, SSIM, LPIPS per frame, FVD over the set, each also on
revisit frames only (a view seen before, outside the ALM window, found from the poses); and
decmem's SGM retrieval precision on revisit frames, per layer. Results: --out (means with 95%
intervals over clips), PLOTS/details.json (per clip, per layer), PNG plots and grid videos in
PLOTS. Rollouts are kept in --workdir, so a rerun resumes.

--config (default configs/world_tiny.py:decmem) gives the stage-3 model, the VAE, the sampler and
the rollout geometry (override with --config.rollout.steps=... etc.); --dense_checkpoint the
stage-2 model.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import app, flags

from decmem_jax.cli import define_config_flag
from decmem_jax.eval.revisits import RevisitRule
from decmem_jax.eval.variants import VARIANTS

_CONFIG = define_config_flag(
    "config", "configs/world_tiny.py:decmem", "run config of the stage-3 DecMem model (checkpoint, vae_checkpoint, "
    "model.memory, rollout.*: context_frames, chunk, steps, guidance, segment_chunks, dtype)", lock_config=True)
_CSV = flags.DEFINE_string("csv", None, "test CSV (video_path, action_path columns, paths relative to the CSV) of "
                           "clips with revisits, each >= context + --num_frames frames")
_OUT = flags.DEFINE_string("out", "docs/results/memory_fidelity.json", "result JSON: {commit, device, clips, frames, "
                           "variants: {NAME: {psnr, ssim, lpips, revisit_*, fvd}}, retrieval_precision: {top1, topk}}, "
                           "each metric [mean, lo, hi] (95% interval over clips)")
_PLOTS = flags.DEFINE_string("plots", None, "folder for details.json, PNG plots and grid videos (default: --out "
                             "without .json)")
_WORKDIR = flags.DEFINE_string("workdir", "runs/memory_fidelity", "per-clip rollouts (frames, SGM selections); a "
                               "rerun with the same settings skips what is there")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 600, "frames generated per clip after the context")
_CLIPS = flags.DEFINE_integer("clips", 0, "clips of the CSV to use, from its first row (0 = all)")
_BATCH = flags.DEFINE_integer("batch_clips", 8, "clips rolled out together in one forward (one cache row each)")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "variants to run, among " + ",".join(VARIANTS))
_SEED = flags.DEFINE_integer("seed", 0, "noise seed; clip n (CSV row) uses seed + n in every variant")
_DENSE = flags.DEFINE_string("dense_checkpoint", "weights/world_tiny/dense", "stage-2 dense checkpoint "
                             "(dense_full, dense_window)")
_POS = flags.DEFINE_float("pos_tol", RevisitRule.pos_tol, "revisit rule: eye positions within this many blocks")
_YAW = flags.DEFINE_float("yaw_tol", RevisitRule.yaw_tol, "revisit rule: yaws within this many degrees")
_PITCH = flags.DEFINE_float("pitch_tol", RevisitRule.pitch_tol, "revisit rule: pitches within this many degrees")
_EXCLUDE = flags.DEFINE_bool("exclude_window", RevisitRule.exclude_window, "revisit rule: a view still held in the "
                             "committed part of the ALM window is no revisit")
_SOURCES = flags.DEFINE_enum("revisit_sources", RevisitRule.sources, ["context", "any"], "revisit rule: which "
                              "earlier frames count as a revisit's source: 'context' (the teacher-forced frames, "
                              "whose truth the memory holds) or 'any' (generated frames too: then the truth shows "
                              "a view the model never saw; see docs/memory.md)")
_FVD = flags.DEFINE_bool("fvd", True, "compute FVD (I3D on 16-frame segments; slow on a CPU)")
_PLOT_CLIPS = flags.DEFINE_integer("plot_clips", 4, "clips (from the first) that get PSNR and retrieval plots and a "
                                   "grid video")
_COMMIT = flags.DEFINE_string("commit", "", "commit to record (default: git rev-parse HEAD of this checkout)")
_PROGRESS = flags.DEFINE_bool("progress", True, "progress bars")


def settings_from_flags():
    from decmem_jax.eval.benchmark import Settings

    out = _OUT.value
    return Settings(csv=_CSV.value or "", out=out, workdir=_WORKDIR.value,
                    plots=_PLOTS.value or str(Path(out).with_suffix("")), num_frames=_NUM_FRAMES.value,
                    clips=_CLIPS.value, batch_clips=_BATCH.value, variants=tuple(_VARIANTS.value), seed=_SEED.value,
                    dense_checkpoint=_DENSE.value,
                    rule=RevisitRule(_POS.value, _YAW.value, _PITCH.value, _EXCLUDE.value, _SOURCES.value),
                    fvd=_FVD.value,
                    plot_clips=_PLOT_CLIPS.value, commit=_COMMIT.value,
                    progress=_PROGRESS.value)


def _table(result: dict, extra: dict) -> str:
    fmt = lambda v: "-" if v[0] is None else (f"{v[0]:.3f}" if v[1] is None else  # noqa: E731
                                             f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]")
    cols = ("psnr", "ssim", "lpips", "revisit_psnr", "revisit_ssim", "revisit_lpips", "fvd")
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in result["variants"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(m[c]) for c in cols) + " |")
    rp = result["retrieval_precision"]
    lines.append(f"\nretrieval precision (decmem, revisit queries, mean over layers): top-1 {fmt(rp['top1'])}, "
                 f"top-k {fmt(rp['topk'])}; chance {fmt(extra.get('chance', [None] * 3))}, ceiling "
                 f"{fmt(extra.get('ceiling', [None] * 3))}; {extra['revisit_frames']} revisit frames in "
                 f"{extra['clips_with_revisits']} of {result['clips']} clips")
    return "\n".join(lines)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from decmem_jax.errors import DecMemError
    from decmem_jax.eval.benchmark import run

    try:
        s = settings_from_flags()
        out = run(s, _CONFIG.value)
    except (DecMemError, ValueError, FileNotFoundError) as e:  # plain ValueError: a config the dataclasses reject
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_table(out["result"], out["details"]["retrieval"]))
    print(f"wrote {s.out} and {s.plots}/ (details.json, plots, grid videos) in {out['details']['total_seconds']} s")
    return 0


if __name__ == "__main__":
    app.run(main)
