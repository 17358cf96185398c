"""Flow-matching samplers (Euler, UniPC-bh2) with a functional, `lax.scan`-friendly interface, plus the CFG helper.

Conventions (docs/method.md §4): x_t = (1-σ)·x0 + σ·ε, the model predicts v = ε - x0, x0 = x_t - σ·v, model
timestep t = σ·1000.

Schedules are static per rollout: `flow_sigmas` builds them on the host in numpy. Every UniPC coefficient depends
only on the σ grid and the step index, so each sampler precomputes per-step coefficient tables (float64 on the
host) and a step is a gather on the traced step index `i` plus a fixed linear combination of fixed-size buffers.
The state is a pytree of arrays with the sample's shape; shapes never change across steps.

    sig, ts = flow_sigmas(50, 5.0, kind="wan")
    solver = UniPC(sig)                       # or Euler(sig)
    state = solver.init(x_T)
    for i in range(50):                       # or inside lax.scan / fori_loop with i traced
        state = solver.step(state, velocity_fn(state.x, ts[i]), i)
    x0 = state.x
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["flow_sigmas", "shift_sigmas", "Euler", "UniPC", "EulerState", "UniPCState", "sample",
           "guided_velocity"]


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------

def shift_sigmas(sigmas, shift: float):
    """σ' = s·σ / (1 + (s-1)·σ)."""
    sigmas = np.asarray(sigmas, np.float64)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_sigmas(num_steps: int, shift: float, kind: str = "wan", num_train_timesteps: int = 1000,
                int_timesteps: bool = True):
    """Host-side flow-matching grid. Returns (sigmas [num_steps+1] float64 ending in 0, timesteps [num_steps]).

    kind="wan": Wan's FlowUniPCMultistepScheduler (made with shift 1, then set_timesteps(n, shift=s)):
        σ = shift(linspace(1 - 1/T, 0, n+1)[:-1]).
    kind="diffusers": diffusers' UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s):
        σ = shift(linspace(1, 1/T, n+1)[:-1]), σ[0] -= 1e-6 when it is within 1e-6 of 1.
    Both then append σ = 0 and store σ as float32; the returned σ are those float32 values widened to float64, so the
    coefficients computed from them see exactly the reference grid.

    Timesteps are σ·T computed from the float64 (pre-float32) σ. Both Wan and diffusers truncate them to int64
    (`.astype(int64)` / `.to(torch.int64)`), which is the default here (int_timesteps=True, numpy int64). With
    int_timesteps=False the untruncated float64 σ·T is returned (the value before diffusers' int cast).
    """
    T = num_train_timesteps
    if kind == "wan":
        s = np.linspace(1.0 - 1.0 / T, 0.0, num_steps + 1)[:-1].copy()
        s = shift_sigmas(s, shift)
    elif kind == "diffusers":
        s = np.linspace(1.0, 1.0 / T, num_steps + 1)[:-1].copy()
        s = shift_sigmas(s, shift)
        if np.fabs(s[0] - 1.0) < 1e-6:
            s[0] -= 1e-6
    else:
        raise ValueError(f"kind must be 'wan' or 'diffusers', got {kind!r}")
    timesteps = s * T
    timesteps = timesteps.astype(np.int64) if int_timesteps else timesteps.astype(np.float64)
    sigmas = np.concatenate([s, [0.0]]).astype(np.float32).astype(np.float64)
    return sigmas, timesteps


# ----------------------------------------------------------------------------------------------------------------
# Euler
# ----------------------------------------------------------------------------------------------------------------

class EulerState(NamedTuple):
    x: jax.Array


class Euler:
    """Flow Euler: x <- x + (σ_{i+1} - σ_i)·v (diffusers' FlowMatchEulerDiscreteScheduler step)."""

    def __init__(self, sigmas):
        self.sigmas = np.asarray(sigmas, np.float64)
        self.num_steps = len(self.sigmas) - 1
        self._dt = np.diff(self.sigmas)  # [N], σ_{i+1} - σ_i

    def init(self, x) -> EulerState:
        return EulerState(x=x)

    def step(self, state: EulerState, velocity, i) -> EulerState:
        x = state.x
        dt = jnp.asarray(self._dt, x.dtype)[i]
        return EulerState(x=(x + dt * velocity.astype(x.dtype)).astype(x.dtype))


# ----------------------------------------------------------------------------------------------------------------
# UniPC (multistep, B(h), data prediction on the flow model output)
# ----------------------------------------------------------------------------------------------------------------

