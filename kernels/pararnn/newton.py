"""Time-tiled Newton kernels (forward) and tiled adjoint-scan kernels (backward) for ParaGRU/ParaLSTM.

One program owns ``BLOCK_N`` channels of one sequence ``b`` and walks time in tiles of ``BLOCK_T``
steps, carrying the exact final state of each tile into the next one.

Forward, per tile (all in registers):

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
"""
import triton
import triton.language as tl

from ._math import combine1, combine2, gru_gates, gru_jac, lstm_gates, lstm_jac, sigmoid, tanh


# ================================================================================================ GRU
@triton.jit
def gru_newton_fwd_kernel(
    P, A, H0, RST, H, RES,
    T, N,
    sPb, sPt, sPg, sH0b, sRb, sRt, sHb, sHt,
    NUM_ITERS: tl.constexpr, HAS_H0: tl.constexpr, HAS_RST: tl.constexpr, WANT_RES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    az = tl.load(A + offs_n, mask=mask_n, other=0.0)[None, :]
    ar = tl.load(A + N + offs_n, mask=mask_n, other=0.0)[None, :]
    ac = tl.load(A + 2 * N + offs_n, mask=mask_n, other=0.0)[None, :]
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
        pp = P + b * sPb + tt * sPt + offs_n[None, :]
        pz = tl.load(pp, mask=m2, other=0.0).to(tl.float32)
        pr = tl.load(pp + sPg, mask=m2, other=0.0).to(tl.float32)
        pc = tl.load(pp + 2 * sPg, mask=m2, other=0.0).to(tl.float32)
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
            res = tl.maximum(res, tl.max(tl.where(m2, tl.abs(fs - h), 0.0), axis=0))
        tl.store(H + b * sHb + tt * sHt + offs_n[None, :], h.to(H.dtype.element_ty), mask=m2)
        last = tl.minimum(T - t0, BLOCK_T) - 1
        carry = tl.sum(tl.where((rows == last)[:, None], h, 0.0), axis=0)
    if WANT_RES:
        tl.store(RES + (b * tl.num_programs(0) + pid_n), tl.max(res, axis=0))


@triton.jit
def gru_newton_bwd_kernel(
    P, A, H0, RST, H, G, DP, DAP, DH0,
    T, N,
    sPb, sPt, sPg, sH0b, sRb, sRt, sHb, sHt, sGb, sGt, sDb, sDt, sDg,
    HAS_H0: tl.constexpr, HAS_RST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    az1 = tl.load(A + offs_n, mask=mask_n, other=0.0)
    ar1 = tl.load(A + N + offs_n, mask=mask_n, other=0.0)
    ac1 = tl.load(A + 2 * N + offs_n, mask=mask_n, other=0.0)
    az, ar, ac = az1[None, :], ar1[None, :], ac1[None, :]
    if HAS_H0:
        h0 = tl.load(H0 + b * sH0b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    rows = tl.arange(0, BLOCK_T)
    first = (rows == 0)[:, None]
    lam_carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_N], dtype=tl.float32)
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
        pp = P + b * sPb + tt * sPt + offs_n[None, :]
        pz = tl.load(pp, mask=m2, other=0.0).to(tl.float32)
        pr = tl.load(pp + sPg, mask=m2, other=0.0).to(tl.float32)
        pc = tl.load(pp + 2 * sPg, mask=m2, other=0.0).to(tl.float32)
        pz1 = tl.load(pp + sPt, mask=m2n, other=0.0).to(tl.float32)
        pr1 = tl.load(pp + sPt + sPg, mask=m2n, other=0.0).to(tl.float32)
        pc1 = tl.load(pp + sPt + 2 * sPg, mask=m2n, other=0.0).to(tl.float32)
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
        dd = DP + b * sDb + tt * sDt + offs_n[None, :]
        tl.store(dd, gz.to(DP.dtype.element_ty), mask=m2)
        tl.store(dd + sDg, gr.to(DP.dtype.element_ty), mask=m2)
        tl.store(dd + 2 * sDg, gc.to(DP.dtype.element_ty), mask=m2)
        acc_z += tl.sum(tl.where(m2, gz * s, 0.0), axis=0)
        acc_r += tl.sum(tl.where(m2, gr * s, 0.0), axis=0)
        acc_c += tl.sum(tl.where(m2, gc * s * r, 0.0), axis=0)
        last = tl.minimum(t_hi, BLOCK_T) - 1
        lam_carry = tl.sum(tl.where((rows == last)[:, None], lam, 0.0), axis=0)
    dap = DAP + b * 3 * N + offs_n
    tl.store(dap, acc_z, mask=mask_n)
    tl.store(dap + N, acc_r, mask=mask_n)
    tl.store(dap + 2 * N, acc_c, mask=mask_n)
    if HAS_H0:
        # dh0 = J_0ᵀ λ_0 with J_0 at (h0, P_0); lam_carry is λ_0 now
        p0 = P + b * sPb + offs_n
        pz0 = tl.load(p0, mask=mask_n, other=0.0).to(tl.float32)
        pr0 = tl.load(p0 + sPg, mask=mask_n, other=0.0).to(tl.float32)
        pc0 = tl.load(p0 + 2 * sPg, mask=mask_n, other=0.0).to(tl.float32)
        z0, r0, c0, _ = gru_gates(h0, pz0, pr0, pc0, az1, ar1, ac1)
        dh0 = gru_jac(h0, z0, r0, c0, az1, ar1, ac1) * lam_carry
        if HAS_RST:
            dh0 = dh0 * (1.0 - tl.load(RST + b * sRb).to(tl.float32))
        tl.store(DH0 + b * N + offs_n, dh0, mask=mask_n)


# =============================================================================================== LSTM
@triton.jit
def lstm_newton_fwd_kernel(
    P, A, C, H0, RST, H, RES,
    T, N,
    sPb, sPt, sPg, sH0b, sH0k, sRb, sRt, sHb, sHt, sHk,
    NUM_ITERS: tl.constexpr, HAS_H0: tl.constexpr, HAS_RST: tl.constexpr, WANT_RES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    af = tl.load(A + offs_n, mask=mask_n, other=0.0)[None, :]
    ao = tl.load(A + N + offs_n, mask=mask_n, other=0.0)[None, :]
    az = tl.load(A + 2 * N + offs_n, mask=mask_n, other=0.0)[None, :]
    cf = tl.load(C + offs_n, mask=mask_n, other=0.0)[None, :]
    co = tl.load(C + N + offs_n, mask=mask_n, other=0.0)[None, :]
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
        pp = P + b * sPb + tt * sPt + offs_n[None, :]
        pf = tl.load(pp, mask=m2, other=0.0).to(tl.float32)
        po = tl.load(pp + sPg, mask=m2, other=0.0).to(tl.float32)
        pz = tl.load(pp + 2 * sPg, mask=m2, other=0.0).to(tl.float32)
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
            err = tl.maximum(tl.abs(cn - hc), tl.abs(hn - hh))
            res = tl.maximum(res, tl.max(tl.where(m2, err, 0.0), axis=0))
        ho = H + b * sHb + tt * sHt + offs_n[None, :]
        tl.store(ho, hc.to(H.dtype.element_ty), mask=m2)
        tl.store(ho + sHk, hh.to(H.dtype.element_ty), mask=m2)
        last = (rows == (tl.minimum(T - t0, BLOCK_T) - 1))[:, None]
        carry_c = tl.sum(tl.where(last, hc, 0.0), axis=0)
        carry_h = tl.sum(tl.where(last, hh, 0.0), axis=0)
    if WANT_RES:
        tl.store(RES + (b * tl.num_programs(0) + pid_n), tl.max(res, axis=0))


@triton.jit
def lstm_newton_bwd_kernel(
    P, A, C, H0, RST, H, G, DP, DAP, DCP, DH0,
    T, N,
    sPb, sPt, sPg, sH0b, sH0k, sRb, sRt, sHb, sHt, sHk, sGb, sGt, sGk, sDb, sDt, sDg,
    HAS_H0: tl.constexpr, HAS_RST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    af1 = tl.load(A + offs_n, mask=mask_n, other=0.0)
    ao1 = tl.load(A + N + offs_n, mask=mask_n, other=0.0)
    az1 = tl.load(A + 2 * N + offs_n, mask=mask_n, other=0.0)
    cf1 = tl.load(C + offs_n, mask=mask_n, other=0.0)
    co1 = tl.load(C + N + offs_n, mask=mask_n, other=0.0)
    af, ao, az, cf, co = af1[None, :], ao1[None, :], az1[None, :], cf1[None, :], co1[None, :]
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
        pp = P + b * sPb + tt * sPt + offs_n[None, :]
        pf = tl.load(pp, mask=m2, other=0.0).to(tl.float32)
        po = tl.load(pp + sPg, mask=m2, other=0.0).to(tl.float32)
        pz = tl.load(pp + 2 * sPg, mask=m2, other=0.0).to(tl.float32)
        pf1 = tl.load(pp + sPt, mask=m2n, other=0.0).to(tl.float32)
        po1 = tl.load(pp + sPt + sPg, mask=m2n, other=0.0).to(tl.float32)
        pz1 = tl.load(pp + sPt + 2 * sPg, mask=m2n, other=0.0).to(tl.float32)
        gg = G + b * sGb + tt * sGt + offs_n[None, :]
        gc_ = tl.load(gg, mask=m2, other=0.0).to(tl.float32)
        gh_ = tl.load(gg + sGk, mask=m2, other=0.0).to(tl.float32)
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
        dd = DP + b * sDb + tt * sDt + offs_n[None, :]
        tl.store(dd, gf.to(DP.dtype.element_ty), mask=m2)
        tl.store(dd + sDg, go.to(DP.dtype.element_ty), mask=m2)
        tl.store(dd + 2 * sDg, gz.to(DP.dtype.element_ty), mask=m2)
        acc_f += tl.sum(tl.where(m2, gf * sh, 0.0), axis=0)
        acc_o += tl.sum(tl.where(m2, go * sh, 0.0), axis=0)
        acc_z += tl.sum(tl.where(m2, gz * sh, 0.0), axis=0)
        acc_cf += tl.sum(tl.where(m2, gf * sc, 0.0), axis=0)
        acc_co += tl.sum(tl.where(m2, go * cn, 0.0), axis=0)
        last = (rows == (tl.minimum(t_hi, BLOCK_T) - 1))[:, None]
        lc_carry = tl.sum(tl.where(last, lc, 0.0), axis=0)
        lh_carry = tl.sum(tl.where(last, lh, 0.0), axis=0)
    dap = DAP + b * 3 * N + offs_n
    tl.store(dap, acc_f, mask=mask_n)
    tl.store(dap + N, acc_o, mask=mask_n)
    tl.store(dap + 2 * N, acc_z, mask=mask_n)
    dcp = DCP + b * 2 * N + offs_n
    tl.store(dcp, acc_cf, mask=mask_n)
    tl.store(dcp + N, acc_co, mask=mask_n)
    if HAS_H0:
        p0 = P + b * sPb + offs_n
        pf0 = tl.load(p0, mask=mask_n, other=0.0).to(tl.float32)
        po0 = tl.load(p0 + sPg, mask=mask_n, other=0.0).to(tl.float32)
        pz0 = tl.load(p0 + 2 * sPg, mask=mask_n, other=0.0).to(tl.float32)
        f0, z0, _, o0, tc0, _ = lstm_gates(h0c, h0h, pf0, po0, pz0, af1, ao1, az1, cf1, co1)
        j11, j12, j21, j22 = lstm_jac(h0c, f0, z0, o0, tc0, af1, ao1, az1, cf1, co1)
        d_c = j11 * lc_carry + j21 * lh_carry
        d_h = j12 * lc_carry + j22 * lh_carry
        if HAS_RST:
            k0 = 1.0 - tl.load(RST + b * sRb).to(tl.float32)
            d_c = d_c * k0
            d_h = d_h * k0
        tl.store(DH0 + b * 2 * N + offs_n, d_c, mask=mask_n)
        tl.store(DH0 + b * 2 * N + N + offs_n, d_h, mask=mask_n)
