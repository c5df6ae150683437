"""ParaGRU and ParaLSTM: nonlinear RNN cells applied to a whole sequence at once by Newton's method.

A cell is a transition ``h_t = f(h_{t-1}, P_t)`` whose Jacobian ``df/dh`` is diagonal (ParaGRU) or
2×2 block-diagonal (ParaLSTM), where ``P = B x + b`` is the input projection for every step at once.
Three ways to apply it (``mode``):

* ``"sequential"``: a plain loop with autograd through it. The oracle for tests, and inference.
* ``"parallel"``: Newton in pure torch. Initial guess ``f(0, P_t)``; each iteration solves the linear
  recurrence ``δ_t = J_t δ_{t-1} + r_t`` with the work-efficient scan of :mod:`pararnn_scan`. It is a
  ``torch.autograd.Function``: the forward builds no graph; the backward solves the adjoint recurrence
  ``λ_t = g_t + J_{t+1}ᵀ λ_{t+1}`` with one reverse scan and forms the input, parameter and initial-state
  gradients from λ in closed form (the projection's too: dx, dB, db are einsums of dP, no autograd).
  Saved: ``x``, the state trajectory and, if ``save_projection`` (default), the projection P.
* ``"triton"``: the same Function with the fused Triton kernels of ``kernels.pararnn`` (repository
  only; exported checkpoints ship this file without them and fall back to ``"parallel"``).

A new cell needs only :meth:`ParaRNNCell.transition`: the parallel mode then gets its Jacobians and
local gradients through ``torch.func``. ParaGRU and ParaLSTM override both with analytic formulas.

This file, ``pararnn_scan.py`` and the configuration/modeling files are copied into exported
checkpoints, so they use only torch and relative imports.
"""
import math
import warnings

import torch
from torch import Tensor, nn

from .pararnn_scan import linear_scan, matvec, transpose

