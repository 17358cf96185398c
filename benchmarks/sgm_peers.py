"""Peers of the SGM kernel for benchmarks/sgm_kernel.py, run under torch on the same inputs and lists:

- `vsa`: the `vsa` package's Triton block-sparse kernel (loaded by file path), at 64-token cube granularity.
- `cudnn_bsa`: cuDNN frontend's block-sparse attention (`cudnn.block_sparse_attention`, CuTe DSL kernels; one
  list of 64-token key blocks per 64-row query block, with per-block valid lengths: the SGM contract).
- `flex`: PyTorch FlexAttention with a BlockMask built from the same lists at 64-token granularity (a 192-slot
  block = 3 sub-blocks: full ones run without a mask, the partial last one under a mask_mod on the block's valid
  length). Its backends are tried in order (FLEX_BACKENDS): FLASH (the CuTe-DSL FlashAttention kernel, when the
  flash package is installed), then TRITON at its own tiles, at 64 x 64 tiles, and at 64 x 64 tiles under
  max-autotune (torch 2.11's backward needs it with 64-token blocks); each attempt's outcome is recorded.

Every peer's output is compared with ours before it is timed: a peer that computes something else is reported as
a mismatch, not timed."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import guarded, timed
from pallas_kernels.sgm import mosaic_gpu as mg
from pallas_kernels.sgm.lists import reverse_block_lists, subtile_steps

BF16 = jnp.dtype(jnp.bfloat16)
SUB = 64  # the peers' block granularity (a key block of 192 slots = 3 sub-blocks)
PEER_TOL = 2e-2  # max |peer - ours| / max |ours| for a bf16 peer to count as computing the same thing


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def ms_of(r):
    return r["median_ms"] if isinstance(r, dict) and r.get("status") == "ok" else None


def _start(name, skip, flag):
    """(torch, None) when peer `name` can run here, else (None, its status record)."""
    if skip:
        return None, {"status": f"skipped ({flag})"}
    if jax.default_backend() != "gpu":
        return None, {"status": "skipped (needs a GPU)"}
    try:
        import torch
    except ImportError:
        return None, {"status": f"{name}: torch not installed"}
    return torch, None


# ------------------------------------------------------------------------------------------------------------ vsa


def load_vsa():
    """The vsa package's Triton module, loaded by file path (importing `vsa` itself pulls in its CUDA extension)."""
    spec = importlib.util.find_spec("vsa")
    if spec is None or not spec.submodule_search_locations:
        return None, "vsa: not installed"
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "block_sparse_attn_triton.py"
    if not path.exists():
        return None, f"vsa: {path} not found"
    mod_spec = importlib.util.spec_from_file_location("vsa_block_sparse_attn_triton", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module, None


def cube_lists(c):
    """The SGM lists at 64-token granularity, as vsa and cuDNN's block-sparse attention take them (B = 1): per 64-row
    q tile (inheriting its query block's list) the ids of the 64-key sub-blocks holding valid keys, empty ones
    dropped [B, H, Tq/64, K·block_kv/64], their count [B, H, Tq/64], and the valid keys of every sub-block [Tk/64]."""
    rows, _, n = subtile_steps(c["idx"], c["cnt"], c["lens"], block_kv=c["bkv"], sub=SUB)
    nqs = c["bq"] // SUB
    sizes = jnp.clip(c["lens"][0][:, None] - jnp.arange(c["bkv"] // SUB) * SUB, 0, SUB).reshape(-1)
    return jnp.repeat(rows // SUB, nqs, axis=2), jnp.repeat(n, nqs, axis=2), sizes


def bench_vsa(c, ours_out, cot, args):
    """vsa Triton fwd and fwd+bwd with the same lists expanded to 64-token cubes; B = 1, bf16 only."""
    torch, skipped = _start("vsa", args.no_vsa, "--no-vsa")
    if skipped:
        return skipped
    try:
        module, why = load_vsa()
    except Exception as e:  # noqa: BLE001 -- e.g. triton missing: report, do not fail the benchmark
        module, why = None, f"vsa: failed to load block_sparse_attn_triton.py: {type(e).__name__}: {str(e)[:200]}"
    if module is None:
        print(why)
        return {"status": why}
    if c["q"].shape[0] != 1 or jnp.dtype(c["q"].dtype) != BF16:
        return {"status": "skipped (vsa needs B = 1, bf16)"}
    b, tq, h, d = c["q"].shape
    tk = c["k"].shape[1]
    q2k, q2k_num, sizes = cube_lists(c)
    # vsa's kernels take one length T for q and k/v (K's shape and the strides come from q); for Tq < Tk the
    # queries are zero-padded to Tk with empty lists, and the cost of those empty q tiles is timed separately
    # (same call with every list empty) and subtracted: "net" (the number the ratio uses, favourable to vsa).
    pad_t = tk - tq
    if pad_t < 0:
        return {"status": "skipped (vsa needs Tq <= Tk)"}
    q2k = jnp.pad(q2k, ((0, 0), (0, 0), (0, pad_t // mg.TILE), (0, 0)))
    q2k_num = jnp.pad(q2k_num, ((0, 0), (0, 0), (0, pad_t // mg.TILE)))
    nk64 = sizes.shape[0]
    k2q, k2q_num = reverse_block_lists(q2k.reshape(b * h, tk // mg.TILE, -1), q2k_num.reshape(b * h, -1), nk64)
    tt = lambda x: torch.from_dlpack(jax.block_until_ready(x)).cuda()
    bhtd = lambda x: tt(jnp.pad(x, ((0, 0), (0, tk - x.shape[1]), (0, 0), (0, 0)))).permute(0, 2, 1, 3).contiguous()
    q, k, v, do = (bhtd(x) for x in (c["q"], c["k"], c["v"], cot.astype(c["q"].dtype)))
    i32 = lambda x: tt(x.astype(jnp.int32)).contiguous()
    q2k_t, q2k_num_t, sizes_t = i32(q2k), i32(q2k_num), i32(sizes)
    k2q_t, k2q_num_t = i32(k2q.reshape(b, h, nk64, -1)), i32(k2q_num.reshape(b, h, nk64))
    fwd = lambda num=q2k_num_t: module.triton_block_sparse_attn_forward(q, k, v, q2k_t, num, sizes_t)
    try:
        o, m = fwd()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        return {"status": f"vsa forward failed: {type(e).__name__}: {str(e)[:200]}"}
    err = rel(o.permute(0, 2, 1, 3)[:, :tq].float().cpu().numpy(), np.asarray(ours_out, np.float32))
    if not err <= PEER_TOL:  # a peer that computes something else is not timed
        return {"status": f"mismatch (rel err {err:.2e} vs ours)", "rel_err_vs_ours": err}
    res = {"status": "ok", "rel_err_vs_ours": err, "q_padded_to": tk if pad_t else None}
    time_it = _torch_timer(torch, args)
    bwd = getattr(module, "triton_block_sparse_attn_backward", None)

    def fwd_bwd(num=q2k_num_t, rnum=k2q_num_t):
        o, m = fwd(num)
        return bwd(do, q, k, v, o, m, q2k_t, num, k2q_t, rnum, sizes_t)
    runs = {"fwd": fwd, "fwd_bwd": fwd_bwd if bwd is not None else None}
    for key, f in runs.items():
        res[key] = time_it(f) if f is not None else {"status": "no triton_block_sparse_attn_backward"}
        if pad_t and ms_of(res[key]):
            empty = torch.zeros_like(q2k_num_t), torch.zeros_like(k2q_num_t)
            res[key + "_empty_tiles"] = time_it(lambda f=f: f(*empty[:1 if key == "fwd" else 2]))
            base = ms_of(res[key + "_empty_tiles"])
            res[key + "_raw"] = res[key]
            res[key] = {**res[key], "median_ms": res[key]["median_ms"] - base} if base else res[key]
    return res


def bench_cudnn_bsa(c, ours_out, cot, args):
    """cuDNN frontend's block-sparse attention (`cudnn.block_sparse_attention`, CuTe DSL kernels, SM90 path: 64-token
    blocks) fwd and fwd+bwd with the same lists as 64-token cubes, in our [B, T, H, D] layout ("bshd"); bf16."""
    torch, skipped = _start("cudnn_bsa", args.no_cudnn_bsa, "--no-cudnn-bsa")
    if skipped:
        return skipped
    try:
        from cudnn.block_sparse_attention import block_sparse_attention_backward, block_sparse_attention_forward
    except Exception as e:  # noqa: BLE001 -- not installed, or its CuTe DSL runtime missing: report
        return {"status": f"cudnn_bsa: not available ({type(e).__name__}: {str(e)[:200]}); needs the "
                          "nvidia-cudnn-frontend wheel (>= 1.32) with nvidia-cutlass-dsl and apache-tvm-ffi"}
    if jnp.dtype(c["q"].dtype) != BF16:
        return {"status": "skipped (cudnn_bsa's backward needs bf16)"}
    q2k, q2k_num, sizes = cube_lists(c)
    tt = lambda x: torch.from_dlpack(jax.block_until_ready(x)).cuda().contiguous()
    q, k, v, do = (tt(x) for x in (c["q"], c["k"], c["v"], cot.astype(c["q"].dtype)))
    idx_t, num_t, sizes_t = (tt(x.astype(jnp.int32)) for x in (q2k, q2k_num, sizes))
    scale = c["q"].shape[-1] ** -0.5
    common = dict(block_sizes=sizes_t, q2k_block_nums=num_t, softmax_scale=scale, sparse_block_size=SUB,
                  layout="bshd")

    def fwd():
        r = block_sparse_attention_forward(q, k, v, idx_t, allow_empty_block_nums=True, kv_splits="auto", **common)
        return r["o_tensor"], r["lse_tensor"]

    def fwd_bwd():
        o, lse = fwd()
        return block_sparse_attention_backward(do, q, k, v, o, lse, idx_t, **common)

    try:
        o, _ = fwd()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        return {"status": f"cudnn_bsa forward failed: {type(e).__name__}: {str(e)[:200]}"}
    err = rel(o.float().cpu().numpy(), np.asarray(ours_out, np.float32))
    if not err <= PEER_TOL:
        return {"status": f"mismatch (rel err {err:.2e} vs ours)", "rel_err_vs_ours": err}
    time_it = _torch_timer(torch, args)
    return {"status": "ok", "rel_err_vs_ours": err, "fwd": time_it(fwd), "fwd_bwd": time_it(fwd_bwd)}


def _torch_timer(torch, args):
    """f -> its timing dict; a failure is recorded (status, error, traceback in the JSON) without printing: the
    caller reports it in one line, and FlexAttention's backends are tried in turn, so some are expected to fail."""
    sync = lambda x: (torch.cuda.synchronize(), x)[1]
    return lambda f: guarded(lambda: {"status": "ok", **timed(f, sync, args.warmup, args.repeats, args.inner)[1]},
                             quiet=True)


@contextlib.contextmanager
def captured_stderr(into: dict, key: str = "compile_log", keep: int = 4000):
    """Python-level stderr of the block into `into[key]` (its last `keep` characters), off the console: torch
    inductor's max-autotune writes a table of every candidate kernel per compile, a few hundred lines per case,
    which would bury the benchmark's own table. Kept in the JSON for whoever wants it."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    finally:
        text = buf.getvalue()
        if text:
            into[key] = into.get(key, "") + text[-keep:]


# ----------------------------------------------------------------------------------------------- FlexAttention


def flex_block_mask(idx, cnt, lens, *, block_q, block_kv, tq, tk, device, exact=False):
    """A FlexAttention BlockMask of the SGM lists at 64-token granularity.

    idx/cnt/lens as for `sgm_attention` (numpy or jax). Each 64-row q tile inherits its query block's list; a listed
    key block contributes its 64-key sub-blocks holding valid keys: full ones (64 valid) as full blocks, the partial
    last one under mask_mod (key position in its block < the block's valid length). exact=True makes mask_mod the
    whole SGM mask (selection too), which eager FlexAttention needs: it applies mask_mod alone, not the block
    lists; the compiled kernels visit only the listed blocks, where the length test is all that is left."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    idx, cnt, lens = np.asarray(idx), np.asarray(cnt), np.asarray(lens)
    b, h, nq, k = idx.shape
    nk = lens.shape[1]
    if block_q % SUB or block_kv % SUB:
        raise ValueError(f"flex peer: block_q {block_q} and block_kv {block_kv} must be multiples of {SUB}")
    nqs, nks = block_q // SUB, block_kv // SUB
    sel = np.zeros((b, h, nq, nk), bool)
    bi, hi, qi, ki = np.nonzero(np.arange(k) < cnt[..., None])
    sel[bi, hi, qi, np.clip(idx[bi, hi, qi, ki], 0, nk - 1)] = True
    valid = np.clip(lens[:, :, None] - np.arange(nks) * SUB, 0, SUB)  # [B, Nk, nks] valid keys per sub-block
    some = sel[..., None] & (valid[:, None, None] > 0)
    full = sel[..., None] & (valid[:, None, None] == SUB)

    def ordered(m):  # [B, H, Nq, Nk, nks] -> FlexAttention's (count, ids first) per 64-row q tile
        dense = torch.from_numpy(np.repeat(m.reshape(b, h, nq, nk * nks), nqs, axis=2)).to(device)
        count = dense.sum(-1, dtype=torch.int32)
        ids = torch.argsort(dense.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
        return count, ids

    lens_t = torch.from_numpy(lens.astype(np.int32)).to(device)
    sel_t = torch.from_numpy(sel).to(device)

    def in_block(bb, hh, q_idx, kv_idx):
        return (kv_idx % block_kv) < lens_t[bb, kv_idx // block_kv]

    def whole(bb, hh, q_idx, kv_idx):
        return in_block(bb, hh, q_idx, kv_idx) & sel_t[bb, hh, q_idx // block_q, kv_idx // block_kv]

    return BlockMask.from_kv_blocks(*ordered(some & ~full), *ordered(full), BLOCK_SIZE=SUB,
                                    mask_mod=whole if exact else in_block, seq_lengths=(tq, tk))


_TILES64 = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64}
# FlexAttention backends as (name, kernel_options, torch.compile mode), tried in order, best first. FLASH needs the
# CuTe-DSL flash package. TRITON's Hopper defaults at D 128 use 128-row tiles, larger than our 64-token blocks. With
# 64 x 64 tiles the forward compiles, but torch 2.11's backward checks the block sizes of its heuristic config
# before applying kernel_options and is left with no config (NoValidChoicesError; pytorch/pytorch#176025, fixed by
# #184797 after 2.11; seen on an H200 at 3 stages / 8 warps and at 2 / 4). Under max-autotune the candidate list
# holds configs that pass that check.
FLEX_BACKENDS = (("FLASH", {"BACKEND": "FLASH"}, None),
                 ("TRITON", {"BACKEND": "TRITON"}, None),
                 ("TRITON 64x64 tiles", {"BACKEND": "TRITON", **_TILES64}, None),
                 ("TRITON 64x64 tiles, max-autotune", {"BACKEND": "TRITON", **_TILES64}, "max-autotune-no-cudagraphs"))


def bench_flex(c, ours_out, cot, args):
    """FlexAttention (torch.compile'd) fwd and fwd+bwd on the same q, k, v and lists: the first backend of
    FLEX_BACKENDS whose forward matches our output and whose backward runs is reported; when no backward runs, the
    first matching forward is reported with its backward's error. Every attempt's outcome is recorded."""
    torch, skipped = _start("flex", args.no_flex, "--no-flex")
    if skipped:
        return skipped
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:
        return {"status": f"flex: {e}"}
    b, tq, h, d = c["q"].shape
    tk = c["k"].shape[1]
    bm = flex_block_mask(c["idx"], c["cnt"], c["lens"], block_q=c["bq"], block_kv=c["bkv"], tq=tq, tk=tk,
                         device="cuda")
    bhtd = lambda x: torch.from_dlpack(jax.block_until_ready(x)).cuda().permute(0, 2, 1, 3).contiguous()
    q, k, v, do = (bhtd(x) for x in (c["q"], c["k"], c["v"], cot.astype(c["q"].dtype)))
    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    torch._dynamo.reset()  # each case and backend compiles anew: past the recompile limit dynamo would run eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(FLEX_BACKENDS))
    time_it = _torch_timer(torch, args)
    ours = np.asarray(ours_out, np.float32)
    res, first = {"attempts": {}}, None
    for name, opts, mode in FLEX_BACKENDS:
        compiled = torch.compile(flex_attention, dynamic=False, mode=mode)
        run = lambda x=(q, k, v), opts=opts, f=compiled: f(*x, block_mask=bm, scale=d ** -0.5,
                                                           kernel_options=dict(opts))
        try:
            with captured_stderr(res):
                out = run()
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 -- an unavailable backend is reported, the next one tried
            res["attempts"][name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        err = rel(out.permute(0, 2, 1, 3).float().cpu().numpy(), ours)
        if not err <= PEER_TOL:
            res["attempts"][name] = f"mismatch (rel err {err:.2e} vs ours)"
            continue

        def fwd_bwd(run=run):
            o = run((qg, kg, vg))
            return torch.autograd.grad(o, (qg, kg, vg), do)
        with captured_stderr(res):  # the backward compiles (and autotunes) on its first call
            got = dict(status="ok", backend=name, rel_err_vs_ours=err, fwd=time_it(run), fwd_bwd=time_it(fwd_bwd))
        if ms_of(got["fwd_bwd"]):
            res["attempts"][name] = "ok"
            return {**res, **got}
        res["attempts"][name] = f"forward ok, backward failed: {got['fwd_bwd'].get('error', '?')[:200]}"
        first = first or got
    if first:
        return {**res, **first}
    res["status"] = "flex: no backend ran: " + "; ".join(f"{k}: {v}" for k, v in res["attempts"].items())
    return res
