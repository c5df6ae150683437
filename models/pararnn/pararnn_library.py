"""The ParaRNN op as ``torch.library`` custom ops, so that ``torch.compile`` traces a block around the cell
without a graph break (``fullgraph=True``).

Dynamo cannot trace the op's own path: the Triton launches go through a cached compiled launcher, the
torch path re-solves unconverged chains after a data-dependent host check, and neither the options nor
the cell's equations (:class:`~.pararnn_math.CellMath`) are tensors. Here the forward and the backward are
two opaque ops on tensors and plain options, ``pararnn::forward`` and ``pararnn::backward``, whose bodies
are the op's own :func:`~.pararnn_op.solve` and :func:`~.pararnn_op.gradients` (the same code as eager,
Triton or torch path alike), with fake (meta) implementations that give Inductor every output's shape,
dtype and strides, and the backward registered as the forward's autograd formula. The named cells (GRU,
LSTM) go through them; ``para_rnn`` uses them while Dynamo traces (eager calls keep the autograd.Function,
which costs less host time per call).

The autocast state is an explicit argument (``autocast_dtype``): the bodies run under it as the eager op
does (the projection GEMMs in bf16 under bf16 autocast, h in x's dtype), and the fake implementations know
every dtype from it.

Exports carry this file; a process that loads an export beside the repository's package registers the ops
once (the first copy imported serves both: the code is the same).
"""
import torch
from torch import Tensor

from .pararnn_math import GRU, LSTM
from .pararnn_op import _Options, gradients, solve

CELLS = {"gru": GRU, "lstm": LSTM}


def apply(cell: str, opts: _Options, x: Tensor, h0: Tensor | None, reset: Tensor | None, B: Tensor, b: Tensor,
          rw: tuple) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(y, h_T, residual or None)`` as :class:`~.pararnn_op.ParaRNNFunction` returns them, through the ops."""
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    h, _, residual, fallbacks = torch.ops.pararnn.forward(
        x, B, b, rw[0], rw[1] if len(rw) > 1 else None, h0, reset, cell, opts.kernels is not None, opts.newton_iters,
        opts.newton_tol, opts.clip, opts.fallback_tol, opts.save_projection, opts.want_residual, autocast)
    if opts.fallback_count is not None:
        opts.fallback_count.add_(fallbacks)
    return h[:, :, -1], h[:, -1], residual if opts.want_residual else None


def _options(triton: bool, clip: float | None, newton_iters: int = 0, newton_tol: float = 0.0,
             fallback_tol: float | None = None, fallback_count: Tensor | None = None, save_projection: bool = True,
             want_residual: bool = False) -> _Options:
    kernels = None
    if triton:
        from kernels import pararnn as kernels
    return _Options(kernels, newton_iters, newton_tol, clip, fallback_tol, fallback_count, save_projection,
                    want_residual)


def _autocast(device: str, dtype: torch.dtype | None):
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


def _projection_dtype(x: Tensor, autocast: torch.dtype | None) -> torch.dtype:
    # what the projection GEMM writes: autocast leaves float64 alone
    return autocast if autocast is not None and x.dtype != torch.float64 else x.dtype


def _forward(x: Tensor, B: Tensor, b: Tensor, A: Tensor, C: Tensor | None, h0: Tensor | None, reset: Tensor | None,
             cell: str, triton: bool, newton_iters: int, newton_tol: float, clip: float | None,
             fallback_tol: float | None, save_projection: bool, want_residual: bool,
             autocast: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(h [batch, T, K, N] in x's dtype, P (empty unless save_projection), residual (0-d fp32; 0 unless
    want_residual), chains solved again (0-d int64))``. Functional (autograd formulas need it): the
    fallback count comes out as a number for the caller to add to its counter."""
    fallbacks = torch.zeros((), dtype=torch.int64, device=x.device)
    opts = _options(triton, clip, newton_iters, newton_tol, fallback_tol, fallbacks, save_projection, want_residual)
    with _autocast(x.device.type, autocast):
        h, P, residual, _ = solve(CELLS[cell], opts, x, h0, reset, B, b, (A,) if C is None else (A, C))
    if residual is None:
        residual = torch.zeros((), device=x.device)
    return h.contiguous(), P if save_projection else P.new_empty(0), residual, fallbacks


