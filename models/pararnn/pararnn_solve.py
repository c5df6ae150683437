"""A cell applied to a whole sequence in pure torch: the sequential loop, Newton, the adjoint, the projection.

Plain functions of tensors and a :class:`~.pararnn_math.CellMath` (no autograd.Function, no module):

* :func:`sequential`: ``h_t = f(h_{t-1}, P_t)`` one step at a time (differentiable; the ``"sequential"``
  mode, and the exact re-solve when Newton has not converged).
* :func:`newton`: Newton's method for the whole trajectory. Initial guess ``f(0, P_t)``; each iteration
  solves the linear recurrence ``δ_t = J_t δ_{t-1} + r_t`` (``r_t = f(h_{t-1}, P_t) − h_t``) with the
  work-efficient scan of :mod:`.pararnn_scan`.
* :func:`chain_residual`: ``max_t |f(h_{t-1}, P_t) − h_t|`` per chain (batch row, channel).
* :func:`adjoint`: the backward of the trajectory: ``λ_t = g_t + J_{t+1}ᵀ λ_{t+1}`` by one reverse scan, then
  dP, the recurrent weights' and the initial state's gradients in closed form.
* :func:`project` / :func:`project_heads` and their closed-form backwards: ``P = B x + b`` with the input map
  block-diagonal over heads (``B [H, D_in/H, G, N/H]``; channel ``n = head·N/H + j``).

Shapes: ``P [B, T, G, N]``, states ``[B, T, K, N]``, ``h0 [B, K, N]`` or None (zeros), ``keep [B, T, 1, 1]``
(0 where a document starts: the state entering that step is zero) or None.
"""
import torch
from torch import Tensor

from .pararnn_math import CellMath
from .pararnn_scan import linear_scan, matvec, transpose


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Chains of products over thousands of steps: bf16/fp16 storage is fine, bf16/fp16 math is not.
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t.to(dtype)`` without the call when nothing changes (the triton path is host-bound at short T)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def previous(h: Tensor, h0: Tensor | None, keep: Tensor | None) -> Tensor:
    """The states entering every step: ``h_{t-1}`` (``h0`` or zeros before the first), zero at a reset."""
    first = h0.unsqueeze(1).to(h.dtype) if h0 is not None else torch.zeros_like(h[:, :1])
    prev = torch.cat([first, h[:, :-1]], dim=1)
    return prev if keep is None else prev * keep


def sequential(math: CellMath, P: Tensor, rp: tuple, h0: Tensor | None, keep: Tensor | None) -> Tensor:
    """The exact trajectory ``[B, T, K, N]``, one step at a time, in P's dtype (autograd goes through it)."""
    Bsz, T, _, N = P.shape
    h = h0 if h0 is not None else P.new_zeros(Bsz, math.state_blocks, N)
    out = []
    for t in range(T):
        if keep is not None:
            h = h * keep[:, t]
        h = math.transition(h, P[:, t], *rp)
        out.append(h)
    return torch.stack(out, dim=1)


@torch.no_grad()
def newton(math: CellMath, P: Tensor, rp: tuple, h0: Tensor | None, keep: Tensor | None, iters: int,
           tol: float = 0.0) -> Tensor:
    """Newton's method for the trajectory; ``tol > 0`` stops once the residual max-norm is at most ``tol``
    (a host sync per iteration)."""
    Bsz, T, _, N = P.shape
    prev = P.new_zeros(Bsz, T, math.state_blocks, N)
    if h0 is not None:
        prev[:, 0] = h0
    if keep is not None:
        prev = prev * keep
    h = math.transition(prev, P, *rp)  # f(0, P_t); exact at t = 0
    for _ in range(iters):
        prev = previous(h, h0, keep)
        residual = math.transition(prev, P, *rp) - h
        if tol > 0 and residual.abs().max().item() <= tol:
            break
        J = math.jacobian(prev, P, rp)
        if keep is not None:
            J = J * keep.unsqueeze(-1)
        h = h + linear_scan(J, residual)
    return h


@torch.no_grad()
def chain_residual(math: CellMath, P: Tensor, rp: tuple, h0: Tensor | None, keep: Tensor | None,
                   h: Tensor) -> Tensor:
    """``max_{t, k} |f(h_{t-1}, P_t) − h_t|`` per chain: ``[B, N]`` (NaN where the trajectory is)."""
    return (math.transition(previous(h, h0, keep), P, *rp) - h).abs().amax(dim=(1, 2))


