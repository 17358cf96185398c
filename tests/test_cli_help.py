"""Every CLI that takes a run config lists --config in its plain --help (absl shows only the main module's flags, and
the flag is defined in decmem_jax/cli.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["decmem_jax.train", "decmem_jax.train.vae", "decmem_jax.rollout",
                                    "decmem_jax.eval"])
def test_help_lists_the_config_flag(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # absl's --help exits with 1 after printing
    assert "--config:" in proc.stdout, proc.stdout[-2000:]
