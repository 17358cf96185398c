"""`python -m decmem_jax.eval` with the shipped world model on two short generated revisit clips: the JSON in the
issue's schema, revisit frames found, retrieval precision, the plots and videos, a resumed run that rolls out
nothing, and bad inputs that fail before any model work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("decmem", "alm_only", "dense_full", "dense_window", "copy_last")
METRICS = ("psnr", "ssim", "lpips", "revisit_psnr", "revisit_ssim", "revisit_lpips", "fvd")
FRAMES = 32  # 2 chunks after the 33 context frames; the revisit script's last turn lands in the second one
FAST = ["--config.rollout.steps=1", "--config.rollout.segment_chunks=2"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two 65-frame revisit-script clips (walk out, turn, walk back, turn back to the first view) and their CSV."""
    from decmem_jax.data.generate_world import generate

    root = tmp_path_factory.mktemp("revisit_clips")
    pairs = generate(root, clips=2, frames=33 + FRAMES, size=(64, 64), seed=0, revisit=True, split="test",
                     progress=False)
    csv = root / "test.csv"
    rows = [f"{os.path.relpath(m, root)},{os.path.relpath(n, root)}" for m, n in pairs]
    csv.write_text("video_path,action_path\n" + "\n".join(rows) + "\n")
    return csv


def _args(clips, tmp):
    return dict(csv=str(clips), out=str(tmp / "mf.json"), workdir=str(tmp / "work"), plots=str(tmp / "plots"))


def test_help_explains_the_benchmark():
    proc = subprocess.run([sys.executable, "-m", "decmem_jax.eval", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # absl's --help exits with 1 after printing
    for word in ("revisit", "copy_last", "dense_window", "--num_frames", "--batch_clips", "--pos_tol", "[mean, lo, hi]"):
        assert word in proc.stdout


@pytest.mark.slow
def test_cli_scores_five_variants_on_two_revisit_clips(clips, tmp_path, monkeypatch):
    a = _args(clips, tmp_path)
    cmd = [sys.executable, "-m", "decmem_jax.eval", f"--csv={a['csv']}", f"--out={a['out']}",
           f"--workdir={a['workdir']}", f"--plots={a['plots']}", f"--num_frames={FRAMES}", "--batch_clips=2",
           "--nofvd", "--plot_clips=1", "--noprogress", "--commit=test", *FAST]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(Path(a["out"]).read_text())
    assert set(result) == {"commit", "device", "clips", "frames", "variants", "retrieval_precision"}
    assert (result["commit"], result["clips"], result["frames"]) == ("test", 2, FRAMES)
    assert tuple(result["variants"]) == VARIANTS
    for name, m in result["variants"].items():
        assert tuple(m) == METRICS, name
        for metric in METRICS[:-1]:
            mean, lo, hi = m[metric]
            assert np.isfinite(mean) and lo <= mean <= hi, (name, metric, m[metric])
        assert m["fvd"] == [None, None, None]  # --nofvd
    assert 5 < result["variants"]["copy_last"]["psnr"][0] < 40
    for key in ("top1", "topk"):
        mean, lo, hi = result["retrieval_precision"][key]
        assert 0 <= mean <= 1 and lo <= mean <= hi
    details = json.loads((tmp_path / "plots" / "details.json").read_text())
    assert details["retrieval"]["revisit_frames"] >= 2 and details["retrieval"]["clips_with_revisits"] == 2
    assert len(details["retrieval"]["topk_per_layer"]) == 8  # the shipped model's layers
    forced = details["retrieval"]["teacher_forced"]["topk"][0]  # the same retrieval on the true frames
    assert 0 <= forced <= 1
    for clip in details["per_clip"]:
        assert clip["revisits"]["frames"] and all(len(s) for s in clip["revisits"]["sources"])
        assert clip["retrieval"]["queries"] >= 1
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"psnr_mean.png", "clip0000_psnr.png", "clip0000_retrieval.png", "clip0000_grid.mp4"} <= names
    with np.load(tmp_path / "work" / "clips" / "0000_decmem.npz") as d:
        assert d["frames"].shape == (FRAMES, 64, 64, 3) and d["ids"].shape == (2, 8, 4, 4, 8)
        # SGM's candidates: latents before the window, 5 for chunk 0 (window from latent 5), 9 for chunk 1; top-8
        assert (d["counts"][0] == 5).all() and (d["counts"][1] == 8).all()
        assert d["forced_ids"].shape == d["ids"].shape and (d["ids"][1][d["counts"][1] > 0][..., :8] < 9).all()
        assert int(d["blocks_per_frame"]) == 1 and int(d["context_latents"]) == 9 and int(d["chunk"]) == 4
    assert "| decmem |" in proc.stdout

    # Resume, in-process: nothing is rolled out again; FVD wiring with a stand-in for I3D (I3D takes minutes on a
    # CPU; decmem_jax.eval.fvd has its own tests): a feature is each 16-frame segment's mean colour per frame.
    from configs import world_tiny
    from decmem_jax.eval import benchmark, fvd, variants

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(variants, "load_models", lambda *_: pytest.fail("resumed run rolled out again"))
    monkeypatch.setattr(fvd, "i3d_features", lambda v: np.asarray(v, np.float64).mean(axis=(2, 3)).reshape(len(v), -1))
    c = world_tiny.get_config("decmem")
    c.rollout.update(steps=1, segment_chunks=2)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "clips").iterdir()}
    out = benchmark.run(benchmark.Settings(**{**a, "out": str(tmp_path / "again.json")}, num_frames=FRAMES,
                                           batch_clips=2, plot_clips=0, progress=False), c)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "clips").iterdir()} == before
    again = out["result"]
    assert again["variants"]["decmem"]["psnr"] == result["variants"]["decmem"]["psnr"]
    assert all(again["variants"][v]["fvd"][0] is not None for v in VARIANTS)
    # Scored clips are kept in the workdir too: a run stopped after scoring resumes without scoring them again.
    from decmem_jax.eval import summary

    monkeypatch.setattr(summary, "frame_scores", lambda *_: pytest.fail("a scored clip was scored again"))
    third = benchmark.run(benchmark.Settings(**{**a, "out": str(tmp_path / "third.json")}, num_frames=FRAMES,
                                             batch_clips=2, plot_clips=0, progress=False), c)
    assert third["result"]["variants"] == again["variants"]
    # ... but not under another revisit rule, which changes which frames are revisits
    from decmem_jax.eval.revisits import RevisitRule

    other_rule = benchmark.Settings(**{**a, "out": str(tmp_path / "fourth.json")}, num_frames=FRAMES, batch_clips=2,
                                    plot_clips=0, progress=False, rule=RevisitRule(pos_tol=0.5))
    with pytest.raises(pytest.fail.Exception, match="scored again"):
        benchmark.run(other_rule, c)
    c.rollout.steps = 2  # other settings: the stored rollouts are refused, not mixed in
    with pytest.raises(benchmark.BenchmarkError, match="holds rollouts of other settings \\(rollout differ"):
        benchmark.run(benchmark.Settings(**a, num_frames=FRAMES, batch_clips=2, progress=False), c)