def adjoint(math: CellMath, P: Tensor, rp: tuple, h0: Tensor | None, keep: Tensor | None, h: Tensor,
            grad_h: Tensor) -> tuple[Tensor, tuple, Tensor | None]:
    """Backward of the trajectory (treated as exact): ``(dP, d rp, dh0)`` from ``grad_h = dL/dh``."""
    prev = previous(h, h0, keep)
    J = math.jacobian(prev, P, rp)
    if keep is not None:
        J = J * keep.unsqueeze(-1)
    JT = transpose(J)
    # λ_t = g_t + J_{t+1}ᵀ λ_{t+1}: roll so step t holds J_{t+1}ᵀ (the wrapped-around J_0 is unused).
    lam = linear_scan(torch.roll(JT, -1, dims=1), grad_h, reverse=True)
    dP, drp = math.local_vjp(prev, P, rp, lam)
    dh0 = matvec(JT[:, 0], lam[:, 0]) if h0 is not None else None
    return dP, drp, dh0


# ------------------------------------------------------------------------------------------- projection
def project(x: Tensor, B: Tensor, b: Tensor) -> Tensor:
    """``P [..., T, G, N]`` for every step: ``x [..., T, D_in]`` through the per-head map ``B``, plus ``b``."""
    H, Dh, G, Nh = B.shape
    xh = x.reshape(*x.shape[:-1], H, Dh)
    P = torch.einsum("...hd,hdgn->...ghn", xh, B.to(x.dtype))
    return P.reshape(*x.shape[:-1], G, H * Nh) + b.to(P.dtype)


def project_backward(x: Tensor | None, B: Tensor, dP: Tensor, needs: tuple = (True, True, True)) -> tuple:
    """Gradients of :func:`project` in closed form: ``(dx, dB, db)`` from ``dP [..., T, G, N]``.

    ``needs`` says which of the three to form (the others are None; x is used only for dB). The GEMMs run
    in the dtype autograd through :func:`project` would use (dP's, under the caller's autocast state), db
    is summed in fp32 (fp64 for fp64). The results come in those dtypes; the caller casts them.
    """
    H, Dh, G, Nh = B.shape
    lead = dP.shape[:-2]
    dP = dP.reshape(-1, G, H, Nh)  # rows m = (batch, t); channel n = head·(N/H) + j
    dx = dB = db = None
    if needs[0]:
        dx = torch.einsum("mghj,hdgj->mhd", dP, B.to(dP.dtype)).reshape(*lead, H * Dh)
    if needs[1]:
        dB = torch.einsum("mhd,mghj->hdgj", x.reshape(-1, H, Dh).to(dP.dtype), dP)
    if needs[2]:
        db = dP.sum(0, dtype=compute_dtype(dP.dtype)).reshape(G, H * Nh)
    return dx, dB, db


def project_heads(x: Tensor, B: Tensor) -> Tensor:
    """The projection without bias as one batched GEMM over heads: ``[batch, T, G, H, N/H]``.

    A view of head-major storage ``[H, batch, T, G, N/H]`` (what the GEMM writes; channel
    ``n = head·N/H + j``); the Triton kernels read it in place and add the bias themselves, so the
    forward has no relayout copy and no separate bias add.
    """
    H, Dh, G, Nh = B.shape
    Bsz, T = x.shape[:2]
    xh = x.reshape(Bsz * T, H, Dh).transpose(0, 1)  # [H, M, Dh], a strided view
    Ph = torch.bmm(xh, cast(B.view(H, Dh, G * Nh), x.dtype))
    return Ph.view(H, Bsz, T, G, Nh).permute(1, 2, 3, 0, 4)


def project_heads_backward(x: Tensor | None, B: Tensor, dP: Tensor, needs: tuple) -> tuple:
    """``(dx, dB)`` of :func:`project_heads` from ``dP`` in its layout (head-major storage).

    The GEMMs run in dP's dtype (the cast autocast would have made in the forward).
    """
    H, Dh, G, Nh = B.shape
    Bsz, T = dP.shape[:2]
    dPh = dP.permute(3, 0, 1, 2, 4).reshape(H, Bsz * T, G * Nh)  # a view for head-major dP
    dx = dB = None
    if needs[0]:
        # written straight into x's layout: [H, M, Dh] is a strided view of [M, H·Dh]
        dx = dP.new_empty(Bsz, T, H * Dh)
        torch.bmm(dPh, cast(B.view(H, Dh, G * Nh), dP.dtype).transpose(1, 2),
                  out=dx.view(Bsz * T, H, Dh).transpose(0, 1))
    if needs[1]:
        xh = cast(x.reshape(Bsz * T, H, Dh).permute(1, 2, 0), dP.dtype)  # [H, Dh, M]
        dB = torch.bmm(xh, dPh).view(B.shape)
    return dx, dB
