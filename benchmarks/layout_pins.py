"""Row-major layout constraints on named DiT tensors, applied from outside the model, to time XLA's layout choices.

Why: in the stage-3 training step (H100 profile, docs/benchmarks.md, Training step, 2026-12-06 session 15) XLA gives
several GEMM outputs of the rematerialised forward a column-major layout (tokens minor: the FFN hidden state, the q
and k projections) and runs the LayerNorm / adaLN backward on token-minor float32 copies, so that the bias and
per-frame modulation gradients (sums over tokens) become row reductions. About 635 ms of a 6.4 s step run in
fusions on those layouts, 97 ms of it pure transposes back to the row-major layout that cuDNN, the SGM kernels and
the residual stream use. Pinning the tensors below to row-major (`jax.experimental.layout.with_layout_constraint`;
its transpose rule pins the cotangent too) makes those sums column reductions instead; whether that is faster is
what `benchmarks/train_step.py --layout-pins` measures. A pin changes no value: only where XLA puts the bytes.

Pins (names; unknown ones raise):
  linear  the output of every flax `nnx.Linear` (and so the cotangent entering its backward)
  norm    the outputs of the DiT's LayerNorm and RMSNorm modules
  gelu    the feed-forward's activation output

`pinned(names)` patches the classes for the duration of a `with` block and restores them on exit; it acts on code
traced inside the block.
"""

from __future__ import annotations

import contextlib

import jax
from flax import nnx
from jax.experimental.layout import Layout, with_layout_constraint

from decmem_jax.models import dit, layers

PINS = ("linear", "norm", "gelu")


def row_major(x: jax.Array) -> jax.Array:
    """x with its layout pinned to the default (row-major: last axis minor)."""
    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


def parse(spec) -> tuple[str, ...]:
    """'linear,norm' or ['linear', 'norm'] -> ('linear', 'norm'); raises ValueError naming an unknown pin."""
    items = (spec or "").split(",") if isinstance(spec, str) or spec is None else spec
    names = tuple(dict.fromkeys(n.strip() for n in items if n.strip()))
    unknown = [n for n in names if n not in PINS]
    if unknown:
        raise ValueError(f"--layout-pins: unknown pin(s) {unknown}; expected a comma list of {', '.join(PINS)}")
    return names


def _pinned_call(call):
    def wrapped(self, *args, **kwargs):
        return row_major(call(self, *args, **kwargs))
    wrapped.__wrapped__ = call
    return wrapped


def _targets(names) -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) of every patch the pins need."""
    out = []
    if "linear" in names:
        out.append((nnx.Linear, "__call__", _pinned_call(nnx.Linear.__call__)))
    if "norm" in names:
        out += [(cls, "__call__", _pinned_call(cls.__call__)) for cls in (layers.LayerNorm, layers.RMSNorm)]
    if "gelu" in names:  # dit.py imported the function by name: patch the name FeedForward calls
        gelu = dit.gelu_tanh
        out.append((dit, "gelu_tanh", lambda x, backend="xla": row_major(gelu(x, backend))))
    return out


@contextlib.contextmanager
def pinned(names):
    """The pins for the duration of the block (restored on exit, also after an error)."""
    names = parse(names)
    targets = _targets(names)
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
    try:
        for owner, attr, new in targets:
            setattr(owner, attr, new)
        yield names
    finally:
        for owner, attr, old in saved:
            setattr(owner, attr, old)