def _forward_fake(x, B, b, A, C, h0, reset, cell, triton, newton_iters, newton_tol, clip, fallback_tol,
                  save_projection, want_residual, autocast):
    Bsz, T = x.shape[:2]
    H, _, G, Nh = B.shape
    h = x.new_empty(Bsz, T, CELLS[cell].state_blocks, H * Nh)
    dtype = _projection_dtype(x, autocast)
    if not save_projection:
        P = x.new_empty(0, dtype=dtype)
    elif triton:  # head-major storage, as one bmm writes it (pararnn_solve.project_heads)
        P = x.new_empty(H, Bsz, T, G, Nh, dtype=dtype).permute(1, 2, 3, 0, 4)
    else:
        P = x.new_empty(Bsz, T, G, H * Nh, dtype=dtype)
    return h, P, x.new_empty((), dtype=torch.float32), x.new_empty((), dtype=torch.int64)


def _backward(grad_h: Tensor, x: Tensor, P: Tensor, h0: Tensor | None, reset: Tensor | None, B: Tensor, b: Tensor,
              h: Tensor, A: Tensor, C: Tensor | None, cell: str, triton: bool, clip: float | None,
              save_projection: bool, autocast: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                          Tensor]:
    """``(dx, dB, db, dA, dC, dh0)``; dC and dh0 are empty without C and h0. Custom ops may not return
    views of one another: the parameter gradients come as rows of one sum on the Triton path, hence the
    clones of the small ones."""
    opts = _options(triton, clip, save_projection=save_projection)
    state = (x.device.type, autocast or torch.get_autocast_dtype(x.device.type), autocast is not None)
    rw = (A,) if C is None else (A, C)
    dx, dB, db, drw, dh0 = gradients(CELLS[cell], opts, state, x, P if save_projection else None, h0, reset, B, b,
                                     h, rw, grad_h, (True, True, True))
    dA, dC = drw[0].clone(), drw[1].clone() if C is not None else A.new_empty(0)
    return (dx.contiguous(), dB.contiguous(), db.clone(), dA, dC,
            dh0.contiguous() if h0 is not None else h.new_empty(0))


def _backward_fake(grad_h, x, P, h0, reset, B, b, h, A, C, cell, triton, clip, save_projection, autocast):
    return (x.new_empty(x.shape, dtype=h.dtype), torch.empty_like(B, memory_format=torch.contiguous_format),
            torch.empty_like(b, memory_format=torch.contiguous_format),
            torch.empty_like(A, memory_format=torch.contiguous_format),
            A.new_empty(0) if C is None else torch.empty_like(C, memory_format=torch.contiguous_format),
            h.new_empty(0) if h0 is None else torch.empty_like(h0, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:
    x, B, b, A, C, h0, reset, cell, triton, _, _, clip, _, save_projection, _, autocast = inputs
    h, P, _, _ = output
    ctx.save_for_backward(x, P, h0, reset, B, b, h, A, C)
    ctx.options = (cell, triton, clip, save_projection, autocast)


def _autograd(ctx, grad_h, _grad_P, _grad_residual, _grad_fallbacks):
    x, P, h0, reset, B, b, h, A, C = ctx.saved_tensors
    dx, dB, db, dA, dC, dh0 = torch.ops.pararnn.backward(grad_h, x, P, h0, reset, B, b, h, A, C, *ctx.options)
    return (dx, dB, db, dA, dC if C is not None else None, dh0 if h0 is not None else None,
            *(None,) * 10)


def register_pair(forward_name: str, forward, forward_fake, backward_name: str, backward, backward_fake, autograd,
                  setup_context) -> None:
    """Two functional custom ops, a forward and its backward, each with its fake implementation, the backward
    registered as the forward's autograd formula (``autograd(ctx, *grads)`` calls the backward op). Also
    used by Mamba2's SSD (``models/mamba2/ssd/ops.py``)."""
    fwd = torch.library.custom_op(forward_name, forward, mutates_args=())
    fwd.register_fake(forward_fake)
    bwd = torch.library.custom_op(backward_name, backward, mutates_args=())
    bwd.register_fake(backward_fake)
    fwd.register_autograd(autograd, setup_context=setup_context)


if not hasattr(torch.ops.pararnn, "forward"):  # else registered by another copy of this file (an export's)
    register_pair("pararnn::forward", _forward, _forward_fake, "pararnn::backward", _backward, _backward_fake,
                  _autograd, _setup_context)
