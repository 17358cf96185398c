"""VAE checkpoint conversion end to end: the same random weights written as the original `Wan2.1_VAE.pth` and as a
diffusers `vae/` folder convert through the CLI, and `load_vae` of the result reproduces diffusers' AutoencoderKLWan
(encode posterior mean and decode)."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file as save_np

from decmem_jax.convert import keymap, orbax_io
from decmem_jax.convert import vae_keymap as vk
from decmem_jax.convert.__main__ import main
from decmem_jax.convert.dit import convert_dit, load_dit, read_config
from decmem_jax.convert.orbax_io import ConvertError, flatten
from decmem_jax.convert.vae import convert_vae, load_vae, read_vae_config
from decmem_jax.models.config import get_config
from decmem_jax.models.vae import get_vae_config
from tests import vae_reference as ref

REPO = Path(__file__).resolve().parents[1]
CFG = get_vae_config("tiny")


@pytest.fixture(scope="module")
def reference():
    """The randomised diffusers VAE's weights (diffusers layout, original layout, flat JAX), inputs and outputs."""
    model = ref.diffusers_vae(CFG, seed=0)
    diffusers_sd = ref.torch_state_dict(model)
    flat = vk.assemble_vae(diffusers_sd.items(), CFG, "diffusers")
    rng = np.random.default_rng(1)
    video = rng.uniform(-1.0, 1.0, (1, 5, 32, 32, 3)).astype(np.float32)
    z_raw = rng.standard_normal((1, 2, 4, 4, CFG.z_dim)).astype(np.float32)
    return dict(model=model, diffusers=diffusers_sd, original=dict(vk.iter_export_vae(flat, CFG, "original")),
                flat=flat, video=video, z_raw=z_raw, mu=ref.encode_mean(model, video),
                decoded=ref.decode(model, z_raw))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, video, z_raw):
    vae = nnx.merge(graphdef, state)
    return vae.encode_raw(video), vae.decode_raw(z_raw)


def _rel_errs(dst: Path, reference, expected: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, float]:
    """max |y - r| / max |r| of load_vae(dst)'s encode mean and decode against diffusers' (or `expected`)."""
    graphdef, state = nnx.split(load_vae(dst, dtype="float32"))
    mu, decoded = _forward(graphdef, state, reference["video"], reference["z_raw"])
    expected = expected or (reference["mu"], reference["decoded"])
    assert mu.shape == expected[0].shape and decoded.shape == expected[1].shape
    return tuple(float(np.max(np.abs(np.asarray(y, np.float64) - r)) / np.max(np.abs(r)))
                 for y, r in zip((mu, decoded), expected))


def _stored_params(dst: Path) -> dict:
    return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(load_vae(dst), nnx.Param))).items()}


def _save_pth(state: dict[str, np.ndarray], path: Path) -> Path:
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    return path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _record(dst: Path) -> dict:
    return json.loads((dst / "conversion.json").read_text())


def test_original_pth_via_subprocess(reference, tmp_path):
    src = _save_pth(reference["original"], tmp_path / "Wan2.1_VAE.pth")
    dst = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "decmem_jax.convert", "vae", "--src", str(src), "--dst", str(dst),
                           "--config", "tiny", "--quiet"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    record = _record(dst)
    assert record["model"] == "vae" and record["layout"] == "original"
    assert record["source_format"] == "torch pickle" and record["num_tensors"] == len(reference["original"])
    assert record["num_params"] == sum(a.size for a in reference["flat"].values())
    assert read_vae_config(dst) == CFG  # the tiny preset, param_dtype float32
    stored = _stored_params(dst)
    assert stored.keys() == reference["flat"].keys()
    assert all(np.array_equal(stored[p], reference["flat"][p]) for p in stored)
    enc, dec = _rel_errs(dst, reference)
    assert enc <= 1e-5 and dec <= 1e-5, (enc, dec)
    assert _leftovers(tmp_path) == []


