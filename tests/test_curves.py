"""python -m decmem_jax.train.curves: a PNG from runs' metrics.jsonl, one clear error for a folder that is no run."""

import json

import numpy as np

from decmem_jax.train import curves


def _run(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_png_from_runs_and_errors(tmp_path, capsys):
    vae = _run(tmp_path / "vae", [{"step": s, "loss": 1 / s, "psnr": 20 + s / 100} for s in range(10, 200, 10)])
    dit = _run(tmp_path / "dit", [{"step": s, "loss": 2 / s} for s in range(10, 200, 10)] +
               [{"step": 190, "eval_loss": 0.02}])
    out = tmp_path / "plots" / "curves.png"
    assert curves.main(["--runs", str(vae), str(dit), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = curves.read_metrics(dit)
    assert m["eval_loss"][0].tolist() == [190] and len(m["loss"][1]) == 19
    np.testing.assert_allclose(curves.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    assert curves.main(["--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) != 0
    assert "no metrics.jsonl" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
