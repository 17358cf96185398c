"""Test-session defaults, set before anything imports JAX: don't preallocate most of an accelerator's memory (the
parity tests run PyTorch next to JAX). The platform is not forced here, so a bare `pytest` on a GPU machine runs
the GPU tests; scripts/test.sh (CI) defaults to JAX_PLATFORMS=cpu."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
