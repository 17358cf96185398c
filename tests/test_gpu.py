"""cuDNN attention backend on an NVIDIA GPU. Skipped (and reported as skipped) where no GPU exists, e.g. in CI;
run on a lent H100/H200 with `python -m pytest tests/test_gpu.py` (see docs/benchmarks.md for the recorded run)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decmem_jax.models import attention as attn
from decmem_jax.models.config import get_config
from decmem_jax.models.dit import WanDiT

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (cuDNN backend)")


def rel_err(y, r):
    y, r = np.asarray(y, np.float32), np.asarray(r, np.float32)
    return float(np.abs(y - r).max() / np.abs(r).max())


def qkv(seed, b=2, sq=256, sk=384, h=4, d=128, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, (b, s, h, d)).astype(dtype) for kk, s in zip(ks, (sq, sk, sk)))


def test_auto_resolves_to_cudnn():
    assert attn.resolve_attention_backend("auto") == "cudnn"


@pytest.mark.parametrize("backend", ["cudnn", "mosaic"])
def test_fused_backends_match_xla(backend):
    # Ragged lengths (not multiples of the kernel tiles) exercise the mosaic wrapper's padding and key-tail merge.
    q, k, v = qkv(0, sq=250, sk=390)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ref = attn.attention(f32(q), f32(k), f32(v), backend="xla")
    assert rel_err(attn.attention(q, k, v, backend=backend), ref) < 2e-2
    lengths = jnp.array([100, 300], jnp.int32)
    ref = attn.attention(f32(q), f32(k), f32(v), backend="xla", kv_length=lengths)
    assert rel_err(attn.attention(q, k, v, backend=backend, kv_length=lengths), ref) < 2e-2
    if backend == "cudnn":  # an explicit (materialised) mask
        mask = jax.random.bernoulli(jax.random.key(5), 0.5, (2, 1, 250, 390)).at[..., 0].set(True)
        ref = attn.attention(f32(q), f32(k), f32(v), backend="xla", mask=mask)
        assert rel_err(attn.attention(q, k, v, backend=backend, mask=mask), ref) < 2e-2
    q, k, v = qkv(1, sq=384, sk=384)
    ref = attn.block_causal_attention(f32(q), f32(k), f32(v), chunk_tokens=128, backend="xla")
    got = attn.block_causal_attention(q, k, v, chunk_tokens=128, backend=backend)
    assert rel_err(got, ref) < 2e-2


@pytest.mark.parametrize("backend", ["cudnn", "mosaic"])
def test_bf16_model_matches_fp32_xla_model_and_cache_path(backend):
    cfg = get_config("tiny", dtype="float32", attention="xla")
    fp32 = WanDiT(cfg, rngs=nnx.Rngs(0))
    bf16 = WanDiT(cfg.replace(dtype="bfloat16", attention=backend), rngs=nnx.Rngs(0))  # same seed: same weights
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 8, 16, 16, 16)), jnp.float32)
    t = jnp.asarray(rng.uniform(0, 1000, (1, 8)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 7, cfg.text_dim)), jnp.float32)
    run = nnx.jit(lambda m, x, t, c: m(x, t, c, chunk_size=2))
    ref, got = run(fp32, x, t, ctx), run(bf16, x, t, ctx)
    assert rel_err(got, ref) < 2e-2
    cache = bf16.init_cache(1, 8, (16, 16))
    commit = nnx.jit(lambda m, x, t, c, k: m.commit(x, t, c, k))
    for i in range(4):
        out, cache = commit(bf16, x[:, 2 * i:2 * i + 2], t[:, 2 * i:2 * i + 2], ctx, cache)
        assert rel_err(out, got[:, 2 * i:2 * i + 2]) < 2e-2


def test_folded_alm_window_and_its_gradients_match_xla(monkeypatch):
    """The training ALM window as `memory.window_attention` runs it on long sequences (the chunks folded into ONE
    cuDNN call under a key-length mask) and its q, k, v gradients, in bf16, against the fp32 xla backend."""
    from decmem_jax.models import memory as mem

    monkeypatch.setattr(mem, "fits_mask", lambda *_: False)  # the path of long sequences
    t, plan, window = 96, mem.teacher_forcing_plan(6, 2), 4  # 6 clean + 6 noisy frames of 96 tokens
    assert mem._fold_spec(plan, window) == (2, 2)
    q, k, v = qkv(2, b=1, sq=12 * t, sk=12 * t)
    cot = jax.random.normal(jax.random.key(6), q.shape)

    def run(backend, dtype):
        args = [a.astype(dtype) for a in (q, k, v)]
        f = lambda q, k, v: mem.window_attention(q, k, v, plan, window, t, backend)  # noqa: E731
        loss = lambda *a: (f(*a).astype(jnp.float32) * cot).sum()  # noqa: E731
        return jax.jit(f)(*args), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)

    (ref, ref_grads), (got, got_grads) = run("xla", jnp.float32), run("cudnn", jnp.bfloat16)
    assert rel_err(got, ref) < 2e-2
    for g, r in zip(got_grads, ref_grads):
        assert rel_err(g, r) < 2e-2


def test_save_attention_remat_keeps_cudnn_forwards_out_of_the_backward():
    """DiTConfig.remat="save_attention" saves the cuDNN attention forwards' outputs (matched by primitive name, which
    this test pins to the installed jax): the compiled gradient holds half the forward calls of `full` (none in the
    backward loop), and the gradients agree."""
    import re

    cfg = get_config("tiny", dtype="bfloat16", attention="cudnn")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 4, 16, 16, 16)), jnp.float32)
    t = jnp.asarray(rng.uniform(0, 1000, (1, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 7, cfg.text_dim)), jnp.float32)
    calls, grads = {}, {}
    for remat in ("full", "save_attention"):
        graphdef, state = nnx.split(WanDiT(cfg.replace(remat=remat), rngs=nnx.Rngs(0)))
        loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(x, t, ctx, chunk_size=2).astype(jnp.float32) ** 2)  # noqa
        step = jax.jit(jax.grad(loss))
        text = step.lower(state).compile().as_text()
        calls[remat] = len(re.findall(r'custom_call_target="__cudnn\$fmha\w*Softmax"', text))
        grads[remat] = jax.tree.leaves(step(state))
    assert calls["full"] > 0 and calls["save_attention"] * 2 == calls["full"], calls
    for g, r in zip(grads["save_attention"], grads["full"]):
        assert rel_err(g, r) < 2e-2
