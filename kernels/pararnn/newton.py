"""Time-tiled Newton kernels (forward) and tiled adjoint-scan kernels (backward) for ParaGRU/ParaLSTM.

One program owns ``BLOCK_N`` channels of one sequence ``b`` and walks time in tiles of ``BLOCK_T``
steps, carrying the exact final state of each tile into the next one.

Forward, per tile (all in registers), and with ``WANT_RES`` each chain's final residual
``max_t |f(h_{t-1}, P_t) − h_t|`` written to ``RES [B, N]`` (NaN as +inf):

* initial guess ``h_t = f(0, P_t)``;
* ``NUM_ITERS`` Newton steps. With ``s_t = h_{t-1}`` (row 0: the carried state; a reset zeroes it)
  the Newton update ``h_t += δ_t``, ``δ_t = J_t δ_{t-1} + f(s_t) − h_t`` is rewritten as one linear
  recurrence for the new iterate, ``h'_t = J_t h'_{t-1} + (f(s_t) − J_t s_t)``, solved by
  ``tl.associative_scan`` over the tile. The shift ``s_t = h_{t-1}`` is a ``tl.gather`` along time.

Backward: tiles are visited from the last to the first, each loaded in reversed time order, so the
adjoint ``λ_t = g_t + J_{t+1}ᵀ λ_{t+1}`` is a forward scan over the tile's rows. ``J_{t+1}`` is
recomputed from ``h_t`` and ``P_{t+1}`` (both read from memory), so no shift is needed; the local
VJP at ``(h_{t-1}, P_t)`` then gives ``dP_t`` and the per-channel sums for ``dA``/``dC``, written as
per-(b, channel) partials (summed over b outside: deterministic, no atomics).

P's head-split layout, the bias added on load, the weight clip and the gradient partials: ``_io.py``.
"""
import triton
import triton.language as tl

from ._io import (
    chan_offsets,
    load_biases3,
    load_gates,
    load_weights2,
    load_weights3,
    store3,
    store_partials,
    store_weight_grad,
)
from ._math import combine1, combine2, gru_gates, gru_jac, lstm_gates, lstm_jac, nan_to_inf, sigmoid, tanh


