"""What a person looks at after a memory benchmark run, drawn with Pillow alone (no plotting dependency):

- `psnr_plot`: PSNR against the clip's frame index, one line per variant, the revisit frames marked by red ticks
  under the axis and faint red columns across it.
- `retrieval_plot`: the retrieval heatmap, query chunk (rows) x history latent frame (columns): the share of the
  chunk's SGM picks (all layers, heads, query blocks) on each history latent, white = none, dark blue = most. Grey
  cells were not candidates (inside the chunk's ALM window or not yet generated); red outlines mark the ground-truth
  sources of the chunk's revisit frames (what SGM should retrieve).
- `grid_video`: an mp4 of ground truth | each variant side by side, labelled, with a red bar under the frames that
  are revisit frames.

Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {"decmem": (214, 39, 40), "alm_only": (31, 119, 180), "dense_full": (44, 160, 44),
          "dense_window": (148, 103, 189), "copy_last": (127, 127, 127)}
_FALLBACK = [(255, 127, 14), (140, 86, 75), (227, 119, 194), (23, 190, 207)]
REVISIT = (220, 40, 40)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _save(image: Image.Image, path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    image.save(tmp)
    os.replace(tmp, path)
    return path


def _ticks(lo: float, hi: float, n: int = 6, integer: bool = False) -> np.ndarray:
    """Round tick values covering [lo, hi] (whole numbers only with integer=True)."""
    span = max(hi - lo, 1e-9)
    step = 10 ** np.floor(np.log10(span / n))
    if integer:
        step = max(step, 1.0)
    for mult in (1, 2, 5, 10):
        if span / (step * mult) <= n:
            step *= mult
            break
    return np.arange(np.ceil(lo / step) * step, hi + step * 1e-6, step)


def psnr_plot(path, x: np.ndarray, series: dict[str, np.ndarray], revisit_x=(), *, title: str,
              ylabel: str = "PSNR (dB)", size=(960, 480)) -> Path:
    """Line plot of series[name] (same length as x) against x with the revisit frames marked (module docstring)."""
    w, h = size
    left, right, top, bottom = 64, 150, 44, 48
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = _font()
    values = np.concatenate([np.asarray(v, np.float64)[np.isfinite(v)] for v in series.values()] or [np.zeros(1)])
    y_lo, y_hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    pad = 0.05 * max(y_hi - y_lo, 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_lo, x_hi = float(np.min(x)), float(max(np.max(x), np.min(x) + 1))
    px = lambda v: left + (v - x_lo) / (x_hi - x_lo) * (w - left - right)  # noqa: E731
    py = lambda v: h - bottom - (v - y_lo) / (y_hi - y_lo) * (h - top - bottom)  # noqa: E731
    for r in revisit_x:  # faint columns first, under everything else
        d.line([(px(r), top), (px(r), h - bottom)], fill=(252, 220, 220))
    for t in _ticks(y_lo, y_hi):
        d.line([(left, py(t)), (w - right, py(t))], fill=(232, 232, 232))
        d.text((left - 6, py(t)), f"{t:g}", fill="black", font=font, anchor="rm")
    for t in _ticks(x_lo, x_hi, 10):
        d.line([(px(t), h - bottom), (px(t), h - bottom + 4)], fill="black")
        d.text((px(t), h - bottom + 6), f"{t:g}", fill="black", font=font, anchor="mt")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for r in revisit_x:
        d.line([(px(r), h - bottom - 6), (px(r), h - bottom)], fill=REVISIT, width=2)
    for i, (name, y) in enumerate(series.items()):
        color = COLORS.get(name, _FALLBACK[i % len(_FALLBACK)])
        y = np.asarray(y, np.float64)
        pts = [(px(a), py(b)) for a, b in zip(x, y) if np.isfinite(b)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        d.line([(w - right + 12, top + 10 + 18 * i), (w - right + 34, top + 10 + 18 * i)], fill=color, width=3)
        d.text((w - right + 40, top + 10 + 18 * i), name, fill="black", font=font, anchor="lm")
    if len(revisit_x):
        y0 = top + 10 + 18 * len(series)
        d.line([(w - right + 23, y0 - 6), (w - right + 23, y0 + 6)], fill=REVISIT, width=2)
        d.text((w - right + 40, y0), "revisit frame", fill="black", font=font, anchor="lm")
    d.text((8, 16), title, fill="black", font=font, anchor="ls")
    d.text(((left + w - right) / 2, h - 14), "frame index in the clip", fill="black", font=font, anchor="mm")
    d.text((8, top - 8), ylabel, fill="black", font=font, anchor="ls")
    return _save(img, path)


def retrieval_plot(path, matrix: np.ndarray, candidates: np.ndarray, targets: dict[int, np.ndarray], *, title: str,
                   first_chunk_latent: int, chunk: int, cell: int | None = None) -> Path:
    """Heatmap of matrix [chunks, latents] (shares), candidates bool [chunks, latents], targets {chunk: latents}."""
    n_c, n_l = matrix.shape
    cell = cell or int(np.clip(900 // max(n_l, 1), 2, 24))
    ch = int(np.clip(600 // max(n_c, 1), 2, 24))
    left, top, right, bottom = 80, 46, 20, 40
    w, h = max(left + n_l * cell + right, 720), top + n_c * ch + bottom
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    peak = float(matrix.max()) or 1.0
    shade = np.clip(matrix / peak, 0, 1)
    rgb = np.stack([255 - 247 * shade, 255 - 207 * shade, 255 - 148 * shade], -1)  # white -> (8, 48, 107)
    rgb[~candidates] = (205, 205, 205)
    tile = np.repeat(np.repeat(rgb.astype(np.uint8), ch, 0), cell, 1)
    img.paste(Image.fromarray(tile), (left, top))
    for c, lat in targets.items():
        for j in lat:
            x0, y0 = left + int(j) * cell, top + int(c) * ch
            d.rectangle([x0, y0, x0 + cell - 1, y0 + ch - 1], outline=REVISIT, width=max(1, min(cell, ch) // 6))
    d.rectangle([left - 1, top - 1, left + n_l * cell, top + n_c * ch], outline="black")
    for t in _ticks(0, n_l - 1, 10, integer=True):
        d.text((left + t * cell + cell / 2, top + n_c * ch + 4), f"{int(t)}", fill="black", font=font, anchor="mt")
    for t in _ticks(0, n_c - 1, 8, integer=True):
        label = f"{int(t)} (lat {first_chunk_latent + int(t) * chunk})"
        d.text((left - 4, top + t * ch + ch / 2), label, fill="black", font=_font(10), anchor="rm")
    for i, line in enumerate(title.split("\n")):
        d.text((8, 14 + 14 * i), line, fill="black", font=font, anchor="ls")
    d.text((8, top - 4), "query chunk", fill="black", font=font, anchor="ls")
    d.text((left + n_l * cell / 2, h - 10), "history latent frame (frames 4j-3..4j)", fill="black", font=font,
           anchor="mm")
    return _save(img, path)


def grid_frames(truth: np.ndarray, variants: dict[str, np.ndarray], revisit_rows=(), *, scale: int = 2,
                gap: int = 4) -> np.ndarray:
    """uint8 [T, header + H*scale + bar, (1 + V) panels, 3]: truth | variants, labelled (module docstring)."""
    t, hh, ww = truth.shape[:3]
    panels = [("ground truth", truth)] + list(variants.items())
    pw, ph, header, bar = ww * scale, hh * scale, 18, 6
    width = len(panels) * pw + (len(panels) - 1) * gap
    width += width % 2  # H.264 (yuv420p) needs even sizes
    height = header + ph + bar
    height += height % 2
    base = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(base)
    for i, (name, _) in enumerate(panels):
        d.text((i * (pw + gap) + pw / 2, header / 2), name, fill="black", font=_font(11), anchor="mm")
    canvas = np.repeat(np.asarray(base)[None], t, axis=0)
    for i, (_, frames) in enumerate(panels):
        big = np.repeat(np.repeat(frames[:t], scale, 1), scale, 2)
        canvas[:, header:header + ph, i * (pw + gap):i * (pw + gap) + pw] = big
    rows = np.asarray(revisit_rows, np.int64)
    canvas[rows[rows < t], header + ph:header + ph + bar] = REVISIT
    return canvas


def grid_video(path, truth: np.ndarray, variants: dict[str, np.ndarray], revisit_rows=(), *, fps: float = 10,
               scale: int = 2) -> Path:
    from decmem_jax import video

    video.write_video(path, grid_frames(truth, variants, revisit_rows, scale=scale), fps=fps)  # temp + rename
    return Path(path)
