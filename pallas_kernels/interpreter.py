"""The Mosaic GPU interpreter on XLA:CPU needs one XLA flag, set before JAX's first computation.

The interpreter runs every simulated warpgroup as its own XLA:CPU program on a Python thread, and its callbacks block
while a simulated barrier waits for another warpgroup. XLA:CPU's concurrency-optimised scheduler lets independent
operations of a program run at once on its worker threads (one per core); on a 2-core machine the blocked callbacks
can then hold every worker while the warpgroup that would release them waits for one: a silent deadlock. Measured
on 2 cores (jax 0.11.2), one interpreted call of the packed-tails forward: 6 of 6 runs hung with the scheduler on,
0 of 6 (and 0 of 3 runs of its whole test file) with it off. XLA reads the flag once, at its first compilation, so it
has to be in XLA_FLAGS before that: tests/conftest.py and the benchmarks' `--interpret` runs call `enable()` first.
"""

from __future__ import annotations

import os
import warnings

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_warned = False


def enabled(environ=None):
    """Whether XLA_FLAGS in `environ` (default os.environ) turns the scheduler off."""
    return FLAG in (os.environ if environ is None else environ).get("XLA_FLAGS", "").split()


def enable(environ=None):
    """Add FLAG to XLA_FLAGS in `environ` (default os.environ), keeping the flags already there. Takes effect only if
    called before JAX's first computation in this process (and always for subprocesses given this environment)."""
    env = os.environ if environ is None else environ
    if not enabled(env):
        env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), FLAG]))
    return env


def check():
    """Warn once when a kernel is interpreted without FLAG (the run may hang on machines with few cores)."""
    global _warned
    if not (_warned or enabled()):
        _warned = True
        warnings.warn(f"Mosaic GPU interpreter without XLA_FLAGS={FLAG}: its simulated warpgroups can deadlock "
                      "XLA:CPU on machines with few cores. Set it before JAX's first computation (e.g. call "
                      "pallas_kernels.interpreter.enable() first, or export XLA_FLAGS).", RuntimeWarning, stacklevel=3)
