"""Observability: the FLOP count of a teacher-forcing step (for MFU), accelerator peak FLOP/s, and the metric writer
(TensorBoard event files via tensorboardX + a `metrics.jsonl` with exact floats, process 0 only).

FLOP model (matmul FLOPs only, 2 per multiply-add; norms, RoPE, softmax, elementwise and top-k ignored). Per sample,
with F latent frames, T tokens per frame, S = F*T tokens per copy, the sequence [clean ; noisy] has 2S tokens:

  block linears   L * 2 * 2S * (6 D^2 + 2 D Dffn)          self q,k,v,o + cross q,o + FFN on every token
                + L * 2 * Ltext * 2 D^2                    cross-attention k,v on the text rows
                + Lmem * 2 * 2S * D^2                      DecMem gate Linear (memory layers only)
  cross-attn      L * 4 * H * 2S * Ltext * Dh
  self-attn       L * 4 * H * Dh * (query-key token pairs)
                  dense block-causal: chunk c (0-based, n chunks of C = chunk*T tokens) sees (c+1) chunks, in both
                  copies: pairs = 2 * sum_c C * (c+1) C = C^2 n (n+1)
                  DecMem: a query token of chunk c sees ALM min(window, (c+1)*chunk) frames = that many * T tokens,
                  plus SGM min(top_k, (c+1)*chunk*M) blocks of T/M valid tokens (candidates "all"), in both copies
                  (memory.layers: DecMem layers count this, the others the dense pairs; the gate likewise)
  embeddings      2 * 2S * (P Cin D + D P Cout) + 2 * Ltext * (Dtext D + D^2) + 2 * 2F * (Dfreq D + 7 D^2)
  train step      3 * forward (backward = 2 * forward) * global batch; activation recomputation (remat) is not
                  counted, so this is model FLOPs utilisation (MFU), not hardware FLOPs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax

FLOP_FORMULA = __doc__[__doc__.index("FLOP model"):].strip()

# Dense bf16 peak FLOP/s per chip by device_kind substring (first match; most specific first).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one chip (None when unknown, e.g. a CPU); `override_tflops` > 0 wins."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for name, flops in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def forward_flops(dit_cfg, *, frames: int, hw: tuple[int, int], chunk: int) -> dict:
    """Forward FLOPs of one teacher-forcing sample (see the module docstring), split by kind."""
    c = dit_cfg
    pt, ph, pw = c.patch_size
    t = (hw[0] // ph) * (hw[1] // pw)
    s2 = 2 * frames * t
    d, dff, h, dh, L, lt = c.dim, c.ffn_dim, c.num_heads, c.head_dim, c.num_layers, c.text_len
    n = frames // chunk
    mem = getattr(c, "memory", None)
    linear = L * 2 * s2 * (6 * d * d + 2 * d * dff) + L * 2 * lt * 2 * d * d
    ct = chunk * t
    dense_pairs = ct * ct * n * (n + 1)
    mem_layers = sum(c.memory_layer_mask()) if mem is not None else 0
    mem_pairs = 0
    if mem is not None:
        linear += mem_layers * 2 * s2 * d * d
        m = mem.blocks_per_frame
        for ci in range(n):
            seen = (ci + 1) * chunk
            keys = min(mem.window, seen) * t + min(mem.top_k, seen * m) * t / m
            mem_pairs += 2 * chunk * t * keys
    self_attn = 4 * h * dh * ((L - mem_layers) * dense_pairs + mem_layers * mem_pairs)
    cross = L * 4 * h * s2 * lt * dh
    patch = pt * ph * pw
    embed = 2 * s2 * (patch * c.in_channels * d + d * patch * c.out_channels)
    embed += 2 * lt * (c.text_dim * d + d * d) + 2 * 2 * frames * (c.freq_dim * d + 7 * d * d)
    total = linear + self_attn + cross + embed
    return {"linear": float(linear), "self_attention": float(self_attn), "cross_attention": float(cross),
            "embeddings": float(embed), "forward_per_sample": float(total), "tokens_per_sample": s2}


def step_flops(dit_cfg, *, batch: int, frames: int, hw: tuple[int, int], chunk: int) -> dict:
    """FLOPs of one optimizer step over the global batch (3 x forward), with the breakdown and the formula."""
    fwd = forward_flops(dit_cfg, frames=frames, hw=hw, chunk=chunk)
    return {**fwd, "batch": batch, "train_step": 3.0 * batch * fwd["forward_per_sample"],
            "tokens_per_step": batch * fwd["tokens_per_sample"], "formula": FLOP_FORMULA}


def mfu(train_step_flops: float, seconds: float, peak: float | None, num_chips: int) -> float | None:
    if peak is None or seconds <= 0:
        return None
    return train_step_flops / seconds / (peak * num_chips)


class MetricWriter:
    """Scalars to TensorBoard (`<workdir>/tensorboard`) and to `<workdir>/metrics.jsonl` (one JSON object per line,
    floats written exactly, appended across restarts). Does nothing on processes other than 0."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.tb = None
        self.jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            workdir = Path(workdir)
            self.tb = SummaryWriter(str(workdir / "tensorboard"))
            self.jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        for k, v in clean.items():
            if math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.tb.add_text(tag, "```\n" + text + "\n```", step)

    def flush(self) -> None:
        if self.enabled:
            self.tb.flush()
            self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()
            self.enabled = False


def read_metrics(workdir: str | os.PathLike) -> dict[int, dict]:
    """`metrics.jsonl` as {step: record}: the records of one step are merged (train scalars and the held-out loss are
    written separately), a value logged twice (re-run after a restart) keeps its last value."""
    out = {}
    path = Path(workdir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out.setdefault(int(rec["step"]), {}).update(rec)
    return out
