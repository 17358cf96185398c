"""Training curves of a recipe's runs as one PNG, from the `metrics.jsonl` every run writes (no TensorBoard needed).

    python -m decmem_jax.train.curves --runs runs/world_tiny/vae runs/world_tiny/dense_short \\
        runs/world_tiny/dense_long runs/world_tiny/decmem --out docs/images/world_tiny_training.png

One panel per run: the training loss (a moving average over `--smooth` logged points, the raw points faint) and the
held-out `eval_loss` where the run logged one; a VAE run (it logs `psnr`) shows its batch PSNR on a second axis.
Needs matplotlib (the `notebook` or `test` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from decmem_jax import cli


def read_metrics(run: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{scalar: (steps, values)} from RUN/metrics.jsonl; ValueError naming the file if it is missing or unreadable."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"--runs {run}: no metrics.jsonl (is it a training run directory?)")
    series: dict[str, list] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not JSON ({e.msg})") from None
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    series.setdefault(key, []).append((row["step"], value))
    return {k: (np.array([s for s, _ in v]), np.array([x for _, x in v], np.float64)) for k, v in series.items()}


def smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is)."""
    if width <= 1 or len(values) == 0:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    n = np.minimum(np.arange(1, len(values) + 1), width)
    return (c[1:] - c[np.arange(1, len(values) + 1) - n]) / n


def plot(runs: list[Path], out: Path, width: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [read_metrics(r) for r in runs]  # every file checked before anything is drawn
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False)
    for ax, run, m in zip(axes[0], runs, metrics):
        if "loss" in m:
            steps, loss = m["loss"]
            ax.plot(steps, loss, color="C0", alpha=0.25, lw=0.8)
            ax.plot(steps, smooth(loss, width), color="C0", label="train loss")
        if "eval_loss" in m:
            ax.plot(*m["eval_loss"], "o-", color="C3", ms=4, label="held-out loss")
        ax.set_title(run.name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if "psnr" in m:
            twin = ax.twinx()
            twin.plot(m["psnr"][0], smooth(m["psnr"][1], width), color="C2", label="batch PSNR (dB)")
            twin.set_ylabel("PSNR (dB)", color="C2")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)  # a reader never sees half a file
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m decmem_jax.train.curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="training run directories (each has metrics.jsonl)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--smooth", type=int, default=5, help="moving-average width in logged points (default 5)")
    args = parser.parse_args(argv)
    try:
        plot([Path(r) for r in args.runs], Path(args.out), args.smooth)
    except ValueError as e:
        return cli.fail(str(e))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
