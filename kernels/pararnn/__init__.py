"""Fused Triton kernels for the ParaGRU and ParaLSTM cells (used by ``models.pararnn``'s ``mode="triton"``).

Public API (see :mod:`kernels.pararnn.api` for the full contract)::

    solve_forward(cell, P, A, C, h0, reset, method=None, newton_iters=3, residual=False, fallback_tol=None, ...)
        -> (h, residual | None)
    solve_backward(cell, P, A, C, h0, reset, h, grad_h, method=None, ...) -> (dP, dA, dC, dbias, dh0)
    available() -> bool;  pick_method(cell, B, T, N, direction) -> "newton" | "sweep"

On a machine without a GPU set ``TRITON_INTERPRET=1`` before importing this package.
"""
from .api import CONFIGS, METHODS, available, pick_method, solve_backward, solve_forward

__all__ = ["solve_forward", "solve_backward", "available", "pick_method", "CONFIGS", "METHODS"]
