"""The README's commands marked as runnable offline run as written.

A fenced ```bash block whose previous line is `<!-- runnable-offline -->` must run on a clean clone without a
network or a GPU, on tiny inputs. Each such block runs under `bash -eu -o pipefail` in a temporary folder that
links to the repository's shipped files (`weights/`, `configs/`), so relative outputs (`data/...`) land in the
temporary folder and the checkout stays clean. `.venv/bin/python` is the interpreter running the tests (the one
`scripts/bootstrap.sh` makes is that venv's).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- runnable-offline -->"
LINKED = ("weights", "configs")  # what the marked blocks may read from the checkout


def runnable_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, body) of every ```bash block right after the marker line."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        assert i + 1 < len(lines) and lines[i + 1].strip() == "```bash", \
            f"README.md:{i + 1}: {MARKER} must be followed by a ```bash fence"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        blocks.append((i + 3, "\n".join(lines[i + 2:end])))
    return blocks


def test_marker_parsing():
    text = f"x\n{MARKER}\n```bash\necho a \\\n  b\n```\n```bash\necho no\n```\n"
    assert runnable_blocks(text) == [(4, "echo a \\\n  b")]


BLOCKS = runnable_blocks((ROOT / "README.md").read_text())


def test_readme_marks_the_data_chain():
    assert BLOCKS, f"README.md marks no block {MARKER}"
    joined = "\n".join(body for _, body in BLOCKS)
    for tool in ("generate_world", "build_csv", "encode_latents"):
        assert f"decmem_jax.data.{tool}" in joined


@pytest.mark.slow
@pytest.mark.parametrize("line,body", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_block_runs(line, body, tmp_path):
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    script = body.replace(".venv/bin/python", shlex.quote(sys.executable))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run(["bash", "-eu", "-o", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    # What the data chain promises: every split indexed, latents for every training clip.
    outputs = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    if "decmem_jax.data.encode_latents" in body:
        latents_csv = next(p for p in outputs if p.endswith("latents.csv"))
        rows = (tmp_path / latents_csv).read_text().splitlines()
        train_csv = re.search(r"--csv (\S+)", body).group(1)
        assert len(rows) == len((tmp_path / train_csv).read_text().splitlines()) > 1
    if "decmem_jax.data.build_csv" in body:
        assert {"train.csv", "validation.csv", "test.csv"} <= {Path(p).name for p in outputs}
    assert not [p for p in outputs if p.endswith(".tmp")]