MODES = ("sequential", "parallel", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INITS = ("paper", "reference")


def resets_from_cu_seqlens(cu_seqlens: Tensor, length: int) -> Tensor:
    """Reset mask ``[1, length]`` (True where a document starts) from cumulative sequence lengths."""
    reset = torch.zeros(1, length, dtype=torch.bool, device=cu_seqlens.device)
    starts = cu_seqlens[:-1].long()
    reset[0, starts[starts < length]] = True
    return reset


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t.to(dtype)`` without the call when nothing changes (the triton path is host-bound at short T)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Chains of products over thousands of steps: bf16/fp16 storage is fine, bf16/fp16 math is not.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shift(h: Tensor, h0: Tensor | None) -> Tensor:
    """Previous states ``h_{t-1}`` for every t; ``h0`` (or zeros) before the first step."""
    first = h0.unsqueeze(1).to(h.dtype) if h0 is not None else torch.zeros_like(h[:, :1])
    return torch.cat([first, h[:, :-1]], dim=1)


def _sum_leading(t: Tensor, keep_dims: int) -> Tensor:
    return t.reshape(-1, *t.shape[t.dim() - keep_dims :]).sum(0)


class ParaRNNCell(nn.Module):
    """Base class of the parallel nonlinear RNN cells (see the module docstring).

    Args:
        input_dim: width D_in of the input x.
        state_dim: width N of one state variable (the output width).
        num_heads: H; the input map B is block-diagonal over heads. Must divide D_in and N.
        mode: ``"sequential"``, ``"parallel"`` or ``"triton"``.
        newton_iters: Newton iterations after the initial guess (3 suffices, as in the paper).
        newton_tol: if > 0, stop early once the residual max-norm is at most this (costs a host sync).
        clip: if set, the diagonal recurrent weights (A, and C for ParaLSTM) are clamped to
            ``[-clip, clip]`` in the forward pass (the paper clips at 0.5 for LMs).
        init: ``"paper"`` (the LM initialisation of the paper's App. C.1) or ``"reference"`` (the
            released code's defaults).
        autodiff_jacobians: use ``torch.func`` for the Jacobians and local gradients even where
            analytic ones exist (to check them, or to prototype).

    Subclasses set ``num_gates`` (rows of P) and ``state_blocks`` (K: the state has K·N values and
    the Jacobian K×K blocks) and implement :meth:`transition`.
    """

    num_gates = 3
    state_blocks = 1
    kernel_name: str | None = None
    # Parallel modes: keep P for the backward (G·N values per token, vs D_in for x) or recompute it
    # there (one more GEMM). Set False on an instance for memory-bound large models.
    save_projection = True

    def __init__(self, input_dim: int, state_dim: int, num_heads: int = 2, mode: str = "parallel",
                 newton_iters: int = 3, newton_tol: float = 0.0, clip: float | None = None,
                 init: str = "paper", autodiff_jacobians: bool = False):
        super().__init__()
        name = type(self).__name__
        for key, value in (("input_dim", input_dim), ("state_dim", state_dim), ("num_heads", num_heads)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: {key} must be a positive int, got {value!r}")
        for key, value in (("input_dim", input_dim), ("state_dim", state_dim)):
            if value % num_heads:
                raise ValueError(f"{name}: {key}={value} is not divisible by num_heads={num_heads}")
        if not isinstance(newton_iters, int) or newton_iters < 1:
            raise ValueError(f"{name}: newton_iters must be an int >= 1, got {newton_iters!r}")
        if init not in _INITS:
            raise ValueError(f"{name}: init={init!r} is not one of {', '.join(_INITS)}")
        if clip is not None and clip <= 0:
            raise ValueError(f"{name}: clip must be positive or None, got {clip!r}")
        self.input_dim, self.state_dim, self.num_heads = input_dim, state_dim, num_heads
        self.mode = mode
        self.newton_iters, self.newton_tol, self.clip = newton_iters, float(newton_tol), clip
        self.init, self.autodiff_jacobians = init, autodiff_jacobians
        G, N, H = self.num_gates, state_dim, num_heads
        self.A = nn.Parameter(torch.empty(G, N))
        self.B = nn.Parameter(torch.empty(H, input_dim // H, G, N // H))
        self.b = nn.Parameter(torch.empty(G, N))
        self.track_residual = False
        self.last_residual: Tensor | None = None
        if type(self).__init__ is ParaRNNCell.__init__:
            # A subclass that defines only transition() must not be left with torch.empty weights.
            self.reset_parameters()

    # ------------------------------------------------------------------ configuration
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"{type(self).__name__}: mode={value!r} is not one of {', '.join(MODES)}")
        self._mode = value

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, state_dim={self.state_dim}, num_heads={self.num_heads}, "
                f"mode={self.mode!r}, newton_iters={self.newton_iters}, clip={self.clip}")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        N, H = self.state_dim, self.num_heads
        fan_in = self.input_dim // H
        if self.init == "paper":
            # App. C.1: Kaiming-uniform input map, small truncated-Gaussian diagonals, zero biases.
            bound = math.sqrt(3.0 / fan_in)
            self.B.uniform_(-bound, bound)
            for p in self.recurrent_weights():
                nn.init.trunc_normal_(p, std=1.0 / math.sqrt(N), a=-0.9, b=0.9)
            self.b.zero_()
        else:
            fan_out = N if self.state_blocks == 1 else N // H
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            self.B.uniform_(-bound, bound)
            for p in self.recurrent_weights():
                p.normal_(0.0, 2.0 / math.sqrt(5 * N))
            self.b.zero_()
            self.b[0] = -torch.linspace(0.0, 1.0, N)

    def recurrent_weights(self) -> list:
        """The diagonal recurrent parameters (clipped together, passed to :meth:`transition`)."""
        return [self.A]

    def recurrent_params(self) -> tuple:
        """The recurrent parameters as the transition sees them (clipped if ``clip`` is set)."""
        weights = self.recurrent_weights()
        return tuple(w.clamp(-self.clip, self.clip) if self.clip else w for w in weights)

    # ------------------------------------------------------------------ the math
    def project(self, x: Tensor, B: Tensor, b: Tensor) -> Tensor:
        """Input projection for every step: ``x [..., T, D_in] -> P [..., T, G, N]`` (per-head B)."""
        H, G = self.num_heads, self.num_gates
        xh = x.reshape(*x.shape[:-1], H, self.input_dim // H)
        P = torch.einsum("...hd,hdgn->...ghn", xh, B.to(x.dtype))
        return P.reshape(*x.shape[:-1], G, self.state_dim) + b.to(P.dtype)

    def project_backward(self, x: Tensor | None, B: Tensor, dP: Tensor,
                         needs: tuple = (True, True, True)) -> tuple:
        """Gradients of :meth:`project` in closed form: ``(dx, dB, db)`` from ``dP [..., T, G, N]``.

        ``needs`` says which of the three to form (the others are None; x is used only for dB). The
        GEMMs run in the dtype autograd through :meth:`project` would use (dP's, under the caller's
        autocast state), db is summed in fp32 (fp64 for fp64). The results come in those dtypes; the
        caller casts them to the input/parameter dtypes. A subclass that overrides :meth:`project`
        must override this too.
        """
        H, G = self.num_heads, self.num_gates
        Nh, Dh = self.state_dim // H, self.input_dim // H
        lead = dP.shape[:-2]
        dP = dP.reshape(-1, G, H, Nh)  # rows m = (batch, t); channel n = head·(N/H) + j
        dx = dB = db = None
        if needs[0]:
            dx = torch.einsum("mghj,hdgj->mhd", dP, B.to(dP.dtype)).reshape(*lead, self.input_dim)
        if needs[1]:
            dB = torch.einsum("mhd,mghj->hdgj", x.reshape(-1, H, Dh).to(dP.dtype), dP)
        if needs[2]:
            db = dP.sum(0, dtype=_compute_dtype(dP.dtype)).reshape(G, self.state_dim)
        return dx, dB, db

    def project_heads(self, x: Tensor, B: Tensor) -> Tensor:
        """The projection without bias as one batched GEMM over heads: ``[batch, T, G, H, N/H]``.

        A view of head-major storage ``[H, batch, T, G, N/H]`` (what the GEMM writes; channel
        ``n = head·N/H + j``); the Triton kernels read it in place and add the bias themselves, so
        the forward has no relayout copy and no separate bias add.
        """
        H, G = self.num_heads, self.num_gates
        Bsz, T = x.shape[:2]
        Dh, Nh = self.input_dim // H, self.state_dim // H
        xh = x.reshape(Bsz * T, H, Dh).transpose(0, 1)  # [H, M, Dh], a strided view
        Ph = torch.bmm(xh, _cast(B.view(H, Dh, G * Nh), x.dtype))
        return Ph.view(H, Bsz, T, G, Nh).permute(1, 2, 3, 0, 4)

    def project_heads_backward(self, x: Tensor | None, B: Tensor, dP: Tensor, needs: tuple) -> tuple:
        """``(dx, dB)`` of :meth:`project_heads` from ``dP`` in its layout (head-major storage).

        The GEMMs run in dP's dtype (the cast autocast would have made in the forward).
        """
        H, G = self.num_heads, self.num_gates
        Bsz, T = dP.shape[:2]
        Dh, Nh = self.input_dim // H, self.state_dim // H
        dPh = dP.permute(3, 0, 1, 2, 4).reshape(H, Bsz * T, G * Nh)  # a view for head-major dP
        dx = dB = None
        if needs[0]:
            # written straight into x's layout: [H, M, Dh] is a strided view of [M, H·Dh]
            dx = dP.new_empty(Bsz, T, self.input_dim)
            torch.bmm(dPh, _cast(B.view(H, Dh, G * Nh), dP.dtype).transpose(1, 2),
                      out=dx.view(Bsz * T, H, Dh).transpose(0, 1))
        if needs[1]:
            xh = _cast(x.reshape(Bsz * T, H, Dh).permute(1, 2, 0), dP.dtype)  # [H, Dh, M]
            dB = torch.bmm(xh, dPh).view(B.shape)
        return dx, dB

    @staticmethod
    def transition(h: Tensor, p: Tensor, *rp: Tensor) -> Tensor:
        """``f(h_{t-1}, P_t)``: ``h [..., K, N]``, ``p [..., G, N]``, recurrent params -> ``[..., K, N]``."""
        raise NotImplementedError

    def jacobian(self, h: Tensor, p: Tensor, rp: tuple) -> Tensor:
        """``df/dh`` at ``(h, p)`` as K×K blocks ``[..., K, K, N]``; here by forward-mode autodiff."""
        f = lambda hh: self.transition(hh, p, *rp)  # noqa: E731
        columns = []
        for j in range(self.state_blocks):
            tangent = torch.zeros_like(h)
            tangent[..., j, :] = 1.0
            # The Jacobian is block-diagonal over channels, so one JVP per block column gives it all.
            columns.append(torch.func.jvp(f, (h,), (tangent,))[1])
        return torch.stack(columns, dim=-2)

    def local_vjp(self, h: Tensor, p: Tensor, rp: tuple, lam: Tensor) -> tuple:
        """Gradients of ``Σ_t <λ_t, f(h_{t-1}, P_t)>`` w.r.t. P and the recurrent params, h held fixed.

        Returns ``(dP [..., G, N], (d rp...))``; here by reverse-mode autodiff.
        """
        _, vjp = torch.func.vjp(lambda pp, *r: self.transition(h, pp, *r), p, *rp)
        grads = vjp(lam)
        return grads[0], tuple(grads[1:])

    def _jacobian(self, h, p, rp):
        return ParaRNNCell.jacobian(self, h, p, rp) if self.autodiff_jacobians else self.jacobian(h, p, rp)

    def _local_vjp(self, h, p, rp, lam):
        if self.autodiff_jacobians:
            return ParaRNNCell.local_vjp(self, h, p, rp, lam)
        return self.local_vjp(h, p, rp, lam)

    # ------------------------------------------------------------------ application
    def _check_inputs(self, x: Tensor, state: Tensor | None, reset: Tensor | None) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.input_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: x must be [batch, T, {self.input_dim}], got {shape}")
        if x.shape[1] == 0:
            raise ValueError(f"{name}: x has T=0 steps")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: x dtype {x.dtype} unsupported; expected float16, bfloat16, "
                             f"float32 or float64")
        width = self.state_blocks * self.state_dim
        if state is not None and tuple(state.shape) != (x.shape[0], width):
            raise ValueError(f"{name}: state must be [batch, {width}] = [{x.shape[0]}, {width}], "
                             f"got {tuple(state.shape)}")
        if reset is not None and reset.dtype != torch.bool:
            # ~reset on an int 0/1 mask is bitwise (-1/-2), which would silently scale the state.
            raise ValueError(f"{name}: reset must be a bool tensor (True where a document starts), "
                             f"got {reset.dtype}")
        if reset is not None and tuple(reset.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{name}: reset must be [batch, T] = {list(x.shape[:2])}, got {list(reset.shape)}")

    def _backend(self, x: Tensor):
        if self.mode != "triton":
            return None
        if x.is_cuda and _CUDA_KERNELS:
            return _CUDA_KERNELS[0]  # found usable before: spare the import and checks on every call
        reason = None
        try:
            from kernels import pararnn as triton_kernels
        except ImportError as err:
            reason = f"kernels.pararnn is not importable ({err})"
        else:
            if self.kernel_name is None:
                reason = f"{type(self).__name__} has no fused kernel"
            elif not triton_kernels.available() or (x.device.type != "cuda" and not _interpreting()):
                reason = "Triton needs a CUDA device (or TRITON_INTERPRET=1)"
            else:
                if x.is_cuda:
                    _CUDA_KERNELS[:] = [triton_kernels]
                return triton_kernels
        warnings.warn(f"{type(self).__name__}: mode='triton' unavailable: {reason}; using mode='parallel'",
                      stacklevel=3)
        return None

    def forward(self, x: Tensor, state: Tensor | None = None, return_state: bool = False,
                reset: Tensor | None = None, cu_seqlens: Tensor | None = None):
        """Apply the cell to a whole sequence.

        Args:
            x: ``[batch, T, D_in]`` input.
            state: optional initial state ``[batch, K·N]`` (ParaLSTM: ``[c; h]``).
            return_state: also return the final state.
            reset: optional ``[batch, T]`` bool, True where a document starts: the state entering that
                step is zero, so nothing crosses a document boundary of a packed row.
            cu_seqlens: alternative to ``reset`` for ``batch == 1``: cumulative document lengths.

        Returns:
            ``y [batch, T, N]`` (the h part of the state), or ``(y, final_state [batch, K·N])``.
        """
        if cu_seqlens is not None:
            if x.shape[0] != 1 or reset is not None:
                raise ValueError(f"{type(self).__name__}: cu_seqlens needs batch 1 and no reset mask")
            reset = resets_from_cu_seqlens(cu_seqlens, x.shape[1])
        self._check_inputs(x, state, reset)
        Bsz, K, N = x.shape[0], self.state_blocks, self.state_dim
        h0 = state.reshape(Bsz, K, N) if state is not None else None
        if self.mode == "sequential":
            hs = self._sequential(x, h0, reset, self.recurrent_params())
            y, final = hs[..., -1, :], hs[:, -1]
        else:
            y, final = _NewtonApply.apply(self, self._backend(x), x, h0, reset, self.B, self.b,
                                          *self.recurrent_weights())
        return (y, final.reshape(Bsz, K * N)) if return_state else y

    def _sequential(self, x, h0, reset, rp):
        dtype = _compute_dtype(x.dtype)
        P = self.project(x, self.B, self.b).to(dtype)
        rp = tuple(r.to(dtype) for r in rp)
        h = torch.zeros(x.shape[0], self.state_blocks, self.state_dim, dtype=dtype, device=x.device)
        if h0 is not None:
            h = h0.to(dtype)
        out = []
        for t in range(x.shape[1]):
            if reset is not None:
                h = h * (~reset[:, t, None, None]).to(dtype)
            h = self.transition(h, P[:, t], *rp)
            out.append(h)
        return torch.stack(out, dim=1).to(x.dtype)

    @torch.no_grad()
    def _newton(self, P: Tensor, rp: tuple, h0: Tensor | None, keep: Tensor | None):
        """Newton's method for the state trajectory in pure torch; returns ``(h, residual or None)``."""
        Bsz, T = P.shape[:2]
        K, N = self.state_blocks, self.state_dim
        prev = P.new_zeros(Bsz, T, K, N)
        if h0 is not None:
            prev[:, 0] = h0
        if keep is not None:
            prev = prev * keep
        h = self.transition(prev, P, *rp)  # f(0, P_t); exact at t = 0
        for _ in range(self.newton_iters):
            prev = _shift(h, h0) if keep is None else _shift(h, h0) * keep
            residual = self.transition(prev, P, *rp) - h
            if self.newton_tol > 0 and residual.abs().max().item() <= self.newton_tol:
                break
            J = self._jacobian(prev, P, rp)
            if keep is not None:
                J = J * keep.unsqueeze(-1)
            h = h + linear_scan(J, residual)
        norm = None
        if self.track_residual:
            prev = _shift(h, h0) if keep is None else _shift(h, h0) * keep
            norm = (self.transition(prev, P, *rp) - h).abs().amax()
        return h, norm

    def _adjoint(self, P, rp, h0, keep, h, grad_h):
        """Backward of the trajectory: ``(dP, d rp, dh0)`` by one reverse scan of the adjoint."""
        prev = _shift(h, h0) if keep is None else _shift(h, h0) * keep
        J = self._jacobian(prev, P, rp)
        if keep is not None:
            J = J * keep.unsqueeze(-1)
        JT = transpose(J)
        # λ_t = g_t + J_{t+1}ᵀ λ_{t+1}: roll so step t holds J_{t+1}ᵀ (the wrapped-around J_0 is unused).
        lam = linear_scan(torch.roll(JT, -1, dims=1), grad_h, reverse=True)
        dP, drp = self._local_vjp(prev, P, rp, lam)
        dh0 = matvec(JT[:, 0], lam[:, 0]) if h0 is not None else None
        return dP, drp, dh0

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def step(self, x_t: Tensor, state: Tensor | None = None):
        """One step for generation, O(1) in the sequence length.

        Args:
            x_t: ``[batch, D_in]``; state: ``[batch, K·N]`` or None (zeros).

        Returns:
            ``(y_t [batch, N], state [batch, K·N])``, equal to sequential mode step by step.
        """
        dtype = _compute_dtype(x_t.dtype)
        Bsz, K, N = x_t.shape[0], self.state_blocks, self.state_dim
        p = self.project(x_t.unsqueeze(1), self.B, self.b)[:, 0].to(dtype)
        if state is None:
            h = torch.zeros(Bsz, K, N, dtype=dtype, device=x_t.device)
        else:
            h = state.reshape(Bsz, K, N).to(dtype)
        h = self.transition(h, p, *(r.to(dtype) for r in self.recurrent_params()))
        return h[:, -1].to(x_t.dtype), h.reshape(Bsz, K * N).to(x_t.dtype)


_CUDA_KERNELS: list = []  # kernels.pararnn, once it has run on a CUDA tensor


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


class _NewtonApply(torch.autograd.Function):
    """Parallel application of a cell: Newton forward, adjoint-scan backward (torch or Triton).

    Outputs ``y = h[..., K-1, :]`` (the h part of the trajectory) and the final state ``[B, K, N]``
    (views of the trajectory). The recurrent weights come unclipped; the clip is applied here (by the
    kernels on the Triton path) and their gradients are masked where it was active, as
    ``torch.clamp``'s would be.

    Triton path (the training hot path, kept to few host-side ops because at short T the launch
    overhead, not the GPU, sets the speed): forward = one batched GEMM (:meth:`ParaRNNCell.project_heads`)
    + one kernel that adds the bias and clips; backward = one kernel (dP in the GEMM's layout and
    per-(batch, channel) partials of every parameter gradient) + one sum + two GEMMs for dx, dB.

    Torch path: P from :meth:`ParaRNNCell.project`, Newton and the adjoint scan in torch, then
    ``dx``, ``dB``, ``db`` in closed form (:meth:`ParaRNNCell.project_backward`: no autograd).

    Memory: saved are ``x`` (for dB, or to recompute P), the trajectory h, ``h0``, ``reset``, the
    parameters and, if ``cell.save_projection`` (default), the projection ``P``: G·N = 3N values per
    token against D_in for x, i.e. about 3× the activation memory of x, to spare the backward one
    projection GEMM. With ``save_projection = False`` the backward recomputes P.
    """

    @staticmethod
    def forward(ctx, cell, backend, x, h0, reset, B, b, *rw):
        ctx.set_materialize_grads(False)
        clip = cell.clip
        save_P = bool(cell.save_projection)
        if backend is None or not save_P:  # the backward redoes a projection under the same autocast state
            ctx.autocast = (x.device.type, torch.get_autocast_dtype(x.device.type),
                            torch.is_autocast_enabled(x.device.type))
        if backend is not None:
            P = cell.project_heads(x, B)
            h, residual = backend.newton_forward(cell.kernel_name, P, *_kernel_params(rw), h0, reset,
                                                 cell.newton_iters, cell.track_residual, bias=b, clip=clip,
                                                 out_dtype=x.dtype)
        else:
            dtype = _compute_dtype(x.dtype)
            P = cell.project(x, B, b)
            keep = None if reset is None else (~reset).to(dtype)[:, :, None, None]
            rp = tuple((r.clamp(-clip, clip) if clip else r).to(dtype) for r in rw)
            h, residual = cell._newton(P.to(dtype), rp, None if h0 is None else h0.to(dtype), keep)
            h = h.to(x.dtype)
        if cell.track_residual or cell.last_residual is not None:  # nn.Module.__setattr__ is not free
            cell.last_residual = residual if cell.track_residual else None
        ctx.cell, ctx.backend = cell, backend
        need_x = ctx.needs_input_grad[5] or not save_P  # x: for dB, or to recompute P
        ctx.save_for_backward(x if need_x else None, P if save_P else None, h0, reset, B, b, h, *rw)
        return h[:, :, -1], h[:, -1]

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        x, P, h0, reset, B, b, h, *rw = ctx.saved_tensors
        cell, backend = ctx.cell, ctx.backend
        n_in = 7 + len(rw)
        if grad_y is None and grad_final is None:
            return (None,) * n_in
        Bsz, T, K, N = h.shape
        if grad_final is None and grad_y is not None and backend is not None:
            grad_h = grad_y  # the kernels take the h part alone
        else:
            grad_h = h.new_zeros(Bsz, T, K, N)
            if grad_y is not None:
                grad_h[:, :, -1] = grad_y
            if grad_final is not None:
                grad_h[:, -1] += grad_final
        needs = (ctx.needs_input_grad[2], ctx.needs_input_grad[5], ctx.needs_input_grad[6])
        if backend is not None:
            if P is None:
                with torch.no_grad(), _autocast(ctx):
                    P = cell.project_heads(x, B)
            dP, dA, dC, db, dh0 = backend.adjoint_backward(cell.kernel_name, P, *_kernel_params(rw), h0, reset,
                                                           h, grad_h, bias=b, clip=cell.clip)
            drw = (dA,) if dC is None else (dA, dC)
            dx, dB = cell.project_heads_backward(x, B, dP, needs)
        else:
            dx, dB, db, drw, dh0 = _torch_backward(ctx, cell, x, P, h0, reset, B, b, h, rw, grad_h, needs)
        dx, dB = _cast(dx, h.dtype), _cast(dB, B.dtype)
        db = _cast(db, b.dtype) if needs[2] else None
        dh0 = _cast(dh0, h0.dtype) if ctx.needs_input_grad[3] else None
        drw = tuple(_cast(d, r.dtype) for d, r in zip(drw, rw))
        return (None, None, dx, dh0, None, dB, db, *drw)


def _autocast(ctx):
    """The forward's autocast state, for work the backward redoes (it does not run under autocast)."""
    device_type, dtype, enabled = ctx.autocast
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def _torch_backward(ctx, cell, x, P, h0, reset, B, b, h, rw, grad_h, needs):
    """The torch path's backward: adjoint scan, then the projection's gradients in closed form."""
    dtype = _compute_dtype(h.dtype)
    amp = _autocast(ctx)
    if P is None:
        with torch.no_grad(), amp:
            P = cell.project(x, B, b)
    clip = cell.clip
    rp = tuple((r.clamp(-clip, clip) if clip else r).to(dtype) for r in rw)
    keep = None if reset is None else (~reset).to(dtype)[:, :, None, None]
    dP, drp, dh0 = cell._adjoint(P.to(dtype), rp, None if h0 is None else h0.to(dtype), keep,
                                 h.to(dtype), grad_h.to(dtype))
    if clip:  # clamp's gradient: zero where the clamp was active
        drp = tuple(d * (r.abs() <= clip) for d, r in zip(drp, rw))
    with amp:  # the projection GEMMs in the activation dtype P had in the forward
        dx, dB, db = cell.project_backward(x, B, dP.to(P.dtype), needs)
    return dx, dB, db, drp, dh0


def _kernel_params(rp: tuple) -> tuple:
    """The kernels take (A, C); C is None for cells without peepholes."""
    return (rp[0], rp[1] if len(rp) > 1 else None)


class ParaGRU(ParaRNNCell):
    """ParaGRU: a GRU with diagonal recurrent weights, so its Jacobian is diagonal.

    Gates (z, r, c) in that order; parameters ``A [3, N]``, ``B [H, D_in/H, 3, N/H]``, ``b [3, N]``::

        z = σ(a_z h + P_z);  r = σ(a_r h + P_r);  c = tanh(a_c (h r) + P_c);  h' = (1 − z) h + z c
    """

    kernel_name = "gru"
    state_blocks = 1

    def __init__(self, input_dim: int, state_dim: int, num_heads: int = 2, **kwargs):
        super().__init__(input_dim, state_dim, num_heads, **kwargs)
        self.reset_parameters()

    @staticmethod
    def _gates(h, p, A):
        z = torch.sigmoid(A[0] * h + p[..., 0, :])
        r = torch.sigmoid(A[1] * h + p[..., 1, :])
        c = torch.tanh(A[2] * (h * r) + p[..., 2, :])
        return z, r, c

    @staticmethod
    def transition(h, p, A):
        h = h[..., 0, :]
        z, r, c = ParaGRU._gates(h, p, A)
        return (h + z * (c - h)).unsqueeze(-2)

    def jacobian(self, h, p, rp):
        (A,) = rp
        h = h[..., 0, :]
        z, r, c = self._gates(h, p, A)
        J = (1 - z) + (c - h) * z * (1 - z) * A[0] + z * (1 - c * c) * A[2] * (r + h * r * (1 - r) * A[1])
        return J[..., None, None, :]

    def local_vjp(self, h, p, rp, lam):
        (A,) = rp
        h, lam = h[..., 0, :], lam[..., 0, :]
        z, r, c = self._gates(h, p, A)
        gz = lam * (c - h) * z * (1 - z)
        gc = lam * z * (1 - c * c)
        gr = gc * A[2] * h * r * (1 - r)
        dA = torch.stack([_sum_leading(gz * h, 1), _sum_leading(gr * h, 1), _sum_leading(gc * h * r, 1)])
        return torch.stack([gz, gr, gc], dim=-2), (dA,)


class ParaLSTM(ParaRNNCell):
    """ParaLSTM: a CIFG LSTM with peepholes and diagonal recurrent weights (2×2 block Jacobian).

    State ``[c; h]`` (2N wide; the output is h). Gates (f, o, z); parameters ``A [3, N]``,
    ``B [H, D_in/H, 3, N/H]``, ``b [3, N]`` and peepholes ``C [2, N]`` (c_f on c_{t-1}, c_o on c_t)::

        f = σ(a_f h + P_f + c_f c);  z = tanh(a_z h + P_z);  c' = f c + (1 − f) z
        o = σ(a_o h + P_o + c_o c');  h' = o tanh(c')
    """

    kernel_name = "lstm"
    state_blocks = 2

    def __init__(self, input_dim: int, state_dim: int, num_heads: int = 2, **kwargs):
        super().__init__(input_dim, state_dim, num_heads, **kwargs)
        self.C = nn.Parameter(torch.empty(2, state_dim))
        self.reset_parameters()

    def recurrent_weights(self) -> list:
        return [self.A, self.C]

    @staticmethod
    def _gates(state, p, A, C):
        c, h = state[..., 0, :], state[..., 1, :]
        f = torch.sigmoid(A[0] * h + p[..., 0, :] + C[0] * c)
        z = torch.tanh(A[2] * h + p[..., 2, :])
        c_new = z + f * (c - z)
        o = torch.sigmoid(A[1] * h + p[..., 1, :] + C[1] * c_new)
        return c, h, f, z, c_new, o, torch.tanh(c_new)

    @staticmethod
    def transition(state, p, A, C):
        _, _, _, _, c_new, o, tc = ParaLSTM._gates(state, p, A, C)
        return torch.stack([c_new, o * tc], dim=-2)

    def jacobian(self, state, p, rp):
        A, C = rp
        c, h, f, z, c_new, o, tc = self._gates(state, p, A, C)
        sf, so, dz, dtc = f * (1 - f), o * (1 - o), 1 - z * z, 1 - tc * tc
        Jcc = f + (c - z) * sf * C[0]
        Jch = (c - z) * sf * A[0] + (1 - f) * dz * A[2]
        u = tc * so
        Jhc = (u * C[1] + o * dtc) * Jcc
        Jhh = u * (A[1] + C[1] * Jch) + o * dtc * Jch
        return torch.stack([torch.stack([Jcc, Jch], dim=-2), torch.stack([Jhc, Jhh], dim=-2)], dim=-3)

    def local_vjp(self, state, p, rp, lam):
        A, C = rp
        c, h, f, z, c_new, o, tc = self._gates(state, p, A, C)
        lam_c, lam_h = lam[..., 0, :], lam[..., 1, :]
        go = lam_h * tc * o * (1 - o)
        dc_new = lam_c + lam_h * o * (1 - tc * tc) + go * C[1]
        gf = dc_new * (c - z) * f * (1 - f)
        gz = dc_new * (1 - f) * (1 - z * z)
        dA = torch.stack([_sum_leading(gf * h, 1), _sum_leading(go * h, 1), _sum_leading(gz * h, 1)])
        dC = torch.stack([_sum_leading(gf * c, 1), _sum_leading(go * c_new, 1)])
        return torch.stack([gf, go, gz], dim=-2), (dA, dC)
