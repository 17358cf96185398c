"""DecMem memory attention (block layout, SGM selection, ALM window, gate) against dense masked attention.

Covers issue items (a)-(c) and (d) at the attention level; (d)-(f) at the model level arrive with the DiT
integration."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from decmem_jax.models import memory as mem

T, M, P = 20, 3, 64  # tokens per frame, blocks per frame, slots: 7/7/6 valid tokens per block
FRAMES, CHUNK = 6, 2
B, H, D = 2, 2, 16


def dense(q, k, v, mask):
    """Dense fp64 softmax attention with a token mask [B or 1, H or 1, S, S]; rows without keys give zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    mx = np.max(logits, -1, keepdims=True)
    p = np.where(mask, np.exp(logits - np.where(np.isfinite(mx), mx, 0)), 0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def token_mask(block_mask, layout, frames):
    """Block-level [.., Nq, Nk] -> token-level [.., S, S] (token-major order)."""
    block_of = (np.arange(frames * layout.tokens_per_frame) // T) * M + np.searchsorted(
        np.cumsum(layout.lengths), np.arange(frames * T) % T, side="right")
    return block_mask[..., block_of[:, None], block_of[None, :]]


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def setup():
    layout = mem.BlockLayout.create(T, M, P)
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (3 * jax.random.normal(kk, (B, FRAMES * T, H, D)) for kk in ks)
    return layout, q, k, v


@pytest.mark.parametrize("t,m,p", [(880, 6, 192), (T, M, P), (64, 1, 64), (10, 4, 64)])
def test_layout_round_trip_and_padding(t, m, p):
    """to_blocks puts token slot_to_token[i] in slot i (zeros where it is -1) and from_blocks inverts it; both are
    pads/reshapes/slices, checked here against the slot table, and their gradients are each other."""
    layout = mem.BlockLayout.create(t, m, p)
    if (t, m) == (880, 6):
        assert layout.lengths.tolist() == [147] * 5 + [145]
    x = jax.random.normal(jax.random.key(1), (2, 3 * t, 4))
    y = layout.to_blocks(x)
    assert y.shape == (2, 3 * m * p, 4)
    s2t = layout.slot_to_token
    want = np.where((s2t >= 0)[None, None, :, None], np.asarray(x).reshape(2, 3, t, 4)[:, :, np.maximum(s2t, 0)], 0)
    np.testing.assert_array_equal(y, want.reshape(y.shape))
    np.testing.assert_array_equal(layout.from_blocks(y), x)
    cot = jax.random.normal(jax.random.key(2), y.shape)
    np.testing.assert_array_equal(jax.vjp(layout.to_blocks, x)[1](cot)[0], layout.from_blocks(cot))
    with pytest.raises(ValueError, match="block_slots"):
        mem.BlockLayout.create(880, 6, 128)


def test_sgm_with_k_at_least_candidates_equals_dense_over_candidates(setup):
    layout, q, k, v = setup
    qb, kb, vb = (layout.to_blocks(x) for x in (q, k, v))
    lengths = layout.block_lengths(FRAMES)
    cand = mem.candidate_mask(FRAMES, CHUNK, M, window=4, mode="all")
    idx, cnt = mem.select_blocks(mem.pool_blocks(qb, lengths, P), mem.pool_blocks(kb, lengths, P),
                                 jnp.asarray(cand)[None, None], top_k=1000)
    np.testing.assert_array_equal(np.asarray(cnt[0, 0]), cand.sum(1))
    out = mem.sgm_attention(qb, kb, vb, idx, cnt, jnp.broadcast_to(jnp.asarray(lengths), (B, FRAMES * M)),
                            block_q=P, block_kv=P, backend="reference")
    got = layout.from_blocks(out)
    assert rel(got, dense(q, k, v, token_mask(cand, layout, FRAMES)[None, None])) <= 1e-5


def test_planted_history_block_is_retrieved(setup):
    layout, q, k, v = setup
    target_q, planted = 5 * M + 1, 1 * M + 2  # a query block in the last chunk, a key block in frame 1
    qb, kb = layout.to_blocks(q), layout.to_blocks(k)
    lengths = layout.block_lengths(FRAMES)
    q_pool = mem.pool_blocks(qb, lengths, P)
    # Keys of the planted block: small noise around 4x the target query block's pooled query (per head).
    kb = kb.reshape(B, FRAMES * M, P, H, D).at[:, planted, : lengths[planted]].set(
        0.3 * kb.reshape(B, FRAMES * M, P, H, D)[:, planted, : lengths[planted]] / 3
        + 4 * q_pool[:, :, target_q][:, None]).reshape(kb.shape)
    cand = mem.candidate_mask(FRAMES, CHUNK, M, window=4, mode="all")
    idx, cnt = mem.select_blocks(q_pool, mem.pool_blocks(kb, lengths, P), jnp.asarray(cand)[None, None], top_k=2)
    assert (np.asarray(cnt[:, :, target_q]) == 2).all()
    assert (np.asarray(idx[:, :, target_q]) == planted).any(-1).all(), np.asarray(idx[:, :, target_q])
    # Without the plant it is not selected for every (batch, head): the test can fail.
    idx0, _ = mem.select_blocks(q_pool, mem.pool_blocks(layout.to_blocks(k), lengths, P),
                                jnp.asarray(cand)[None, None], top_k=2)
    assert not (np.asarray(idx0[:, :, target_q]) == planted).any(-1).all()


def test_top_k_ties_go_to_lower_block_ids():
    q_pool = jnp.ones((1, 1, 1, 4))
    k_pool = jnp.ones((1, 1, 6, 4))  # every score equal
    idx, cnt = mem.select_blocks(q_pool, k_pool, jnp.asarray([[[[True] * 6]]]), top_k=3)
    assert idx.tolist() == [[[[0, 1, 2]]]] and cnt.tolist() == [[[3]]]
    idx, cnt = mem.select_blocks(q_pool, k_pool, jnp.asarray([[[[False, True, False, True, False, False]]]]), 3)
    assert cnt.tolist() == [[[2]]] and idx[..., :2].tolist() == [[[[1, 3]]]]


@pytest.mark.parametrize("window", [2, 4])
def test_frame_lists_give_dense_attention_under_the_frame_mask(setup, window):
    """`frame_lists_to_blocks` (the block lists of the layers with DecMem off, `decmem_attention`'s dense branch)
    through SGM equals dense attention under the same frame mask; here the ALM window's mask, whose ALM itself runs
    as dense attention (`test_window_attention_matches_dense_oracle`)."""
    layout, q, k, v = setup
    qb, kb, vb = (layout.to_blocks(x) for x in (q, k, v))
    idx, cnt = mem.frame_lists_to_blocks(mem.causal_plan(FRAMES, CHUNK).window(window), M, B, H)
    lengths = jnp.broadcast_to(jnp.asarray(layout.block_lengths(FRAMES)), (B, FRAMES * M))
    got = layout.from_blocks(mem.sgm_attention(qb, kb, vb, jnp.asarray(idx), jnp.asarray(cnt), lengths,
                                               block_q=P, block_kv=P, backend="reference"))
    f = np.arange(FRAMES * T) // T
    end = (f // CHUNK + 1) * CHUNK
    mask = (f[None, :] < end[:, None]) & (f[None, :] >= end[:, None] - window)
    assert rel(got, dense(q, k, v, mask[None, None])) <= 1e-5


def test_zero_gate_gives_the_alm_branch_and_the_gate_adds_sgm(setup):
    layout, q, k, v = setup
    cfg = mem.MemoryConfig(blocks_per_frame=M, block_slots=P, top_k=4, window=4, backend="reference")
    alm_only = mem.decmem_attention(q, k, v, jnp.zeros_like(q), layout, cfg, chunk=CHUNK)
    f = np.arange(FRAMES * T) // T
    end = (f // CHUNK + 1) * CHUNK
    window = (f[None, :] < end[:, None]) & (f[None, :] >= end[:, None] - 4)
    assert rel(alm_only, dense(q, k, v, window[None, None])) <= 1e-5
    gated = mem.decmem_attention(q, k, v, jnp.full_like(q, 0.5), layout, cfg, chunk=CHUNK)
    assert rel(gated, np.asarray(alm_only)) > 1e-2
    # Block-causal: perturbing the last chunk changes no earlier output, in both branches.
    k2 = k.at[:, (FRAMES - CHUNK) * T:].add(5.0)
    out2 = mem.decmem_attention(q, k2, v, jnp.full_like(q, 0.5), layout, cfg, chunk=CHUNK)
    np.testing.assert_array_equal(np.asarray(out2[:, : (FRAMES - CHUNK) * T]),
                                  np.asarray(gated[:, : (FRAMES - CHUNK) * T]))


# ---------------------------------------------------------------------------------------------------------------
# Model level: WanDiT with DiTConfig.memory (items d, e, f) and the teacher-forcing layout.
# ---------------------------------------------------------------------------------------------------------------
from flax import nnx  # noqa: E402

from decmem_jax.models.conditioning import ConditioningConfig  # noqa: E402
from decmem_jax.models.config import get_config  # noqa: E402
from decmem_jax.models.dit import WanDiT  # noqa: E402

MF, MC, MGRID = 6, 2, (8, 8)  # latent frames, chunk, latent H x W: 16 tokens per frame -> 3 blocks of 6/6/4


def tiny_memory_config(**memory):
    base = get_config("tiny", dtype="float32")
    kw = dict(blocks_per_frame=3, block_slots=64, top_k=3, window=4, backend="reference")
    return base.replace(memory=mem.MemoryConfig(**{**kw, **memory}),
                        conditioning=ConditioningConfig.from_dit(base, hidden=32))


def make_model(cfg, seed=0, gate_scale=0.0):
    model = WanDiT(cfg, rngs=nnx.Rngs(seed))
    if gate_scale and cfg.memory is not None:  # a trained-looking gate (it is zero at init)
        kernel = model.blocks.gate.kernel
        kernel.set_value(gate_scale * jax.random.normal(jax.random.key(7), kernel.get_value().shape))
    if cfg.conditioning is not None:  # non-zero conditioning output layer (zero at init)
        lin = model.conditioning.action_mlp.linear_2
        lin.kernel.set_value(0.5 * jax.random.normal(jax.random.key(8), lin.kernel.get_value().shape))
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
    return model


@pytest.fixture(scope="module")
def model_inputs():
    rng = np.random.default_rng(0)
    b = 2
    latents = jnp.asarray(rng.standard_normal((b, MF, *MGRID, 16)), jnp.float32)
    t = jnp.asarray(rng.uniform(0, 1000, (b, MF // MC)).repeat(MC, axis=1), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((b, 5, 64)), jnp.float32)
    actions = jnp.asarray(rng.integers(0, 3, (b, 1 + 4 * (MF - 1), 8)), jnp.int32)
    return latents, t, ctx, actions


causal = nnx.jit(lambda m, x, t, c, cond: m(x, t, c, chunk_size=MC, cond=cond))


def test_d_zero_gate_equals_the_alm_only_model(model_inputs):
    latents, t, ctx, actions = model_inputs
    # With a window covering the whole video, ALM-only attention is dense block-causal attention: the DecMem model at
    # its zero-initialised gate equals the dense model with the same weights, whatever SGM retrieves.
    wide = make_model(tiny_memory_config(window=MF))
    dense_cfg = tiny_memory_config().replace(memory=None)
    dense = WanDiT(dense_cfg, rngs=nnx.Rngs(1))
    shared = [(path, v) for path, v in nnx.to_flat_state(nnx.state(wide)) if "gate" not in path]
    nnx.update(dense, nnx.from_flat_state(shared))  # the same parameters, minus the gate
    cond = wide.embed_conditioning(actions)
    ref = causal(dense, latents, t, ctx, cond)
    assert rel(causal(wide, latents, t, ctx, cond), np.asarray(ref)) <= 1e-5
    # A short window: at G = 0 the output does not depend on SGM's settings; with a non-zero gate it does.
    outs = [causal(make_model(tiny_memory_config(top_k=k, candidates=c)), latents, t, ctx, cond)
            for k, c in ((1, "all"), (100, "outside_window"))]
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
    gated = [causal(make_model(tiny_memory_config(top_k=k), gate_scale=0.05), latents, t, ctx, cond) for k in (1, 4)]
    assert rel(gated[0], np.asarray(gated[1])) > 1e-3
    assert rel(gated[0], np.asarray(outs[0])) > 1e-3


def test_e_later_chunks_do_not_change_earlier_outputs(model_inputs):
    latents, t, ctx, actions = model_inputs
    model = make_model(tiny_memory_config(), gate_scale=0.05)
    cond = model.embed_conditioning(actions)
    full = causal(model, latents, t, ctx, cond)
    late = slice(MC, None)
    out = causal(model, latents.at[:, late].add(3.0), t.at[:, late].set(999.0), ctx, cond.at[:, late].add(1.0))
    np.testing.assert_array_equal(np.asarray(out[:, :MC]), np.asarray(full[:, :MC]))
    assert rel(out[:, late], np.asarray(full[:, late])) > 1e-2


def _rollout_chunks(model, latents, t, ctx, cond, cache, commit_t=None):
    """Chunk-by-chunk: forward each chunk at its timesteps, then commit it (at commit_t or the same timesteps)."""
    fwd = nnx.jit(lambda m, x, t, c, k, cond: m.forward_chunk(x, t, c, k, cond=cond))
    commit = nnx.jit(lambda m, x, t, c, k, cond: m.commit(x, t, c, k, cond=cond))
    outs = []
    for s in range(0, latents.shape[1], MC):
        rows = slice(s, s + MC)
        outs.append(fwd(model, latents[:, rows], t[:, rows], ctx, cache, cond[:, rows]))
        ct = t[:, rows] if commit_t is None else jnp.full_like(t[:, rows], commit_t)
        cache = commit(model, latents[:, rows], ct, ctx, cache, cond[:, rows])[1]
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("candidates,score_on", [("all", "rope"), ("outside_window", "rope"),
                                                 ("outside_window", "content")])
def test_f_chunked_cache_inference_equals_full_forward(model_inputs, candidates, score_on):
    latents, t, ctx, actions = model_inputs
    model = make_model(tiny_memory_config(candidates=candidates, layers=None, score_on=score_on), gate_scale=0.05)
    cond = model.embed_conditioning(actions)
    full = causal(model, latents, t, ctx, cond)
    chunked, cache = _rollout_chunks(model, latents, t, ctx, cond, model.init_cache(2, MF + MC, MGRID))
    assert rel(chunked, np.asarray(full)) <= 1e-5
    assert int(cache.length) == MF and cache.pool.shape == (2, 2, 2, (MF + MC) * 3, 128)


def test_f_teacher_forcing_equals_inference_against_the_clean_cache(model_inputs):
    """A noisy chunk in the [clean ; noisy] training sequence sees exactly what it sees at inference after the clean
    chunks before it were committed at t = 0; DecMem layers on only some blocks (the others dense) included."""
    latents, t, ctx, actions = model_inputs
    noisy = jnp.asarray(np.random.default_rng(1).standard_normal(latents.shape), jnp.float32)
    for cfg in (tiny_memory_config(layers=(1,)), tiny_memory_config(score_on="content"),
                tiny_memory_config().replace(memory=None)):
        model = make_model(cfg, gate_scale=0.05)
        cond = model.embed_conditioning(actions)
        drop = jnp.asarray([False, True])
        tf = nnx.jit(lambda m, a, b_, t, c, act, d: m.teacher_forcing(a, b_, t, c, chunk_size=MC, actions=act,
                                                                      drop=d))(model, latents, noisy, t, ctx,
                                                                                actions, drop)
        fwd = nnx.jit(lambda m, x, t, c, k, cond: m.forward_chunk(x, t, c, k, cond=cond))
        commit = nnx.jit(lambda m, x, t, c, k, cond: m.commit(x, t, c, k, cond=cond))
        cache = model.init_cache(2, MF, MGRID)
        noisy_cond = jnp.where(drop[:, None, None], 0.0, cond)
        for s in range(0, MF, MC):
            rows = slice(s, s + MC)
            out = fwd(model, noisy[:, rows], t[:, rows], ctx, cache, noisy_cond[:, rows])
            assert rel(out, np.asarray(tf[:, rows])) <= 1e-5, (cfg.memory, s)
            cache = commit(model, latents[:, rows], jnp.zeros_like(t[:, rows]), ctx, cache, cond[:, rows])[1]


def test_cfg_branches_share_one_history_cache(model_inputs):
    latents, t, ctx, actions = model_inputs
    for cfg in (tiny_memory_config(), tiny_memory_config().replace(memory=None)):
        model = make_model(cfg, gate_scale=0.05)
        cond = model.embed_conditioning(actions[:1])
        one = latents[:1]
        _, shared = _rollout_chunks(model, one[:, :4], t[:1, :4], ctx[:1], cond[:, :4], model.init_cache(1, MF, MGRID))
        _, twice = _rollout_chunks(model, jnp.concatenate([one, one])[:, :4], jnp.concatenate([t[:1]] * 2)[:, :4],
                                   jnp.concatenate([ctx[:1]] * 2), jnp.concatenate([cond] * 2)[:, :4],
                                   model.init_cache(2, MF, MGRID))
        x2 = jnp.concatenate([one[:, 4:], latents[1:, 4:]])  # the two branches differ in the chunk only
        c2 = jnp.concatenate([cond[:, 4:], jnp.zeros_like(cond[:, 4:])])
        args = (x2, jnp.concatenate([t[:1, 4:]] * 2), jnp.concatenate([ctx[:1]] * 2))
        a = model.forward_chunk(*args, shared, cond=c2)
        b = model.forward_chunk(*args, twice, cond=c2)
        assert rel(a, np.asarray(b)) <= 1e-5


def test_save_sgm_remat_gives_the_same_loss_and_gradients(model_inputs):
    """DiTConfig.remat="save_sgm" (the training default: SGM's output and LSE saved, the rest recomputed) and the
    policies that also save attention outputs (`save_attention`: cuDNN's, which the xla backend here does not call)
    and q, k, v (`save_qkv`), and those that move q, k, v or the feed-forward's hidden layer to host memory
    (`offload_qkv`, `offload_ffn`) against no remat and `full`, on a teacher-forcing loss through DecMem blocks with a
    non-zero gate."""
    latents, t, ctx, actions = model_inputs
    noisy = jnp.asarray(np.random.default_rng(3).standard_normal(latents.shape), jnp.float32)

    def loss(m):
        v = m.teacher_forcing(latents, noisy, t, ctx, chunk_size=MC, actions=actions)
        return jnp.mean(v ** 2)

    res = {}
    policies = ("full", "save_sgm", "save_attention", "save_qkv", "offload_qkv", "offload_ffn")
    for remat in ("none",) + policies:
        model = make_model(tiny_memory_config().replace(remat=remat), gate_scale=0.05)
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        res[remat] = (float(value), jax.tree.leaves(nnx.state(grads, nnx.Param)))
        assert float(jnp.abs(grads.blocks.gate.kernel.get_value()).max()) > 0  # SGM's output reaches the loss
    for remat in policies:
        assert abs(res[remat][0] - res["none"][0]) <= 1e-6 * abs(res["none"][0])
        for g, g0 in zip(res[remat][1], res["none"][1]):
            assert float(jnp.linalg.norm(g - g0)) <= 1e-5 * float(jnp.linalg.norm(g0)) + 1e-12


def test_offload_policies_move_their_named_residuals_to_host_memory(model_inputs):
    """`offload_qkv` / `offload_ffn` send exactly their named values (q, k, v: [.., heads, head_dim]; the
    feed-forward's hidden layer: [.., ffn_dim]) to host memory in the gradient's program, one copy out and one back
    per value (the test above checks the gradients); `save_qkv` sends nothing. A renamed checkpoint_name would
    otherwise quietly turn an offload policy into recomputation."""
    latents, t, ctx, actions = model_inputs
    noisy = jnp.zeros_like(latents)

    def host_copies(remat):
        model = make_model(tiny_memory_config().replace(remat=remat), gate_scale=0.05)
        graphdef, state = nnx.split(model)

        def loss(state):
            m = nnx.merge(graphdef, state)
            return jnp.mean(m.teacher_forcing(latents, noisy, t, ctx, chunk_size=MC, actions=actions) ** 2)

        jaxpr = jax.make_jaxpr(jax.grad(loss))(state)
        shapes = []

        def walk(jx):
            for eqn in jx.eqns:
                if eqn.primitive.name == "device_put":
                    shapes.extend(v.aval.shape for v in eqn.outvars if "host" in str(v.aval).lower())
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return model.cfg, shapes

    cfg, shapes = host_copies("save_qkv")
    assert shapes == []
    cfg, shapes = host_copies("offload_ffn")
    assert shapes and all(s[-1] == cfg.ffn_dim for s in shapes), shapes
    cfg, shapes = host_copies("offload_qkv")
    assert len(shapes) == 3 and all(s[-2:] == (cfg.num_heads, cfg.dim // cfg.num_heads) for s in shapes), shapes


def test_save_attention_policy_names_the_installed_cudnn_forward_primitives():
    """`save_attention` finds cuDNN's attention forward by primitive name; this fails on CPU CI when a jax upgrade
    renames it (the policy would otherwise quietly fall back to save_sgm). tests/test_gpu.py checks the effect."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    from decmem_jax.models import dit

    names = {fa._dot_product_attention_fwd_p.name, fa._dot_product_attention_fwd_p_wrapper.name}
    assert names == set(dit._CUDNN_FORWARD)


def test_content_scoring_is_wired_through_training_and_inference(model_inputs):
    """score_on="content" (pool q/k before RoPE) changes what SGM retrieves, at inference and in the full forward
    alike (the equivalences above hold for it too)."""
    latents, t, ctx, actions = model_inputs
    picks = {}
    for score_on in ("rope", "content"):
        model = make_model(tiny_memory_config(score_on=score_on, top_k=2), gate_scale=0.05)
        cond = model.embed_conditioning(actions)
        commit = nnx.jit(lambda m, x, c, k, cond: m.commit(x, jnp.zeros(x.shape[:2]), c, k, cond=cond,
                                                           with_selection=True))
        cache, ids = model.init_cache(2, MF, MGRID), []
        for s in range(0, MF, MC):
            _, cache, (sel, _) = commit(model, latents[:, s:s + MC], ctx, cache, cond[:, s:s + MC])
            ids.append(np.asarray(sel))
        picks[score_on] = np.concatenate(ids, axis=-2)
    assert picks["rope"].shape == picks["content"].shape
    assert not np.array_equal(picks["rope"], picks["content"])


def _window_plan(plan_kind):
    """The plan and fresh q, k, v of its length."""
    plan = mem.causal_plan(FRAMES, CHUNK) if plan_kind == "causal" else mem.teacher_forcing_plan(4, 2)
    ks = jax.random.split(jax.random.key(4), 3)  # teacher forcing: 4 clean + 4 noisy frames, chunks of 2
    return (plan, *(3 * jax.random.normal(kk, (B, plan.frames * T, H, D)) for kk in ks))


@pytest.mark.parametrize("plan_kind", ["causal", "teacher_forcing"])
@pytest.mark.parametrize("path", ["mask", "fold", "loop"])
@pytest.mark.parametrize("history", [0, 1, 2, 3])  # ALM frames before the chunk: window = chunk + history
def test_window_attention_matches_dense_oracle(monkeypatch, plan_kind, path, history):
    """ALM as dense attention equals the fp64 oracle under the plan's window, for a block-causal sequence and a
    [clean ; noisy] teacher-forcing sequence (whose noisy chunks see two separate runs of key frames), on each of its
    paths: one masked call (small sequences), the chunks folded into one call (long ones with a history of at most a
    chunk), one call per chunk over static key slices (everything else: here a history longer than the chunk)."""
    plan, q, k, v = _window_plan(plan_kind)
    window = plan.chunk + history
    if path != "mask":  # force the paths that long sequences take
        monkeypatch.setattr(mem, "fits_mask", lambda *_: False)
    if path == "loop":
        monkeypatch.setattr(mem, "_fold_spec", lambda *_: None)
    if path != "mask":
        assert (mem._fold_spec(plan, window) is not None) == (path == "fold" and history <= plan.chunk)
    out = mem.window_attention(q, k, v, plan, window, T, "xla")
    frame_mask = plan.window(window)
    mask = np.repeat(np.repeat(frame_mask, T, axis=0), T, axis=1)[None, None]
    assert rel(out, dense(q, k, v, mask)) < 1e-5
    if plan_kind == "teacher_forcing" and history:  # the noisy chunks do see two runs of key frames
        f = plan.frames // 2
        assert any(len(mem._runs(np.nonzero(frame_mask[i])[0])) == 2 for i in range(f, 2 * f))


@pytest.mark.parametrize("plan_kind", ["causal", "teacher_forcing"])
def test_folded_window_gradients_match_the_per_chunk_calls(monkeypatch, plan_kind):
    """The folded ALM call's q, k, v gradients equal those of the per-chunk calls (same keys, other layout)."""
    plan, q, k, v = _window_plan(plan_kind)
    monkeypatch.setattr(mem, "fits_mask", lambda *_: False)
    cot = jax.random.normal(jax.random.key(3), q.shape)
    loss = lambda q, k, v: (mem.window_attention(q, k, v, plan, 2 * plan.chunk, T, "xla") * cot).sum()
    folded = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    monkeypatch.setattr(mem, "_fold_spec", lambda *_: None)
    looped = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(folded, looped):
        assert rel(a, np.asarray(b, np.float64)) < 1e-5
