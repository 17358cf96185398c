"""The memory fidelity benchmark, start to end (`python -m decmem_jax.eval` drives it; docs/memory.md is the protocol).

1. `load_clips`: every clip of the test CSV is checked (video size and length, npz actions and poses) before any
   model work, and its revisit frames and their ground-truth sources are found from its poses (`revisits`).
2. `rollouts`: each model variant rolls out every clip that its work folder lacks, several clips per forward; each
   clip's frames (and, for decmem, its commit-pass SGM selections) are written to WORKDIR/clips/ as soon as its
   batch is done, so an interrupted run resumes where it stopped. WORKDIR/run.json records the settings: resuming
   with other settings is refused.
3. `score`: PSNR/SSIM/LPIPS per frame against the truth, means per clip over all generated frames and over revisit
   frames, FVD over 16-frame segments, retrieval precision per layer, 95% intervals over clips (`summary`); the
   plots and grid videos of the first clips (`plots`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from decmem_jax.errors import DecMemError
from decmem_jax.eval import retrieval, revisits, summary
from decmem_jax.eval.variants import MODEL_VARIANTS, VARIANTS
from decmem_jax.format import latent_size

DIAGNOSTIC_FIELDS = ("ids", "counts", "blocks_per_frame", "context_latents", "chunk")  # as the rollout CLI writes


class BenchmarkError(DecMemError, ValueError):
    """A bad input or setting; the message names the file or field."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run measures (the model and sampler come from the run config)."""

    csv: str
    out: str
    workdir: str
    plots: str
    num_frames: int = 600
    clips: int = 0  # 0 = every clip of the CSV
    batch_clips: int = 8
    variants: tuple[str, ...] = VARIANTS
    seed: int = 0
    dense_checkpoint: str = "weights/world_tiny/dense"
    rule: revisits.RevisitRule = revisits.RevisitRule()
    fvd: bool = True
    plot_clips: int = 4
    commit: str = ""
    progress: bool = True

    def problems(self) -> list[str]:
        out = []
        if self.num_frames < 1:
            out.append(f"--num_frames={self.num_frames} must be >= 1")
        if self.clips < 0 or self.batch_clips < 1 or self.plot_clips < 0:
            out.append("--clips and --plot_clips must be >= 0, --batch_clips >= 1")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants or len(set(self.variants)) != len(self.variants):
            out.append(f"--variants={','.join(self.variants)}: expected distinct names among {','.join(VARIANTS)}")
        if self.fvd and self.num_frames < summary.FVD_FRAMES:
            out.append(f"--num_frames={self.num_frames}: FVD needs >= {summary.FVD_FRAMES} (or pass --nofvd)")
        if not self.csv or not os.path.isfile(self.csv):
            out.append(f"--csv {self.csv or '(empty)'}: file not found")
        if not self.out.endswith(".json"):
            out.append(f"--out {self.out}: must be a .json path")
        return out


@dataclasses.dataclass
class Clip:
    index: int  # row of the CSV
    video: str
    actions: np.ndarray  # raw [T, 8]
    poses: np.ndarray  # raw [T, 5]
    revisits: revisits.Revisits


def _fail(msg: str):
    raise BenchmarkError(msg)


def load_clips(s: Settings, c, timeline: revisits.Timeline) -> list[Clip]:
    """The CSV's clips, validated (one clear error naming the file), with their revisit frames."""
    from decmem_jax import video
    from decmem_jax.data.pipeline import CsvSource
    from decmem_jax.format import load_clip_arrays

    try:
        source = CsvSource(s.csv)
    except (ValueError, OSError) as e:
        _fail(f"--csv {s.csv}: {e}")
    n = len(source) if s.clips == 0 else min(s.clips, len(source))
    if n == 0 or (s.clips and len(source) < s.clips):
        _fail(f"--csv {s.csv}: {len(source)} clips, --clips={s.clips} asked")
    needed = timeline.context_frames + s.num_frames
    clips = []
    for i in range(n):
        row = source[i][1]
        mp4, npz = row["video_path"], row["action_path"]
        for path in (mp4, npz):
            if not os.path.isfile(path):
                _fail(f"--csv {s.csv} row {i + 1}: {path}: file not found")
        info = video.probe(mp4)  # VideoError naming the file
        if (info.height, info.width) != (c.rollout.height, c.rollout.width):
            _fail(f"{mp4}: frames are {info.height}x{info.width}, the config expects {c.rollout.height}x"
                  f"{c.rollout.width} (rollout.height/width)")
        if info.num_frames < needed:
            _fail(f"{mp4}: {info.num_frames} frames, fewer than context ({timeline.context_frames}) + --num_frames "
                  f"({s.num_frames}) = {needed}")
        try:
            actions, poses = load_clip_arrays(npz)
            poses = revisits.check_poses(poses, needed, npz)
        except (ValueError, KeyError, OSError) as e:
            _fail(f"{npz}: {e}" if npz not in str(e) else str(e))
        if len(actions) < needed:
            _fail(f"{npz}: {len(actions)} action rows, context + --num_frames = {needed} are needed")
        found = revisits.find_revisits(poses, timeline, s.num_frames, s.rule)
        clips.append(Clip(i, mp4, actions, poses, found))
    return clips