class UniPCState(NamedTuple):
    x: jax.Array      # current sample (the predictor output of the last step; x_T after init)
    last: jax.Array   # the (corrected) sample the last predictor started from (diffusers' `last_sample`)
    buf: jax.Array    # [order, *x.shape] last `order` x0 predictions, oldest first (diffusers' `model_outputs`)


def _lambda(sigma):
    """λ = log α - log σ with α = 1 - σ (flow sigmas); +inf at σ = 0."""
    with np.errstate(divide="ignore"):
        return np.log(1.0 - sigma) - np.log(sigma)


def _bh_terms(h, order, solver_type):
    """hh = -h (predict_x0), h·φ1, B(h) and the vector b[0..order-1] of the UniPC B(h) update."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    with np.errstate(divide="ignore", invalid="ignore"):
        h_phi_k = h_phi_1 / hh - 1.0
    if solver_type == "bh1":
        B_h = hh
    elif solver_type == "bh2":
        B_h = np.expm1(hh)
    else:
        raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
    b, fact = [], 1
    for k in range(1, order + 1):
        b.append(h_phi_k * fact / B_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return h_phi_1, B_h, np.array(b)


class UniPC:
    """UniPC multistep sampler for flow prediction (Wan's FlowUniPC / diffusers' UniPCMultistepScheduler with
    prediction_type="flow_prediction", use_flow_sigmas=True, predict_x0=True, solver_type="bh2", corrector on,
    lower_order_final=True, final_sigmas_type="zero", no thresholding, no solver_p, disable_corrector=[]).

    Per step i (model evaluated at the current sample x_i, giving velocity v_i):
        m_i  = x_i - σ_i v_i                                  (x0 prediction)
        x_c  = UniC(last, buffer, m_i)      if i > 0 and corrector on, else x_i
        x_{i+1} = UniP(x_c, buffer + [m_i])
    Both updates are linear in (x_i, last, buffer, m_i) with coefficients that depend only on the grid and i; they
    are tabulated in float64 in __init__ (including the warm-up orders and lower_order_final).
    """

    def __init__(self, sigmas, order: int = 2, solver_type: str = "bh2", use_corrector: bool = True,
                 lower_order_final: bool = True, disable_corrector=()):
        sig = np.asarray(sigmas, np.float64)
        N = len(sig) - 1
        K = int(order)
        if K < 1:
            raise ValueError("order must be >= 1")
        self.sigmas, self.num_steps, self.order = sig, N, K
        alpha = 1.0 - sig
        lam = _lambda(sig)

        # Effective predictor order per step: warm-up (i+1) and lower_order_final (N - i).
        p = np.array([min(K, N - i if lower_order_final else K, i + 1) for i in range(N)])
        self.step_orders = p

        # x_c = cx·x + cl·last + Σ_j cb[j]·buf[j] + cm·m          (buf = old buffer, oldest first)
        # x'  = px·x_c + Σ_j pb[j]·buf'[j]                         (buf' = buffer after pushing m)
        cx, cl, cm = np.zeros(N), np.zeros(N), np.zeros(N)
        cb, px, pb = np.zeros((N, K)), np.zeros(N), np.zeros((N, K))
        for i in range(N):
            # ---- corrector at step i: from σ_{i-1} to σ_i with the order of the previous predictor.
            if i > 0 and use_corrector and (i - 1) not in disable_corrector:
                q = p[i - 1]
                s0, t = i - 1, i
                h = lam[t] - lam[s0]
                rks = [(lam[s0 - k] - lam[s0]) / h for k in range(1, q)] + [1.0]
                h_phi_1, B_h, b = _bh_terms(h, q, solver_type)
                if q == 1:
                    rhos = np.array([0.5])
                else:
                    R = np.stack([np.power(np.array(rks), k) for k in range(q)])
                    rhos = np.linalg.solve(R, b)
                a = alpha[t] * B_h
                cl[i] = sig[t] / sig[s0]
                c_m0 = -alpha[t] * h_phi_1 + a * rhos[-1]
                for k in range(1, q):  # old buffer entry m_{i-1-k} sits at index K-1-k
                    c = -a * rhos[k - 1] / rks[k - 1]
                    cb[i, K - 1 - k] += c
                    c_m0 -= c
                cb[i, K - 1] += c_m0
                cm[i] = -a * rhos[-1]
            else:
                cx[i] = 1.0
            # ---- predictor at step i: from σ_i to σ_{i+1} with order p[i].
            q = p[i]
            s0, t = i, i + 1
            h = lam[t] - lam[s0]
            h_phi_1, B_h, b = _bh_terms(h, q, solver_type)
            px[i] = sig[t] / sig[s0]
            c_m0 = -alpha[t] * h_phi_1
            if q > 1:
                rks = [(lam[s0 - k] - lam[s0]) / h for k in range(1, q)] + [1.0]
                if q == 2:
                    rhos_p = np.array([0.5])
                else:
                    R = np.stack([np.power(np.array(rks), k) for k in range(q)])
                    rhos_p = np.linalg.solve(R[:-1, :-1], b[:-1])
                a = alpha[t] * B_h
                for k in range(1, q):  # new buffer entry m_{i-k} sits at index K-1-k
                    c = -a * rhos_p[k - 1] / rks[k - 1]
                    pb[i, K - 1 - k] += c
                    c_m0 -= c
            pb[i, K - 1] += c_m0
        tables = dict(cx=cx, cl=cl, cm=cm, cb=cb, px=px, pb=pb)
        for name, v in tables.items():
            if not np.all(np.isfinite(v)):
                raise ValueError(f"non-finite UniPC coefficient {name} (lower_order_final=False at σ=0?)")
        self.tables = tables

    def init(self, x) -> UniPCState:
        z = jnp.zeros_like(x)
        return UniPCState(x=x, last=z, buf=jnp.zeros((self.order,) + x.shape, x.dtype))

    def step(self, state: UniPCState, velocity, i) -> UniPCState:
        x, last, buf = state
        dt = x.dtype
        T = {k: jnp.asarray(v, dt)[i] for k, v in self.tables.items()}
        sigma = jnp.asarray(self.sigmas, dt)[i]
        m = x - sigma * velocity.astype(dt)
        xc = T["cx"] * x + T["cl"] * last + T["cm"] * m
        for j in range(self.order):
            xc = xc + T["cb"][j] * buf[j]
        new_buf = jnp.concatenate([buf[1:], m[None]], axis=0)
        x_next = T["px"] * xc
        for j in range(self.order):
            x_next = x_next + T["pb"][j] * new_buf[j]
        return UniPCState(x=x_next.astype(dt), last=xc.astype(dt), buf=new_buf.astype(dt))


# ----------------------------------------------------------------------------------------------------------------
# Loop + CFG
# ----------------------------------------------------------------------------------------------------------------

def sample(velocity_fn: Callable, x_T, sigmas, timesteps=None, solver: str = "unipc", order: int = 2,
           return_trajectory: bool = False, **solver_kwargs):
    """Run the whole denoising loop in one `lax.scan`.

    velocity_fn(x, t) -> v with t the model timestep of the step (a traced scalar taken from `timesteps`; defaults to
    σ·1000 as float). sigmas: host array [N+1] (from `flow_sigmas`). Returns x_0, or (x_0, trajectory [N, *x.shape])
    with the sample after every step when return_trajectory.
    """
    sigmas = np.asarray(sigmas, np.float64)
    N = len(sigmas) - 1
    if timesteps is None:
        timesteps = sigmas[:-1] * 1000.0
    if solver == "unipc":
        s = UniPC(sigmas, order=order, **solver_kwargs)
    elif solver == "euler":
        s = Euler(sigmas)
    else:
        raise ValueError(f"solver must be 'unipc' or 'euler', got {solver!r}")
    ts = jnp.asarray(timesteps)

    def body(state, i):
        state = s.step(state, velocity_fn(state.x, ts[i]), i)
        return state, (state.x if return_trajectory else None)

    state, traj = jax.lax.scan(body, s.init(x_T), jnp.arange(N))
    return (state.x, traj) if return_trajectory else state.x


def _concat_batch(a, b):
    return jax.tree_util.tree_map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def guided_velocity(model_fn: Callable, x, t, cond: Any, uncond: Any, scale):
    """Classifier-free guidance with cond and uncond as ONE batched call (docs/method.md §9):

        v_c, v_u = split(model_fn(concat[x, x], concat[t, t], concat[cond, uncond]))
        v̂ = v_u + scale·(v_c - v_u)

    x [B, ...]; t a scalar (passed through unchanged) or [B] (concatenated); cond/uncond pytrees with the batch on
    axis 0 of every leaf (None leaves stay None). model_fn(x2, t2, c2) must return an array with batch 2B.
    """
    B = x.shape[0]
    x2 = jnp.concatenate([x, x], axis=0)
    t = jnp.asarray(t)
    t2 = t if t.ndim == 0 else jnp.concatenate([t, t], axis=0)
    out = model_fn(x2, t2, _concat_batch(cond, uncond))
    v_c, v_u = out[:B], out[B:]
    return v_u + scale * (v_c - v_u)
