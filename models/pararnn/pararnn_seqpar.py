"""Sequence parallelism for the ParaRNN op: the time axis of a batch split over a process group, exactly.

Rank r of a group of P holds steps ``[r·T/P, (r+1)·T/P)`` of every row (its *chunk*). A cell couples the
chunks only through the state entering each chunk (its *carry*, ``[B, K, N]``); the rest is local. What
crosses ranks, and why the result is one device's:

**Torch path** (mode ``"parallel"``): the same Newton iterates as one device. The initial guess ``f(0, P_t)``
is local. Every Newton iteration's linear solve ``δ_t = J_t δ_{t-1} + r_t`` is split exactly: each rank
scans its chunk from a zero carry (``δ⁰``) and reduces the chunk to one affine map of the carry,
``δ_end = A_r δ_in + δ⁰_end`` with ``A_r = J_last ⋯ J_first`` (K×K per channel). One all-gather of
``(A_r, δ⁰_end)``, ``B·N·(K²+K)`` numbers per rank, gives each rank its exact ``δ_in`` (the earlier ranks'
maps composed from rank 0's ``δ_in = 0``: h0 is given) and the correction ``δ_t = δ⁰_t + Φ_t δ_in``
(``Φ_t = J_t ⋯ J_first``). That ``δ_in`` is also the update of the previous rank's last state, so the
next iteration's carry needs no other exchange (one more all-gather, of the initial guess's last states,
starts it). Same guess, same iterations, same linear systems solved exactly: the iterates are one
device's up to rounding. ``newton_tol``, the Newton residual and the fallback decide on global values
(all-reduce max), and the fallback re-solves rows exactly rank after rank (point to point).
The backward ``λ_t = g_t + J_{t+1}ᵀ λ_{t+1}`` is linear: a chunk maps the adjoint ``c`` arriving after its
last step to what it sends to the previous rank, ``J_firstᵀ λ_first = A_rᵀ c + o_r`` with
``o_r = Σ_t Φ_tᵀ g_t``; one all-gather of ``(A_r, o_r)``, the later ranks' maps composed from the last
rank's ``c = 0``, and the local adjoint with ``g_last += c_r`` is exact.

**Triton path** (mode ``"triton"``): multiple shooting with the fused kernels doing every local solve.
A state forgets where it started: each rank solves (from a zero state) the last ``window`` steps of its
chunk and hands the end state to the next rank as a guess of its carry; every rank then solves its chunk
from its carry (rank 0: h0) with the kernel. A *round* all-gathers every rank's end state and the carry
it used; a rank whose carry differs from the previous rank's end state by more than the tolerance solves
again from it. Rank 0's carry is exact, so each round fixes at least the next boundary: at most P−1
rounds; with a window longer than the state's memory there are none. The accepted trajectory is the
kernel's own (its tiles continue across the boundary as across any tile) from a carry equal to the
previous rank's end state within ``BOUNDARY_TOL`` (within the rounding of h's dtype, which is what the
carry is read from). The backward is the same with the adjoint: each rank runs the backward kernel
over its first ``window`` steps with nothing arriving after them, the ``dh0`` it gets (``J_firstᵀ λ_first``)
is the previous rank's guess of its adjoint carry, and rounds check it against what the full backward
of the next rank sends (relative tolerance on the carries' scale).

Everywhere: a reset at a chunk's first step zeroes the entering state (its Jacobian is zero, so the
carry has no effect, exactly); a document spanning several chunks is carried through each. The op
returns this rank's part of the trajectory, its chunk's last state (the sequence's final state on the
last rank), the gradient of h0 on rank 0 (zeros elsewhere) and this rank's part of every parameter
gradient: summed over the group (what DDP / FSDP do to any gradient) it is one device's.
"""
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from .pararnn_math import CellMath
from .pararnn_scan import linear_scan, matvec, transpose
from .pararnn_solve import previous, sequential

BOUNDARY_TOL = 1e-6  # Triton path: accepted carry error (states are bounded by 1; adjoints: relative)
WINDOW = 2048  # Triton path: steps of the neighbouring chunk solved to guess a carry

_LOG: list | None = None  # set by record_collectives()


@contextmanager
def record_collectives():
    """Record every collective the op and the LM issue as ``(kind, numel, dtype)`` (what
    ``benchmarks/bench_seqpar.py`` replays alone to time the communication)."""
    global _LOG
    _LOG, log = [], []
    try:
        yield log
    finally:
        log.extend(_LOG)
        _LOG = None