def _atomic_json(path, record) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _atomic_npz(path, **arrays) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def fingerprint(s: Settings, c) -> dict:
    """What the stored rollouts depend on; a resumed run must match it."""
    return {"checkpoint": str(c.checkpoint), "vae_checkpoint": str(c.vae_checkpoint),
            "dense_checkpoint": s.dense_checkpoint, "model_memory": c.model.memory.to_dict(),
            "rollout": c.rollout.to_dict(), "num_frames": s.num_frames, "seed": s.seed, "csv": s.csv}


def open_workdir(s: Settings, c) -> Path:
    work = Path(s.workdir)
    (work / "clips").mkdir(parents=True, exist_ok=True)
    record = json.loads(json.dumps(fingerprint(s, c), default=str))
    stamp = work / "run.json"
    if stamp.exists():
        old = json.loads(stamp.read_text())
        differ = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        if differ:
            _fail(f"--workdir {work}: holds rollouts of other settings ({', '.join(differ)} differ); pass another "
                  "--workdir or delete it")
    else:
        _atomic_json(stamp, record)
    return work


def clip_file(work: Path, clip: Clip, variant: str) -> Path:
    return work / "clips" / f"{clip.index:04d}_{variant}.npz"


def rollouts(s: Settings, c, clips: list[Clip], timeline: revisits.Timeline, work: Path) -> dict:
    """Rolls out every (model variant, clip) missing from the work folder; returns timing per variant."""
    from tqdm.auto import tqdm

    from decmem_jax import video
    from decmem_jax.models.conditioning import fixed_text_context
    from decmem_jax.rollout import settings as settings_lib
    from decmem_jax.eval import variants as var
    from decmem_jax.rollout.generate import encode, warm_decoder

    todo = {v: [cl for cl in clips if not clip_file(work, cl, v).exists()] for v in s.variants
            if v in MODEL_VARIANTS}
    todo = {v: cl for v, cl in todo.items() if cl}
    if not todo:
        return {}
    models, vae = var.load_models(c, s.dense_checkpoint, list(todo))
    any_model = next(iter(models.values()))
    text = fixed_text_context(any_model.cfg.text_len, any_model.cfg.text_dim, c.rollout.text_context or None)
    roller = var.Roller(settings_lib.sampler_settings(c), timeline, int(c.rollout.segment_chunks),
                        latent_size((c.rollout.height, c.rollout.width)), text)
    needed = roller.frames_needed(s.num_frames)
    latents_of: dict[tuple, tuple] = {}  # per batch composition: encoded context, warm decoder (the VAE is shared)
    timing = {}
    total = sum(len(cl) for cl in todo.values()) * s.num_frames
    with tqdm(total=total, desc="rollouts", unit="frame", disable=not s.progress) as bar:
        for name, pending in todo.items():
            t0 = time.perf_counter()
            size = min(s.batch_clips, len(pending))  # no padding rows beyond the clips there are
            for b0 in range(0, len(pending), size):
                group = pending[b0:b0 + size]
                bar.set_postfix_str(f"{name}, clips {group[0].index}..{group[-1].index}")
                contexts = [video.read_video(cl.video, num_frames=timeline.context_frames) for cl in group]
                batch = var.make_batch([{"context": x, "actions": cl.actions, "poses": cl.poses,
                                         "seed": s.seed + cl.index} for x, cl in zip(contexts, group)],
                                       size, needed)
                key = tuple(cl.index for cl in group)
                if key not in latents_of:
                    lat = encode(vae, batch.context)
                    latents_of[key] = (lat, warm_decoder(vae, lat, piece=timeline.chunk)[0])
                frames, sel = roller.run(models[name], vae, batch, latents_of[key][0], s.num_frames,
                                         decoder=latents_of[key][1], with_selection=name == "decmem",
                                         progress=bar.update)
                forced = None
                whole = s.num_frames - s.num_frames % timeline.frames_per_chunk  # frames of whole chunks
                if name == "decmem" and whole:  # the same retrieval on the true continuation (`Roller.teacher_forced`)
                    truth = np.stack([video.read_video(cl.video, num_frames=timeline.context_frames + whole)
                                      for cl in group])
                    truth = np.concatenate([truth, np.repeat(truth[-1:], size - len(group), 0)])  # padding rows
                    forced = roller.teacher_forced(models[name], batch, encode(vae, truth))
                for j, cl in enumerate(group):
                    extra = {}
                    if sel is not None:
                        extra = dict(ids=sel[0][:, :, j], counts=sel[1][:, :, j],
                                     blocks_per_frame=models[name].cfg.memory.blocks_per_frame,
                                     context_latents=timeline.context_latents, chunk=timeline.chunk)
                    if forced is not None:
                        extra.update(forced_ids=forced[0][:, :, j], forced_counts=forced[1][:, :, j])
                    _atomic_npz(clip_file(work, cl, name), frames=frames[j], video=cl.video, **extra)
            timing[name] = round(time.perf_counter() - t0, 1)
    return timing


