"""ParaGRU and ParaLSTM: nonlinear RNN cells applied to a whole sequence at once by Newton's method.

The modules are thin layers: parameters, initialisation and the call to the op (:mod:`.pararnn_op`), which
holds the modes (``"sequential"``, ``"parallel"``, ``"triton"``), the Newton solve and its exact fallback,
and the backward. The equations live in :mod:`.pararnn_math`.

A new cell needs only :meth:`ParaRNNCell.transition`: the parallel mode then gets its Jacobians and local
gradients through ``torch.func``. ParaGRU and ParaLSTM use their analytic ones.

These files are copied into exported checkpoints, so they use only torch and relative imports.
"""
import math

import torch
from torch import Tensor, nn

from . import pararnn_library  # noqa: F401  (registers the custom ops torch.compile traces the op through)
from .pararnn_math import GRU, LSTM, CellMath, generic_math, gru_transition, lstm_transition, with_autodiff
from .pararnn_op import FALLBACK_TOL, MODES, para_rnn, resets_from_cu_seqlens
from .pararnn_solve import compute_dtype, project

_INITS = ("paper", "reference")


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
        fallback_tol: a forward whose final Newton residual is above this on some chain (batch row,
            channel) solves that chain again exactly and counts it in :attr:`newton_fallbacks`; None: no check.

    Subclasses set ``num_gates`` (rows of P) and ``state_blocks`` (K: the state has K·N values and
    the Jacobian K×K blocks) and implement :meth:`transition` (or set ``cell_math``).

    Newton telemetry: with ``track_residual = True`` each forward stores its final residual max-norm in
    ``last_residual`` (a 0-d tensor; no host sync; under torch.compile on every forward); ``newton_fallbacks``
    counts the chains solved again.

    Sequence parallelism: with ``seq_group`` set to a process group, each rank passes its chunk of the time
    axis (see ``para_rnn``'s ``seq_group``).
    """

    num_gates = 3
    state_blocks = 1
    cell_math: CellMath | None = None  # analytic math (ParaGRU, ParaLSTM); None: from transition()
    # Parallel modes: keep P for the backward (G·N values per token, vs D_in for x) or recompute it
    # there (one more GEMM). Set False on an instance for memory-bound large models.
    save_projection = True
    seq_group = None  # a process group splitting the time axis (sequence parallelism), or None

    def __init__(self, input_dim: int, state_dim: int, num_heads: int = 2, mode: str = "parallel",
                 newton_iters: int = 3, newton_tol: float = 0.0, clip: float | None = None,
                 init: str = "paper", autodiff_jacobians: bool = False, fallback_tol: float | None = FALLBACK_TOL):
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
        if fallback_tol is not None and not fallback_tol > 0:
            raise ValueError(f"{name}: fallback_tol must be positive or None, got {fallback_tol!r}")
        self.input_dim, self.state_dim, self.num_heads = input_dim, state_dim, num_heads
        self.mode = mode
        self.newton_iters, self.newton_tol, self.clip = newton_iters, float(newton_tol), clip
        self.fallback_tol = fallback_tol
        self.init, self.autodiff_jacobians = init, autodiff_jacobians
        cell_math = self.cell_math or generic_math(type(self).transition, self.state_blocks, self.num_gates)
        self.math = with_autodiff(cell_math) if autodiff_jacobians else cell_math
        G, N, H = self.num_gates, state_dim, num_heads
        self.A = nn.Parameter(torch.empty(G, N))
        self.B = nn.Parameter(torch.empty(H, input_dim // H, G, N // H))
        self.b = nn.Parameter(torch.empty(G, N))
        self.track_residual = False
        self.last_residual: Tensor | None = None
        # Made here, on the device the module is built on, so that a compiled forward finds it in place
        # (creating it there would recompile the block once).
        self._fallbacks = torch.zeros((), dtype=torch.int64) if fallback_tol is not None else None
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

    @property
    def newton_fallbacks(self) -> Tensor:
        """Chains (batch row, channel) solved again exactly because Newton had not converged (0-d int64)."""
        return self._fallbacks if self._fallbacks is not None else torch.zeros((), dtype=torch.int64)

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

    @staticmethod
    def transition(h: Tensor, p: Tensor, *rp: Tensor) -> Tensor:
        """``f(h_{t-1}, P_t)``: ``h [..., K, N]``, ``p [..., G, N]``, recurrent params -> ``[..., K, N]``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ application
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
        Bsz, K, N = x.shape[0], self.state_blocks, self.state_dim
        h0 = None
        if state is not None:
            if tuple(state.shape) != (Bsz, K * N):
                raise ValueError(f"{type(self).__name__}: state must be [batch, {K * N}] = [{Bsz}, {K * N}], "
                                 f"got {tuple(state.shape)}")
            h0 = state.reshape(Bsz, K, N)
        # Compiled, the residual is always returned (it costs one small reduction): one graph whether it is
        # tracked or not.
        track = torch.compiler.is_compiling() or self.track_residual
        out = para_rnn(self.math, x, self.B, self.b, tuple(self.recurrent_weights()), h0, reset, mode=self.mode,
                       newton_iters=self.newton_iters, newton_tol=self.newton_tol, clip=self.clip,
                       fallback_tol=self.fallback_tol, fallback_count=self._counter(x.device),
                       save_projection=self.save_projection, return_residual=track, seq_group=self.seq_group)
        if track or self.last_residual is not None:  # nn.Module.__setattr__ is not free
            self.last_residual = out[2] if track else None
        return (out[0], out[1].reshape(Bsz, K * N)) if return_state else out[0]

    def _counter(self, device: torch.device) -> Tensor | None:
        if self.fallback_tol is None:
            return None
        if self._fallbacks is None or self._fallbacks.device != device:
            start = 0 if self._fallbacks is None or self._fallbacks.is_meta else self._fallbacks.item()
            self._fallbacks = torch.tensor(start, dtype=torch.int64, device=device)
        return self._fallbacks

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def step(self, x_t: Tensor, state: Tensor | None = None):
        """One step for generation, O(1) in the sequence length.

        Args:
            x_t: ``[batch, D_in]``; state: ``[batch, K·N]`` or None (zeros).

        Returns:
            ``(y_t [batch, N], state [batch, K·N])``, equal to sequential mode step by step.
        """
        dtype = compute_dtype(x_t.dtype)
        Bsz, K, N = x_t.shape[0], self.state_blocks, self.state_dim
        p = project(x_t.unsqueeze(1), self.B, self.b)[:, 0].to(dtype)
        if state is None:
            h = torch.zeros(Bsz, K, N, dtype=dtype, device=x_t.device)
        else:
            h = state.reshape(Bsz, K, N).to(dtype)
        h = self.transition(h, p, *(r.to(dtype) for r in self.recurrent_params()))
        return h[:, -1].to(x_t.dtype), h.reshape(Bsz, K * N).to(x_t.dtype)


class ParaGRU(ParaRNNCell):
    """ParaGRU: a GRU with diagonal recurrent weights, so its Jacobian is diagonal.

    Gates (z, r, c) in that order; parameters ``A [3, N]``, ``B [H, D_in/H, 3, N/H]``, ``b [3, N]``::

        z = σ(a_z h + P_z);  r = σ(a_r h + P_r);  c = tanh(a_c (h r) + P_c);  h' = (1 − z) h + z c
    """

    cell_math = GRU
    state_blocks = 1
    transition = staticmethod(gru_transition)

    def __init__(self, input_dim: int, state_dim: int, num_heads: int = 2, **kwargs):
        super().__init__(input_dim, state_dim, num_heads, **kwargs)
        self.reset_parameters()


class ParaLSTM(ParaRNNCell):
    """ParaLSTM: a CIFG LSTM with peepholes and diagonal recurrent weights (2×2 block Jacobian).

    State ``[c; h]`` (2N wide; the output is h). Gates (f, o, z); parameters ``A [3, N]``,
    ``B [H, D_in/H, 3, N/H]``, ``b [3, N]`` and peepholes ``C [2, N]`` (c_f on c_{t-1}, c_o on c_t)::

        f = σ(a_f h + P_f + c_f c);  z = tanh(a_z h + P_z);  c' = f c + (1 − f) z
        o = σ(a_o h + P_o + c_o c');  h' = o tanh(c')
    """

    cell_math = LSTM
    state_blocks = 2
    transition = staticmethod(lstm_transition)

    def __init__(self, input_dim: int, state_dim: int, num_heads: int = 2, **kwargs):
        super().__init__(input_dim, state_dim, num_heads, **kwargs)
        self.C = nn.Parameter(torch.empty(2, state_dim))
        self.reset_parameters()

    def recurrent_weights(self) -> list:
        return [self.A, self.C]
