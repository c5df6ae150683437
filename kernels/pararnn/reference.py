"""Plain sequential torch loop of the two cells: the oracle for the kernel tests and benchmarks.

Differentiable (autograd through the loop), any dtype/device. Same contract as the kernels:
``P [B, T, 3, N]``, ``A [3, N]``, ``C [2, N]`` (LSTM), ``h0 [B, K, N]`` or None, ``reset [B, T]``
bool or None; returns the trajectory ``h [B, T, K, N]``.
"""

import torch
from torch import Tensor


def gru_step(s: Tensor, p: Tensor, A: Tensor) -> Tensor:
    """``s [..., 1, N]``, ``p [..., 3, N]`` -> ``[..., 1, N]``."""
    h = s[..., 0, :]
    z = torch.sigmoid(A[0] * h + p[..., 0, :])
    r = torch.sigmoid(A[1] * h + p[..., 1, :])
    c = torch.tanh(A[2] * (h * r) + p[..., 2, :])
    return (h + z * (c - h)).unsqueeze(-2)


def lstm_step(s: Tensor, p: Tensor, A: Tensor, C: Tensor) -> Tensor:
    """``s [..., 2, N]`` (c, h), ``p [..., 3, N]`` (f, o, z) -> ``[..., 2, N]``."""
    c, h = s[..., 0, :], s[..., 1, :]
    f = torch.sigmoid(A[0] * h + p[..., 0, :] + C[0] * c)
    z = torch.tanh(A[2] * h + p[..., 2, :])
    cn = f * c + (1 - f) * z
    o = torch.sigmoid(A[1] * h + p[..., 1, :] + C[1] * cn)
    return torch.stack([cn, o * torch.tanh(cn)], dim=-2)


def sequential(cell: str, P: Tensor, A: Tensor, C: Tensor | None, h0: Tensor | None,
               reset: Tensor | None) -> Tensor:
    """The exact recurrence, one step at a time, in the dtype of ``P``."""
    B, T, _, N = P.shape
    K = 1 if cell == "gru" else 2
    s = torch.zeros(B, K, N, dtype=P.dtype, device=P.device) if h0 is None else h0.to(P.dtype)
    out = []
    for t in range(T):
        if reset is not None:
            s = s * (~reset[:, t]).to(P.dtype)[:, None, None]
        s = gru_step(s, P[:, t], A) if cell == "gru" else lstm_step(s, P[:, t], A, C)
        out.append(s)
    return torch.stack(out, dim=1)
