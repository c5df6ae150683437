"""Fused Triton kernels for the ParaGRU and ParaLSTM cells.

Public API (see :mod:`kernels.pararnn.api` for the full contract)::

    newton_forward(cell, P, A, C, h0, reset, num_iters=3, want_residual=False) -> (h, residual | None)
    adjoint_backward(cell, P, A, C, h0, reset, h, grad_h) -> (dP, dA, dC | None, dh0 | None)
    available() -> bool

On a machine without a GPU set ``TRITON_INTERPRET=1`` (and import ``kernels.interpreter_shim``)
before importing this package.
"""
from . import _interp
from .api import CONFIGS, METHODS, adjoint_backward, available, newton_forward, pick_method

_interp.apply()  # interpreter only: vectorised custom-combine scans (same values)

__all__ = ["newton_forward", "adjoint_backward", "available", "pick_method", "CONFIGS", "METHODS"]
