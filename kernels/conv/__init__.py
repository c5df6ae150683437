"""Fused causal depthwise conv + SiLU over packed documents (the ParaRNN block's conv before the cell).

Public API (see :mod:`kernels.conv.conv_silu`)::

    causal_conv_silu(v, weight, bias, positions=None) -> SiLU(conv(v))      # differentiable, torch.compile-able

On a machine without a GPU set ``TRITON_INTERPRET=1`` before importing this package.
"""
from .conv_silu import causal_conv_silu

__all__ = ["causal_conv_silu"]
