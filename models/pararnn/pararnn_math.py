"""The cell equations: ParaGRU and ParaLSTM transitions, Jacobians and local gradients, written once in torch.

A cell is a transition ``h_t = f(h_{t-1}, P_t)`` on a state of K blocks of N channels (``h [..., K, N]``),
driven by the input projection ``P [..., G, N]`` (``P = B x + b``, G gate rows) and a few diagonal recurrent
weights ``rp`` (``[G', N]`` each). Everything is elementwise over channels, so ``df/dh`` is one K×K block per
channel: ``[..., K, K, N]`` with ``J[..., i, j, n] = d f_i[n] / d h_j[n]``.

:class:`CellMath` bundles what the solvers need: the transition, its Jacobian and the local VJP (the
gradients of ``Σ_t <λ_t, f(h_{t-1}, P_t)>`` w.r.t. P and the recurrent weights, the states held fixed).
``GRU`` and ``LSTM`` are analytic; :func:`generic_math` derives the Jacobian and the VJP of any transition
with ``torch.func`` (a new cell then needs only its transition).

The Triton kernels restate these equations in ``kernels/pararnn/_math.py`` (fp32, fast exp/reciprocal);
the tests check both against their own sequential oracle.
"""
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class CellMath:
    """The math of one cell kind.

    Attributes:
        name: the fused Triton kernel's cell name (``"gru"``, ``"lstm"``), or None (no kernel).
        state_blocks: K (the state is ``[..., K, N]``; the Jacobian has K×K blocks).
        num_gates: G, rows of the projection P.
        transition: ``f(h [..., K, N], p [..., G, N], *rp) -> [..., K, N]``.
        jacobian: ``(h, p, rp) -> df/dh [..., K, K, N]``.
        local_vjp: ``(h, p, rp, lam [..., K, N]) -> (dP [..., G, N], (d rp ...))``; the parameter gradients
            are summed over every leading dim.
    """

    name: str | None
    state_blocks: int
    num_gates: int
    transition: Callable
    jacobian: Callable
    local_vjp: Callable


def sum_leading(t: Tensor, keep_dims: int) -> Tensor:
    """Sum over every dim but the last ``keep_dims``."""
    return t.reshape(-1, *t.shape[t.dim() - keep_dims:]).sum(0)


