"""Checkpoint conversion end to end: the same random weights written in every supported PyTorch format convert
through the CLI, and `load_dit` of the result reproduces diffusers' WanTransformer3DModel."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file as save_torch

from decmem_jax.convert import keymap
from decmem_jax.convert.__main__ import main
from decmem_jax.convert.dit import ConvertError, convert_dit, load_dit
from decmem_jax.convert.sources import SourceError, SourceNotFoundError, open_source
from decmem_jax.models.config import get_config
from tests import wan_reference as ref

REPO = Path(__file__).resolve().parents[1]
CFG = get_config("tiny", dtype="float32")


@pytest.fixture(scope="module")
def reference():
    """The randomised diffusers model's weights (diffusers layout, original layout, flat JAX), inputs and output."""
    model = ref.diffusers_wan(CFG, seed=0)
    diffusers_sd = ref.torch_state_dict(model)
    flat = keymap.assemble(diffusers_sd.items(), CFG, "diffusers")
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, 5, 8, 8, 16)).astype(np.float32)
    timesteps = np.array([37.0, 912.0], np.float32)
    context = rng.standard_normal((2, 7, CFG.text_dim)).astype(np.float32)
    out = ref.run_diffusers(model, latents, timesteps, context, CFG.text_len)
    return dict(diffusers=diffusers_sd, original=dict(keymap.iter_export(flat, CFG, "original")),
                inputs=(latents, timesteps, context), out=out)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, latents, timesteps, context):
    return nnx.merge(graphdef, state)(latents, timesteps, context)


def _rel_err(dst: Path, reference) -> float:
    graphdef, state = nnx.split(load_dit(dst, dtype="float32"))
    y = np.asarray(_forward(graphdef, state, *reference["inputs"]))
    r = reference["out"]
    return float(np.max(np.abs(y - r)) / np.max(np.abs(r)))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "decmem_jax.convert", "dit", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_original_safetensors_via_subprocess(reference, tmp_path):
    src = tmp_path / "wan_original.safetensors"
    save_np(reference["original"], str(src))
    dst = tmp_path / "out"
    proc = _cli("--src", str(src), "--dst", str(dst), "--config", "tiny", "--quiet")
    assert proc.returncode == 0, proc.stderr
    conversion = json.loads((dst / "conversion.json").read_text())
    assert conversion["layout"] == "original" and conversion["num_tensors"] == len(reference["original"])
    assert json.loads((dst / "config.json").read_text())["param_dtype"] == "float32"
    assert _rel_err(dst, reference) <= 1e-5
    assert _leftovers(tmp_path) == []


def test_diffusers_sharded_repo_root(reference, tmp_path):
    root = tmp_path / "Wan2.1-Diffusers"
    (root / "transformer").mkdir(parents=True)
    keys = list(reference["diffusers"])
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
        save_np({k: reference["diffusers"][k] for k in part}, str(root / "transformer" / shard))
        weight_map.update({k: shard for k in part})
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    dst = tmp_path / "out"
    assert main(["dit", "--src", str(root), "--dst", str(dst), "--config", "tiny", "--quiet"]) == 0
    assert json.loads((dst / "conversion.json").read_text())["layout"] == "diffusers"
    assert _rel_err(dst, reference) <= 1e-5


def test_self_forcing_pt_picks_generator_ema(reference, tmp_path):
    rng = np.random.default_rng(2)
    good = {k: torch.from_numpy(v) for k, v in reference["original"].items()}
    bad = {k: v + 0.1 * torch.from_numpy(rng.standard_normal(v.shape).astype(np.float32)) for k, v in good.items()}
    ema = {("model._fsdp_wrapped_module." + k).replace(".self_attn.", "._fsdp_wrapped_module.self_attn."): v
           for k, v in good.items()}
    ckpt = {"generator": {"model." + k: v for k, v in bad.items()}, "generator_ema": ema,
            "critic": {"model.blocks.0.self_attn.q.weight": torch.zeros(3, 3)}, "step": 1000}
    src = tmp_path / "self_forcing.pt"
    torch.save(ckpt, src)

    dst = tmp_path / "ema"
    assert main(["dit", "--src", str(src), "--dst", str(dst), "--config", "tiny", "--quiet"]) == 0
    assert json.loads((dst / "conversion.json").read_text())["subkey"] == "generator_ema"
    assert _rel_err(dst, reference) <= 1e-5

    # The explicit pick reads the perturbed copy (overwriting the same destination), proving "auto" chose the EMA.
    assert main(["dit", "--src", str(src), "--dst", str(dst), "--config", "tiny", "--subkey", "generator",
                 "--overwrite", "--quiet"]) == 0
    assert _rel_err(dst, reference) > 1e-2
    assert _leftovers(tmp_path) == []

    with pytest.raises(SourceError, match="'generator_ema', 'critic'"):
        open_source(src, subkey="teacher")


def test_bf16_safetensors_to_bf16(reference, tmp_path):
    src_dir = tmp_path / "bf16"
    src_dir.mkdir()
    save_torch({k: torch.from_numpy(v).bfloat16() for k, v in reference["diffusers"].items()},
               str(src_dir / "diffusion_pytorch_model.safetensors"))
    dst = tmp_path / "out"
    assert main(["dit", "--src", str(src_dir), "--dst", str(dst), "--config", "tiny", "--dtype", "bf16",
                 "--quiet"]) == 0
    assert json.loads((dst / "config.json").read_text())["param_dtype"] == "bfloat16"
    assert _rel_err(dst, reference) <= 2e-2


def test_mismatch_reports_everything_and_leaves_nothing(reference, tmp_path):
    sd = dict(reference["original"])
    del sd["blocks.1.ffn.2.bias"]
    sd["blocks.0.extra.weight"] = np.zeros((4,), np.float32)
    sd["head.head.bias"] = np.zeros((63,), np.float32)
    src = tmp_path / "broken.safetensors"
    save_np(sd, str(src))
    dst = tmp_path / "out"
    proc = _cli("--src", str(src), "--dst", str(dst), "--config", "tiny", "--quiet")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for name in ("missing key: blocks.1.ffn.2.bias", "unexpected key: blocks.0.extra.weight",
                 "shape mismatch: head.head.bias"):
        assert proc.stderr.count(name) == 1, proc.stderr
    assert proc.stderr.count("error:") == 1
    assert not dst.exists() and _leftovers(tmp_path) == []


def test_existing_destination_refused(reference, tmp_path, capsys):
    src = tmp_path / "w.safetensors"
    save_np(reference["original"], str(src))
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["dit", "--src", str(src), "--dst", str(dst), "--config", "tiny", "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    with pytest.raises(ConvertError, match="overwrite"):
        convert_dit(src, dst, config="tiny", progress=False)


def test_missing_and_bad_inputs(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    assert main(["dit", "--src", str(missing), "--dst", str(tmp_path / "out"), "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err
    with pytest.raises(FileNotFoundError):
        convert_dit(missing, tmp_path / "out", config="tiny")
    assert not (tmp_path / "out").exists()

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(SourceError, match="corrupt.safetensors"):
        open_source(corrupt)
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(SourceError, match="unknown checkpoint type"):
        open_source(tmp_path / "weights.npz")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "gone-00001.safetensors"}}))
    with pytest.raises(SourceNotFoundError, match="gone-00001"):
        open_source(index)
    with pytest.raises(ConvertError, match="not a converted DiT checkpoint"):
        load_dit(tmp_path)