def rank_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather(tensors: tuple, group) -> list:
    """Every rank's copy of each tensor (same shapes on every rank), ``[P, *shape]`` each, in one collective."""
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
    if _LOG is not None:
        _LOG.append(("all_gather", flat.numel(), flat.dtype))
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, flat, group=group)
    stacked = torch.stack(parts)
    out, start = [], 0
    for t in tensors:
        out.append(stacked[:, start:start + t.numel()].reshape(len(parts), *t.shape).to(t.dtype))
        start += t.numel()
    return out


def all_max(t: Tensor, group) -> Tensor:
    """Elementwise max over the group (NaN counts as +inf, whatever the backend does with NaN)."""
    t = t.float().nan_to_num(nan=float("inf"))
    if _LOG is not None:
        _LOG.append(("all_reduce", t.numel(), t.dtype))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


# ------------------------------------------------------------------------------------- chunk summaries
def transfer(J: Tensor) -> Tensor:
    """``Φ_t = J_t ⋯ J_0`` for every step of the chunk, ``[B, T, K, K, N]`` (how the carry reaches step t)."""
    if J.shape[-2] == 1:
        return torch.cumprod(J, dim=1)
    K = J.shape[-2]
    # column j solves x_t = J_t x_{t-1} from x_0 = J_0 e_j: K linear scans, batched
    b = J.new_zeros(K, *J.shape[:2], K, J.shape[-1])
    for j in range(K):
        b[j, :, 0] = J[:, 0, :, j]
    cols = linear_scan(J.repeat(K, 1, 1, 1, 1), b.flatten(0, 1)).unflatten(0, (K, -1))
    return cols.permute(1, 2, 3, 0, 4)


def carry_in(A: Tensor, d: Tensor, rank: int) -> Tensor:
    """What enters chunk ``rank``: the earlier chunks' maps ``x ↦ A_q x + d_q`` composed, from 0 entering chunk 0."""
    x = torch.zeros_like(d[0])
    for q in range(rank):
        x = matvec(A[q], x) + d[q]
    return x


def carry_back(A: Tensor, o: Tensor, rank: int) -> Tensor:
    """The adjoint arriving after chunk ``rank``'s last step: the later chunks' maps ``c ↦ A_qᵀ c + o_q``
    composed, from 0 after the last chunk."""
    c = torch.zeros_like(o[0])
    for q in range(A.shape[0] - 1, rank, -1):
        c = matvec(transpose(A[q]), c) + o[q]
    return c


# ------------------------------------------------------------------------------------------ torch path
@torch.no_grad()
def newton(math: CellMath, P: Tensor, rp: tuple, h0: Tensor | None, keep: Tensor | None, iters: int, tol: float,
           group) -> tuple[Tensor, Tensor | None]:
    """:func:`~.pararnn_solve.newton` over this rank's chunk, the linear solves split exactly (module docstring).

    Returns ``(h, carry)``: the chunk's trajectory and the state entering it (h0 or None on rank 0, the
    previous rank's last state elsewhere)."""
    rank, _ = rank_size(group)
    Bsz, T, _, N = P.shape
    prev = P.new_zeros(Bsz, T, math.state_blocks, N)
    if rank == 0 and h0 is not None:
        prev[:, 0] = h0
    if keep is not None:
        prev = prev * keep
    h = math.transition(prev, P, *rp)  # f(0, P_t), as one device's guess
    (ends,) = all_gather((h[:, -1],), group)
    carry = h0 if rank == 0 else ends[rank - 1]
    for _ in range(iters):
        prev = previous(h, carry, keep)
        residual = math.transition(prev, P, *rp) - h
        if tol > 0 and all_max(residual.abs().amax(), group).item() <= tol:
            break
        J = math.jacobian(prev, P, rp)
        if keep is not None:
            J = J * keep.unsqueeze(-1)
        phi = transfer(J)
        delta = linear_scan(J, residual)  # zero carry-in
        A, d = all_gather((phi[:, -1], delta[:, -1]), group)
        d_in = carry_in(A, d, rank)
        h = h + (delta + matvec(phi, d_in.unsqueeze(1)))
        if rank > 0:
            carry = carry + d_in  # the previous rank's last state, updated as it updates it
    return h, carry


