"""The tests' own ParaGRU / ParaLSTM: the cell equations as the paper writes them, one step at a time.

Independent of ``models.pararnn`` and ``kernels.pararnn`` on purpose (nothing is imported from them): the
per-head projection is a loop over heads, each step a plain Python update. Autograd through the loop
gives every gradient, so run it in float64 as the reference.

* ParaGRU, gates (z, r, c)::

      z = σ(a_z h + P_z);  r = σ(a_r h + P_r);  c = tanh(a_c (h r) + P_c);  h' = (1 − z) h + z c

* ParaLSTM (CIFG with peepholes), gates (f, o, z), state (c, h)::

      f = σ(a_f h + P_f + c_f c);  z = tanh(a_z h + P_z);  c' = f c + (1 − f) z
      o = σ(a_o h + P_o + c_o c');  h' = o tanh(c')
"""
import torch
from torch import Tensor

STATE_BLOCKS = {"gru": 1, "lstm": 2}


def gru_step(h: Tensor, p: Tensor, A: Tensor) -> Tensor:
    """``h [..., N]``, ``p [..., 3, N]`` -> the next h."""
    z = torch.sigmoid(A[0] * h + p[..., 0, :])
    r = torch.sigmoid(A[1] * h + p[..., 1, :])
    c = torch.tanh(A[2] * (h * r) + p[..., 2, :])
    return (1 - z) * h + z * c


def lstm_step(c: Tensor, h: Tensor, p: Tensor, A: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """``c, h [..., N]``, ``p [..., 3, N]`` -> the next (c, h)."""
    f = torch.sigmoid(A[0] * h + p[..., 0, :] + C[0] * c)
    z = torch.tanh(A[2] * h + p[..., 2, :])
    c_new = f * c + (1 - f) * z
    o = torch.sigmoid(A[1] * h + p[..., 1, :] + C[1] * c_new)
    return c_new, o * torch.tanh(c_new)


def project(x: Tensor, B: Tensor, b: Tensor) -> Tensor:
    """``x [batch, T, D_in]`` -> ``P [batch, T, G, N]``: head k maps inputs ``k·D/H ..`` to channels ``k·N/H ..``."""
    H, Dh, G, Nh = B.shape
    heads = [torch.einsum("btd,dgn->btgn", x[..., k * Dh:(k + 1) * Dh], B[k]) for k in range(H)]
    return torch.cat(heads, dim=-1) + b


def sequential(cell: str, P: Tensor, A: Tensor, C: Tensor | None, h0: Tensor | None,
               reset: Tensor | None) -> Tensor:
    """The trajectory ``[batch, T, K, N]`` from ``P [batch, T, 3, N]``; ``h0 [batch, K, N]`` (LSTM: (c, h)) or
    None (zeros); ``reset [batch, T]`` bool (the state entering a step where it is True is zero) or None."""
    Bsz, T, _, N = P.shape
    K = STATE_BLOCKS[cell]
    state = [P.new_zeros(Bsz, N) for _ in range(K)] if h0 is None else [h0[:, k] for k in range(K)]
    out = []
    for t in range(T):
        if reset is not None:
            keep = (~reset[:, t]).to(P.dtype)[:, None]
            state = [s * keep for s in state]
        if cell == "gru":
            state = [gru_step(state[0], P[:, t], A)]
        else:
            state = list(lstm_step(state[0], state[1], P[:, t], A, C))
        out.append(torch.stack(state, dim=1))
    return torch.stack(out, dim=1)


def apply(cell: str, x: Tensor, B: Tensor, b: Tensor, A: Tensor, C: Tensor | None = None, h0: Tensor | None = None,
          reset: Tensor | None = None, clip: float | None = None) -> tuple[Tensor, Tensor]:
    """A whole cell: ``(y [batch, T, N], final state [batch, K, N])`` (``clip`` clamps A and C)."""
    if clip is not None:
        A = A.clamp(-clip, clip)
        C = None if C is None else C.clamp(-clip, clip)
    h = sequential(cell, project(x, B, b), A, C, h0, reset)
    return h[:, :, -1], h[:, -1]
