"""The pose-supervised retrieval loss on SGM's block scores (memory.retrieval_loss, objective.latent_view_match)
against a brute-force numpy loop, its gradient, and the config guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decmem_jax.models import memory as mem
from decmem_jax.models.config import MemoryConfig
from decmem_jax.train.objective import Objective, latent_view_match


def test_retrieval_loss_matches_a_brute_force_loop_and_has_finite_gradients():
    cfg = MemoryConfig(blocks_per_frame=1, block_slots=64, top_k=8, window=8, candidates="outside_window",
                       score_on="content")
    frames, tokens, heads, dim = 16, 16, 2, 8
    plan = mem.teacher_forcing_plan(frames, 4)
    layout = mem.BlockLayout.create(tokens, 1, 64)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 2 * frames * tokens, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 2 * frames * tokens, heads, dim)), jnp.float32)
    target = np.zeros((2, frames, frames), bool)
    target[:, 14, 2] = target[:, 15, 3] = target[1, 13, 1] = True
    target[0, 5, 4] = True  # inside the window: not a candidate, ignored
    loss, top1 = mem.retrieval_loss(q, k, layout, cfg, plan, target)

    qp = np.asarray(q).reshape(2, 2 * frames, tokens, heads, dim).mean(2)
    kp = np.asarray(k).reshape(2, 2 * frames, tokens, heads, dim).mean(2)
    logits = np.einsum("bqhd,bkhd->bhqk", qp, kp) / np.sqrt(dim)
    cand, pos = plan.candidates(8, "outside_window"), plan.positions
    ces, hits = [], []
    for b in range(2):
        for h in range(heads):
            for i in range(2 * frames):
                want = target[b][pos[i]][pos] & cand[i]
                if want.any():
                    row = logits[b, h, i]
                    ces.append(np.log(np.exp(row[cand[i]]).sum()) - np.log(np.exp(row[want]).sum()))
                    hits.append(want[np.argmax(np.where(cand[i], row, -np.inf))])
    np.testing.assert_allclose(float(loss), np.mean(ces), rtol=1e-5)
    np.testing.assert_allclose(float(top1), np.mean(hits), rtol=1e-6)
    grad = jax.grad(lambda x: mem.retrieval_loss(x, k, layout, cfg, plan, target)[0])(q)
    assert bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).sum()) > 0


def test_latent_view_match_groups_frames_into_latents():
    poses = np.zeros((1, 13, 5), np.float32)  # 4 latents: frame 0 | 1-4 | 5-8 | 9-12
    poses[0, 1:9, 0] = 10.0  # latents 1 and 2 stand elsewhere
    match = np.asarray(latent_view_match(jnp.asarray(poses), 4))[0]
    assert match[0, 3] and match[1, 2] and not match[0, 1] and not match[3, 2]
    with pytest.raises(ValueError, match="poses for 5 latents"):
        latent_view_match(jnp.asarray(poses), 5)


def test_retrieval_loss_needs_poses():
    with pytest.raises(ValueError, match="needs poses"):
        Objective(retrieval_loss=0.1, poses=False)