@pytest.mark.parametrize("case", ["no_csv", "too_short", "bad_variant", "bad_npz"])
def test_bad_inputs_fail_with_one_clear_error_before_model_work(clips, tmp_path, monkeypatch, case):
    from configs import world_tiny
    from decmem_jax.eval import benchmark, variants

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(variants, "load_models", lambda *_: pytest.fail("models loaded before the inputs were checked"))
    a, kw = _args(clips, tmp_path), {"num_frames": FRAMES}
    if case == "no_csv":
        a["csv"], expected = str(tmp_path / "missing.csv"), "missing.csv: file not found"
    elif case == "too_short":
        kw["num_frames"], expected = 600, "000000.mp4: 65 frames, fewer than context \\(33\\) \\+ --num_frames"
    elif case == "bad_variant":
        kw["variants"], expected = ("decmem", "sparse"), "--variants=decmem,sparse"
    else:
        bad = tmp_path / "bad"
        bad.mkdir()
        video = next(Path(clips).parent.rglob("000000.mp4"))
        (bad / "x.mp4").write_bytes(video.read_bytes())
        np.savez(bad / "x.npz", actions=np.zeros((65, 8), np.int32))
        (bad / "t.csv").write_text("video_path,action_path\nx.mp4,x.npz\n")
        a["csv"], expected = str(bad / "t.csv"), "x.npz: .*poses"
    with pytest.raises(benchmark.BenchmarkError, match=expected):
        benchmark.run(benchmark.Settings(**a, **kw), world_tiny.get_config("decmem"))
    assert not (tmp_path / "work").exists() and not (tmp_path / "mf.json").exists()


def test_plots_and_grid_frames(tmp_path):
    from PIL import Image

    from decmem_jax.eval import plots

    truth = np.zeros((5, 8, 8, 3), np.uint8)
    grid = plots.grid_frames(truth, {"decmem": np.full_like(truth, 255)}, [1, 3], scale=2, gap=4)
    assert grid.shape == (5, 18 + 16 + 6, 2 * 16 + 4, 3)
    bar = grid[:, 18 + 16:, :16]
    assert (bar[[1, 3]] == plots.REVISIT).all() and (bar[[0, 2, 4]] == 255).all()
    assert (grid[:, 18:34, :16] == 0).all() and (grid[:, 18:34, 20:] == 255).all()  # truth | variant
    x = np.arange(33, 65)
    png = plots.psnr_plot(tmp_path / "p.png", x, {"decmem": 10 + np.sin(x), "copy_last": np.full(32, np.inf)},
                          [40, 60], title="t")
    assert Image.open(png).size == (960, 480) and not list(tmp_path.glob(".*"))
    heat = np.random.default_rng(0).random((3, 20))
    png = plots.retrieval_plot(tmp_path / "r.png", heat, heat > 0.3, {1: np.array([2, 3])}, title="a\nb",
                               first_chunk_latent=9, chunk=4)
    assert Image.open(png).size[0] >= 720
    assert plots._ticks(0, 2, 8, integer=True).tolist() == [0, 1, 2]
