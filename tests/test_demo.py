"""The converter round-trip + dense KV-cache demo (`python -m decmem_jax.demo`) still runs and checks itself."""

import json

import jax

from decmem_jax import demo


def test_demo_runs_and_its_checks_pass(tmp_path):
    before = jax.config.jax_default_matmul_precision  # the demo sets it process-wide; keep other tests unaffected
    try:
        assert demo.main(["--out", str(tmp_path)]) == 0
    finally:
        jax.config.update("jax_default_matmul_precision", before)
    assert json.loads((tmp_path / "summary.json").read_text())
