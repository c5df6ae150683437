"""Sequential-in-time sweep kernels: the exact recurrence, one chain per thread.

One program owns ``BLOCK_N`` channels of one sequence (``BLOCK_N = 32·num_warps``: one channel per
thread) and walks time step by step with the state in registers. Inputs are read in chunks of
``CHUNK`` steps as ``[CHUNK, BLOCK_N]`` tiles, one chunk ahead of use (a register double buffer), so
the global-memory latency overlaps the dependent chain of the current chunk. Row ``i`` of a tile is
picked with a ``where``/``sum`` over the chunk axis; with the layout below that reduction is inside
one thread, and the compiler folds it to a register move.

Layout: the batch strides are not specialised (``do_not_specialize``), so the compiler cannot prove
16-byte alignment of a row and does not vectorise along channels; each thread then holds one
channel and the whole chunk axis (``sizePerThread = [1, 1]``, threads and warps along channels).
Reset flags: a ``[CHUNK, 1]`` tile broadcast over channels gets a time-major layout from the
compiler, and every other tile was then converted into it through shared memory (seen in the TTGIR:
a barrier, 190–255 registers, KBs of spills). ``_load_reset`` loads it transposed, with a run-time
zero channel stride ``sRn`` and unspecialised reset strides, which lands on the P tiles' layout.

Forward: no Newton at all, the exact state trajectory; the step uses pre-scaled inputs so that each
gate on the dependent chain is FFMA → EX2 → FADD → RCP (``gru_step_scaled``/``lstm_step_scaled``).
``GATED``: the exact re-solve after a Newton forward, over the H that Newton wrote: a program whose
chains all have a per-chain residual ``RES[b, n] ≤ tol`` returns at once; the others redo all their
channels and add the number of unconverged chains to ``COUNT``.
Backward: the adjoint recurrence
``λ_t = g_t + J_{t+1}ᵀ λ_{t+1}`` walked backwards; the local VJP at step t yields both ``dP_t`` and
``J_tᵀ λ_t`` (the carry into step t − 1), so each step evaluates the cell once.

P's head-split layout, the bias added on load, the weight clip and the gradient partials: ``_io.py``.
"""
import triton
import triton.language as tl

from ._io import (
    chan_offsets,
    load3,
    load_biases3,
    load_weights2,
    load_weights3,
    store3,
    store_partials,
    store_weight_grad,
    unconverged,
)
from ._math import LOG2E, gru_gates, gru_jac, gru_step_scaled, lstm_gates, lstm_jac, lstm_step_scaled


@triton.jit
def _load_reset(base, t, sRt, zero_n, mask):
    """Reset flags of steps ``t [CHUNK]`` broadcast over channels, as a ``[CHUNK, BLOCK_N]`` uint8 tile.

    Loaded as ``[BLOCK_N, CHUNK]`` and transposed: with no contiguity along either dim the
    compiler puts threads along dim 0, which after ``tl.trans`` is the channel dim, the layout of
    the P tiles (a ``[CHUNK, BLOCK_N]`` load would get a time-major layout instead).
    """
    x = tl.load(base + zero_n[:, None] + t[None, :] * sRt, mask=tl.trans(mask), other=0)
    return tl.trans(x)


@triton.jit
def _row(x, sel):
    """Row ``i`` of a ``[CHUNK, BLOCK_N]`` tile (``sel = rows[:, None] == i``): ``[BLOCK_N]``."""
    return tl.sum(tl.where(sel, x, -0.0), axis=0)