# ---------------------------------------------------------------------------------------------- ParaGRU
def gru_gates(h: Tensor, p: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gates (z, r, c) at previous state ``h [..., N]``."""
    z = torch.sigmoid(A[0] * h + p[..., 0, :])
    r = torch.sigmoid(A[1] * h + p[..., 1, :])
    c = torch.tanh(A[2] * (h * r) + p[..., 2, :])
    return z, r, c


def gru_transition(h: Tensor, p: Tensor, A: Tensor) -> Tensor:
    """``z = σ(a_z h + P_z); r = σ(a_r h + P_r); c = tanh(a_c (h r) + P_c); h' = (1 − z) h + z c``."""
    h = h[..., 0, :]
    z, r, c = gru_gates(h, p, A)
    return (h + z * (c - h)).unsqueeze(-2)


def gru_jacobian(h: Tensor, p: Tensor, rp: tuple) -> Tensor:
    (A,) = rp
    h = h[..., 0, :]
    z, r, c = gru_gates(h, p, A)
    J = (1 - z) + (c - h) * z * (1 - z) * A[0] + z * (1 - c * c) * A[2] * (r + h * r * (1 - r) * A[1])
    return J[..., None, None, :]


def gru_local_vjp(h: Tensor, p: Tensor, rp: tuple, lam: Tensor) -> tuple[Tensor, tuple]:
    (A,) = rp
    h, lam = h[..., 0, :], lam[..., 0, :]
    z, r, c = gru_gates(h, p, A)
    gz = lam * (c - h) * z * (1 - z)
    gc = lam * z * (1 - c * c)
    gr = gc * A[2] * h * r * (1 - r)
    dA = torch.stack([sum_leading(gz * h, 1), sum_leading(gr * h, 1), sum_leading(gc * h * r, 1)])
    return torch.stack([gz, gr, gc], dim=-2), (dA,)


# --------------------------------------------------------------------------------------------- ParaLSTM
def lstm_gates(state: Tensor, p: Tensor, A: Tensor, C: Tensor) -> tuple[Tensor, ...]:
    """``(c, h, f, z, c', o, tanh c')`` at previous state ``[c; h]`` (``state [..., 2, N]``)."""
    c, h = state[..., 0, :], state[..., 1, :]
    f = torch.sigmoid(A[0] * h + p[..., 0, :] + C[0] * c)
    z = torch.tanh(A[2] * h + p[..., 2, :])
    c_new = z + f * (c - z)
    o = torch.sigmoid(A[1] * h + p[..., 1, :] + C[1] * c_new)
    return c, h, f, z, c_new, o, torch.tanh(c_new)


def lstm_transition(state: Tensor, p: Tensor, A: Tensor, C: Tensor) -> Tensor:
    """``f = σ(a_f h + P_f + c_f c); z = tanh(a_z h + P_z); c' = f c + (1 − f) z;
    o = σ(a_o h + P_o + c_o c'); h' = o tanh(c')``."""
    _, _, _, _, c_new, o, tc = lstm_gates(state, p, A, C)
    return torch.stack([c_new, o * tc], dim=-2)


def lstm_jacobian(state: Tensor, p: Tensor, rp: tuple) -> Tensor:
    A, C = rp
    c, h, f, z, c_new, o, tc = lstm_gates(state, p, A, C)
    sf, so, dz, dtc = f * (1 - f), o * (1 - o), 1 - z * z, 1 - tc * tc
    Jcc = f + (c - z) * sf * C[0]
    Jch = (c - z) * sf * A[0] + (1 - f) * dz * A[2]
    u = tc * so
    Jhc = (u * C[1] + o * dtc) * Jcc
    Jhh = u * (A[1] + C[1] * Jch) + o * dtc * Jch
    return torch.stack([torch.stack([Jcc, Jch], dim=-2), torch.stack([Jhc, Jhh], dim=-2)], dim=-3)


def lstm_local_vjp(state: Tensor, p: Tensor, rp: tuple, lam: Tensor) -> tuple[Tensor, tuple]:
    A, C = rp
    c, h, f, z, c_new, o, tc = lstm_gates(state, p, A, C)
    lam_c, lam_h = lam[..., 0, :], lam[..., 1, :]
    go = lam_h * tc * o * (1 - o)
    dc_new = lam_c + lam_h * o * (1 - tc * tc) + go * C[1]
    gf = dc_new * (c - z) * f * (1 - f)
    gz = dc_new * (1 - f) * (1 - z * z)
    dA = torch.stack([sum_leading(gf * h, 1), sum_leading(go * h, 1), sum_leading(gz * h, 1)])
    dC = torch.stack([sum_leading(gf * c, 1), sum_leading(go * c_new, 1)])
    return torch.stack([gf, go, gz], dim=-2), (dA, dC)


GRU = CellMath("gru", 1, 3, gru_transition, gru_jacobian, gru_local_vjp)
LSTM = CellMath("lstm", 2, 3, lstm_transition, lstm_jacobian, lstm_local_vjp)


# ---------------------------------------------------------------------------------- any transition
def autodiff_jacobian(transition: Callable, state_blocks: int) -> Callable:
    """``(h, p, rp) -> df/dh [..., K, K, N]`` by forward-mode autodiff: one JVP per block column (the
    Jacobian is block-diagonal over channels, so a column of ones gives a whole block column)."""
    def jacobian(h, p, rp):
        f = lambda hh: transition(hh, p, *rp)
        columns = []
        for j in range(state_blocks):
            tangent = torch.zeros_like(h)
            tangent[..., j, :] = 1.0
            columns.append(torch.func.jvp(f, (h,), (tangent,))[1])
        return torch.stack(columns, dim=-2)
    return jacobian


def autodiff_local_vjp(transition: Callable) -> Callable:
    """``(h, p, rp, lam) -> (dP, d rp)`` by reverse-mode autodiff (h held fixed)."""
    def local_vjp(h, p, rp, lam):
        _, vjp = torch.func.vjp(lambda pp, *r: transition(h, pp, *r), p, *rp)
        grads = vjp(lam)
        return grads[0], tuple(grads[1:])
    return local_vjp


def generic_math(transition: Callable, state_blocks: int, num_gates: int, name: str | None = None) -> CellMath:
    """The math of a cell given only its transition: Jacobian and local VJP through ``torch.func``."""
    return with_autodiff(CellMath(name, state_blocks, num_gates, transition, None, None))


def with_autodiff(math: CellMath) -> CellMath:
    """``math`` with its analytic Jacobian and VJP replaced by ``torch.func`` ones (to check or prototype them)."""
    return replace(math, jacobian=autodiff_jacobian(math.transition, math.state_blocks),
                   local_vjp=autodiff_local_vjp(math.transition))