def test_diffusers_repo_root(reference, tmp_path):
    root = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    (root / "vae").mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    save_np(reference["diffusers"], str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    dst = tmp_path / "out"
    assert main(["vae", "--src", str(root), "--dst", str(dst), "--config", "tiny", "--quiet"]) == 0
    record = _record(dst)
    assert record["layout"] == "diffusers" and record["source"].endswith("vae/diffusion_pytorch_model.safetensors")
    enc, dec = _rel_errs(dst, reference)
    assert enc <= 1e-5 and dec <= 1e-5, (enc, dec)

    # The vae/ folder itself converts the same (here forcing the layout, overwriting the same destination).
    assert main(["vae", "--src", str(root / "vae"), "--dst", str(dst), "--config", "tiny", "--layout", "diffusers",
                 "--overwrite", "--quiet"]) == 0
    assert _record(dst)["layout"] == "diffusers"
    assert _leftovers(tmp_path) == []


def test_bf16_from_original_repo_dir(reference, tmp_path):
    # An original Wan2.1 download keeps the DiT's diffusion_pytorch_model.safetensors next to Wan2.1_VAE.pth: a
    # directory --src must pick the VAE file, not the DiT weights.
    repo = tmp_path / "Wan2.1-T2V-1.3B"
    repo.mkdir()
    save_np({"patch_embedding.weight": np.zeros((4, 4), np.float32)},
            str(repo / "diffusion_pytorch_model.safetensors"))
    _save_pth(reference["original"], repo / "Wan2.1_VAE.pth")
    dst = tmp_path / "out"
    assert main(["vae", "--src", str(repo), "--dst", str(dst), "--config", "tiny", "--dtype", "bf16",
                 "--quiet"]) == 0
    record = _record(dst)
    assert record["source"].endswith("Wan2.1_VAE.pth") and record["param_dtype"] == "bfloat16"
    assert read_vae_config(dst).param_dtype == "bfloat16" and read_vae_config(dst).dtype == "float32"
    stored = _stored_params(dst)
    assert all(stored[p].dtype == ml_dtypes.bfloat16 for p in stored)
    assert all(np.array_equal(stored[p], reference["flat"][p].astype(ml_dtypes.bfloat16)) for p in stored)
    # Exact against diffusers holding the same bf16-rounded weights (fp32 compute in both) ...
    rounded = copy.deepcopy(reference["model"])
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    expected = (ref.encode_mean(rounded, reference["video"]), ref.decode(rounded, reference["z_raw"]))
    enc, dec = _rel_errs(dst, reference, expected)
    assert enc <= 1e-5 and dec <= 1e-5, (enc, dec)
    # ... and close to the fp32 original: bf16 weight rounding compounds through the ~40 random layers of the tiny
    # decoder (measured: encode 1.2e-2, decode 2.9e-2 max-abs relative error).
    enc, dec = _rel_errs(dst, reference)
    assert 1e-4 < enc <= 2e-2 and 1e-4 < dec <= 5e-2, (enc, dec)


def test_mismatch_reports_everything_and_leaves_nothing(reference, tmp_path, capsys):
    sd = dict(reference["original"])
    del sd["encoder.conv1.bias"]
    sd["encoder.middle.1.extra.weight"] = np.zeros((4,), np.float32)
    sd["decoder.head.0.gamma"] = np.ones((CFG.base_dim,), np.float32)  # (C,) instead of (C, 1, 1, 1)
    src = _save_pth(sd, tmp_path / "broken.pth")
    dst = tmp_path / "out"
    assert main(["vae", "--src", str(src), "--dst", str(dst), "--config", "tiny", "--quiet"]) == 2
    err = capsys.readouterr().err
    for name in ("missing key: encoder.conv1.bias", "unexpected key: encoder.middle.1.extra.weight",
                 "shape mismatch: decoder.head.0.gamma: checkpoint shape (8,), expected (8, 1, 1, 1)"):
        assert err.count(name) == 1, err
    assert err.count("error:") == 1 and "broken.pth" in err and "'original'" in err
    assert not dst.exists() and _leftovers(tmp_path) == []

    # The wrong architecture is one error too, not a crash.
    with pytest.raises(keymap.CheckpointMismatch, match="shape mismatch"):
        convert_vae(tmp_path / "broken.pth", dst, config=CFG.replace(base_dim=16), progress=False)
    assert not dst.exists() and _leftovers(tmp_path) == []


def test_failed_write_leaves_nothing(reference, tmp_path, monkeypatch):
    src = _save_pth(reference["original"], tmp_path / "Wan2.1_VAE.pth")
    dst = tmp_path / "out"

    def disk_full(path, tree):
        (path / "partial").mkdir(parents=True)
        raise OSError("No space left on device")

    monkeypatch.setattr(orbax_io, "save_params", disk_full)
    with pytest.raises(OSError, match="No space"):
        convert_vae(src, dst, config="tiny", progress=False)
    assert not dst.exists() and _leftovers(tmp_path) == []


def test_existing_destination_refused(reference, tmp_path, capsys):
    src = _save_pth(reference["original"], tmp_path / "Wan2.1_VAE.pth")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["vae", "--src", str(src), "--dst", str(dst), "--config", "tiny", "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    with pytest.raises(ConvertError, match="overwrite"):
        convert_vae(src, dst, config="tiny", progress=False)


def test_bad_inputs(reference, tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    assert main(["vae", "--src", str(missing), "--dst", str(tmp_path / "out"), "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and err.count("error:") == 1

    dit_like = tmp_path / "dit.safetensors"
    save_np({"blocks.0.self_attn.q.weight": np.zeros((2, 2), np.float32)}, str(dit_like))
    assert main(["vae", "--src", str(dit_like), "--dst", str(tmp_path / "out"), "--config", "tiny"]) == 2
    assert "no key matches a known Wan2.1 VAE layout" in capsys.readouterr().err

    empty = tmp_path / "empty_repo"
    empty.mkdir()
    assert main(["vae", "--src", str(empty), "--dst", str(tmp_path / "out"), "--config", "tiny"]) == 2
    assert "under vae/" in capsys.readouterr().err

    with pytest.raises(ConvertError, match="unknown VAE preset"):
        convert_vae(missing, tmp_path / "out", config="wan2.2-vae")
    with pytest.raises(ConvertError, match="unknown layout"):
        convert_vae(missing, tmp_path / "out", layout="comfy")
    with pytest.raises(ConvertError, match="not a converted VAE checkpoint"):
        load_vae(tmp_path)
    with pytest.raises(ConvertError, match="does not exist"):
        load_vae(tmp_path / "nowhere")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_loaders_reject_the_other_model(reference, tmp_path):
    vae_dst = convert_vae(_save_pth(reference["original"], tmp_path / "Wan2.1_VAE.pth"), tmp_path / "vae",
                          config="tiny", progress=False)
    dit_cfg = get_config("tiny")
    dit_src = tmp_path / "dit.safetensors"
    dit_flat = {p: np.zeros(s, np.float32) for p, s in keymap.param_shapes(dit_cfg).items()}
    save_np(dict(keymap.iter_export(dit_flat, dit_cfg, "original")), str(dit_src))
    dit_dst = convert_dit(dit_src, tmp_path / "dit", config="tiny", progress=False)
    assert _record(dit_dst)["model"] == "dit"

    with pytest.raises(ConvertError, match=r"converted VAE checkpoint .*not a DiT checkpoint; load it with "
                                           r"decmem_jax\.convert\.vae\.load_vae"):
        load_dit(vae_dst)
    with pytest.raises(ConvertError, match="converted VAE checkpoint"):
        read_config(vae_dst)
    with pytest.raises(ConvertError, match=r"converted DiT checkpoint .*not a VAE checkpoint; load it with "
                                           r"decmem_jax\.convert\.dit\.load_dit"):
        load_vae(dit_dst)

    # DiT directories written before conversion.json recorded the model still read as DiT.
    record = _record(dit_dst)
    del record["model"]
    (dit_dst / "conversion.json").write_text(json.dumps(record))
    assert read_config(dit_dst) == dit_cfg
    with pytest.raises(ConvertError, match="converted DiT checkpoint"):
        read_vae_config(dit_dst)