def _load_variant(work: Path, clip: Clip, variant: str, last_context: np.ndarray, num_frames: int):
    if variant == "copy_last":
        return np.broadcast_to(last_context, (num_frames, *last_context.shape)).copy(), None
    with np.load(clip_file(work, clip, variant)) as data:
        if str(data["video"]) != clip.video:
            _fail(f"{clip_file(work, clip, variant)}: rolled out from {data['video']}, not {clip.video}")
        frames = data["frames"]
        sel = None
        if "ids" in data.files:
            forced = (data["forced_ids"], data["forced_counts"]) if "forced_ids" in data.files else None
            sel = (data["ids"], data["counts"], int(data["blocks_per_frame"]), forced)
    if frames.shape[0] != num_frames:
        _fail(f"{clip_file(work, clip, variant)}: {frames.shape[0]} frames, expected {num_frames}")
    return frames, sel


def score(s: Settings, c, clips: list[Clip], timeline: revisits.Timeline, work: Path, plots_dir: Path) -> dict:
    """Per-clip scores, retrieval precision, FVD features; the plots and videos of the first `plot_clips` clips."""
    from tqdm.auto import tqdm

    from decmem_jax import video
    from decmem_jax.eval import fvd, plots

    per_clip, feats = [], {v: [] for v in ("truth", *s.variants)}
    ctx, n = timeline.context_frames, s.num_frames
    x = np.arange(ctx, ctx + n)
    for k, clip in enumerate(tqdm(clips, desc="scoring", unit="clip", disable=not s.progress)):
        cached = _cached_score(work, clip, s, plots_dir if k < s.plot_clips else None)
        if cached is not None:  # scored by an earlier run that was stopped before the end
            per_clip.append(cached[0])
            for v, f in cached[1].items():
                feats[v].append(f)
            continue
        truth = video.read_video(clip.video, start=ctx, num_frames=n)
        last = video.read_video(clip.video, start=ctx - 1, num_frames=1)[0]
        rows = clip.revisits.frames - ctx
        record = {"clip": clip.index, "video": os.path.relpath(clip.video, os.path.dirname(os.path.abspath(s.csv))),
                  "revisits": clip.revisits.to_json(), "variants": {}}
        generated, psnr_lines, targets = {}, {}, clip.revisits.query_targets(timeline)
        if s.fvd:
            feats["truth"].append(fvd.i3d_features(summary.segments(truth)))
        for v in s.variants:
            frames, sel = _load_variant(work, clip, v, last, n)
            per_frame = summary.frame_scores(frames, truth)
            record["variants"][v] = {m: round(val, 6) if np.isfinite(val) else None
                                     for m, val in summary.clip_scores(per_frame, rows).items()}
            psnr_lines[v] = per_frame["psnr"]
            if s.fvd:
                feats[v].append(fvd.i3d_features(summary.segments(frames)))
            if sel is not None:
                prec = retrieval.precision(sel[0], sel[1], targets, timeline, sel[2])
                record["retrieval"] = prec.to_json()
                if sel[3] is not None:  # only the query latents of whole chunks were teacher-forced
                    covered = {q: t for q, t in targets.items() if timeline.chunk_of(q) < len(sel[3][0])}
                    forced = retrieval.precision(*sel[3], covered, timeline, sel[2])
                    record["retrieval_teacher_forced"] = forced.to_json()
            if k < s.plot_clips:
                generated[v] = frames
            if k < s.plot_clips and sel is not None:
                heat = retrieval.heatmap(sel[0], sel[1], timeline, sel[2], timeline.context_latents +
                                         sel[0].shape[0] * timeline.chunk)
                chunk_lat = timeline.context_latents + np.arange(heat.shape[0]) * timeline.chunk
                cand = np.arange(heat.shape[1])[None, :] < (chunk_lat + timeline.chunk - timeline.window)[:, None]
                by_chunk: dict[int, set] = {}
                for q, lat in targets.items():
                    by_chunk.setdefault(int(timeline.chunk_of(q)), set()).update(lat.tolist())
                plots.retrieval_plot(plots_dir / f"clip{clip.index:04d}_retrieval.png", heat, cand,
                                     {c_: np.array(sorted(v_)) for c_, v_ in by_chunk.items()},
                                     title=f"clip {clip.index}: share of decmem's SGM picks per generated chunk "
                                           "(all layers, heads, query blocks)\nred: ground-truth sources of the "
                                           "chunk's revisit frames; grey: not a candidate (ALM window / future)",
                                     first_chunk_latent=timeline.context_latents, chunk=timeline.chunk)
        per_clip.append(record)
        record["psnr_per_frame"] = {v: np.round(p, 2).tolist() for v, p in psnr_lines.items()}
        if k < s.plot_clips:
            plots.psnr_plot(plots_dir / f"clip{clip.index:04d}_psnr.png", x, psnr_lines, clip.revisits.frames,
                            title=f"clip {clip.index}: PSNR per generated frame ({len(rows)} revisit frames)")
            plots.grid_video(plots_dir / f"clip{clip.index:04d}_grid.mp4", truth, generated, rows,
                             fps=c.rollout.fps)
        _save_score(work, clip, s, record, {v: f[-1] for v, f in feats.items()} if s.fvd else None)
    if clips:
        mean = {v: np.mean([r["psnr_per_frame"][v] for r in per_clip], axis=0) for v in s.variants}
        marks = sorted({int(f) for cl in clips for f in cl.revisits.frames})
        plots.psnr_plot(plots_dir / "psnr_mean.png", x, mean, marks,
                        title=f"PSNR per generated frame, mean over {len(clips)} clips (marks: a revisit frame in "
                              "any clip)")
    return {"per_clip": per_clip, "features": feats}


