"""Test-session defaults, set before anything imports JAX: don't preallocate most of an accelerator's memory (the
parity tests run PyTorch next to JAX). The platform is not forced here, so a bare `pytest` on a GPU machine runs
the GPU tests; scripts/test.sh (CI) defaults to JAX_PLATFORMS=cpu. XLA_FLAGS gets the flag the Mosaic GPU interpreter
needs on few cores."""

import os

from pallas_kernels import interpreter

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The Mosaic GPU interpreter's simulated warpgroups can deadlock XLA:CPU's concurrency-optimised scheduler on few
# cores (pallas_kernels/interpreter.py); subprocesses inherit the flag through the environment.
interpreter.enable()
