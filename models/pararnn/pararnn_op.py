"""The ParaRNN op: a cell applied to a whole sequence, as tensor functions with their autograd.Function.

::

    y, h_T = para_gru(x, B, b, A, h0=None, reset=None, mode="parallel", newton_iters=3, clip=None)
    y, h_T = para_lstm(x, B, b, A, C, h0=None, reset=None, ...)
    y, h_T = para_rnn(math, x, B, b, (A, ...), ...)     # any CellMath, e.g. generic_math(transition, K, G)

``x [batch, T, D_in]`` goes through the input map ``B [H, D_in/H, G, N/H]`` (block-diagonal over heads) and
the bias ``b [G, N]`` inside the op, so the Triton path can keep the projection in the layout its GEMM
writes; ``y [batch, T, N]`` is the h part of the trajectory, ``h_T [batch, K, N]`` the final state.

Modes:

* ``"sequential"``: a plain loop with autograd through it (the reference; inference).
* ``"parallel"``: Newton in torch (:mod:`.pararnn_solve`). The forward builds no graph; the backward solves
  the adjoint recurrence with one reverse scan and forms every gradient in closed form.
* ``"triton"``: the same :class:`ParaRNNFunction` over the fused kernels of ``kernels.pararnn`` (repository
  only; exported checkpoints carry this file without them and fall back to ``"parallel"`` with a warning).

Newton cannot fail silently: after the forward, every chain (batch row, channel) whose final residual
``max_t |f(h_{t-1}, P_t) − h_t|`` is above ``fallback_tol`` (or not finite) is solved again exactly (the
sequential loop in torch; the exact sweep kernel, only on those chains, on the Triton path) and counted
in ``fallback_count``. Both cells' states are bounded by 1 in magnitude (convex combinations of the
previous state and a tanh; ``h = o·tanh c``), so an absolute tolerance is one relative to the state
scale. The backward treats the trajectory it gets as exact, so it is exact for the corrected one.
On the Triton path the check costs no host synchronisation: the Newton kernel writes each chain's
residual, and the sweep kernel, launched every time, returns at once for chains that converged.

Sequence parallelism (``seq_group=``, a process group): each rank passes its time chunk of x and reset
(rank r: steps ``[r·T/P, (r+1)·T/P)``); the solves are split exactly over the group (:mod:`.pararnn_seqpar`).
"""
import os
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from .pararnn_math import GRU, LSTM, CellMath
from .pararnn_seqpar import adjoint_carry, all_max, rank_size, resolve_rows, triton_adjoint, triton_solve
from .pararnn_seqpar import newton as split_newton
from .pararnn_solve import (
    adjoint,
    cast,
    chain_residual,
    compute_dtype,
    newton,
    project,
    project_backward,
    project_heads,
    project_heads_backward,
    sequential,
)

MODES = ("sequential", "parallel", "triton")
FALLBACK_TOL = 1e-4  # ~500× fp32 rounding on a converged step (~2e-7); 3-iteration LSTM Newton reaches ~1e-5
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resets_from_cu_seqlens(cu_seqlens: Tensor, length: int) -> Tensor:
    """Reset mask ``[1, length]`` (True where a document starts) from cumulative sequence lengths."""
    reset = torch.zeros(1, length, dtype=torch.bool, device=cu_seqlens.device)
    starts = cu_seqlens[:-1].long()
    reset[0, starts[starts < length]] = True
    return reset