@torch.no_grad()
def resolve_rows(math: CellMath, P: Tensor, rp: tuple, carry: Tensor | None, keep: Tensor | None, h: Tensor,
                 rows: Tensor, group) -> Tensor | None:
    """The exact sequential loop on batch rows ``rows`` (the same on every rank), rank after rank: each
    chunk starts from the previous rank's exact end state (point to point). Updates ``h`` in place and
    returns the new carry."""
    rank, size = rank_size(group)
    start = None if carry is None else carry[rows]
    if rank > 0:
        start = torch.empty_like(h[rows, 0])
        dist.recv(start, src=dist.get_global_rank(group, rank - 1), group=group)
        carry = carry.clone()
        carry[rows] = start
    h[rows] = sequential(math, P[rows], rp, start, None if keep is None else keep[rows])
    if rank < size - 1:
        dist.send(h[rows, -1].contiguous(), dst=dist.get_global_rank(group, rank + 1), group=group)
    return carry


def adjoint_carry(math: CellMath, P: Tensor, rp: tuple, carry: Tensor | None, keep: Tensor | None, h: Tensor,
                  grad_h: Tensor, group) -> Tensor:
    """``grad_h`` with the adjoint arriving from the later ranks added at the chunk's last step."""
    rank, size = rank_size(group)
    Bsz, _, K, N = h.shape
    if rank == 0:  # nobody before it: its map is never used
        A, o = h.new_zeros(Bsz, K, K, N), h.new_zeros(Bsz, K, N)
    else:
        J = math.jacobian(previous(h, carry, keep), P, rp)
        if keep is not None:
            J = J * keep.unsqueeze(-1)
        phi = transfer(J)
        A, o = phi[:, -1], matvec(transpose(phi), grad_h).sum(1)  # o: J_firstᵀ λ_first with nothing arriving
    A, o_all = all_gather((A, o), group)
    if rank == size - 1:
        return grad_h
    grad_h = grad_h.clone()
    grad_h[:, -1] += carry_back(A, o_all, rank)
    return grad_h


# ----------------------------------------------------------------------------------------- triton path
def _settle(run, out_of, carry: Tensor | None, fixed: bool, backward: bool, tol: float, relative: bool, group):
    """Rounds of the multiple shooting (module docstring): ``run(carry)`` solves the chunk, ``out_of(result)``
    is what this rank hands its neighbour (``[B, K, N]``). ``fixed``: this rank's carry is exact (rank 0
    forward, the last rank backward). Returns ``(result, carry, boundary error)``."""
    rank, size = rank_size(group)
    result = run(carry)
    for _ in range(size):
        out = out_of(result).float()
        used = carry.float() if carry is not None else torch.zeros_like(out)
        outs, useds = all_gather((out, used), group)
        # forward: chunk q's carry should be what chunk q-1 ends in; backward: what chunk q+1 sends back
        err = (outs[1:] - useds[:-1]) if backward else (outs[:-1] - useds[1:])
        err = err.abs().amax(dim=(1, 2, 3))  # [P-1]: boundary q|q+1
        limit = tol * (outs.abs().amax() if relative else 1.0)
        bad = err > limit  # NaN (a diverged trajectory) is no carry error: the outputs show it, as on one device
        if not bad.any().item():  # a host sync per round
            return result, carry, err.amax()
        mine = rank if backward else rank - 1  # the boundary whose far side feeds this rank's carry
        if not fixed and bad[mine]:
            carry = outs[rank + 1] if backward else outs[rank - 1]
            result = run(carry)
    raise RuntimeError("pararnn sequence parallel: the chunk carries did not settle")  # impossible: P-1 rounds


