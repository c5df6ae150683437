"""``mamba_chunk_scan_combined`` as the Mamba2 mixer calls it, with its Triton kernels behind ``torch.library``
custom ops while ``torch.compile`` traces (ours, not mamba-ssm's).

Dynamo cannot trace the vendored autograd.Function whole (autotuned Triton kernels with pre-hooks that
zero their outputs), so a compiled Mamba2 block would break around the scan; as two opaque ops
(``mamba2_ssd::chunk_scan`` and its backward, with fake implementations and the backward registered as
its autograd formula) the block compiles in one graph (``fullgraph=True``) and Inductor fuses the conv,
the gated norm and the casts around them. Eager calls keep the Function.

``seq_idx`` is always passed to the kernels (zeros: one document per row when the caller has none):
``HAS_SEQ_IDX`` is a compile-time constant of most kernels, so a batch without a document boundary
would otherwise compile and autotune a second variant of each of them in the middle of a run.
"""
import torch
from torch import Tensor

from models.pararnn.pararnn_library import register_pair

from .ssd_combined import _mamba_chunk_scan_combined_bwd, _mamba_chunk_scan_combined_fwd, mamba_chunk_scan_combined


def chunk_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor, dt_bias: Tensor,
               seq_idx: Tensor | None = None, dt_softplus: bool = False,
               dt_limit: tuple = (0.0, float("inf"))) -> Tensor:
    """``mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx,
    dt_softplus=dt_softplus, dt_limit=dt_limit)`` (no z, no initial or final states): y ``[b, l, h, p]``."""
    if seq_idx is None:
        seq_idx = torch.zeros(x.shape[:2], dtype=torch.int32, device=x.device)
    if torch.compiler.is_compiling():
        return torch.ops.mamba2_ssd.chunk_scan(x, dt, A, B, C, D, dt_bias, seq_idx, chunk_size, dt_softplus,
                                               float(dt_limit[0]), float(dt_limit[1]))
    return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx,
                                     dt_softplus=dt_softplus, dt_limit=tuple(dt_limit))


def _forward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor, seq_idx: Tensor,
             chunk_size: int, dt_softplus: bool, dt_min: float, dt_max: float) -> Tensor:
    out, *_ = _mamba_chunk_scan_combined_fwd(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx,
                                             dt_softplus=dt_softplus, dt_limit=(dt_min, dt_max))
    return out


def _forward_fake(x, dt, A, B, C, D, dt_bias, seq_idx, chunk_size, dt_softplus, dt_min, dt_max):
    return x.new_empty(x.shape)  # contiguous, as _chunk_scan_fwd allocates it


def _backward(dout: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
              seq_idx: Tensor, out: Tensor, chunk_size: int, dt_softplus: bool, dt_min: float,
              dt_max: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, ddt, dA, dB, dC, dD, ddt_bias)``, contiguous (the kernels allocate them like their inputs,
    which may be strided views)."""
    dx, ddt, dA, dB, dC, dD, _, ddt_bias, _ = _mamba_chunk_scan_combined_bwd(
        dout, x, dt, A, B, C, out, chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=dt_softplus,
        dt_limit=(dt_min, dt_max))
    return tuple(t.contiguous() for t in (dx, ddt, dA, dB, dC, dD, ddt_bias))


def _backward_fake(dout, x, dt, A, B, C, D, dt_bias, seq_idx, out, chunk_size, dt_softplus, dt_min, dt_max):
    new = lambda t, dtype=None: t.new_empty(t.shape, dtype=dtype or t.dtype)  # noqa: E731
    return (new(x), new(dt), new(A, torch.float32), new(B), new(C), new(D), new(dt_bias, torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    x, dt, A, B, C, D, dt_bias, seq_idx, *options = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, seq_idx, output)
    ctx.options = options


def _autograd(ctx, dout):
    x, dt, A, B, C, D, dt_bias, seq_idx, out = ctx.saved_tensors
    grads = torch.ops.mamba2_ssd.chunk_scan_backward(dout, x, dt, A, B, C, D, dt_bias, seq_idx, out, *ctx.options)
    return (*grads, None, None, None, None, None)


register_pair("mamba2_ssd::chunk_scan", _forward, _forward_fake, "mamba2_ssd::chunk_scan_backward", _backward,
              _backward_fake, _autograd, _setup_context)