def para_rnn(math: CellMath, x: Tensor, B: Tensor, b: Tensor, rw: tuple, h0: Tensor | None = None,
             reset: Tensor | None = None, *, mode: str = "parallel", newton_iters: int = 3,
             newton_tol: float = 0.0, clip: float | None = None, fallback_tol: float | None = FALLBACK_TOL,
             fallback_count: Tensor | None = None, save_projection: bool = True, return_residual: bool = False,
             seq_group=None):
    """Apply a cell to a whole sequence.

    Args:
        math: the cell's equations (``GRU``, ``LSTM``, or :func:`~.pararnn_math.generic_math`).
        x: ``[batch, T, D_in]`` input, any float dtype (the math runs in fp32, fp64 for fp64).
        B: ``[H, D_in/H, G, N/H]`` input map; b: ``[G, N]`` its bias.
        rw: the recurrent weights as the transition takes them (GRU ``(A,)``, LSTM ``(A, C)``), unclipped.
        h0: ``[batch, K, N]`` initial state, or None (zeros).
        reset: ``[batch, T]`` bool, True where a document starts (the state entering that step is zero).
        mode: ``"sequential"``, ``"parallel"`` or ``"triton"`` (see the module docstring).
        newton_iters: Newton iterations after the initial guess ``f(0, P_t)``.
        newton_tol: if > 0, the torch Newton stops early once the residual max-norm is at most this (a host
            sync per iteration).
        clip: if set, the recurrent weights are clamped to ``[-clip, clip]`` (their gradients are zero where
            the clamp is active, as ``torch.clamp``'s).
        fallback_tol: chains whose final Newton residual is above this (or not finite) are solved again
            exactly; None disables the check.
        fallback_count: a 0-d int64 tensor on x's device; the number of chains solved again is added to it.
        save_projection: keep the projection P for the backward (3N values per token) or redo it there.
        return_residual: also return Newton's final residual max-norm (0-d fp32, before any re-solve; 0 for
            the exact sequential loop and sweep kernel).
        seq_group: a ``torch.distributed`` process group over which the time axis is split (sequence
            parallelism, modes ``"parallel"`` and ``"triton"``): x and reset are this rank's chunk of
            steps, h0 the sequence's initial state (used on the group's rank 0, its gradient returned
            there, zeros elsewhere); the outputs are this chunk's (h_T: its last state), the residual the
            global one, and the parameter gradients this rank's part (sum them over the group). Not under
            torch.compile.

    Returns:
        ``(y [batch, T, N], h_T [batch, K, N])``, plus the residual if ``return_residual``.
    """
    name = f"para_{math.name or 'rnn'}"
    _check(name, math, x, B, h0, reset)
    if mode not in MODES:
        raise ValueError(f"{name}: mode={mode!r} is not one of {', '.join(MODES)}")
    if seq_group is not None and mode == "sequential":
        raise ValueError(f"{name}: sequence parallelism (seq_group) needs mode 'parallel' or 'triton'")
    if mode == "sequential":
        dtype = compute_dtype(x.dtype)
        keep = None if reset is None else (~reset).to(dtype)[:, :, None, None]
        h = sequential(math, project(x, B, b).to(dtype), _clipped(rw, clip, dtype), cast(h0, dtype), keep).to(x.dtype)
        y, final = h[..., -1, :], h[:, -1]
        residual = torch.zeros((), device=x.device) if return_residual else None
    else:
        opts = _Options(_kernels(name, math, x) if mode == "triton" else None, newton_iters, newton_tol, clip,
                        fallback_tol, fallback_count, save_projection, return_residual, seq_group)
        if torch.compiler.is_compiling():  # Dynamo cannot trace the Function; the custom ops hold the same code
            if math.name not in ("gru", "lstm") or seq_group is not None:
                raise NotImplementedError(f"{name}: torch.compile supports the named cells (GRU, LSTM) without "
                                          f"sequence parallelism only")
            from .pararnn_library import apply

            y, final, residual = apply(math.name, opts, x, h0, reset, B, b, rw)
        else:
            y, final, residual = ParaRNNFunction.apply(math, opts, x, h0, reset, B, b, *rw)
    return (y, final, residual) if return_residual else (y, final)


def para_gru(x: Tensor, B: Tensor, b: Tensor, A: Tensor, h0: Tensor | None = None, reset: Tensor | None = None,
             **kwargs):
    """ParaGRU over a sequence (gates z, r, c; ``A [3, N]``, ``B [H, D_in/H, 3, N/H]``, ``b [3, N]``).
    Keyword arguments and returns: :func:`para_rnn` (``h0``, ``h_T``: ``[batch, 1, N]``)."""
    return para_rnn(GRU, x, B, b, (A,), h0, reset, **kwargs)


def para_lstm(x: Tensor, B: Tensor, b: Tensor, A: Tensor, C: Tensor, h0: Tensor | None = None,
              reset: Tensor | None = None, **kwargs):
    """ParaLSTM over a sequence (gates f, o, z; peepholes ``C [2, N]``; state ``[c; h]``: ``h0``, ``h_T``
    ``[batch, 2, N]``). Keyword arguments and returns: :func:`para_rnn`."""
    return para_rnn(LSTM, x, B, b, (A, C), h0, reset, **kwargs)