# ================================================================================================ GRU
@triton.jit(do_not_specialize=["sPb", "sPh", "NH", "sHb", "sRb", "sRt", "sRn"])
def gru_sweep_fwd_kernel(
    P, BIAS, A, H0, RST, H, RES, COUNT,
    T, N, NH, clip,
    sPb, sPt, sPg, sPh, sH0b, sRb, sRt, sRn, sHb, sHt, tol,
    HAS_BIAS: tl.constexpr, HAS_CLIP: tl.constexpr, IN_HEAD: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_RST: tl.constexpr, GATED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if GATED:
        n_bad = unconverged(RES + b * N, offs_n, mask_n, tol)
        if n_bad == 0:
            return
        tl.atomic_add(COUNT, n_bad.to(tl.int64))
    # parameters and inputs pre-scaled for gru_step_scaled (exponent arguments in log2 units)
    bz, br, bc = load_weights3(A, N, offs_n, mask_n, clip, HAS_CLIP)
    bz, br, bc = bz * (-LOG2E), br * (-LOG2E), bc * (-2.0 * LOG2E)
    ez, er, ec = load_biases3(BIAS, N, offs_n, mask_n, HAS_BIAS)
    ez, er, ec = (ez * (-LOG2E))[None, :], (er * (-LOG2E))[None, :], (ec * (-2.0 * LOG2E))[None, :]
    if HAS_H0:
        s = tl.load(H0 + b * sH0b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
    rows = tl.arange(0, CHUNK)
    zero_n = tl.arange(0, BLOCK_N) * sRn  # sRn = 0 at run time (see the module doc)
    Pb = P + b * sPb + chan_offsets(pid_n, NH, sPh, BLOCK_N, IN_HEAD)[None, :]
    # chunk 0
    m2 = (rows < T)[:, None] & mask_n[None, :]
    nz, nr, nc = load3(Pb + rows.to(tl.int64)[:, None] * sPt, sPg, m2)
    if HAS_RST:
        nk = _load_reset(RST + b * sRb, rows, sRt, zero_n, m2)
    for t0 in range(0, T, CHUNK):
        qz = nz.to(tl.float32) * (-LOG2E) + ez
        qr = nr.to(tl.float32) * (-LOG2E) + er
        qc = nc.to(tl.float32) * (-2.0 * LOG2E) + ec
        if HAS_RST:
            kk = 1.0 - nk.to(tl.float32)
        # prefetch the next chunk
        tn = t0 + CHUNK + rows
        m2n = (tn < T)[:, None] & mask_n[None, :]
        nz, nr, nc = load3(Pb + tn.to(tl.int64)[:, None] * sPt, sPg, m2n)
        if HAS_RST:
            nk = _load_reset(RST + b * sRb, tn, sRt, zero_n, m2n)
        out = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(CHUNK):
            sel = (rows == i)[:, None]
            if HAS_RST:
                s = s * _row(kk, sel)
            s = gru_step_scaled(s, _row(qz, sel), _row(qr, sel), _row(qc, sel), bz, br, bc)
            out = tl.where(sel, s[None, :], out)
        t = t0 + rows
        m2 = (t < T)[:, None] & mask_n[None, :]
        tl.store(H + b * sHb + t.to(tl.int64)[:, None] * sHt + offs_n[None, :],
                 out.to(H.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["sPb", "sPh", "NH", "sHb", "sGb", "sDb", "sDh", "sRb", "sRt", "sRn"])
def gru_sweep_bwd_kernel(
    P, BIAS, A, H0, RST, H, G, DP, PART, DH0,
    T, N, NH, clip,
    sPb, sPt, sPg, sPh, sH0b, sRb, sRt, sRn, sHb, sHt, sGb, sGt, sDb, sDt, sDg, sDh, sPart,
    HAS_BIAS: tl.constexpr, HAS_CLIP: tl.constexpr, IN_HEAD: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_RST: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    az, ar, ac = load_weights3(A, N, offs_n, mask_n, clip, HAS_CLIP)
    bz, br, bc = load_biases3(BIAS, N, offs_n, mask_n, HAS_BIAS)
    bz, br, bc = bz[None, :], br[None, :], bc[None, :]
    if HAS_H0:
        h0 = tl.load(H0 + b * sH0b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    rows = tl.arange(0, CHUNK)
    zero_n = tl.arange(0, BLOCK_N) * sRn  # sRn = 0 at run time (see the module doc)
    Pb = P + b * sPb + chan_offsets(pid_n, NH, sPh, BLOCK_N, IN_HEAD)[None, :]
    Db = DP + b * sDb + chan_offsets(pid_n, NH, sDh, BLOCK_N, IN_HEAD)[None, :]
    Hb = H + b * sHb + offs_n[None, :]
    Gb = G + b * sGb + offs_n[None, :]
    # chunk 0 (the last CHUNK steps, rows in reversed time)
    t = T - 1 - rows
    m2 = (t >= 0)[:, None] & mask_n[None, :]
    m2p = (t >= 1)[:, None] & mask_n[None, :]
    tt = t.to(tl.int64)[:, None]
    ns = tl.load(Hb + (tt - 1) * sHt, mask=m2p, other=0.0)
    nz, nr, nc = load3(Pb + tt * sPt, sPg, m2)
    ng = tl.load(Gb + tt * sGt, mask=m2, other=0.0)
    if HAS_RST:
        nk = _load_reset(RST + b * sRb, t, sRt, zero_n, m2)
    lam_c = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_r = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_c = tl.zeros([BLOCK_N], dtype=tl.float32)
    num_chunks = tl.cdiv(T, CHUNK)
    for k in range(0, num_chunks):
        t_hi = T - k * CHUNK
        t = t_hi - 1 - rows
        s_t = ns.to(tl.float32)
        if HAS_H0:
            s_t = tl.where((t == 0)[:, None], h0[None, :], s_t)
        if HAS_RST:
            kk = 1.0 - nk.to(tl.float32)
            s_t = s_t * kk
        pz = nz.to(tl.float32) + bz
        pr = nr.to(tl.float32) + br
        pc = nc.to(tl.float32) + bc
        g = ng.to(tl.float32)
        # prefetch the next chunk
        tn = t - CHUNK
        m2n = (tn >= 0)[:, None] & mask_n[None, :]
        m2pn = (tn >= 1)[:, None] & mask_n[None, :]
        ttn = tn.to(tl.int64)[:, None]
        ns = tl.load(Hb + (ttn - 1) * sHt, mask=m2pn, other=0.0)
        nz, nr, nc = load3(Pb + ttn * sPt, sPg, m2n)
        ng = tl.load(Gb + ttn * sGt, mask=m2n, other=0.0)
        if HAS_RST:
            nk = _load_reset(RST + b * sRb, tn, sRt, zero_n, m2n)
        oz = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
        orr = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
        oc = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(CHUNK):
            sel = (rows == i)[:, None]
            vi = (t_hi - 1 - i) >= 0
            si = _row(s_t, sel)
            z, r, c, _ = gru_gates(si, _row(pz, sel), _row(pr, sel), _row(pc, sel), az, ar, ac)
            lam = _row(g, sel) + lam_c
            gz = lam * (c - si) * z * (1.0 - z)
            gc = lam * z * (1.0 - c * c)
            gr = gc * ac * si * r * (1.0 - r)
            oz = tl.where(sel, gz[None, :], oz)
            orr = tl.where(sel, gr[None, :], orr)
            oc = tl.where(sel, gc[None, :], oc)
            acc_z += tl.where(vi, gz * si, 0.0)
            acc_r += tl.where(vi, gr * si, 0.0)
            acc_c += tl.where(vi, gc * si * r, 0.0)
            if HAS_BIAS:
                sum_z += tl.where(vi, gz, 0.0)
                sum_r += tl.where(vi, gr, 0.0)
                sum_c += tl.where(vi, gc, 0.0)
            jt = gru_jac(si, z, r, c, az, ar, ac)
            if HAS_RST:
                jt = jt * _row(kk, sel)
            lam_c = tl.where(vi, lam * jt, lam_c)
        m2 = (t >= 0)[:, None] & mask_n[None, :]
        store3(Db + t.to(tl.int64)[:, None] * sDt, sDg, oz, orr, oc, m2)
    # partials, rows: dA (z, r, c), then d bias (z, r, c)
    store_partials(PART + b * sPart, N, offs_n, mask_n, A, clip, acc_z, acc_r, acc_c, sum_z, sum_r, sum_c,
                   HAS_CLIP, HAS_BIAS)
    if HAS_H0:
        tl.store(DH0 + b * N + offs_n, lam_c, mask=mask_n)


# =============================================================================================== LSTM
@triton.jit(do_not_specialize=["sPb", "sPh", "NH", "sHb", "sRb", "sRt", "sRn"])
def lstm_sweep_fwd_kernel(
    P, BIAS, A, C, H0, RST, H, RES, COUNT,
    T, N, NH, clip,
    sPb, sPt, sPg, sPh, sH0b, sH0k, sRb, sRt, sRn, sHb, sHt, sHk, tol,
    HAS_BIAS: tl.constexpr, HAS_CLIP: tl.constexpr, IN_HEAD: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_RST: tl.constexpr, GATED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if GATED:
        n_bad = unconverged(RES + b * N, offs_n, mask_n, tol)
        if n_bad == 0:
            return
        tl.atomic_add(COUNT, n_bad.to(tl.int64))
    # parameters and inputs pre-scaled for lstm_step_scaled (exponent arguments in log2 units)
    bf, bo, bz = load_weights3(A, N, offs_n, mask_n, clip, HAS_CLIP)
    bf, bo, bz = bf * (-LOG2E), bo * (-LOG2E), bz * (-2.0 * LOG2E)
    gf, go = load_weights2(C, N, offs_n, mask_n, clip, HAS_CLIP)
    gf, go = gf * (-LOG2E), go * (-LOG2E)
    ef, eo, ez = load_biases3(BIAS, N, offs_n, mask_n, HAS_BIAS)
    ef, eo, ez = (ef * (-LOG2E))[None, :], (eo * (-LOG2E))[None, :], (ez * (-2.0 * LOG2E))[None, :]
    if HAS_H0:
        sc = tl.load(H0 + b * sH0b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        sh = tl.load(H0 + b * sH0b + sH0k + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        sc = tl.zeros([BLOCK_N], dtype=tl.float32)
        sh = tl.zeros([BLOCK_N], dtype=tl.float32)
    rows = tl.arange(0, CHUNK)
    zero_n = tl.arange(0, BLOCK_N) * sRn  # sRn = 0 at run time (see the module doc)
    Pb = P + b * sPb + chan_offsets(pid_n, NH, sPh, BLOCK_N, IN_HEAD)[None, :]
    m2 = (rows < T)[:, None] & mask_n[None, :]
    nf, no, nz = load3(Pb + rows.to(tl.int64)[:, None] * sPt, sPg, m2)
    if HAS_RST:
        nk = _load_reset(RST + b * sRb, rows, sRt, zero_n, m2)
    for t0 in range(0, T, CHUNK):
        qf = nf.to(tl.float32) * (-LOG2E) + ef
        qo = no.to(tl.float32) * (-LOG2E) + eo
        qz = nz.to(tl.float32) * (-2.0 * LOG2E) + ez
        if HAS_RST:
            kk = 1.0 - nk.to(tl.float32)
        tn = t0 + CHUNK + rows
        m2n = (tn < T)[:, None] & mask_n[None, :]
        nf, no, nz = load3(Pb + tn.to(tl.int64)[:, None] * sPt, sPg, m2n)
        if HAS_RST:
            nk = _load_reset(RST + b * sRb, tn, sRt, zero_n, m2n)
        oc = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
        oh = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(CHUNK):
            sel = (rows == i)[:, None]
            if HAS_RST:
                ki = _row(kk, sel)
                sc = sc * ki
                sh = sh * ki
            sc, sh = lstm_step_scaled(sc, sh, _row(qf, sel), _row(qo, sel), _row(qz, sel),
                                      bf, bo, bz, gf, go)
            oc = tl.where(sel, sc[None, :], oc)
            oh = tl.where(sel, sh[None, :], oh)
        t = t0 + rows
        m2 = (t < T)[:, None] & mask_n[None, :]
        ho = H + b * sHb + t.to(tl.int64)[:, None] * sHt + offs_n[None, :]
        tl.store(ho, oc.to(H.dtype.element_ty), mask=m2)
        tl.store(ho + sHk, oh.to(H.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["sPb", "sPh", "NH", "sHb", "sGb", "sDb", "sDh", "sRb", "sRt", "sRn"])
def lstm_sweep_bwd_kernel(
    P, BIAS, A, C, H0, RST, H, G, DP, PART, DH0,
    T, N, NH, clip,
    sPb, sPt, sPg, sPh, sH0b, sH0k, sRb, sRt, sRn, sHb, sHt, sHk, sGb, sGt, sGk, sDb, sDt, sDg, sDh,
    sPart,
    HAS_BIAS: tl.constexpr, HAS_CLIP: tl.constexpr, IN_HEAD: tl.constexpr, HAS_GC: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_RST: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    af, ao, az = load_weights3(A, N, offs_n, mask_n, clip, HAS_CLIP)
    cf, co = load_weights2(C, N, offs_n, mask_n, clip, HAS_CLIP)
    bf, bo, bz = load_biases3(BIAS, N, offs_n, mask_n, HAS_BIAS)
    bf, bo, bz = bf[None, :], bo[None, :], bz[None, :]
    if HAS_H0:
        h0c = tl.load(H0 + b * sH0b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        h0h = tl.load(H0 + b * sH0b + sH0k + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    rows = tl.arange(0, CHUNK)
    zero_n = tl.arange(0, BLOCK_N) * sRn  # sRn = 0 at run time (see the module doc)
    Pb = P + b * sPb + chan_offsets(pid_n, NH, sPh, BLOCK_N, IN_HEAD)[None, :]
    Db = DP + b * sDb + chan_offsets(pid_n, NH, sDh, BLOCK_N, IN_HEAD)[None, :]
    Hb = H + b * sHb + offs_n[None, :]
    Gb = G + b * sGb + offs_n[None, :]
    t = T - 1 - rows
    m2 = (t >= 0)[:, None] & mask_n[None, :]
    m2p = (t >= 1)[:, None] & mask_n[None, :]
    tt = t.to(tl.int64)[:, None]
    nsc = tl.load(Hb + (tt - 1) * sHt, mask=m2p, other=0.0)
    nsh = tl.load(Hb + (tt - 1) * sHt + sHk, mask=m2p, other=0.0)
    nf, no, nz = load3(Pb + tt * sPt, sPg, m2)
    ngh = tl.load(Gb + tt * sGt + sGk, mask=m2, other=0.0)
    if HAS_GC:
        ngc = tl.load(Gb + tt * sGt, mask=m2, other=0.0)
    if HAS_RST:
        nk = _load_reset(RST + b * sRb, t, sRt, zero_n, m2)
    lc_c = tl.zeros([BLOCK_N], dtype=tl.float32)
    lh_c = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_cf = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_co = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_f = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_o = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    num_chunks = tl.cdiv(T, CHUNK)
    for k in range(0, num_chunks):
        t_hi = T - k * CHUNK
        t = t_hi - 1 - rows
        sct = nsc.to(tl.float32)
        sht = nsh.to(tl.float32)
        if HAS_H0:
            at0 = (t == 0)[:, None]
            sct = tl.where(at0, h0c[None, :], sct)
            sht = tl.where(at0, h0h[None, :], sht)
        if HAS_RST:
            kk = 1.0 - nk.to(tl.float32)
            sct = sct * kk
            sht = sht * kk
        pf = nf.to(tl.float32) + bf
        po = no.to(tl.float32) + bo
        pz = nz.to(tl.float32) + bz
        ght = ngh.to(tl.float32)
        if HAS_GC:
            gct = ngc.to(tl.float32)
        else:
            gct = tl.zeros_like(ght)
        tn = t - CHUNK
        m2n = (tn >= 0)[:, None] & mask_n[None, :]
        m2pn = (tn >= 1)[:, None] & mask_n[None, :]
        ttn = tn.to(tl.int64)[:, None]
        nsc = tl.load(Hb + (ttn - 1) * sHt, mask=m2pn, other=0.0)
        nsh = tl.load(Hb + (ttn - 1) * sHt + sHk, mask=m2pn, other=0.0)
        nf, no, nz = load3(Pb + ttn * sPt, sPg, m2n)
        ngh = tl.load(Gb + ttn * sGt + sGk, mask=m2n, other=0.0)
        if HAS_GC:
            ngc = tl.load(Gb + ttn * sGt, mask=m2n, other=0.0)
        if HAS_RST:
            nk = _load_reset(RST + b * sRb, tn, sRt, zero_n, m2n)
        of = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
        oo = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
        oz = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(CHUNK):
            sel = (rows == i)[:, None]
            vi = (t_hi - 1 - i) >= 0
            sc = _row(sct, sel)
            sh = _row(sht, sel)
            f, z, cn, o, tc, _ = lstm_gates(sc, sh, _row(pf, sel), _row(po, sel), _row(pz, sel),
                                            af, ao, az, cf, co)
            lc = _row(gct, sel) + lc_c
            lh = _row(ght, sel) + lh_c
            go = lh * tc * o * (1.0 - o)
            dcn = lc + lh * o * (1.0 - tc * tc) + go * co
            gf = dcn * (sc - z) * f * (1.0 - f)
            gz = dcn * (1.0 - f) * (1.0 - z * z)
            of = tl.where(sel, gf[None, :], of)
            oo = tl.where(sel, go[None, :], oo)
            oz = tl.where(sel, gz[None, :], oz)
            acc_f += tl.where(vi, gf * sh, 0.0)
            acc_o += tl.where(vi, go * sh, 0.0)
            acc_z += tl.where(vi, gz * sh, 0.0)
            acc_cf += tl.where(vi, gf * sc, 0.0)
            acc_co += tl.where(vi, go * cn, 0.0)
            if HAS_BIAS:
                sum_f += tl.where(vi, gf, 0.0)
                sum_o += tl.where(vi, go, 0.0)
                sum_z += tl.where(vi, gz, 0.0)
            j11, j12, j21, j22 = lstm_jac(sc, f, z, o, tc, af, ao, az, cf, co)
            if HAS_RST:
                ki = _row(kk, sel)
                j11 = j11 * ki
                j12 = j12 * ki
                j21 = j21 * ki
                j22 = j22 * ki
            lc_c = tl.where(vi, j11 * lc + j21 * lh, lc_c)
            lh_c = tl.where(vi, j12 * lc + j22 * lh, lh_c)
        m2 = (t >= 0)[:, None] & mask_n[None, :]
        store3(Db + t.to(tl.int64)[:, None] * sDt, sDg, of, oo, oz, m2)
    # partials, rows: dA (f, o, z), d bias (f, o, z), then dC (f, o)
    part = PART + b * sPart
    store_partials(part, N, offs_n, mask_n, A, clip, acc_f, acc_o, acc_z, sum_f, sum_o, sum_z, HAS_CLIP, HAS_BIAS)
    store_weight_grad(part + 6 * N, acc_cf, C, offs_n, mask_n, clip, HAS_CLIP)
    store_weight_grad(part + 7 * N, acc_co, C + N, offs_n, mask_n, clip, HAS_CLIP)
    if HAS_H0:
        tl.store(DH0 + b * 2 * N + offs_n, lc_c, mask=mask_n)
        tl.store(DH0 + b * 2 * N + N + offs_n, lh_c, mask=mask_n)
