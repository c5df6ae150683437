"""A whole ParaRNN cell (input projection + fused kernels) as one autograd Function, for benchmarks.

``models.pararnn`` is the project's cell implementation; this module is a lean variant used by
``benchmarks/bench_cells.py`` to measure what the kernels allow once the glue is minimal:

* the block-diagonal input projection is written straight into ``P [B, T, 3, N]`` by one GEMM per
  (head, gate) (``torch.addmm`` into a strided slice: no permute copy, bias fused), or by an einsum;
* the backward forms dx and dB with the same per-(head, gate) GEMMs, and db as a sum of dP;
* P is saved for the backward (``save_P=True``, 3N values per token) or recomputed (one more GEMM).
"""
from typing import Optional

import torch
from torch import Tensor

from .api import adjoint_backward, newton_forward


AUTO_ADDMM_MIN_ROWS = 8192  # proj="auto": per-(head, gate) GEMMs from B·T rows up, else einsum (fewer launches)


def _impl(impl: str, x: Tensor) -> str:
    if impl != "auto":
        return impl
    return "addmm" if x.shape[0] * x.shape[1] >= AUTO_ADDMM_MIN_ROWS else "einsum"


def project(x: Tensor, B: Tensor, b: Tensor, impl: str = "auto") -> Tensor:
    """``x [Bsz, T, D] -> P [Bsz, T, 3, N]`` with ``B [H, D/H, 3, N/H]`` (per head) and ``b [3, N]``."""
    impl = _impl(impl, x)
    Bsz, T, D = x.shape
    H, Dh, G, Nh = B.shape
    N = H * Nh
    B = B.to(x.dtype)
    b = b.to(x.dtype)
    if impl == "einsum":
        P = torch.einsum("mhd,hdgn->mghn", x.reshape(Bsz * T, H, Dh), B)
        return (P.reshape(Bsz, T, G, N) + b)
    M = Bsz * T
    P = torch.empty(Bsz, T, G, N, device=x.device, dtype=x.dtype)
    P2 = P.view(M, G, N)
    with torch.no_grad():  # out= GEMMs: no autograd graph (used inside ParaCellFunction)
        x2 = x.reshape(M, H, Dh)
        for h in range(H):
            xh = x2[:, h, :]
            for g in range(G):
                sl = slice(h * Nh, (h + 1) * Nh)
                torch.addmm(b[g, sl], xh, B[h, :, g, :], out=P2[:, g, sl])
    return P


def project_backward(x: Tensor, B: Tensor, dP: Tensor, impl: str = "auto"):
    """Gradients of :func:`project`: ``(dx [Bsz, T, D], dB [H, D/H, 3, N/H] fp32, db [3, N] fp32)``."""
    impl = _impl(impl, x)
    Bsz, T, D = x.shape
    H, Dh, G, Nh = B.shape
    M = Bsz * T
    Bc = B.to(x.dtype)
    dP2 = dP.reshape(M, G, H, Nh)
    db = dP.reshape(M, G, H * Nh).sum(0, dtype=torch.float32)
    x2 = x.reshape(M, H, Dh)
    if impl == "einsum":
        dx = torch.einsum("mghn,hdgn->mhd", dP2, Bc).reshape(Bsz, T, D)
        dB = torch.einsum("mhd,mghn->hdgn", x2, dP2).float()
        return dx, dB, db
    dx = torch.empty(Bsz, T, D, device=x.device, dtype=x.dtype)
    dx2 = dx.view(M, H, Dh)
    dB = torch.empty(H, Dh, G, Nh, device=x.device, dtype=torch.float32)
    for h in range(H):
        for g in range(G):
            dpg = dP2[:, g, h, :]
            if g == 0:
                torch.mm(dpg, Bc[h, :, g, :].t(), out=dx2[:, h, :])
            else:
                dx2[:, h, :].addmm_(dpg, Bc[h, :, g, :].t())
            dB[h, :, g, :] = torch.mm(x2[:, h, :].t(), dpg)
    return dx, dB, db


class ParaCellFunction(torch.autograd.Function):
    """``y = cell(x)``: projection GEMMs + :func:`newton_forward`; backward via :func:`adjoint_backward`."""

    @staticmethod
    def forward(ctx, cell: str, x: Tensor, B: Tensor, b: Tensor, A: Tensor, C: Optional[Tensor],
                num_iters: int, proj: str, save_P: bool, method_fwd: Optional[str], method_bwd: Optional[str]):
        P = project(x, B, b, proj)
        h, _ = newton_forward(cell, P, A, C, None, None, num_iters, False, method=method_fwd)
        ctx.cell, ctx.proj, ctx.method_bwd = cell, proj, method_bwd
        ctx.save_for_backward(x, B, b, A, C if C is not None else A, h, P if save_P else None)
        ctx.has_C = C is not None
        return h[:, :, -1, :]

    @staticmethod
    def backward(ctx, gy):
        x, B, b, A, C, h, P = ctx.saved_tensors
        C = C if ctx.has_C else None
        if P is None:
            P = project(x, B, b, ctx.proj)
        if h.shape[2] == 1:
            g = gy.unsqueeze(2)  # GRU: the state is the output (a view, no copy)
        else:
            g = torch.zeros_like(h)
            g[:, :, -1, :] = gy
        dP, dA, dC, _ = adjoint_backward(ctx.cell, P, A, C, None, None, h, g, method=ctx.method_bwd)
        dx, dB, db = project_backward(x, B, dP, ctx.proj)
        return (None, dx, dB.to(B.dtype), db.to(b.dtype), dA.to(A.dtype),
                None if dC is None else dC.to(C.dtype), None, None, None, None, None)


def cell_apply(cell: str, x: Tensor, B: Tensor, b: Tensor, A: Tensor, C: Optional[Tensor] = None,
               num_iters: int = 3, proj: str = "auto", save_P: bool = True,
               method_fwd: Optional[str] = None, method_bwd: Optional[str] = None) -> Tensor:
    """Apply a ParaGRU (``C=None``) or ParaLSTM cell to ``x [Bsz, T, D]``; returns ``y [Bsz, T, N]``."""
    return ParaCellFunction.apply(cell, x, B, b, A, C, num_iters, proj, save_P, method_fwd, method_bwd)