def triton_solve(kern, math: CellMath, P: Tensor, A: Tensor, C: Tensor | None, h0: Tensor | None, reset: Tensor | None,
                 group, *, newton_iters: int, residual: bool, fallback_tol: float | None,
                 fallback_count: Tensor | None, bias: Tensor | None, clip: float | None, out_dtype: torch.dtype
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``kern.solve_forward`` over this rank's chunk from a settled carry: ``(h, residual, carry)``.

    The residual is the global max of the kernels' residuals and the boundaries' carry errors."""
    rank, size = rank_size(group)
    name, T = math.name, P.shape[1]
    solve = dict(newton_iters=newton_iters, fallback_tol=fallback_tol, bias=bias, clip=clip)
    W = min(WINDOW, T)
    if rank < size - 1:
        tail, _ = kern.solve_forward(name, P[:, T - W:], A, C, None, None if reset is None else reset[:, T - W:],
                                     out_dtype=torch.float32, **solve)
        guess = tail[:, -1]
    else:  # nobody continues the last chunk
        guess = torch.zeros(P.shape[0], math.state_blocks, A.shape[-1], device=P.device)
    (guesses,) = all_gather((guess,), group)
    carry = h0 if rank == 0 else guesses[rank - 1]
    counts = []

    def run(c):
        count = None if fallback_count is None else torch.zeros_like(fallback_count)
        counts.append(count)
        return kern.solve_forward(name, P, A, C, c, reset, residual=residual, fallback_count=count,
                                  out_dtype=out_dtype, **solve)

    # the end states are read from h: compared in its precision (bf16 rounds a state by up to 4e-3)
    tol = max(BOUNDARY_TOL, torch.finfo(out_dtype).eps)
    (h, res), carry, boundary = _settle(run, lambda r: r[0][:, -1], carry, rank == 0, False, tol, False, group)
    if fallback_count is not None:
        fallback_count.add_(counts[-1])
    if residual:
        # the carries' error is a residual of the boundary steps where h holds the states exactly (fp32)
        res = all_max(torch.maximum(res, boundary) if tol == BOUNDARY_TOL else res, group)
    return h, res, carry


def triton_adjoint(kern, math: CellMath, P: Tensor, A: Tensor, C: Tensor | None, carry: Tensor | None,
                   reset: Tensor | None, h: Tensor, grad_h: Tensor, group, *, bias: Tensor | None,
                   clip: float | None):
    """``kern.solve_backward`` over this rank's chunk with the adjoint arriving from the later ranks
    settled by rounds; returns its ``(dP, dA, dC, dbias, dh0)`` (``dh0``: w.r.t. ``carry``)."""
    rank, size = rank_size(group)
    name, (Bsz, T, K, N) = math.name, h.shape
    solve = dict(bias=bias, clip=clip)
    W = min(WINDOW, T)
    if rank > 0:
        *_, out = kern.solve_backward(name, P[:, :W], A, C, carry, None if reset is None else reset[:, :W],
                                      h[:, :W], grad_h[:, :W], **solve)
    else:
        out = torch.zeros(Bsz, K, N, device=h.device, dtype=torch.float32)
    (outs,) = all_gather((out,), group)
    arriving = outs[rank + 1] if rank < size - 1 else None

    def run(c):
        g = grad_h
        if c is not None:
            g = grad_h.new_zeros(Bsz, T, K, N)
            if grad_h.dim() == 3:
                g[:, :, -1] = grad_h
            else:
                g.copy_(grad_h)
            g[:, -1] += c.to(g.dtype)
        return kern.solve_backward(name, P, A, C, carry, reset, h, g, **solve)

    def sent(result):
        return result[4] if result[4] is not None else torch.zeros(Bsz, K, N, device=h.device)

    result, _, _ = _settle(run, sent, arriving, rank == size - 1, True, BOUNDARY_TOL, True, group)
    return result


# ------------------------------------------------------------------------------------------ LM blocks
class _PreviousTail(torch.autograd.Function):
    """The previous rank's ``x`` (zeros on rank 0); the gradient goes back to the rank it came from."""

    @staticmethod
    def forward(ctx, x: Tensor, group):
        ctx.group = group
        rank, _ = rank_size(group)
        (xs,) = all_gather((x,), group)
        return xs[rank - 1] if rank > 0 else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rank, size = rank_size(ctx.group)
        (grads,) = all_gather((grad,), ctx.group)
        return (grads[rank + 1] if rank < size - 1 else torch.zeros_like(grad)), None


def previous_tail(x: Tensor, length: int, group) -> Tensor:
    """The last ``length`` steps of the previous rank's ``x [B, T, d]`` (zeros on rank 0), differentiable:
    what a causal conv of width ``length + 1`` reads across the chunk boundary."""
    if x.shape[1] < length:
        raise ValueError(f"sequence parallel: a chunk of {x.shape[1]} steps is shorter than the conv window "
                         f"({length} previous steps): use fewer ranks or longer sequences")
    return _PreviousTail.apply(x[:, x.shape[1] - length:], group)
