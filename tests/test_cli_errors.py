"""Every input problem a newcomer can make with the data tools, the converter and the config-file CLIs ends in one
line `error: <file or field>: ...` (or, for a clip that cannot be encoded, one summary line naming its file), a
non-zero exit status and nothing written. One test per case of issue 16.

The data set is tiny (4 generated clips of 13 frames, 32x32) and no test here encodes anything: every failure is
found before a model is loaded, which is the point.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from decmem_jax import cli
from decmem_jax.data import build_csv as build_csv_mod
from decmem_jax.data import encode_latents as enc
from decmem_jax.data import generate_world
from decmem_jax.format import check_index_csv, load_clip_arrays

REPO = Path(__file__).resolve().parents[1]
VAE = REPO / "weights/world_tiny/vae"
DIT = REPO / "weights/world_tiny/dense"


# ------------------------------------------------------------------------------------------------------ helpers

def run_main(main, argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of an in-process CLI main (argparse errors exit through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_module(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_error(err: str, *names: str) -> str:
    """The single `error:` line of `err` (stderr), which names every one of `names`."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def snapshot(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A generated data root with all three splits and its CSVs, plus the latents CSV format's header."""
    root = tmp_path_factory.mktemp("world")
    generate_world.generate(root, clips=4, frames=13, size=(32, 32), seed=0, split="all", progress=False)
    build_csv_mod.build_csv(root, progress=False)
    latents = root / "latents.csv"  # what encode_latents writes (no file it names needs to exist here)
    latents.write_text("latent_path,video_path,action_path,num_latents,frame_start\n"
                       "a.latents.npz,training/0/000000.mp4,training/0/000000.npz,4,0\n")
    return root


# ------------------------------------------------------------------------------------------------ encode_latents

def _encode(capsys, tmp_path, csv, vae=VAE, *extra):
    out = tmp_path / "latents"
    before = snapshot(tmp_path)
    code, stdout, err = run_main(enc.main, ["--csv", str(csv), "--vae", str(vae), "--out", str(out),
                                            "--no-progress", *extra], capsys)
    assert snapshot(tmp_path) == before and not out.exists()  # nothing written, not even the output folder
    return code, stdout, err


def test_encode_missing_csv(capsys, tmp_path):
    missing = tmp_path / "train.csv"
    code, _, err = _encode(capsys, tmp_path, missing)
    assert code == 2
    assert "build_csv" in one_error(err, missing, "no such file")


def test_encode_csv_header_typo(capsys, tmp_path, data):
    typo = tmp_path / "typo.csv"
    typo.write_text((data / "train.csv").read_text().replace("video_path", "vide_path", 1))
    code, _, err = _encode(capsys, tmp_path, typo)
    assert code == 2
    one_error(err, typo, "'video_path'", "found 'vide_path'")


def test_encode_given_a_latents_csv(capsys, tmp_path, data):
    code, _, err = _encode(capsys, tmp_path, data / "latents.csv")
    assert code == 2
    one_error(err, data / "latents.csv", "is a latents CSV", "build_csv")


def test_train_given_a_video_csv(data, tmp_path):
    """The other way round: training reads latents; a build_csv index is refused before the model is built."""
    workdir = tmp_path / "run"
    proc = run_module("-m", "decmem_jax.train", "--config=configs/train_tiny.py", "--config.data.source=latents",
                      f"--config.data.csv={data / 'train.csv'}", f"--workdir={workdir}")
    assert proc.returncode == 1
    one_error(proc.stderr, "--config.data.csv", data / "train.csv", "is a video CSV", "encode_latents")
    assert not workdir.exists()


def test_check_index_csv_both_kinds(data):
    assert check_index_csv(data / "train.csv", "video")[:2] == ["video_path", "action_path"]
    assert check_index_csv(data / "latents.csv", "latents")[0] == "latent_path"
    with pytest.raises(ValueError, match="is a video CSV"):
        check_index_csv(data / "train.csv", "latents")
    with pytest.raises(ValueError, match="is a folder; pass the CSV file itself .it holds train.csv"):
        check_index_csv(data, "video")


def test_encode_binary_file_as_csv(capsys, tmp_path, data):
    mp4 = data / "training/0/000000.mp4"
    code, _, err = _encode(capsys, tmp_path, mp4)
    assert code == 2
    one_error(err, mp4, "binary file")


@pytest.mark.parametrize("flag,value,phrase", [
    ("--skip-frames", "-5", "negative"), ("--clip-frames", "-3", "must be >= 1"),
    ("--clip-frames", "10", "1 + 4k"), ("--chunk", "6", "multiple of 4"), ("--batch", "0", "must be >= 1"),
    ("--size", "0x64", ">= 1"), ("--size", "60x64", "multiples of 8"), ("--size", "64", "HxW")])
def test_encode_impossible_numbers(capsys, tmp_path, data, flag, value, phrase):
    code, _, err = _encode(capsys, tmp_path, data / "train.csv", VAE, flag, value)
    assert code == 2
    one_error(err, flag, phrase)


