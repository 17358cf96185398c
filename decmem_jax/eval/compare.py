"""Generated frames against the ground truth of a generated clip: scores, a copy-the-last-frame baseline, and files a
person opens (a side-by-side mp4 and a PNG contact sheet).

The procedural world gives the true continuation of every clip, so a rollout under the clip's own actions can be
scored frame by frame. The baseline repeats the last context frame: a model that learned nothing about motion
scores about that; one that follows the actions scores above it.
"""

from __future__ import annotations

import numpy as np

from decmem_jax.eval import metrics


def scores(generated: np.ndarray, truth: np.ndarray) -> dict:
    """Mean PSNR (dB), SSIM and LPIPS of uint8 frames [T, H, W, 3] against the ground truth [T, H, W, 3]."""
    if generated.shape != truth.shape:
        raise ValueError(f"generated frames {generated.shape} and ground truth {truth.shape} differ in shape")
    return {"psnr": float(metrics.psnr(generated, truth).mean), "ssim": float(metrics.ssim(generated, truth).mean),
            "lpips": float(metrics.lpips(generated, truth).mean)}


def per_frame_psnr(generated: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.asarray(metrics.psnr(generated, truth).per_frame[0], np.float64)


def compare(generated: np.ndarray, truth: np.ndarray, last_context: np.ndarray) -> dict:
    """{"metrics": scores of the generated frames, "baseline_metrics": scores of `last_context` repeated,
    "psnr_per_frame": [...], "baseline_psnr_per_frame": [...]}."""
    copy_last = np.broadcast_to(last_context, truth.shape).copy()
    return {"metrics": scores(generated, truth), "baseline_metrics": scores(copy_last, truth),
            "psnr_per_frame": per_frame_psnr(generated, truth).round(3).tolist(),
            "baseline_psnr_per_frame": per_frame_psnr(copy_last, truth).round(3).tolist()}


def side_by_side(truth: np.ndarray, generated: np.ndarray, gap: int = 2) -> np.ndarray:
    """[T, H, 2W + gap, 3]: ground truth left, generated right, a white gap between."""
    sep = np.full((*truth.shape[:2], gap, 3), 255, np.uint8)
    return np.concatenate([truth, sep, generated], axis=2)


def contact_sheet(rows: dict[str, np.ndarray], every: int, scale: int = 2):
    """A PIL image: one labelled row per video (every `every`-th frame, upscaled `scale`x, nearest)."""
    from PIL import Image, ImageDraw

    names = list(rows)
    t = min(len(v) for v in rows.values())
    idx = list(range(0, t, every))
    h, w = rows[names[0]].shape[1:3]
    label_w, pad = 96, 2
    sheet = Image.new("RGB", (label_w + len(idx) * (w * scale + pad), len(names) * (h * scale + pad) + 14),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, name in enumerate(names):
        y = r * (h * scale + pad)
        draw.text((4, y + h * scale // 2 - 6), name, fill=(0, 0, 0))
        for c, i in enumerate(idx):
            tile = Image.fromarray(np.asarray(rows[name][i], np.uint8)).resize((w * scale, h * scale), Image.NEAREST)
            sheet.paste(tile, (label_w + c * (w * scale + pad), y))
    y = len(names) * (h * scale + pad)
    for c, i in enumerate(idx):
        draw.text((label_w + c * (w * scale + pad) + 2, y), f"+{i}", fill=(80, 80, 80))
    return sheet
