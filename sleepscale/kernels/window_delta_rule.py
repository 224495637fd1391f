"""The gated delta rule over one short window (T <= 64 tokens), forward and backward, in Triton.

What it computes, per (batch, value head), with q and k read from head j // (HV // H):

    q^ = scale * q / sqrt(|q|^2 + 1e-6),  k^ = k / sqrt(|k|^2 + 1e-6)        (sleepscale's l2_normalize)
    beta_t = sigmoid(b_t),  g_t = -exp(A_log) * softplus(a_t + dt_bias)       (GatedDeltaNet's gates)
    S_t = exp(g_t) S_{t-1} + k^_t e_t^T,  e_t = beta_t (v_t - (exp(g_t) S_{t-1})^T k^_t),  o_t = S_t^T q^_t

from the raw projections q, k, a, b: exactly `sleepscale.ops.gated_delta_rule` fed with
`GatedDeltaNet.forward`'s normalised q, k and its gates (`window_delta_rule_reference` is the
plain-PyTorch ground truth).

Why ours: sleep re-runs short windows many times with gradients. fla's chunked kernel pads each
window to a 64-token chunk and launches ~5 kernels forward and ~10 backward, plus the PyTorch ops
for the norms and gates; its fused recurrent kernel is one launch but has no backward. Here the
forward is one launch (one program per (batch, value head), a loop over the tokens with the [K, V]
state in registers) and the backward is one launch too, with the L2 norms and the gates inside both
(the gates of all the window's tokens are computed at once, before the sequential loop).

Backward: each program first re-runs its forward, writing the states S_0 .. S_{T-1} to a transient
global scratch, then walks the tokens in reverse with the running gradient of the state (the
derivation is in `_window_bwd_kernel`'s comments). The scratch is allocated by the backward operator
(`sleepscale::window_delta_rule_backward`) and freed when it returns: 4 * T * K * V bytes per (batch,
value head) in float32 (8 in float64), e.g. 4 MiB at T = 64, K = V = 128, so 512 MiB for 8 sequences x 16 value heads.
Between forward and backward only the inputs are kept, nothing per step. Gradients of q and k are
computed per value head into [B, T, HV, K] buffers (compute dtype) and summed over each group of value
heads in PyTorch (no atomics); those of A_log and dt_bias are written per (batch, token, value
head) and summed over batch and tokens in PyTorch.

Limits: 1 <= T <= 64, K <= 128, V <= 128 (any size: padded to powers of two with masks), HV a
multiple of H; otherwise ValueError. Dtypes: float32 and bfloat16 inputs are computed in float32
(the state, its gradient and all sums); float64 inputs in float64, and the final state is then
float64 (float32 otherwise). o and the input gradients have their inputs' dtypes. On CPU tensors it
runs only under Triton's interpreter (TRITON_INTERPRET=1 set before Triton is imported), which is
how the tests run it; it is meant for CUDA, where it has not been run yet by these tests. At
K = V = 128 the state and its gradient are large register tiles for one program (8 warps are used
there); wider heads would need V split across programs, which the backward's sums over V (for dk and
the decay) would then have to combine.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The kernel's limits, defined where configs are checked against them.
from sleepscale.config import WINDOW_MAX_HEAD_DIM as MAX_HEAD_DIM
from sleepscale.config import WINDOW_MAX_LENGTH as MAX_LENGTH

L2_EPS = 1e-6
SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus's: linear above it

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _token(
    q,
    k,
    v,
    p_qk,
    p_v,
    mk,
    mv,
    t,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    DT: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """Token t's q and k normalised (x / sqrt(|x|^2 + 1e-6), before the scale) with their inverse
    norms, and its v."""
    q_t = tl.load(q + p_qk + t * H * K, mask=mk, other=0).to(DT)
    k_t = tl.load(k + p_qk + t * H * K, mask=mk, other=0).to(DT)
    v_t = tl.load(v + p_v + t * HV * V, mask=mv, other=0).to(DT)
    if IS_F64:
        q_inv = 1.0 / tl.sqrt(tl.sum(q_t * q_t, 0) + 1e-6)
        k_inv = 1.0 / tl.sqrt(tl.sum(k_t * k_t, 0) + 1e-6)
    else:  # tl.sqrt is the approximate square root in float32
        q_inv = 1.0 / tl.sqrt_rn(tl.sum(q_t * q_t, 0) + 1e-6)
        k_inv = 1.0 / tl.sqrt_rn(tl.sum(k_t * k_t, 0) + 1e-6)
    return q_t * q_inv, q_inv, k_t * k_inv, k_inv, v_t


@triton.jit
def _gates(a, b, A_log, dt_bias, p_g, ot, mt, i_hv, HV: tl.constexpr, DT: tl.constexpr):
    """The gates of all the window's tokens at once, off the sequential loop: g = -exp(A_log) *
    softplus(a + dt_bias) (torch's softplus: linear above 20), beta = sigmoid(b); also -exp(A_log)
    and softplus' (for the backward)."""
    neg_A = -tl.exp(tl.load(A_log + i_hv).to(DT))
    x = tl.load(a + p_g + ot * HV, mask=mt, other=0).to(DT) + tl.load(dt_bias + i_hv).to(DT)
    ex = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + ex
    log1p = tl.where(
        w == 1.0, ex, tl.log(w) * (ex / tl.where(w == 1.0, 1.0, w - 1.0))
    )  # log(1 + ex), accurate for small ex
    g = neg_A * tl.where(x > 20.0, x, log1p)
    beta = 1.0 / (1.0 + tl.exp(-tl.load(b + p_g + ot * HV, mask=mt, other=0).to(DT)))
    softplus_grad = tl.where(x > 20.0, 1.0, ex / w)
    return g, beta, neg_A, softplus_grad


@triton.jit
def _window_fwd_kernel(
    q,
    k,
    v,
    a,
    b,
    A_log,
    dt_bias,
    h0,
    o,
    ht,
    scale_ptr,
    T,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    DT: tl.constexpr,
    IS_F64: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)  # the backward's scratch can pass 2**31 elements
    i_b = i_bh // HV
    i_hv = i_bh % HV
    i_h = i_hv // (HV // H)
    ot = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = tl.arange(0, BV)
    mk = ok < K
    mv = ov < V
    mkv = mk[:, None] & mv[None, :]
    p_qk = (i_b * T * H + i_h) * K + ok  # + t * H * K
    p_v = (i_b * T * HV + i_hv) * V + ov  # + t * HV * V
    p_g = i_b * T * HV + i_hv  # + t * HV
    p_h = i_bh * K * V + ok[:, None] * V + ov[None, :]
    scale = tl.load(scale_ptr).to(DT)  # from memory: a float argument would be float32
    g_all, beta_all, neg_A, softplus_grad = _gates(a, b, A_log, dt_bias, p_g, ot, ot < T, i_hv, HV, DT)
    if HAS_H0:
        S = tl.load(h0 + p_h, mask=mkv, other=0).to(DT)
    else:
        S = tl.zeros([BK, BV], dtype=DT)
    for t in range(0, T):
        nq, q_inv, kh, k_inv, v_t = _token(q, k, v, p_qk, p_v, mk, mv, t, H, HV, K, V, DT, IS_F64)
        this = ot == t
        g = tl.sum(tl.where(this, g_all, 0.0), 0)
        beta = tl.sum(tl.where(this, beta_all, 0.0), 0)
        S = S * tl.exp(g)
        e = beta * (v_t - tl.sum(S * kh[:, None], 0))
        S = S + kh[:, None] * e[None, :]
        o_t = tl.sum(S * (nq * scale)[:, None], 0)
        tl.store(o + p_v + t * HV * V, o_t.to(o.dtype.element_ty), mask=mv)
    tl.store(ht + p_h, S.to(ht.dtype.element_ty), mask=mkv)


@triton.jit
def _window_bwd_kernel(
    q,
    k,
    v,
    a,
    b,
    A_log,
    dt_bias,
    h0,
    do,
    dht,
    scratch,
    dq,
    dk,
    dv,
    da,
    db,
    dA,
    dh0,
    scale_ptr,
    T,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DHT: tl.constexpr,
    DT: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """dq, dk: [B, T, HV, K] per value head; da, db, dA (the A_log piece dg * g): [B, T, HV]."""
    i_bh = tl.program_id(0).to(tl.int64)  # the backward's scratch can pass 2**31 elements
    i_b = i_bh // HV
    i_hv = i_bh % HV
    i_h = i_hv // (HV // H)
    ot = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = tl.arange(0, BV)
    mt = ot < T
    mk = ok < K
    mv = ov < V
    mkv = mk[:, None] & mv[None, :]
    p_qk = (i_b * T * H + i_h) * K + ok
    p_dqk = (i_b * T * HV + i_hv) * K + ok  # the per-value-head dq, dk buffers; + t * HV * K
    p_v = (i_b * T * HV + i_hv) * V + ov
    p_g = i_b * T * HV + i_hv
    p_h = i_bh * K * V + ok[:, None] * V + ov[None, :]
    p_s = scratch + i_bh * T * K * V + ok[:, None] * V + ov[None, :]  # + t * K * V: the state before token t
    scale = tl.load(scale_ptr).to(DT)
    g_all, beta_all, neg_A, softplus_grad = _gates(a, b, A_log, dt_bias, p_g, ot, mt, i_hv, HV, DT)

    # 1. The forward again, keeping the state before each token.
    if HAS_H0:
        S = tl.load(h0 + p_h, mask=mkv, other=0).to(DT)
    else:
        S = tl.zeros([BK, BV], dtype=DT)
    for t in range(0, T):
        tl.store(p_s + t * K * V, S, mask=mkv)
        nq, q_inv, kh, k_inv, v_t = _token(q, k, v, p_qk, p_v, mk, mv, t, H, HV, K, V, DT, IS_F64)
        this = ot == t
        g = tl.sum(tl.where(this, g_all, 0.0), 0)
        beta = tl.sum(tl.where(this, beta_all, 0.0), 0)
        S = S * tl.exp(g)
        e = beta * (v_t - tl.sum(S * kh[:, None], 0))
        S = S + kh[:, None] * e[None, :]
    tl.debug_barrier()  # the scratch is read back below, by other threads of this program

    # 2. In reverse, with dS the gradient w.r.t. the state after token t (from d final_state). Token t:
    #    S' = alpha S_{t-1}, u = S'^T k^, e = beta (v - u), S_t = S' + k^ e^T, o_t = S_t^T q^. Then
    #    dS += q^ do^T; dq^ = S_t do; de = dS^T k^; dk^ = dS e - S' dv; dv = beta de (du = -dv);
    #    dbeta = de . (v - u); dS' = dS - k^ dv^T; dalpha = <dS', S_{t-1}>; dS_{t-1} = alpha dS';
    #    dg = alpha dalpha; then through the L2 norms, sigmoid(b) and g = -exp(A_log) softplus(a + dt_bias).
    if HAS_DHT:
        dS = tl.load(dht + p_h, mask=mkv, other=0).to(DT)
    else:
        dS = tl.zeros([BK, BV], dtype=DT)
    dg_all = tl.zeros([BT], dtype=DT)
    dbeta_all = tl.zeros([BT], dtype=DT)
    for i in range(0, T):
        t = T - 1 - i
        nq, q_inv, kh, k_inv, v_t = _token(q, k, v, p_qk, p_v, mk, mv, t, H, HV, K, V, DT, IS_F64)
        this = ot == t
        alpha = tl.exp(tl.sum(tl.where(this, g_all, 0.0), 0))
        beta = tl.sum(tl.where(this, beta_all, 0.0), 0)
        S_prev = tl.load(p_s + t * K * V, mask=mkv, other=0)
        S_decayed = S_prev * alpha  # S' = alpha S_{t-1}
        residual = v_t - tl.sum(S_decayed * kh[:, None], 0)  # v - u, u = S'^T k^
        e = beta * residual
        do_t = tl.load(do + p_v + t * HV * V, mask=mv, other=0).to(DT)
        qh = nq * scale

        dS = dS + qh[:, None] * do_t[None, :]  # o_t = S_t^T q^
        dqh = tl.sum((S_decayed + kh[:, None] * e[None, :]) * do_t[None, :], 1)  # S_t = S' + k^ e^T
        de = tl.sum(dS * kh[:, None], 0)
        dv_t = beta * de  # du = -beta de = -dv
        dS_decayed = dS - kh[:, None] * dv_t[None, :]
        dkh = tl.sum(dS * e[None, :] - S_decayed * dv_t[None, :], 1)
        dg_all = tl.where(this, tl.sum(dS_decayed * S_prev) * alpha, dg_all)  # dg = alpha dalpha
        dbeta_all = tl.where(this, tl.sum(de * residual, 0), dbeta_all)
        dS = dS_decayed * alpha

        # through x * r, r = 1 / sqrt(|x|^2 + eps): dx = r (dn - n (dn . n)); q^ also has the scale
        dq_t = (q_inv * scale) * (dqh - nq * tl.sum(dqh * nq, 0))
        dk_t = k_inv * (dkh - kh * tl.sum(dkh * kh, 0))
        tl.store(dq + p_dqk + t * HV * K, dq_t.to(dq.dtype.element_ty), mask=mk)
        tl.store(dk + p_dqk + t * HV * K, dk_t.to(dk.dtype.element_ty), mask=mk)
        tl.store(dv + p_v + t * HV * V, dv_t.to(dv.dtype.element_ty), mask=mv)
    tl.store(dh0 + p_h, dS.to(dh0.dtype.element_ty), mask=mkv)
    tl.store(db + p_g + ot * HV, (dbeta_all * beta_all * (1.0 - beta_all)).to(db.dtype.element_ty), mask=mt)
    tl.store(da + p_g + ot * HV, (dg_all * neg_A * softplus_grad).to(da.dtype.element_ty), mask=mt)
    tl.store(dA + p_g + ot * HV, (dg_all * g_all).to(dA.dtype.element_ty), mask=mt)  # d g / d A_log = g


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _launch_settings(q: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> dict:
    block_k, block_v = triton.next_power_of_2(q.shape[-1]), triton.next_power_of_2(v.shape[-1])
    return {
        "H": q.shape[2],
        "HV": v.shape[2],
        "K": q.shape[-1],
        "V": v.shape[-1],
        "BT": triton.next_power_of_2(q.shape[1]),
        "BK": block_k,
        "BV": block_v,
        "DT": tl.float64 if dtype == torch.float64 else tl.float32,
        "IS_F64": dtype == torch.float64,
        "num_warps": 4 if block_k * block_v <= 64 * 64 else 8,
    }


# The kernels as two PyTorch custom operators with an autograd formula linking them, rather than an
# autograd.Function: torch.compile then keeps them opaque (one call each in a graph, never traced into
# or broken on), and their fake implementations give shapes without launching Triton.


def _contiguous(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The kernels read dense row-major tensors; None (an absent initial state or gradient) stays None."""
    return [None if x is None else x.contiguous() for x in tensors]


@torch.library.custom_op("sleepscale::window_delta_rule", mutates_args=())
def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    initial_state: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, a, b, A_log, dt_bias, initial_state = _contiguous(q, k, v, a, b, A_log, dt_bias, initial_state)
    batch, length = q.shape[:2]
    dtype = _compute_dtype(q, k, v)
    settings = _launch_settings(q, v, dtype)
    o = torch.empty_like(v)
    final_state = torch.empty(batch, v.shape[2], q.shape[-1], v.shape[-1], device=v.device, dtype=dtype)
    _window_fwd_kernel[(batch * v.shape[2],)](
        q,
        k,
        v,
        a,
        b,
        A_log,
        dt_bias,
        initial_state if initial_state is not None else final_state,
        o,
        final_state,
        torch.full((1,), scale, device=v.device, dtype=dtype),
        length,
        HAS_H0=initial_state is not None,
        **settings,
    )
    return o, final_state


@_forward.register_fake
def _(q, k, v, a, b, A_log, dt_bias, initial_state, scale):
    dtype = _compute_dtype(q, k, v)
    return torch.empty_like(v), v.new_empty((q.shape[0], v.shape[2], q.shape[-1], v.shape[-1]), dtype=dtype)


@torch.library.custom_op("sleepscale::window_delta_rule_backward", mutates_args=())
def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    initial_state: torch.Tensor | None,
    d_output: torch.Tensor,
    d_final_state: torch.Tensor | None,
    scale: float,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """The gradients of q, k, v, a, b, A_log, dt_bias and the initial state (zeros without one)."""
    q, k, v, a, b, A_log, dt_bias, initial_state, d_output, d_final_state = _contiguous(
        q, k, v, a, b, A_log, dt_bias, initial_state, d_output, d_final_state
    )
    batch, length, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    dtype = _compute_dtype(q, k, v)
    settings = _launch_settings(q, v, dtype)
    scratch = torch.empty(batch * value_heads, length, key_dim, value_dim, device=v.device, dtype=dtype)
    dq = torch.empty(batch, length, value_heads, key_dim, device=q.device, dtype=dtype)  # per value head
    dk = torch.empty_like(dq)
    dv = torch.empty_like(v)
    da, db, dA = (torch.empty(batch, length, value_heads, device=v.device, dtype=dtype) for _ in range(3))
    dh0 = torch.empty(batch, value_heads, key_dim, value_dim, device=v.device, dtype=dtype)
    _window_bwd_kernel[(batch * value_heads,)](
        q,
        k,
        v,
        a,
        b,
        A_log,
        dt_bias,
        initial_state if initial_state is not None else dh0,
        d_output,
        d_final_state if d_final_state is not None else dh0,
        scratch,
        dq,
        dk,
        dv,
        da,
        db,
        dA,
        dh0,
        torch.full((1,), scale, device=v.device, dtype=dtype),
        length,
        HAS_H0=initial_state is not None,
        HAS_DHT=d_final_state is not None,
        **settings,
    )
    del scratch
    groups = value_heads // heads
    dq = dq.view(batch, length, heads, groups, key_dim).sum(3).to(q.dtype)
    dk = dk.view(batch, length, heads, groups, key_dim).sum(3).to(k.dtype)
    d_initial = dh0 if initial_state is None else dh0.to(initial_state.dtype)
    return (
        dq,
        dk,
        dv,
        da.to(a.dtype),
        db.to(b.dtype),
        dA.sum((0, 1)).to(A_log.dtype),
        da.sum((0, 1)).to(dt_bias.dtype),
        d_initial,
    )


@_backward.register_fake
def _(q, k, v, a, b, A_log, dt_bias, initial_state, d_output, d_final_state, scale):
    dtype = _compute_dtype(q, k, v)
    state = v.new_empty((q.shape[0], v.shape[2], q.shape[-1], v.shape[-1]), dtype=dtype)
    d_initial = state if initial_state is None else torch.empty_like(initial_state)
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(a),
        torch.empty_like(b),
        torch.empty_like(A_log),
        torch.empty_like(dt_bias),
        d_initial,
    )


def _setup_context(ctx, inputs, output) -> None:
    *tensors, scale = inputs
    ctx.save_for_backward(*tensors)  # the inputs only: nothing per token is kept
    ctx.scale = scale


def _autograd_backward(ctx, d_output, d_final_state):
    q, k, v, a, b, A_log, dt_bias, initial_state = ctx.saved_tensors
    if d_output is None:
        d_output = torch.zeros_like(v)
    grads = list(_backward(q, k, v, a, b, A_log, dt_bias, initial_state, d_output, d_final_state, ctx.scale))
    if initial_state is None:
        grads[-1] = None
    return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad)), None)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check(q, k, v, a, b, A_log, dt_bias, initial_state) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"window_gated_delta_rule: q, k must be [B, T, H, K] and v [B, T, HV, V] alike, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, length, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    if not 1 <= length <= MAX_LENGTH:
        raise ValueError(
            f"window_gated_delta_rule: T = {length} tokens; the kernel takes 1 to {MAX_LENGTH} (one window)"
        )
    if key_dim > MAX_HEAD_DIM or value_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"window_gated_delta_rule: K = {key_dim}, V = {value_dim}; "
            f"the kernel takes head dimensions up to {MAX_HEAD_DIM}"
        )
    if value_heads % heads:
        raise ValueError(f"window_gated_delta_rule: value heads ({value_heads}) must be a multiple of heads ({heads})")
    gate_shape = (batch, length, value_heads)
    if (
        a.shape != gate_shape
        or b.shape != gate_shape
        or A_log.shape != (value_heads,)
        or dt_bias.shape != (value_heads,)
    ):
        raise ValueError(
            f"window_gated_delta_rule: a, b must be {list(gate_shape)} and A_log, dt_bias [{value_heads}], "
            f"got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(A_log.shape)}, {tuple(dt_bias.shape)}"
        )
    if initial_state is not None and initial_state.shape != (batch, value_heads, key_dim, value_dim):
        raise ValueError(
            f"window_gated_delta_rule: initial_state must be {[batch, value_heads, key_dim, value_dim]}, "
            f"got {tuple(initial_state.shape)}"
        )
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"window_gated_delta_rule: {q.device.type} tensors need Triton's interpreter "
            "(TRITON_INTERPRET=1 before importing triton); the kernel is for CUDA"
        )


def window_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: raw (not normalised) [B, T, H, K]; v: [B, T, HV, V]; a, b: the raw gate projections
    [B, T, HV]; A_log, dt_bias: [HV]; initial_state: [B, HV, K, V] or None (zeros); scale defaults
    to K ** -0.5. Returns (o [B, T, HV, V] in v's dtype, final state [B, HV, K, V] in float32, or
    float64 for float64 inputs). Differentiable in every tensor input, through both outputs."""
    _check(q, k, v, a, b, A_log, dt_bias, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _forward(q, k, v, a, b, A_log, dt_bias, initial_state, scale)