def _score_paths(work: Path, clip: Clip) -> tuple[Path, Path]:
    stem = work / "scores" / f"clip{clip.index:04d}"
    return stem.with_suffix(".json"), stem.with_suffix(".npz")


def _scoring(s: Settings) -> dict:
    """What a clip's scores depend on beyond its rollouts (which `fingerprint` pins): the revisit rule, the PSNR cap,
    the FVD segment length and the variants scored."""
    return {"rule": dataclasses.asdict(s.rule), "psnr_cap_db": summary.PSNR_CAP, "fvd_frames": summary.FVD_FRAMES,
            "variants": sorted(s.variants)}


def _save_score(work: Path, clip: Clip, s: Settings, record: dict, features: dict | None) -> None:
    """A scored clip into the workdir (its record; its I3D features with FVD), so that a run stopped after scoring
    part of the clips (a job's time limit) resumes after them: scoring 24 clips takes minutes on a GPU."""
    rec, npz = _score_paths(work, clip)
    rec.parent.mkdir(exist_ok=True)
    if features is not None:
        _atomic_npz(npz, **features)
    # last: a record without its features is never taken for a complete score
    _atomic_json(rec, {"scoring": json.loads(json.dumps(_scoring(s))), "record": record})


def _cached_score(work: Path, clip: Clip, s: Settings, plots_dir: Path | None):
    """(record, features) of a clip scored by an earlier run, or None when it must be scored (again): no record,
    scored under other settings (`_scoring`: e.g. another --pos_tol), FVD asked for but no features, or one of its
    plots missing."""
    rec, npz = _score_paths(work, clip)
    if not rec.exists() or (s.fvd and not npz.exists()):
        return None
    if plots_dir is not None and not all((plots_dir / f"clip{clip.index:04d}_{kind}").exists()
                                         for kind in ("psnr.png", "grid.mp4")):
        return None
    stored = json.loads(rec.read_text())
    if stored.get("scoring") != json.loads(json.dumps(_scoring(s))):
        return None
    record = stored["record"]
    features = {}
    if s.fvd:
        with np.load(npz) as z:
            features = {v: z[v] for v in ("truth", *s.variants)}
    return record, features


