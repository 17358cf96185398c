"""The world-model recipe's evaluation (`scripts/train_world_tiny.sh eval`): the VAE's reconstruction and the
main job's protocol on held-out test clips, written to one JSON.

    python -m decmem_jax.eval.world_model --data runs/world_tiny/data --weights weights/world_tiny --clips 4 \\
        --out runs/world_tiny/eval.json

- VAE: PSNR / SSIM / LPIPS of encode -> decode over the first `--vae-frames` frames of `--vae-clips` test clips.
- World model: for each of `--clips` test clips, the rollout of `configs/world_tiny.py:decmem` (the shipped
  weights under `--weights`) from its first `rollout.context_frames` frames under its own actions for
  `--frames` frames, scored against the clip's true continuation and against the copy-the-last-frame baseline;
  the per-clip scores, their means and the sampler settings. The memory benchmark proper (revisits, variants,
  retrieval precision) is `python -m decmem_jax.eval`'s job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def reconstruction_scores(vae, clips: list[np.ndarray], frames: int) -> dict:
    """{clips, frames, psnr, ssim, lpips}: the means of encode -> decode over the first `frames` frames of each
    uint8 clip [T, H, W, 3]."""
    import jax.numpy as jnp
    from flax import nnx

    from decmem_jax import video as video_io
    from decmem_jax.eval import metrics

    rec = nnx.jit(lambda m, x: m.decode(m.encode(x)))
    outs = [video_io.from_model_range(np.asarray(rec(vae, jnp.asarray(video_io.to_model_range(c[:frames]))[None])[0]))
            for c in clips]
    gen, ref = np.stack(outs), np.stack([c[:frames] for c in clips])
    return {"clips": len(clips), "frames": frames, "psnr": float(metrics.psnr(gen, ref).mean),
            "ssim": float(metrics.ssim(gen, ref).mean), "lpips": float(metrics.lpips(gen, ref).mean)}


def vae_scores(weights: Path, test_csv: str, clips: int, frames: int) -> dict:
    from decmem_jax.convert.vae import load_vae
    from decmem_jax.data.clips import load_clips, read_clip_paths

    vae = load_vae(weights / "vae", dtype="float32")
    videos = load_clips(read_clip_paths(test_csv), None, limit=clips, progress=False)
    return reconstruction_scores(vae, videos, frames)


def world_scores(weights: Path, test_csv: str, clips: int, frames: int, out_dir: Path, overrides: dict) -> dict:
    from configs import world_tiny
    from decmem_jax.data.pipeline import CsvSource
    from decmem_jax.rollout.__main__ import run

    source = CsvSource(test_csv)
    rows = [source[i][1] for i in range(min(clips, len(source)))]
    per_clip = []
    for i, row in enumerate(rows):
        c = world_tiny.get_config("decmem")
        c.checkpoint, c.vae_checkpoint = str(weights / "decmem"), str(weights / "vae")
        c.rollout.update(overrides)
        rec = run(c, context=row["video_path"], actions=row["action_path"], num_frames=frames,
                  out=str(out_dir / f"clip{i}.mp4"), ground_truth=row["video_path"])
        per_clip.append({"clip": row["video_path"], "metrics": rec["metrics"], "baseline": rec["baseline_metrics"]})
    mean = lambda key, m: float(np.mean([p[key][m] for p in per_clip]))  # noqa: E731
    return {"clips": len(per_clip), "frames": frames, "rollout": overrides,
            "mean": {m: mean("metrics", m) for m in ("psnr", "ssim", "lpips")},
            "baseline_mean": {m: mean("baseline", m) for m in ("psnr", "ssim", "lpips")}, "per_clip": per_clip}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m decmem_jax.eval.world_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the recipe's data root (its test.csv is used)")
    p.add_argument("--weights", required=True, help="folder with vae/, dense/ and decmem/ converted checkpoints")
    p.add_argument("--clips", type=int, default=4, help="test clips rolled out (default 4)")
    p.add_argument("--frames", type=int, default=64, help="frames generated per clip (default 64)")
    p.add_argument("--vae-clips", type=int, default=8, help="test clips for the VAE reconstruction (default 8)")
    p.add_argument("--vae-frames", type=int, default=97, help="frames of each (1 + 4k, default 97)")
    p.add_argument("--out", required=True, help="JSON to write (rollout videos go next to it)")
    args = p.parse_args(argv)
    test_csv = os.path.join(args.data, "test.csv")
    weights = Path(args.weights)
    problems = [f"{path}: not found" for path in (test_csv, weights / "vae", weights / "decmem")
                if not os.path.exists(path)]
    if problems:
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        return 1
    out = Path(args.out)
    videos = out.with_suffix("")
    videos.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    record = {"vae": vae_scores(weights, test_csv, args.vae_clips, args.vae_frames),
              "world": world_scores(weights, test_csv, args.clips, args.frames, videos, {}),
              "date": time.strftime("%Y-%m-%d"), "seconds": None}
    record["seconds"] = round(time.perf_counter() - t0, 1)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out)
    w = record["world"]
    print(f"VAE on {args.vae_clips} test clips: PSNR {record['vae']['psnr']:.2f} dB, SSIM {record['vae']['ssim']:.3f}, "
          f"LPIPS {record['vae']['lpips']:.3f}; world model on {w['clips']} test clips x {w['frames']} frames: "
          f"PSNR {w['mean']['psnr']:.2f} dB (copy-last baseline {w['baseline_mean']['psnr']:.2f}); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
