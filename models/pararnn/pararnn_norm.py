"""Activation memory of the ParaRNN block (and Mamba2's mixer): what the backward recomputes instead of keeping.

* :func:`gated_rms_norm`, a gated RMSNorm whose backward recomputes::

      gated_rms_norm(x, g, w, eps, norm_before_gate=True)  = RMSNorm(x) · w · SiLU(g)   # ParaRNN (RNNBlock)
      gated_rms_norm(x, g, w, eps, norm_before_gate=False) = RMSNorm(x · SiLU(g)) · w   # Mamba2 (HF's)

  In fp32 inside (fp64 for fp64), returned in x's dtype (bf16 under autocast). Autograd through the plain
  torch expression keeps the fp32 upcasts of ``x`` and ``g`` and the normalised activations, 8–16 bytes per
  channel and token (at Mamba2-1B's inner width, 48 layers, B8·T2048: tens of GiB); this Function keeps its
  inputs (kept by their producers anyway) and the per-token ``1/rms``.
* :func:`recompute_elementwise`: selective activation checkpointing of a region that keeps only its GEMMs'
  outputs (the norms, conv, SiLU and gating between them are redone in the backward).
"""
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


def _forward(x: Tensor, g: Tensor, w: Tensor, rstd: Tensor | None, eps: float, norm_before_gate: bool):
    """``(out, normalised, SiLU(g), 1/rms)`` in fp32 (fp64 for fp64 x); ``rstd`` given: reused (the backward)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    s = F.silu(g.to(dtype))
    u = x.to(dtype) if norm_before_gate else x.to(dtype) * s
    if rstd is None:
        rstd = torch.rsqrt(u.square().mean(-1, keepdim=True) + eps)
    n = u * rstd
    return (n * w * s if norm_before_gate else n * w), n, s, rstd


class GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, g: Tensor, w: Tensor, eps: float, norm_before_gate: bool) -> Tensor:
        out, _, _, rstd = _forward(x, g, w, None, eps, norm_before_gate)
        ctx.save_for_backward(x, g, w, rstd)
        ctx.eps, ctx.norm_before_gate = eps, norm_before_gate
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout: Tensor):
        x, g, w, rstd = ctx.saved_tensors
        _, n, s, _ = _forward(x, g, w, rstd, ctx.eps, ctx.norm_before_gate)
        dout, gc = dout.to(n.dtype), g.to(n.dtype)
        sig = torch.sigmoid(gc)
        ds_dg = sig * (1 + gc * (1 - sig))  # SiLU'
        if ctx.norm_before_gate:  # out = n·w·s
            dw = (dout * n * s).flatten(0, -2).sum(0)
            dg = dout * n * w * ds_dg
            dn = dout * w * s
            dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
        else:  # out = n·w, n = rstd·x·s
            dw = (dout * n).flatten(0, -2).sum(0)
            dn = dout * w
            du = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
            dx, dg = du * s, du * x.to(n.dtype) * ds_dg
        return dx.to(x.dtype), dg.to(g.dtype), dw.to(w.dtype), None, None


def gated_rms_norm(x: Tensor, g: Tensor, weight: Tensor, eps: float, norm_before_gate: bool = True) -> Tensor:
    """See the module docstring: ``x, g [..., d]``, ``weight [d]``; the result in x's dtype."""
    return GatedRMSNorm.apply(x, g, weight, eps, norm_before_gate)


_GEMMS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def _save_gemms(_ctx, op, *_args, **_kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _GEMMS else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_elementwise(fn, *args, enabled: bool = True):
    """``fn(*args)`` whose backward keeps only the region's inputs and its GEMMs' outputs: the norms, casts,
    conv, SiLU and gating between them are redone in the backward (selective activation checkpointing;
    under ``torch.compile`` the partitioner then recomputes them inside its fused backward kernels).
    Only for regions without side effects or collectives (they would run twice). Without grad, or not
    ``enabled``: ``fn(*args)``."""
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, _save_gemms))