def aggregate(s: Settings, clips: list[Clip], scored: dict, device: str) -> tuple[dict, dict]:
    """(the result in the issue's schema, per-layer retrieval precision and references)."""
    per_clip, feats = scored["per_clip"], scored["features"]
    result = {"commit": s.commit or git_commit(), "device": device, "clips": len(clips), "frames": s.num_frames,
              "variants": {}, "retrieval_precision": {"top1": [None] * 3, "topk": [None] * 3}}
    for v in s.variants:
        entry = {m: summary.mean_ci([r["variants"][v][m] if r["variants"][v][m] is not None else float("nan")
                                     for r in per_clip]) for m in ("psnr", "ssim", "lpips", "revisit_psnr",
                                                                  "revisit_ssim", "revisit_lpips")}
        entry["fvd"] = (summary.fvd_ci(feats[v], feats["truth"]) if s.fvd
                        else [None, None, None])
        result["variants"][v] = entry
    scored_clips = [r["retrieval"] for r in per_clip if r.get("retrieval") and r["retrieval"]["queries"]]
    extra = {"clips_with_revisits": sum(1 for cl in clips if len(cl.revisits)),
             "revisit_frames": int(sum(len(cl.revisits) for cl in clips))}
    if scored_clips:
        nan = lambda x: float("nan") if x is None else x  # noqa: E731
        for key in ("top1", "topk"):
            per_layer = np.array([[nan(x) for x in r[f"{key}_per_layer"]] for r in scored_clips])
            result["retrieval_precision"][key] = summary.mean_ci(np.nanmean(per_layer, axis=1))
            extra[f"{key}_per_layer"] = [summary.mean_ci(per_layer[:, layer]) for layer in range(per_layer.shape[1])]
        for key in ("chance", "ceiling"):
            extra[key] = summary.mean_ci([nan(r[key]) for r in scored_clips])
        extra["clips_scored"] = len(scored_clips)
        forced = [r["retrieval_teacher_forced"] for r in per_clip
                  if r.get("retrieval_teacher_forced") and r["retrieval_teacher_forced"]["queries"]]
        extra["teacher_forced"] = {key: summary.mean_ci([np.nanmean([nan(x) for x in r[f"{key}_per_layer"]])
                                                         for r in forced]) for key in ("top1", "topk")}
    return result, extra


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def run(s: Settings, c) -> dict:
    """The whole benchmark; returns the result (also written to s.out) with the details written next to it."""
    import jax

    from decmem_jax.rollout import settings as settings_lib

    problems = s.problems() + settings_lib.check(c)
    if not c.model.memory.enabled:
        problems.append("model.memory.enabled is False: --config must describe the stage-3 DecMem model")
    if problems:
        _fail("; ".join(problems))
    timeline = revisits.Timeline(int(c.rollout.context_frames), int(c.rollout.chunk), int(c.model.memory.window))
    t0 = time.perf_counter()
    clips = load_clips(s, c, timeline)
    work = open_workdir(s, c)
    plots_dir = Path(s.plots)
    plots_dir.mkdir(parents=True, exist_ok=True)
    timing = rollouts(s, c, clips, timeline, work)
    scored = score(s, c, clips, timeline, work, plots_dir)
    devices = jax.devices()
    result, extra = aggregate(s, clips, scored, f"{len(devices)}x {devices[0].device_kind}")
    details = {"result": result, "retrieval": extra, "settings": {
        **json.loads(json.dumps(fingerprint(s, c), default=str)), "variants": list(s.variants),
        "revisit_rule": dataclasses.asdict(s.rule), "timeline": dataclasses.asdict(timeline),
        "psnr_cap_db": summary.PSNR_CAP, "fvd_frames": summary.FVD_FRAMES, "fvd_interval": "jackknife over clips"},
        "rollout_seconds": timing, "total_seconds": round(time.perf_counter() - t0, 1),
        "date": time.strftime("%Y-%m-%d"), "per_clip": scored["per_clip"]}
    _atomic_json(plots_dir / "details.json", details)
    _atomic_json(s.out, result)
    return {"result": result, "details": details}
