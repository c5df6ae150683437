"""The ParaRNN block's short causal depthwise conv: the parallel form over packed documents, the window a
recurrent decode step needs, and that step (``modeling_pararnn.RNNBlock``)."""
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _fused_conv_silu(x: Tensor):
    """The fused Triton conv + SiLU (``kernels.conv``, repository only) if it can run on x's device, else None:
    exports carry this file without the kernels and use the torch form. No cache: this runs inside
    checkpointed regions that ``torch.compile`` traces, where mutating a module-level cache is refused."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    try:
        from kernels.conv import causal_conv_silu
    except ImportError:
        return None
    return causal_conv_silu


class CausalDepthwiseConv(nn.Module):
    """Short causal depthwise conv whose window never reaches back across a document start."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(dim, kernel))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, positions: Tensor | None, prefix: Tensor | None = None) -> Tensor:
        """``prefix [B, kernel-1, d]``: the inputs before ``x`` (zeros if None: the sequence starts here).
        Computed in the weights' dtype, returned in x's (bf16 under autocast, like the GEMM outputs): the
        cell then takes, saves and returns bf16, half the bytes of fp32."""
        # weight[:, -1] is the tap on the current step, weight[:, -1 - j] the tap j steps back.
        k1, T = self.kernel - 1, x.shape[1]
        ext = F.pad(x, (0, 0, k1, 0)) if prefix is None else torch.cat([prefix.to(x.dtype), x], dim=1)
        out = x * self.weight[:, -1]
        for j in range(1, self.kernel):
            shifted = ext[:, k1 - j:k1 - j + T]
            if positions is not None:
                shifted = shifted * (positions >= j).unsqueeze(-1).to(x.dtype)
            out = out + shifted * self.weight[:, -1 - j]
        return (out + self.bias).to(x.dtype)

    def silu(self, x: Tensor, positions: Tensor | None, prefix: Tensor | None = None, fused: bool = False) -> Tensor:
        """``SiLU(self(x, positions, prefix))``; ``fused``: by the Triton kernel where it can run (no prefix:
        not under sequence parallelism), one read of x and one write, fp32 inside (the torch form rounds the
        conv to x's dtype before the SiLU)."""
        kernel = _fused_conv_silu(x) if fused and prefix is None else None
        if kernel is not None:
            return kernel(x, self.weight, self.bias, positions)
        return F.silu(self(x, positions, prefix))

    def tail(self, x: Tensor, positions: Tensor | None) -> Tensor:
        """The window the next step needs: the last ``kernel - 1`` inputs ``[B, kernel-1, d]``, zero before the
        current document's start (and before the sequence), so a step sees what :meth:`forward` would."""
        k1 = self.kernel - 1
        tail = F.pad(x[:, -k1:], (0, 0, max(0, k1 - x.shape[1]), 0)) if k1 > 0 else x[:, :0]
        if positions is not None and k1 > 0:
            # Entry i is (k1 - i) steps before the next token; it belongs to the current document iff the last
            # token's position (its distance from the document start) is at least k1 - 1 - i.
            back = torch.arange(k1 - 1, -1, -1, device=x.device)
            tail = tail * (positions[:, -1:] >= back).unsqueeze(-1).to(x.dtype)
        return tail

    def step(self, x_t: Tensor, window: Tensor):
        """One step: ``x_t [B, d]`` and the window ``[B, kernel-1, d]`` -> ``(y_t [B, d], new window)``."""
        full = torch.cat([window.to(x_t.dtype), x_t.unsqueeze(1)], dim=1)  # full[:, i] meets weight[:, i]
        y = (full * self.weight.t()).sum(1) + self.bias
        return y.to(x_t.dtype), full[:, 1:]
