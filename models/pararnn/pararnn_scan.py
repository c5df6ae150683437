"""Linear recurrences ``x_t = J_t x_{t-1} + b_t`` (``x_{-1} = 0``) solved in pure PyTorch.

This is the linear solve inside every Newton step and the adjoint solve of the backward pass. The
parallel solver is the work-efficient odd/even recursion (Blelloch-style): each level combines
neighbouring pairs, halves the problem, recurses, then fills in the other half. That is O(T) work
and O(log T) depth, unlike the recursive doubling of the reference code (O(T log T) work).

Layouts (time is dim 1): states ``[B, T, K, N]`` with Jacobians ``[B, T, K, K, N]``, where
``J[..., i, j, n]`` is d x_i[n] / d x_prev_j[n] (a K×K block per channel n). ``K = 1`` is a diagonal
Jacobian and runs on a cheaper elementwise path.
"""
import torch
from torch import Tensor


def matvec(J: Tensor, x: Tensor) -> Tensor:
    """Block-diagonal product: ``J [..., K, K, N] @ x [..., K, N] -> [..., K, N]``."""
    if J.shape[-2] == 1:
        return J[..., 0, :, :] * x
    return (J * x.unsqueeze(-3)).sum(-2)


def matmul(J1: Tensor, J2: Tensor) -> Tensor:
    """Block-diagonal product of two Jacobians: ``J1 @ J2``, both ``[..., K, K, N]``."""
    if J1.shape[-2] == 1:
        return J1 * J2
    return (J1.unsqueeze(-2) * J2.unsqueeze(-4)).sum(-3)


def transpose(J: Tensor) -> Tensor:
    """Transpose every K×K block of ``J [..., K, K, N]``."""
    return J if J.shape[-2] == 1 else J.transpose(-3, -2)


def _scan(J: Tensor, b: Tensor) -> Tensor:
    T = b.shape[1]
    if T == 1:
        return b
    m = T // 2
    J_even, J_odd = J[:, 0 : 2 * m : 2], J[:, 1 : 2 * m : 2]
    b_even, b_odd = b[:, 0 : 2 * m : 2], b[:, 1 : 2 * m : 2]
    # Odd steps depend only on the previous odd step once each pair is folded together.
    x_odd = _scan(matmul(J_odd, J_even), matvec(J_odd, b_even) + b_odd)
    # Even steps t >= 2 follow from the odd step just before them; t = 0 has no predecessor.
    x_even = torch.cat([b[:, :1], matvec(J[:, 2::2], x_odd[:, : T - m - 1]) + b[:, 2::2]], dim=1)
    x = torch.stack([x_even[:, :m], x_odd], dim=2).flatten(1, 2)
    return torch.cat([x, x_even[:, m:]], dim=1) if T % 2 else x


def linear_scan(J: Tensor, b: Tensor, reverse: bool = False) -> Tensor:
    """Solve a linear recurrence over time with the work-efficient parallel scan.

    Args:
        J: ``[B, T, K, K, N]`` per-step block-diagonal transition. ``J[:, 0]`` is ignored (forward).
        b: ``[B, T, K, N]`` per-step input.
        reverse: if True solve ``x_t = J_t x_{t+1} + b_t`` with ``x_T = 0`` (``J[:, T-1]`` ignored).

    Returns:
        ``x [B, T, K, N]``.
    """
    if reverse:
        return _scan(J.flip(1), b.flip(1)).flip(1)
    return _scan(J, b)


def sequential_scan(J: Tensor, b: Tensor, reverse: bool = False) -> Tensor:
    """The same recurrence as :func:`linear_scan`, one step at a time (the test oracle)."""
    order = range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1])
    x = torch.zeros_like(b[:, 0])
    out = [None] * b.shape[1]
    for t in order:
        x = matvec(J[:, t], x) + b[:, t]
        out[t] = x
    return torch.stack(out, dim=1)
