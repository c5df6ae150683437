"""Cell math shared by the ParaRNN Triton kernels (fp32, elementwise, any tensor shape).

GRU (gates z, r, c; state h)::

    z = σ(a_z h + P_z);  r = σ(a_r h + P_r);  c = tanh(a_c (h r) + P_c);  h' = h + z (c − h)

LSTM (CIFG with peepholes; gates f, o, z; state (c, h))::

    f = σ(a_f h + P_f + c_f c);  z = tanh(a_z h + P_z);  c' = z + f (c − z)
    o = σ(a_o h + P_o + c_o c');  h' = o tanh(c')

σ and tanh go through one exponential and one reciprocal each (tanh x = 2σ(2x) − 1): absolute error
~1e-7. On a GPU these are single MUFU instructions, ``ex2.approx.ftz.f32`` and ``rcp.approx.ftz.f32``
(inline PTX): the plain ``tl.exp``/division lower to the non-ftz forms, which wrap every MUFU in
range fix-ups (compare, select, predicated multiplies) that sit on the sequential sweep's critical
path. Under the CPU interpreter (no inline asm) ``tl.exp2`` and a division are used instead.
"""
import os

import triton
import triton.language as tl

FAST = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def ex2(x):
    """2**x (fp32)."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def rcp(x):
    """1/x (fp32)."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def sigmoid(x):
    return rcp(1.0 + ex2(x * (-LOG2E)))


@triton.jit
def tanh(x):
    return 2.0 * rcp(1.0 + ex2(x * (-2.0 * LOG2E))) - 1.0


@triton.jit
def nan_to_inf(x):
    """``x`` with NaN replaced by +inf, so that a max over it reports a diverged solve (max may drop NaN)."""
    return tl.where(x == x, x, float("inf"))


# ---------------------------------------------------------------------------------------------- GRU
@triton.jit
def gru_gates(s, pz, pr, pc, az, ar, ac):
    """Gates and new state at previous state ``s``: returns ``(z, r, c, h')``."""
    z = sigmoid(az * s + pz)
    r = sigmoid(ar * s + pr)
    c = tanh(ac * (s * r) + pc)
    return z, r, c, s + z * (c - s)


@triton.jit
def gru_step_scaled(s, qz, qr, qc, bz, br, bc):
    """New state only, from pre-scaled inputs (the sweep's critical path, shortest dependent chain).

    ``q = (−log2e P_z, −log2e P_r, −2 log2e P_c)``, ``b`` the same scalings of ``(a_z, a_r, a_c)``.
    With ``c = 2R − 1``: ``h' = s + z (c − s) = 2z·R + (s − z s − z)``.
    """
    z = rcp(1.0 + ex2(bz * s + qz))
    r = rcp(1.0 + ex2(br * s + qr))
    R = rcp(1.0 + ex2((bc * s) * r + qc))
    return (2.0 * z) * R + (s - z * s - z)


@triton.jit
def gru_jac(s, z, r, c, az, ar, ac):
    """``dh'/dh`` at previous state ``s`` (diagonal)."""
    zz = z * (1.0 - z)
    return (1.0 - z) + (c - s) * zz * az + z * (1.0 - c * c) * ac * (r + s * r * (1.0 - r) * ar)


# --------------------------------------------------------------------------------------------- LSTM
@triton.jit
def lstm_gates(sc, sh, pf, po, pz, af, ao, az, cf, co):
    """Gates and new state at previous state ``(sc, sh)``: returns ``(f, z, c', o, tanh c', h')``."""
    f = sigmoid(af * sh + pf + cf * sc)
    z = tanh(az * sh + pz)
    cn = z + f * (sc - z)
    o = sigmoid(ao * sh + po + co * cn)
    tc = tanh(cn)
    return f, z, cn, o, tc, o * tc


@triton.jit
def lstm_step_scaled(sc, sh, qf, qo, qz, bf, bo, bz, gf, go):
    """New state ``(c', h')`` from pre-scaled inputs (the sweep's critical path).

    ``q = (−log2e P_f, −log2e P_o, −2 log2e P_z)``, ``b`` the same scalings of ``(a_f, a_o, a_z)``,
    ``g = (−log2e c_f, −log2e c_o)``. ``h' = o (2R − 1) = 2o·R − o``.
    """
    f = rcp(1.0 + ex2(gf * sc + (bf * sh + qf)))
    z = 2.0 * rcp(1.0 + ex2(bz * sh + qz)) - 1.0
    cn = f * (sc - z) + z
    o = rcp(1.0 + ex2(go * cn + (bo * sh + qo)))
    R = rcp(1.0 + ex2(cn * (-2.0 * LOG2E)))
    return cn, (2.0 * o) * R - o


@triton.jit
def lstm_jac(sc, f, z, o, tc, af, ao, az, cf, co):
    """The 2×2 block ``d(c', h')/d(c, h)``: returns ``(Jcc, Jch, Jhc, Jhh)``."""
    sf = f * (1.0 - f)
    Jcc = f + (sc - z) * sf * cf
    Jch = (sc - z) * sf * af + (1.0 - f) * (1.0 - z * z) * az
    u = tc * o * (1.0 - o)
    w = u * co + o * (1.0 - tc * tc)
    return Jcc, Jch, w * Jcc, u * ao + w * Jch


# ---------------------------------------------------------------------------------- scan combiners
@triton.jit
def combine1(a1, b1, a2, b2):
    """Compose ``x -> a1 x + b1`` (earlier) then ``x -> a2 x + b2`` (later)."""
    return a2 * a1, a2 * b1 + b2


@triton.jit
def combine2(a11, a12, a21, a22, b1, b2, c11, c12, c21, c22, d1, d2):
    """Compose 2×2 affine maps: earlier ``(A, b)``, later ``(C, d)`` -> ``(C A, C b + d)``."""
    return (c11 * a11 + c12 * a21, c11 * a12 + c12 * a22,
            c21 * a11 + c22 * a21, c21 * a12 + c22 * a22,
            c11 * b1 + c12 * b2 + d1, c21 * b1 + c22 * b2 + d2)