def test_encode_library_refuses_negative_skip(tmp_path, data):
    with pytest.raises(ValueError, match="skip_frames=-5"):
        enc.encode_latents(data / "train.csv", VAE, tmp_path / "out", skip_frames=-5, all_frames=True)
    assert not (tmp_path / "out").exists()


def test_encode_vae_that_is_a_dit(capsys, tmp_path, data):
    code, _, err = _encode(capsys, tmp_path, data / "train.csv", DIT)
    assert code == 2
    one_error(err, DIT, "DiT checkpoint", "not a VAE")


def test_encode_vae_that_is_no_checkpoint(capsys, tmp_path, data):
    code, _, err = _encode(capsys, tmp_path, data / "train.csv", data)
    assert code == 2
    one_error(err, data, "not a converted VAE checkpoint", "decmem_jax.convert vae")


def test_encode_out_below_a_file(capsys, tmp_path, data):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_main(enc.main, ["--csv", str(data / "train.csv"), "--vae", str(VAE), "--out",
                                       str(blocker / "latents"), "--no-progress"], capsys)
    assert code == 2
    one_error(err, blocker, "is a file")
    assert snapshot(tmp_path) == {"file"}


# ------------------------------------------------------------------------------------------------- corrupt npz

def _corrupt_copies(data: Path, folder: Path) -> tuple[Path, Path, Path]:
    """A clip whose npz is garbage, one whose npz is cut in half, and a CSV indexing both (paths relative to it)."""
    folder.mkdir(parents=True)
    for name, damage in (("garbage", lambda b: b"not a zip file at all" * 4), ("cut", lambda b: b[:len(b) // 2])):
        (folder / f"{name}.mp4").write_bytes((data / "training/0/000000.mp4").read_bytes())
        (folder / f"{name}.npz").write_bytes(damage((data / "training/0/000000.npz").read_bytes()))
    csv = folder / "bad.csv"
    csv.write_text("video_path,action_path\ngarbage.mp4,garbage.npz\ncut.mp4,cut.npz\n")
    return folder / "garbage.npz", folder / "cut.npz", csv


def test_corrupt_npz_is_named(capsys, tmp_path, data):
    garbage, cut, csv = _corrupt_copies(data, tmp_path / "clips")
    for npz in (garbage, cut):
        with pytest.raises(ValueError, match=f"^{npz}: cannot be read as an npz"):
            load_clip_arrays(npz)
    out = tmp_path / "latents"
    code, stdout, err = run_main(enc.main, ["--csv", str(csv), "--vae", str(VAE), "--out", str(out),
                                            "--no-progress", "--all-frames", "--skip-frames", "0"], capsys)
    assert code == 1 and "Traceback" not in err
    failed = [line for line in stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 2 and str(garbage) in failed[0] and str(cut) in failed[1]
    assert "no index written" in stdout and not out.exists()  # the VAE was not even loaded


def test_build_csv_names_the_corrupt_npz(tmp_path, data):
    root = tmp_path / "root"
    _corrupt_copies(data, root / "training")
    summary = build_csv_mod.build_csv(root, progress=False, splits=["training"])
    problems = summary.invalid["training/garbage.mp4"]
    assert any("npz does not load: garbage.npz: cannot be read as an npz" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------- build_csv

def test_build_csv_indexes_validation(capsys, tmp_path, data):
    root = tmp_path / "root"
    generate_world.generate(root, clips=4, frames=13, size=(32, 32), seed=0, split="all", progress=False)
    code, out, _ = run_main(build_csv_mod.main, ["--root", str(root), "--no-progress"], capsys)
    assert code == 0 and "validation/: 1 valid pairs" in out
    assert sorted(p.name for p in root.glob("*.csv")) == ["test.csv", "train.csv", "validation.csv"]


def test_build_csv_says_it_skipped_validation(capsys, tmp_path):
    root = tmp_path / "root"
    generate_world.generate(root, clips=4, frames=13, size=(32, 32), seed=0, split="all", progress=False)
    code, out, _ = run_main(build_csv_mod.main, ["--root", str(root), "--splits", "training,test", "--no-progress"],
                            capsys)
    assert code == 0 and "validation/: skipped (not in --splits)" in out
    assert not (root / "validation.csv").exists()


def test_build_csv_missing_root(capsys, tmp_path):
    code, _, err = run_main(build_csv_mod.main, ["--root", str(tmp_path / "nope"), "--no-progress"], capsys)
    assert code == 2
    one_error(err, tmp_path / "nope", "no such folder")
    assert snapshot(tmp_path) == set()


@pytest.mark.parametrize("flag,value", [("--seed", "-1"), ("--workers", "0"), ("--splits", ",")])
def test_build_csv_bad_numbers(capsys, tmp_path, data, flag, value):
    before = snapshot(data)
    code, _, err = run_main(build_csv_mod.main, ["--root", str(data), flag, value, "--no-progress"], capsys)
    assert code == 2
    one_error(err, flag)
    assert snapshot(data) == before


# ----------------------------------------------------------------------------------------------- generate_world

@pytest.mark.parametrize("flag,value,phrase", [("--quantizer", "40", "1..31"), ("--seed", "-3", ">= 0"),
                                               ("--clips", "-2", "positive"), ("--frames", "0", "positive")])
def test_generate_world_bad_arguments(capsys, tmp_path, flag, value, phrase):
    args = {"--out": str(tmp_path / "world"), "--clips": "1", "--frames": "9", "--quiet": None, flag: value}
    argv = [v for kv in args.items() for v in kv if v is not None]
    code, _, err = run_main(generate_world.main, argv, capsys)
    assert code == 2
    one_error(err, flag, phrase)
    assert snapshot(tmp_path) == set()


def test_generate_world_out_below_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = run_main(generate_world.main, ["--out", str(tmp_path / "file/world"), "--clips", "1",
                                                  "--frames", "9", "--quiet"], capsys)
    assert code == 2
    one_error(err, "--out", tmp_path / "file", "is a file")
    assert snapshot(tmp_path) == {"file"}


# ----------------------------------------------------------------------------------------------------- converter

@pytest.fixture
def vae_source(tmp_path, monkeypatch):
    """A safetensors file standing for a VAE checkpoint; opening it fails the test (the destination must be refused
    before any tensor is read)."""
    from safetensors.numpy import save_file

    src = tmp_path / "Wan2.1_VAE.safetensors"
    save_file({"encoder.conv1.weight": np.zeros((4, 3, 3, 3, 3), np.float32)}, str(src))

    def opened(*args, **kwargs):
        raise AssertionError("the source was opened before the destination was checked")

    monkeypatch.setattr("decmem_jax.convert.vae.open_source", opened)
    return src


def test_convert_destination_below_a_file(capsys, tmp_path, vae_source):
    from decmem_jax.convert.__main__ import main

    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    code, _, err = run_main(main, ["vae", "--src", str(vae_source), "--dst", str(tmp_path / "file/vae"),
                                   "--config", "tiny", "--quiet"], capsys)
    assert code == 2
    one_error(err, tmp_path / "file/vae", "is a file")
    assert snapshot(tmp_path) == before


def test_convert_destination_on_a_read_only_file_system(capsys, tmp_path, vae_source, monkeypatch):
    """A read-only mount, simulated: every folder created below `ro/` fails with EROFS, as it would there (a real
    read-only mount needs privileges a test does not have; as root, permission bits would not stop the write)."""
    from decmem_jax.convert.__main__ import main

    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    before = snapshot(tmp_path)
    code, _, err = run_main(main, ["vae", "--src", str(vae_source), "--dst", str(ro / "ckpt/vae"), "--config",
                                   "tiny", "--quiet"], capsys)
    assert code == 2
    one_error(err, ro / "ckpt/vae", "read-only file system")
    assert snapshot(tmp_path) == before


def test_output_problem():
    assert cli.output_problem(REPO / "no/such/folder") is None  # created later, below a writable folder
    assert "is a file, not a folder" in cli.output_problem(REPO / "README.md")
    assert "is a file, so nothing" in cli.output_problem(REPO / "README.md/x", inside=False)


# ---------------------------------------------------------------------------------------- config files and flags

def test_unknown_config_field_did_you_mean():
    from ml_collections import ConfigDict

    c = ConfigDict(dict(train=dict(steps=1, batch=2), model=dict(memory=dict(top_k=4)), stage="s"))
    assert cli.unknown_field(c, "train.steps") is None
    assert cli.unknown_field(c, "train.stpes") == ("--config.train.stpes: config.train has no field 'stpes'; did you "
                                                   "mean --config.train.steps?")
    assert "did you mean --config.model.memory.top_k?" in cli.unknown_field(c, "model.memory.topk")
    assert "did you mean --config.train.steps" in cli.unknown_field(c, "steps")  # right name, wrong level
    assert "its fields are model, stage, train" in cli.unknown_field(c, "zzzqq")


def test_train_unknown_config_field(tmp_path):
    proc = run_module("-m", "decmem_jax.train", "--config=configs/train_tiny.py", "--config.train.stpes=3",
                      f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 2
    one_error(proc.stderr, "--config.train.stpes", "did you mean --config.train.steps?")
    assert not (tmp_path / "run").exists()


def test_metrics_module_is_a_library():
    proc = run_module("-m", "decmem_jax.eval.metrics")
    assert proc.returncode == 2
    one_error(proc.stderr, "decmem_jax.eval.metrics", "library")
    assert "RuntimeWarning" not in proc.stderr


# ------------------------------------------------------------------------------------------------ console scripts

def test_console_scripts_resolve():
    import importlib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"decmem-rollout", "decmem-train", "decmem-train-vae", "decmem-export", "decmem-convert",
            "decmem-generate-world", "decmem-build-csv", "decmem-encode-latents"} <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_console_script_runs_like_python_m(tmp_path):
    """What the generated `decmem-train` script does: sys.exit(decmem_jax.cli.train()), with its own argv."""
    code = "import sys; from decmem_jax.cli import train; sys.argv = ['decmem-train', '--workdir', 'x']; train()"
    proc = run_module("-c", code, cwd=tmp_path)
    assert proc.returncode == 2
    one_error(proc.stderr, "--config", "required")