def _check(name: str, math: CellMath, x: Tensor, B: Tensor, h0: Tensor | None, reset: Tensor | None) -> None:
    width = B.shape[0] * B.shape[1]
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != width:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: x must be [batch, T, {width}], got {shape}")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: x has T=0 steps")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: x dtype {x.dtype} unsupported; expected float16, bfloat16, float32 or float64")
    state = (x.shape[0], math.state_blocks, B.shape[0] * B.shape[3])
    if h0 is not None and tuple(h0.shape) != state:
        raise ValueError(f"{name}: h0 must be [batch, K, N] = {list(state)}, got {list(h0.shape)}")
    if reset is not None and reset.dtype != torch.bool:
        # ~reset on an int 0/1 mask is bitwise (-1/-2), which would silently scale the state.
        raise ValueError(f"{name}: reset must be a bool tensor (True where a document starts), got {reset.dtype}")
    if reset is not None and tuple(reset.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{name}: reset must be [batch, T] = {list(x.shape[:2])}, got {list(reset.shape)}")


def _clipped(rw: tuple, clip: float | None, dtype: torch.dtype) -> tuple:
    return tuple((r.clamp(-clip, clip) if clip else r).to(dtype) for r in rw)


_CUDA_KERNELS: list = []  # kernels.pararnn, once it has run on a CUDA tensor


def _kernels(name: str, math: CellMath, x: Tensor):
    """``kernels.pararnn`` if it can run this cell on x's device, else None (with a warning)."""
    if x.is_cuda and _CUDA_KERNELS and math.name is not None:
        return _CUDA_KERNELS[0]  # found usable before: spare the import and checks on every call
    try:
        from kernels import pararnn as triton_kernels
    except ImportError as err:
        reason = f"kernels.pararnn is not importable ({err})"
    else:
        if math.name is None:
            reason = "this cell has no fused kernel"
        elif not triton_kernels.available() or (x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"):
            reason = "Triton needs a CUDA device (or TRITON_INTERPRET=1)"
        else:
            if x.is_cuda:
                _CUDA_KERNELS[:] = [triton_kernels]
            return triton_kernels
    warnings.warn(f"{name}: mode='triton' unavailable: {reason}; using mode='parallel'", stacklevel=4)
    return None


class _Options(NamedTuple):  # a tuple: built on every call of the hot path, where host time counts
    """What :class:`ParaRNNFunction` needs besides tensors (see :func:`para_rnn`)."""

    kernels: object  # kernels.pararnn, or None for the torch path
    newton_iters: int
    newton_tol: float
    clip: float | None
    fallback_tol: float | None
    fallback_count: Tensor | None
    save_projection: bool
    want_residual: bool
    seq_group: object = None  # a process group splitting the time axis (pararnn_seqpar), or None


class ParaRNNFunction(torch.autograd.Function):
    """Newton forward, adjoint-scan backward, in torch or through the Triton kernels.

    Outputs ``y = h[..., K-1, :]`` (the h part of the trajectory), the final state ``[B, K, N]`` (views of
    the trajectory) and the residual (or None). The recurrent weights come unclipped; the clip is applied
    here (by the kernels on the Triton path) and their gradients are masked where it was active.

    Triton path (the training hot path, kept to few host-side ops because at short T the launch overhead,
    not the GPU, sets the speed): forward = one batched GEMM (:func:`project_heads`) + the solve (bias added
    and weights clipped on load), plus the gated exact sweep when Newton ran; backward = one kernel (dP in
    the GEMM's layout and per-(batch, channel) partials of every parameter gradient) + one sum + two GEMMs
    (dx written straight into x's layout). Torch path: :func:`project`, Newton and the adjoint in torch,
    then ``dx``, ``dB``, ``db`` in closed form (:func:`project_backward`, no autograd).

    Memory: saved are ``x`` (for dB, or to recompute P), the trajectory, ``h0``, ``reset``, the parameters
    and, if ``save_projection``, the projection P: 3N values per token against D_in for x, about 3× the
    activation memory of x, to spare the backward one projection GEMM.
    """

    @staticmethod
    def forward(ctx, math: CellMath, opts: _Options, x, h0, reset, B, b, *rw):
        ctx.set_materialize_grads(False)
        # the backward redoes a projection under the same autocast
        ctx.autocast = autocast_state(x.device.type)
        h, P, residual, carry = solve(math, opts, x, h0, reset, B, b, rw)
        if residual is not None:
            ctx.mark_non_differentiable(residual)
        ctx.math, ctx.opts = math, opts
        # carry: the state entering this chunk (h0 but on the later ranks of a sequence-parallel group)
        ctx.h0_dtype = None if h0 is None else h0.dtype
        ctx.h0_enters = opts.seq_group is None or rank_size(opts.seq_group)[0] == 0
        need_x = ctx.needs_input_grad[5] or not opts.save_projection  # x: for dB, or to recompute P
        ctx.save_for_backward(x if need_x else None, P if opts.save_projection else None, carry, reset, B, b, h, *rw)
        return h[:, :, -1], h[:, -1], residual

    @staticmethod
    def backward(ctx, grad_y, grad_final, _grad_residual):
        x, P, carry, reset, B, b, h, *rw = ctx.saved_tensors
        n_in = 7 + len(rw)
        if grad_y is None and grad_final is None:
            return (None,) * n_in
        Bsz, T, K, N = h.shape
        if grad_final is None and ctx.opts.kernels is not None:
            grad_h = grad_y  # the kernels take the h part alone
        else:
            grad_h = h.new_zeros(Bsz, T, K, N)
            if grad_y is not None:
                grad_h[:, :, -1] = grad_y
            if grad_final is not None:
                grad_h[:, -1] += grad_final
        needs = (ctx.needs_input_grad[2], ctx.needs_input_grad[5], ctx.needs_input_grad[6])
        dx, dB, db, drw, dh0 = gradients(ctx.math, ctx.opts, ctx.autocast, x, P, carry, reset, B, b, h, rw, grad_h,
                                         needs)
        if not ctx.needs_input_grad[3]:
            dh0 = None
        elif ctx.h0_enters:
            dh0 = cast(dh0, ctx.h0_dtype)
        else:  # h0 enters on rank 0 only (dh0 above is the carry's gradient, already sent back)
            dh0 = h.new_zeros(Bsz, K, N, dtype=ctx.h0_dtype)
        return (None, None, dx, dh0, None, dB, db, *drw)


def solve(math: CellMath, opts: _Options, x: Tensor, h0: Tensor | None, reset: Tensor | None, B: Tensor, b: Tensor,
          rw: tuple) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The forward's work (under the caller's autocast): ``(h [batch, T, K, N] in x's dtype, the projection P
    in the layout its path keeps, Newton's residual or None, the state entering this chunk: h0 without
    sequence parallelism)``."""
    kern = opts.kernels
    if kern is not None:
        P = project_heads(x, B)
        solve = dict(newton_iters=opts.newton_iters, residual=opts.want_residual, fallback_tol=opts.fallback_tol,
                     fallback_count=opts.fallback_count, bias=b, clip=opts.clip, out_dtype=x.dtype)
        C = rw[1] if len(rw) > 1 else None
        if opts.seq_group is None:
            h, residual = kern.solve_forward(math.name, P, rw[0], C, h0, reset, **solve)
            return h, P, residual, h0
        h, residual, carry = triton_solve(kern, math, P, rw[0], C, h0, reset, opts.seq_group, **solve)
        return h, P, residual, carry
    P = project(x, B, b)
    h, residual, carry = _torch_forward(math, opts, P, h0, reset, rw)
    return cast(h, x.dtype), P, residual, carry


def gradients(math: CellMath, opts: _Options, autocast: tuple, x: Tensor | None, P: Tensor | None,
              carry: Tensor | None, reset: Tensor | None, B: Tensor, b: Tensor, h: Tensor, rw: tuple,
              grad_h: Tensor, needs: tuple) -> tuple:
    """The backward's work from ``grad_h`` (``[batch, T, K, N]``, or the h part ``[batch, T, N]`` on the
    Triton path): ``(dx, dB, db, d rw, d carry)`` in the dtypes of h, B, b, rw and carry (None without a
    carry), ``carry`` the state entering the chunk (:func:`solve`'s; h0 without sequence parallelism).
    ``needs`` = (dx, dB, db) wanted; ``autocast`` = the forward's :func:`autocast_state`, under which a P
    not saved (None) is recomputed from x."""
    kern = opts.kernels
    if kern is not None:
        if P is None:
            with torch.no_grad(), _autocast(autocast):
                P = project_heads(x, B)
        C = rw[1] if len(rw) > 1 else None
        if opts.seq_group is None:
            dP, dA, dC, db, dh0 = kern.solve_backward(math.name, P, rw[0], C, carry, reset, h, grad_h, bias=b,
                                                      clip=opts.clip)
        else:
            dP, dA, dC, db, dh0 = triton_adjoint(kern, math, P, rw[0], C, carry, reset, h, grad_h, opts.seq_group,
                                                 bias=b, clip=opts.clip)
        drw = (dA,) if dC is None else (dA, dC)
        dx, dB = project_heads_backward(x, B, dP, needs)
    else:
        dx, dB, db, drw, dh0 = _torch_backward(autocast, math, opts, x, P, carry, reset, B, b, h, rw, grad_h,
                                               needs)
    dx, dB = cast(dx, h.dtype), cast(dB, B.dtype)
    db = cast(db, b.dtype) if needs[2] else None
    dh0 = cast(dh0, carry.dtype) if carry is not None else None
    drw = tuple(cast(d, r.dtype) for d, r in zip(drw, rw))
    return dx, dB, db, drw, dh0


def autocast_state(device_type: str) -> tuple:
    """``(device type, dtype, enabled)``: the autocast a backward must redo forward work under."""
    return device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)


def _autocast(state: tuple):
    """The forward's autocast state, for work the backward redoes (it does not run under autocast)."""
    device_type, dtype, enabled = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def _torch_forward(math: CellMath, opts: _Options, P: Tensor, h0: Tensor | None, reset: Tensor | None, rw: tuple):
    """Newton in torch, then the exact re-solve of every batch row with an unconverged chain:
    ``(h, residual or None, the state entering the chunk)``."""
    dtype = compute_dtype(P.dtype)
    P, h0 = cast(P, dtype), cast(h0, dtype)
    keep = None if reset is None else (~reset).to(dtype)[:, :, None, None]
    rp = _clipped(rw, opts.clip, dtype)
    group = opts.seq_group
    if group is None:
        h, carry = newton(math, P, rp, h0, keep, opts.newton_iters, opts.newton_tol), h0
    else:
        h, carry = split_newton(math, P, rp, h0, keep, opts.newton_iters, opts.newton_tol, group)
    if opts.fallback_tol is None and not opts.want_residual:
        return h, None, carry
    chains = chain_residual(math, P, rp, carry, keep, h)  # [B, N]
    if group is not None:
        chains = all_max(chains, group)
    if opts.fallback_tol is not None:
        bad = ~(chains <= opts.fallback_tol)  # NaN is not converged either
        rows = bad.any(-1).nonzero().flatten()  # a host sync on a GPU; this path is not the GPU's hot path
        if rows.numel():
            if group is None:
                with torch.no_grad():
                    h[rows] = sequential(math, P[rows], rp, None if h0 is None else h0[rows],
                                         None if keep is None else keep[rows])
            else:
                carry = resolve_rows(math, P, rp, carry, keep, h, rows, group)
            if opts.fallback_count is not None:
                opts.fallback_count.add_(bad.sum())
    return h, chains.amax() if opts.want_residual else None, carry


def _torch_backward(autocast: tuple, math: CellMath, opts: _Options, x, P, carry, reset, B, b, h, rw, grad_h, needs):
    """The torch path's backward: adjoint scan, then the projection's gradients in closed form."""
    dtype = compute_dtype(h.dtype)
    amp = _autocast(autocast)
    if P is None:
        with torch.no_grad(), amp:
            P = project(x, B, b)
    keep = None if reset is None else (~reset).to(dtype)[:, :, None, None]
    Pc, rp, hc, grad_h = P.to(dtype), _clipped(rw, opts.clip, dtype), h.to(dtype), grad_h.to(dtype)
    carry = cast(carry, dtype)
    if opts.seq_group is not None:  # add the adjoint arriving from the later ranks
        grad_h = adjoint_carry(math, Pc, rp, carry, keep, hc, grad_h, opts.seq_group)
    dP, drp, dh0 = adjoint(math, Pc, rp, carry, keep, hc, grad_h)
    if opts.clip:  # clamp's gradient: zero where the clamp was active
        drp = tuple(d * (r.abs() <= opts.clip) for d, r in zip(drp, rw))
    with amp:  # the projection GEMMs in the activation dtype P had in the forward
        dx, dB, db = project_backward(x, B, dP.to(P.dtype), needs)
    return dx, dB, db, drp, dh0