# ================================================================================================ GRU
@triton.jit
def gru_newton_fwd_kernel(
    P, BIAS, A, H0, RST, H, RES,
    T, N, NH, clip,
    sPb, sPt, sPg, sPh, sH0b, sRb, sRt, sHb, sHt,
    NUM_ITERS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLIP: tl.constexpr, IN_HEAD: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_RST: tl.constexpr, WANT_RES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    pn = chan_offsets(pid_n, NH, sPh, BLOCK_N, IN_HEAD)
    az, ar, ac = load_weights3(A, N, offs_n, mask_n, clip, HAS_CLIP)
    az, ar, ac = az[None, :], ar[None, :], ac[None, :]
    bz, br, bc = load_biases3(BIAS, N, offs_n, mask_n, HAS_BIAS)
    if HAS_H0:
        carry = tl.load(H0 + b * sH0b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    rows = tl.arange(0, BLOCK_T)
    first = (rows == 0)[:, None]
    prev_idx = tl.broadcast_to(tl.maximum(rows - 1, 0)[:, None], [BLOCK_T, BLOCK_N])
    res = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + rows
        mt = t < T
        m2 = mt[:, None] & mask_n[None, :]
        tt = t.to(tl.int64)[:, None]
        pz, pr, pc = load_gates(P + b * sPb + tt * sPt + pn[None, :], sPg, m2, bz, br, bc)
        if HAS_RST:
            keep = 1.0 - tl.load(RST + b * sRb + t * sRt, mask=mt, other=0).to(tl.float32)[:, None]
        # initial guess f(0, P_t)
        h = sigmoid(pz) * tanh(pc)
        for _ in tl.static_range(NUM_ITERS):
            s = tl.where(first, carry[None, :], tl.gather(h, prev_idx, 0))
            if HAS_RST:
                s = s * keep
            z, r, c, fs = gru_gates(s, pz, pr, pc, az, ar, ac)
            a = gru_jac(s, z, r, c, az, ar, ac)
            if HAS_RST:
                a = a * keep
            a = tl.where(first, 0.0, a)
            _, h = tl.associative_scan((a, fs - a * s), 0, combine1)
        if WANT_RES:
            s = tl.where(first, carry[None, :], tl.gather(h, prev_idx, 0))
            if HAS_RST:
                s = s * keep
            _, _, _, fs = gru_gates(s, pz, pr, pc, az, ar, ac)
            res = tl.maximum(res, tl.max(tl.where(m2, nan_to_inf(tl.abs(fs - h)), 0.0), axis=0))
        tl.store(H + b * sHb + tt * sHt + offs_n[None, :], h.to(H.dtype.element_ty), mask=m2)
        last = tl.minimum(T - t0, BLOCK_T) - 1
        carry = tl.sum(tl.where((rows == last)[:, None], h, 0.0), axis=0)
    if WANT_RES:
        tl.store(RES + b * N + offs_n, res, mask=mask_n)


@triton.jit
def gru_newton_bwd_kernel(
    P, BIAS, A, H0, RST, H, G, DP, PART, DH0,
    T, N, NH, clip,
    sPb, sPt, sPg, sPh, sH0b, sRb, sRt, sHb, sHt, sGb, sGt, sDb, sDt, sDg, sDh, sPart,
    HAS_BIAS: tl.constexpr, HAS_CLIP: tl.constexpr, IN_HEAD: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_RST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    pn = chan_offsets(pid_n, NH, sPh, BLOCK_N, IN_HEAD)
    dn = chan_offsets(pid_n, NH, sDh, BLOCK_N, IN_HEAD)
    az1, ar1, ac1 = load_weights3(A, N, offs_n, mask_n, clip, HAS_CLIP)
    az, ar, ac = az1[None, :], ar1[None, :], ac1[None, :]
    bz, br, bc = load_biases3(BIAS, N, offs_n, mask_n, HAS_BIAS)
    if HAS_H0:
        h0 = tl.load(H0 + b * sH0b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    rows = tl.arange(0, BLOCK_T)
    first = (rows == 0)[:, None]
    lam_carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_r = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_c = tl.zeros([BLOCK_N], dtype=tl.float32)
    num_tiles = tl.cdiv(T, BLOCK_T)
    for k in range(0, num_tiles):
        t_hi = T - k * BLOCK_T
        t = t_hi - 1 - rows                      # reversed: row 0 is the latest step of the tile
        valid = t >= 0
        nxt = (t + 1) < T
        m2 = valid[:, None] & mask_n[None, :]
        m2n = (valid & nxt)[:, None] & mask_n[None, :]
        m2p = (t >= 1)[:, None] & mask_n[None, :]
        tt = t.to(tl.int64)[:, None]
        hh = H + b * sHb + tt * sHt + offs_n[None, :]
        h_t = tl.load(hh, mask=m2, other=0.0).to(tl.float32)
        s = tl.load(hh - sHt, mask=m2p, other=0.0).to(tl.float32)
        if HAS_H0:
            s = tl.where((t == 0)[:, None], h0[None, :], s)
        pp = P + b * sPb + tt * sPt + pn[None, :]
        pz, pr, pc = load_gates(pp, sPg, m2, bz, br, bc)
        pz1, pr1, pc1 = load_gates(pp + sPt, sPg, m2n, bz, br, bc)
        g = tl.load(G + b * sGb + tt * sGt + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
        # J_{t+1} at (h_t, P_{t+1}), zero past the end and where step t+1 starts a document
        z1, r1, c1, _ = gru_gates(h_t, pz1, pr1, pc1, az, ar, ac)
        a = tl.where((valid & nxt)[:, None], gru_jac(h_t, z1, r1, c1, az, ar, ac), 0.0)
        if HAS_RST:
            rp = RST + b * sRb + t * sRt
            a = a * (1.0 - tl.load(rp + sRt, mask=valid & nxt, other=0).to(tl.float32))[:, None]
            s = s * (1.0 - tl.load(rp, mask=valid, other=0).to(tl.float32))[:, None]
        bb = tl.where(first, g + a * lam_carry[None, :], g)
        a = tl.where(first, 0.0, a)
        _, lam = tl.associative_scan((a, bb), 0, combine1)
        # local VJP at (h_{t-1}, P_t)
        z, r, c, _ = gru_gates(s, pz, pr, pc, az, ar, ac)
        gz = lam * (c - s) * z * (1.0 - z)
        gc = lam * z * (1.0 - c * c)
        gr = gc * ac * s * r * (1.0 - r)
        gz = tl.where(m2, gz, 0.0)
        gr = tl.where(m2, gr, 0.0)
        gc = tl.where(m2, gc, 0.0)
        store3(DP + b * sDb + tt * sDt + dn[None, :], sDg, gz, gr, gc, m2)
        acc_z += tl.sum(gz * s, axis=0)
        acc_r += tl.sum(gr * s, axis=0)
        acc_c += tl.sum(gc * s * r, axis=0)
        if HAS_BIAS:
            sum_z += tl.sum(gz, axis=0)
            sum_r += tl.sum(gr, axis=0)
            sum_c += tl.sum(gc, axis=0)
        last = tl.minimum(t_hi, BLOCK_T) - 1
        lam_carry = tl.sum(tl.where((rows == last)[:, None], lam, 0.0), axis=0)
    # partials, rows: dA (z, r, c), then d bias (z, r, c)
    store_partials(PART + b * sPart, N, offs_n, mask_n, A, clip, acc_z, acc_r, acc_c, sum_z, sum_r, sum_c,
                   HAS_CLIP, HAS_BIAS)
    if HAS_H0:
        # dh0 = J_0ᵀ λ_0 with J_0 at (h0, P_0); lam_carry is λ_0 now
        pz0, pr0, pc0 = load_gates(P + b * sPb + pn[None, :], sPg, mask_n[None, :], bz, br, bc)
        z0, r0, c0, _ = gru_gates(h0, tl.sum(pz0, axis=0), tl.sum(pr0, axis=0), tl.sum(pc0, axis=0),
                                  az1, ar1, ac1)
        dh0 = gru_jac(h0, z0, r0, c0, az1, ar1, ac1) * lam_carry
        if HAS_RST:
            dh0 = dh0 * (1.0 - tl.load(RST + b * sRb).to(tl.float32))
        tl.store(DH0 + b * N + offs_n, dh0, mask=mask_n)


# =============================================================================================== LSTM
@triton.jit
def lstm_newton_fwd_kernel(
    P, BIAS, A, C, H0, RST, H, RES,
    T, N, NH, clip,
    sPb, sPt, sPg, sPh, sH0b, sH0k, sRb, sRt, sHb, sHt, sHk,
    NUM_ITERS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLIP: tl.constexpr, IN_HEAD: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_RST: tl.constexpr, WANT_RES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    pn = chan_offsets(pid_n, NH, sPh, BLOCK_N, IN_HEAD)
    af, ao, az = load_weights3(A, N, offs_n, mask_n, clip, HAS_CLIP)
    cf, co = load_weights2(C, N, offs_n, mask_n, clip, HAS_CLIP)
    af, ao, az, cf, co = af[None, :], ao[None, :], az[None, :], cf[None, :], co[None, :]
    bf, bo, bz = load_biases3(BIAS, N, offs_n, mask_n, HAS_BIAS)
    if HAS_H0:
        carry_c = tl.load(H0 + b * sH0b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        carry_h = tl.load(H0 + b * sH0b + sH0k + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        carry_c = tl.zeros([BLOCK_N], dtype=tl.float32)
        carry_h = tl.zeros([BLOCK_N], dtype=tl.float32)
    rows = tl.arange(0, BLOCK_T)
    first = (rows == 0)[:, None]
    prev_idx = tl.broadcast_to(tl.maximum(rows - 1, 0)[:, None], [BLOCK_T, BLOCK_N])
    res = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + rows
        mt = t < T
        m2 = mt[:, None] & mask_n[None, :]
        tt = t.to(tl.int64)[:, None]
        pf, po, pz = load_gates(P + b * sPb + tt * sPt + pn[None, :], sPg, m2, bf, bo, bz)
        if HAS_RST:
            keep = 1.0 - tl.load(RST + b * sRb + t * sRt, mask=mt, other=0).to(tl.float32)[:, None]
        # initial guess f(0, P_t)
        zero = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        _, _, hc, _, _, hh = lstm_gates(zero, zero, pf, po, pz, af, ao, az, cf, co)
        for _ in tl.static_range(NUM_ITERS):
            sc = tl.where(first, carry_c[None, :], tl.gather(hc, prev_idx, 0))
            sh = tl.where(first, carry_h[None, :], tl.gather(hh, prev_idx, 0))
            if HAS_RST:
                sc = sc * keep
                sh = sh * keep
            f, z, cn, o, tc, hn = lstm_gates(sc, sh, pf, po, pz, af, ao, az, cf, co)
            j11, j12, j21, j22 = lstm_jac(sc, f, z, o, tc, af, ao, az, cf, co)
            if HAS_RST:
                j11 = j11 * keep
                j12 = j12 * keep
                j21 = j21 * keep
                j22 = j22 * keep
            j11 = tl.where(first, 0.0, j11)
            j12 = tl.where(first, 0.0, j12)
            j21 = tl.where(first, 0.0, j21)
            j22 = tl.where(first, 0.0, j22)
            b1 = cn - (j11 * sc + j12 * sh)
            b2 = hn - (j21 * sc + j22 * sh)
            _, _, _, _, hc, hh = tl.associative_scan((j11, j12, j21, j22, b1, b2), 0, combine2)
        if WANT_RES:
            sc = tl.where(first, carry_c[None, :], tl.gather(hc, prev_idx, 0))
            sh = tl.where(first, carry_h[None, :], tl.gather(hh, prev_idx, 0))
            if HAS_RST:
                sc = sc * keep
                sh = sh * keep
            _, _, cn, _, _, hn = lstm_gates(sc, sh, pf, po, pz, af, ao, az, cf, co)
            err = tl.maximum(nan_to_inf(tl.abs(cn - hc)), nan_to_inf(tl.abs(hn - hh)))
            res = tl.maximum(res, tl.max(tl.where(m2, err, 0.0), axis=0))
        ho = H + b * sHb + tt * sHt + offs_n[None, :]
        tl.store(ho, hc.to(H.dtype.element_ty), mask=m2)
        tl.store(ho + sHk, hh.to(H.dtype.element_ty), mask=m2)
        last = (rows == (tl.minimum(T - t0, BLOCK_T) - 1))[:, None]
        carry_c = tl.sum(tl.where(last, hc, 0.0), axis=0)
        carry_h = tl.sum(tl.where(last, hh, 0.0), axis=0)
    if WANT_RES:
        tl.store(RES + b * N + offs_n, res, mask=mask_n)


@triton.jit
def lstm_newton_bwd_kernel(
    P, BIAS, A, C, H0, RST, H, G, DP, PART, DH0,
    T, N, NH, clip,
    sPb, sPt, sPg, sPh, sH0b, sH0k, sRb, sRt, sHb, sHt, sHk, sGb, sGt, sGk, sDb, sDt, sDg, sDh, sPart,
    HAS_BIAS: tl.constexpr, HAS_CLIP: tl.constexpr, IN_HEAD: tl.constexpr, HAS_GC: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_RST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    pn = chan_offsets(pid_n, NH, sPh, BLOCK_N, IN_HEAD)
    dn = chan_offsets(pid_n, NH, sDh, BLOCK_N, IN_HEAD)
    af1, ao1, az1 = load_weights3(A, N, offs_n, mask_n, clip, HAS_CLIP)
    cf1, co1 = load_weights2(C, N, offs_n, mask_n, clip, HAS_CLIP)
    af, ao, az, cf, co = af1[None, :], ao1[None, :], az1[None, :], cf1[None, :], co1[None, :]
    bf, bo, bz = load_biases3(BIAS, N, offs_n, mask_n, HAS_BIAS)
    if HAS_H0:
        h0c = tl.load(H0 + b * sH0b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        h0h = tl.load(H0 + b * sH0b + sH0k + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    rows = tl.arange(0, BLOCK_T)
    first = (rows == 0)[:, None]
    lc_carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    lh_carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_cf = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_co = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_f = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_o = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    num_tiles = tl.cdiv(T, BLOCK_T)
    for k in range(0, num_tiles):
        t_hi = T - k * BLOCK_T
        t = t_hi - 1 - rows                      # reversed: row 0 is the latest step of the tile
        valid = t >= 0
        nxt = (t + 1) < T
        m2 = valid[:, None] & mask_n[None, :]
        m2n = (valid & nxt)[:, None] & mask_n[None, :]
        m2p = (t >= 1)[:, None] & mask_n[None, :]
        tt = t.to(tl.int64)[:, None]
        hp = H + b * sHb + tt * sHt + offs_n[None, :]
        hc_t = tl.load(hp, mask=m2, other=0.0).to(tl.float32)
        hh_t = tl.load(hp + sHk, mask=m2, other=0.0).to(tl.float32)
        sc = tl.load(hp - sHt, mask=m2p, other=0.0).to(tl.float32)
        sh = tl.load(hp - sHt + sHk, mask=m2p, other=0.0).to(tl.float32)
        if HAS_H0:
            at0 = (t == 0)[:, None]
            sc = tl.where(at0, h0c[None, :], sc)
            sh = tl.where(at0, h0h[None, :], sh)
        pp = P + b * sPb + tt * sPt + pn[None, :]
        pf, po, pz = load_gates(pp, sPg, m2, bf, bo, bz)
        pf1, po1, pz1 = load_gates(pp + sPt, sPg, m2n, bf, bo, bz)
        gg = G + b * sGb + tt * sGt + offs_n[None, :]
        gh_ = tl.load(gg + sGk, mask=m2, other=0.0).to(tl.float32)
        if HAS_GC:
            gc_ = tl.load(gg, mask=m2, other=0.0).to(tl.float32)
        else:
            gc_ = tl.zeros_like(gh_)
        # J_{t+1} at (h_t, P_{t+1}); the scan element is its transpose
        f1, z1, _, o1, tc1, _ = lstm_gates(hc_t, hh_t, pf1, po1, pz1, af, ao, az, cf, co)
        j11, j12, j21, j22 = lstm_jac(hc_t, f1, z1, o1, tc1, af, ao, az, cf, co)
        kn = (valid & nxt).to(tl.float32)[:, None]
        if HAS_RST:
            rp = RST + b * sRb + t * sRt
            kn = kn * (1.0 - tl.load(rp + sRt, mask=valid & nxt, other=0).to(tl.float32))[:, None]
            k0 = (1.0 - tl.load(rp, mask=valid, other=0).to(tl.float32))[:, None]
            sc = sc * k0
            sh = sh * k0
        m11 = tl.where(first, 0.0, j11 * kn)
        m12 = tl.where(first, 0.0, j21 * kn)
        m21 = tl.where(first, 0.0, j12 * kn)
        m22 = tl.where(first, 0.0, j22 * kn)
        # fold the carried λ_{t_hi} into the first row: b += J_{t_hi}ᵀ λ_{t_hi}
        b1 = tl.where(first, gc_ + kn * (j11 * lc_carry[None, :] + j21 * lh_carry[None, :]), gc_)
        b2 = tl.where(first, gh_ + kn * (j12 * lc_carry[None, :] + j22 * lh_carry[None, :]), gh_)
        _, _, _, _, lc, lh = tl.associative_scan((m11, m12, m21, m22, b1, b2), 0, combine2)
        # local VJP at (h_{t-1}, P_t)
        f, z, cn, o, tc, _ = lstm_gates(sc, sh, pf, po, pz, af, ao, az, cf, co)
        go = lh * tc * o * (1.0 - o)
        dcn = lc + lh * o * (1.0 - tc * tc) + go * co
        gf = dcn * (sc - z) * f * (1.0 - f)
        gz = dcn * (1.0 - f) * (1.0 - z * z)
        gf = tl.where(m2, gf, 0.0)
        go = tl.where(m2, go, 0.0)
        gz = tl.where(m2, gz, 0.0)
        store3(DP + b * sDb + tt * sDt + dn[None, :], sDg, gf, go, gz, m2)
        acc_f += tl.sum(gf * sh, axis=0)
        acc_o += tl.sum(go * sh, axis=0)
        acc_z += tl.sum(gz * sh, axis=0)
        acc_cf += tl.sum(gf * sc, axis=0)
        acc_co += tl.sum(go * cn, axis=0)
        if HAS_BIAS:
            sum_f += tl.sum(gf, axis=0)
            sum_o += tl.sum(go, axis=0)
            sum_z += tl.sum(gz, axis=0)
        last = (rows == (tl.minimum(t_hi, BLOCK_T) - 1))[:, None]
        lc_carry = tl.sum(tl.where(last, lc, 0.0), axis=0)
        lh_carry = tl.sum(tl.where(last, lh, 0.0), axis=0)
    # partials, rows: dA (f, o, z), d bias (f, o, z), then dC (f, o)
    part = PART + b * sPart
    store_partials(part, N, offs_n, mask_n, A, clip, acc_f, acc_o, acc_z, sum_f, sum_o, sum_z, HAS_CLIP, HAS_BIAS)
    store_weight_grad(part + 6 * N, acc_cf, C, offs_n, mask_n, clip, HAS_CLIP)
    store_weight_grad(part + 7 * N, acc_co, C + N, offs_n, mask_n, clip, HAS_CLIP)
    if HAS_H0:
        pf0, po0, pz0 = load_gates(P + b * sPb + pn[None, :], sPg, mask_n[None, :], bf, bo, bz)
        f0, z0, _, o0, tc0, _ = lstm_gates(h0c, h0h, tl.sum(pf0, axis=0), tl.sum(po0, axis=0),
                                           tl.sum(pz0, axis=0), af1, ao1, az1, cf1, co1)
        j11, j12, j21, j22 = lstm_jac(h0c, f0, z0, o0, tc0, af1, ao1, az1, cf1, co1)
        d_c = j11 * lc_carry + j21 * lh_carry
        d_h = j12 * lc_carry + j22 * lh_carry
        if HAS_RST:
            k0 = 1.0 - tl.load(RST + b * sRb).to(tl.float32)
            d_c = d_c * k0
            d_h = d_h * k0
        tl.store(DH0 + b * 2 * N + offs_n, d_c, mask=mask_n)
        tl.store(DH0 + b * 2 * N + N + offs_n, d_h, mask=mask_n)
