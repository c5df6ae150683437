"""The ParaGRU / ParaLSTM modules, custom ParaRNNCell subclasses and the linear scans, against independent oracles.

The op itself (``para_gru`` / ``para_lstm`` on tensors, every mode and precision) is tested in
``test_pararnn_op.py``; here the module layer: its plumbing (state layout, parameters, modes), packed rows,
clipping, the generic ``torch.func`` path for a cell defined only by its transition, generation steps,
Newton telemetry and the fallback to ``"parallel"`` when the kernels are missing. The oracles are
:mod:`tests.pararnn_oracle` (GRU/LSTM), a loop over a custom cell's own transition, ``torch.autograd``
itself, a dense linear solve, and the cell's ``step``. A parallel result is never compared with another
parallel result, except where that is the claim ("the Triton fallback gives parallel's numbers").

Every test is seeded; all shapes are small so that the file runs in well under a minute on 2 cores.
"""
import contextlib
import re
import sys
import types

import pytest
import torch

import kernels
from models.pararnn import (
    ParaGRU,
    ParaLSTM,
    ParaRNNCell,
    linear_scan,
    pararnn_math,
    pararnn_solve,
    resets_from_cu_seqlens,
    sequential_scan,
)
from tests import pararnn_oracle as oracle
from tests.helpers import rel_err

F64 = torch.float64


# ---------------------------------------------------------------------------------------------- cells
class MinimalDiag(ParaRNNCell):
    """K = 1: a two-gate diagonal cell defined only by its transition."""

    num_gates = 2

    @staticmethod
    def transition(h, p, A):
        h = h[..., 0, :]
        z = torch.sigmoid(A[0] * h + p[..., 0, :])
        return (h + z * (torch.tanh(A[1] * h + p[..., 1, :]) - h)).unsqueeze(-2)


class MinimalBlock2(ParaRNNCell):
    """K = 2: two coupled state variables (a full 2×2 Jacobian block), defined only by its transition."""

    num_gates = 3
    state_blocks = 2

    @staticmethod
    def transition(h, p, A):
        u, v = h[..., 0, :], h[..., 1, :]
        g = torch.sigmoid(A[0] * v + p[..., 0, :])
        u_new = g * u + (1 - g) * torch.tanh(A[1] * u + p[..., 1, :])
        v_new = torch.tanh(A[2] * u_new + p[..., 2, :] + 0.5 * v)
        return torch.stack([u_new, v_new], dim=-2)


CELLS = {"gru": ParaGRU, "lstm": ParaLSTM, "diag": MinimalDiag, "block2": MinimalBlock2}


def make_cell(kind, D, N, H, dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seed)
    return CELLS[kind](D, N, H, **kwargs).to(dtype)


def make_data(cell, B, T, seed=1, with_state=True):
    """x, an initial state, and the weights of a fixed random linear loss on (y, final state); float64."""
    g = torch.Generator().manual_seed(seed)
    width = cell.state_blocks * cell.state_dim
    x = torch.randn(B, T, cell.input_dim, generator=g, dtype=F64)
    state = (torch.rand(B, width, generator=g, dtype=F64) * 1.8 - 0.9) if with_state else None
    wy = torch.randn(B, T, cell.state_dim, generator=g, dtype=F64)
    ws = torch.randn(B, width, generator=g, dtype=F64)
    return x, state, wy, ws


def _collect(cell, y, final, x, state, wy, ws):
    ((y.double() * wy).sum() + (final.double() * ws).sum()).backward()
    out = {"y": y.detach(), "final": final.detach(), "dx": x.grad}
    if state is not None:
        out["dstate"] = state.grad
    for name, p in cell.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        out["d" + name] = p.grad.clone()
    return out


def run(cell, x, state, wy, ws, mode, **fwd):
    """Forward + backward in ``mode`` at the cell's dtype; returns outputs and all gradients (x, state, params)."""
    dtype = next(cell.parameters()).dtype
    cell.mode = mode
    cell.zero_grad(set_to_none=True)
    x = x.detach().to(dtype).requires_grad_()
    state = None if state is None else state.detach().to(dtype).requires_grad_()
    y, final = cell(x, state, return_state=True, **fwd)
    assert y.dtype == dtype and y.shape == (*x.shape[:2], cell.state_dim)
    return _collect(cell, y, final, x, state, wy, ws)


def assert_close(got, ref, tol, what=""):
    assert set(got) == set(ref)
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    bad = {k: f"{e:.2e}" for k, e in errs.items() if e > tol}
    assert not bad, f"{what}: relative error above {tol:g}: {bad} (all: { {k: f'{e:.1e}' for k, e in errs.items()} })"
    return errs


def oracle_run(cell, x, state, wy, ws, reset=None, documents=None):
    """The float64 reference of :func:`run` (same keys): ParaGRU/ParaLSTM through :mod:`tests.pararnn_oracle`,
    a custom cell through a loop over its own transition, with autograd for every gradient.

    ``documents``: per row ``(spans, from_state)``: each span ``(start, end)`` run on its own, from zeros, the
    row's first one from ``state`` if ``from_state`` (a packed row's reference)."""
    params = {n: p.detach().double().requires_grad_() for n, p in cell.named_parameters()}
    rp = [params[n] for n, p in cell.named_parameters() if any(p is w for w in cell.recurrent_weights())]
    x = x.detach().double().requires_grad_()
    state = None if state is None else state.detach().double().requires_grad_()
    Bsz, K, N = x.shape[0], cell.state_blocks, cell.state_dim
    h0 = None if state is None else state.reshape(Bsz, K, N)

    def forward(x, h0, reset):
        if isinstance(cell, (ParaGRU, ParaLSTM)):
            kind = "gru" if isinstance(cell, ParaGRU) else "lstm"
            return oracle.apply(kind, x, params["B"], params["b"], *rp, h0=h0, reset=reset, clip=cell.clip)
        P = oracle.project(x, params["B"], params["b"])
        h = h0 if h0 is not None else x.new_zeros(x.shape[0], K, N)
        hs = []
        for t in range(x.shape[1]):
            if reset is not None:
                h = h * (~reset[:, t]).double()[:, None, None]
            h = cell.transition(h, P[:, t], *rp)
            hs.append(h)
        return torch.stack(hs, dim=1)[:, :, -1], h

    if documents is None:
        y, final = forward(x, h0, reset)
    else:
        ys, finals = [], []
        for b, (spans, from_state) in enumerate(documents):
            parts = []
            for i, (s, e) in enumerate(spans):
                y_doc, final = forward(x[b:b + 1, s:e], h0[b:b + 1] if i == 0 and from_state else None, None)
                parts.append(y_doc)
            ys.append(torch.cat(parts, dim=1))
            finals.append(final)
        y, final = torch.cat(ys), torch.cat(finals)
    final = final.reshape(Bsz, K * N)
    ((y * wy).sum() + (final * ws).sum()).backward()
    out = {"y": y.detach(), "final": final.detach(), "dx": x.grad}
    if state is not None:
        out["dstate"] = state.grad
    out.update({"d" + n: p.grad for n, p in params.items()})
    return out


def hide_kernels(monkeypatch):
    """Make ``from kernels import pararnn`` fail, whether or not the real package exists."""
    monkeypatch.setitem(sys.modules, "kernels.pararnn", None)
    monkeypatch.delattr(kernels, "pararnn", raising=False)


def fake_kernels(monkeypatch, available):
    def boom(*args, **kwargs):
        raise AssertionError("the fallback must not call the kernels")

    fake = types.ModuleType("kernels.pararnn")
    fake.available = lambda: available
    fake.solve_forward = fake.solve_backward = boom
    monkeypatch.setitem(sys.modules, "kernels.pararnn", fake)
    monkeypatch.setattr(kernels, "pararnn", fake, raising=False)


# ------------------------------------------------------------------------------- the module layer
SHAPES = [  # (B, T, D_in, N, H, initial state given)
    (1, 1, 4, 4, 1, True),  # T = 1, batch 1, one head
    (2, 2, 6, 6, 2, False),  # T = 2, no initial state
    (3, 7, 6, 10, 2, True),  # odd T, N = 10 != D_in
    (2, 33, 12, 6, 3, True),  # 3 heads, odd T, D_in != N
]
SHAPE_IDS = [f"B{s[0]}T{s[1]}D{s[2]}N{s[3]}H{s[4]}{'s' if s[5] else ''}" for s in SHAPES]
PRECISIONS = {  # name: (dtype, newton_iters, tolerance)
    "fp32-3it": (torch.float32, 3, 1e-5),
    "fp64-12it": (F64, 12, 1e-10),
}


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_module_matches_oracle(kind, mode, shape):
    """The module's plumbing around the op (state ``[batch, K·N]`` as ``[c; h]``, parameter order, the paper
    initialisation) gives the oracle's output, final state and every gradient (x, state, A, B, b, C).

    Mutation: ParaLSTM's recurrent_weights returned as [C, A] -> fails."""
    B, T, D, N, H, with_state = shape
    cell = make_cell(kind, D, N, H)
    x, state, wy, ws = make_data(cell, B, T, with_state=with_state)
    assert_close(run(cell, x, state, wy, ws, mode), oracle_run(cell, x, state, wy, ws), 1e-5, f"{kind} {mode}")


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_iteration_error_falls_two_orders(kind, dtype):
    """From 1 to 3 Newton iterations the error against the oracle falls by >= 100× (reference init; the
    fallback off, so Newton's own error shows)."""
    cell = make_cell(kind, 32, 32, 2, dtype=dtype, init="reference", fallback_tol=None)
    x, state, wy, ws = make_data(cell, 2, 64, with_state=False)
    ref = oracle_run(cell, x, state, wy, ws)
    errs = {}
    for iters in (1, 3):
        cell.newton_iters = iters
        got = run(cell, x, state, wy, ws, "parallel")
        errs[iters] = max(rel_err(got[k], ref[k]) for k in ref)
    assert errs[1] > 1e-4, f"iteration 1 is already nearly exact ({errs[1]:.1e}); pick another shape"
    assert errs[1] / errs[3] >= 100, f"error after 1 iteration {errs[1]:.1e}, after 3 {errs[3]:.1e}"


# ------------------------------------------------------------------------------ Jacobians and local VJPs
@pytest.mark.parametrize("kind", list(CELLS))
def test_jacobian_and_local_vjp_match_autograd(kind):
    """The analytic (pararnn_math) and the torch.func Jacobians and local VJPs against autograd on the transition.

    Mutation: the GRU Jacobian's a_r term dropped -> fails."""
    cell = make_cell(kind, 6, 5, 1, dtype=F64)
    K, G, N, M = cell.state_blocks, cell.num_gates, 5, 6  # M = 2 × 3 leading positions
    with torch.no_grad():
        for w in cell.recurrent_weights():  # larger than the init, so every term of J matters
            w.normal_(0.0, 0.7)
    rp = tuple(w.detach() for w in cell.recurrent_params())
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 3, K, N, generator=g, dtype=F64) * 0.8
    p = torch.randn(2, 3, G, N, generator=g, dtype=F64)

    full = torch.autograd.functional.jacobian(lambda hh: cell.transition(hh, p, *rp), h)
    full = full.reshape(M, K, N, M, K, N)
    same = torch.eye(M, dtype=F64)[:, None, None, :, None, None] * torch.eye(N, dtype=F64)[None, None, :, None, None, :]
    assert (full * (1 - same)).abs().max().item() == 0.0, "transition couples positions or channels"
    expected = torch.einsum("minmjn->mijn", full).reshape(2, 3, K, K, N)

    lam = torch.randn(2, 3, K, N, generator=g, dtype=F64)
    pg, rpg = p.clone().requires_grad_(), [r.clone().requires_grad_() for r in rp]
    auto = torch.autograd.grad((cell.transition(h, pg, *rpg) * lam).sum(), [pg, *rpg])

    methods = {"generic": pararnn_math.generic_math(cell.transition, K, G)}  # torch.func
    if cell.cell_math is not None:
        methods["analytic"] = cell.cell_math
    for name, math in methods.items():
        J = math.jacobian(h, p, rp)
        assert J.shape == (2, 3, K, K, N)
        assert rel_err(J, expected) <= 1e-12, f"{name} jacobian"
        dP, drp = math.local_vjp(h, p, rp, lam)
        assert len(drp) == len(rp)
        assert rel_err(dP, auto[0]) <= 1e-12, f"{name} local_vjp dP"
        for i, (d, a) in enumerate(zip(drp, auto[1:])):
            assert rel_err(d, a) <= 1e-12, f"{name} local_vjp d rp[{i}]"


# ------------------------------------------------------------------------------------ generic path
GENERIC = {  # name: (cell kind, constructor kwargs)
    "gru-autodiff": ("gru", {"autodiff_jacobians": True}),
    "lstm-autodiff": ("lstm", {"autodiff_jacobians": True}),
    "custom-K1": ("diag", {}),
    "custom-K2": ("block2", {}),
}


@pytest.mark.parametrize("precision", ["fp32-3it", "fp64-12it"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3]], ids=[SHAPE_IDS[0], SHAPE_IDS[2], SHAPE_IDS[3]])
@pytest.mark.parametrize("variant", list(GENERIC))
def test_generic_path_matches_oracle(variant, shape, precision):
    """Mutation: with_autodiff returning the analytic math unchanged -> the gru/lstm-autodiff cases fail."""
    kind, kwargs = GENERIC[variant]
    B, T, D, N, H, with_state = shape
    dtype, iters, tol = PRECISIONS[precision]
    cell = make_cell(kind, D, N, H, dtype=dtype, newton_iters=iters, **kwargs)
    for name, p in cell.named_parameters():  # a transition-only subclass gets initialised weights
        assert torch.isfinite(p).all() and p.abs().max() < 10, f"{variant}: {name} not initialised"
    if cell.cell_math is not None:  # the analytic Jacobian/VJP must not be used on the generic path
        assert cell.math.jacobian is not cell.cell_math.jacobian
        assert cell.math.local_vjp is not cell.cell_math.local_vjp
    x, state, wy, ws = make_data(cell, B, T, with_state=with_state)
    got = run(cell, x, state, wy, ws, "parallel")
    assert_close(got, oracle_run(cell, x, state, wy, ws), tol, f"{variant} {shape} {precision}")


# -------------------------------------------------------------------------- packed batches with resets
ROWS = {  # form: (documents per row as (start, end), whether the row's first document starts from `state`)
    "cu_seqlens": ([[(0, 3), (3, 4), (4, 10), (10, 15)]], [False]),
    "reset": ([[(0, 3), (3, 4), (4, 10), (10, 15)], [(0, 7), (7, 15)]], [True, False]),
}


@pytest.mark.parametrize("precision", ["fp32-3it", "fp64-12it"])  # 3 its: Newton must stay exact at resets
@pytest.mark.parametrize("form", list(ROWS))
@pytest.mark.parametrize("mode", ["sequential", "parallel", "triton"])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_packed_resets_equal_separate_documents(kind, mode, form, precision, monkeypatch):
    """A packed row (reset mask or cu_seqlens) equals its documents run on their own (oracle, float64).

    Mutation: the reset ignored in the Newton solve's shifted states (``previous``) -> fails."""
    rows, from_state = ROWS[form]
    B, T = len(rows), rows[0][-1][1]
    dtype, iters, tol = PRECISIONS[precision]
    cell = make_cell(kind, 6, 8, 2, dtype=dtype, newton_iters=iters)
    x, state, wy, ws = make_data(cell, B, T, with_state=any(from_state))
    if form == "cu_seqlens":
        cu = torch.tensor([s for s, _ in rows[0]] + [T], dtype=torch.int32)
        fwd = {"cu_seqlens": cu}
    else:
        reset = torch.zeros(B, T, dtype=torch.bool)
        for b, docs in enumerate(rows):
            for i, (s, _) in enumerate(docs):
                reset[b, s] = i > 0 or not from_state[b]
        fwd = {"reset": reset}
    ref = oracle_run(cell, x, state, wy, ws, documents=list(zip(rows, from_state)))
    warn = contextlib.nullcontext()
    if mode == "triton":  # the kernels are another test file's concern: check the fallback carries resets
        hide_kernels(monkeypatch)
        warn = pytest.warns(UserWarning, match="triton")
    with warn:
        got = run(cell, x, state, wy, ws, mode, **fwd)
    errs = assert_close(got, ref, tol, f"{kind} {mode} {form} {precision}")
    if "dstate" in ref:  # row 1 starts with a reset: its initial state must get exactly zero gradient
        assert got["dstate"][1].abs().max().item() == 0.0, errs


def test_resets_from_cu_seqlens():
    reset = resets_from_cu_seqlens(torch.tensor([0, 3, 4, 10, 15]), 15)
    expected = torch.zeros(1, 15, dtype=torch.bool)
    expected[0, [0, 3, 4, 10]] = True
    assert torch.equal(reset, expected)


# --------------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_input_map_is_block_diagonal_over_heads(kind):
    """Channel n = head·(N/H) + j of every gate depends only on input slice ``head`` (the paper's multi-head
    cells: the input map is block-diagonal over heads, ``B [H, D_in/H, G, N/H]``)."""
    D, N, H = 6, 8, 2
    cell = make_cell(kind, D, N, H, dtype=F64)
    x = torch.randn(1, 1, D, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda xx: pararnn_solve.project(xx, cell.B, cell.b), x)
    jac = jac.reshape(cell.num_gates, N, D)
    head_of_channel = torch.arange(N) // (N // H)
    head_of_input = torch.arange(D) // (D // H)
    same_head = head_of_channel[:, None] == head_of_input[None, :]
    assert (jac[:, ~same_head] == 0).all(), "a channel depends on another head's inputs"
    # Within a head, the map is the stored block B[head, :, gate, :] (transposed).
    for h in range(H):
        block = jac[:, head_of_channel == h][:, :, head_of_input == h]  # [G, N/H, D/H]
        assert rel_err(block, cell.B[h].detach().permute(1, 2, 0)) <= 1e-15


# ------------------------------------------------------------------------------------- step function
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("kind", ["gru", "lstm", "block2"])
def test_step_matches_oracle(kind, with_state):
    cell = make_cell(kind, 6, 8, 2)
    x, state, wy, ws = make_data(cell, 3, 11, with_state=with_state)
    ref = oracle_run(cell, x, state, wy, ws)
    x, state = x.float(), None if state is None else state.float()
    ys, s = [], state
    for t in range(x.shape[1]):
        y_t, s = cell.step(x[:, t], s)
        assert y_t.shape == (3, 8) and s.shape == (3, cell.state_blocks * 8)
        ys.append(y_t)
    assert rel_err(torch.stack(ys, dim=1), ref["y"]) <= 1e-6
    assert rel_err(s, ref["final"]) <= 1e-6


# ------------------------------------------------------------------------------------------ bad input
def _gru(mode, **kwargs):
    return ParaGRU(6, 6, 2, mode=mode, **kwargs)


BAD_INPUTS = {  # id: (call(mode), names the message must contain)
    "x-rank": (lambda m: _gru(m)(torch.randn(2, 6)), ["x"]),
    "x-width": (lambda m: _gru(m)(torch.randn(2, 5, 7)), ["x"]),
    "x-int-dtype": (lambda m: _gru(m)(torch.ones(2, 5, 6, dtype=torch.int64)), ["x", "dtype"]),
    "heads-input": (lambda m: ParaGRU(6, 8, num_heads=4, mode=m), ["num_heads", "input_dim"]),
    "heads-state": (lambda m: ParaLSTM(8, 6, num_heads=4, mode=m), ["num_heads", "state_dim"]),
    "mode-ctor": (lambda m: ParaGRU(6, 6, 2, mode="fused"), ["mode"]),
    "mode-setter": (lambda m: setattr(_gru(m), "mode", "Parallel"), ["mode"]),
    "state-shape": (lambda m: _gru(m)(torch.randn(2, 5, 6), state=torch.randn(2, 5)), ["state"]),
    "state-lstm-width": (lambda m: ParaLSTM(6, 6, 2, mode=m)(torch.randn(2, 5, 6), state=torch.randn(2, 6)),
                         ["state"]),
    "state-batch": (lambda m: _gru(m)(torch.randn(2, 5, 6), state=torch.randn(3, 6)), ["state"]),
    "reset-shape": (lambda m: _gru(m)(torch.randn(2, 5, 6), reset=torch.zeros(2, 4, dtype=torch.bool)), ["reset"]),
    "reset-int-dtype": (lambda m: _gru(m)(torch.randn(2, 5, 6), reset=torch.zeros(2, 5, dtype=torch.int64)),
                        ["reset"]),
    "cu_seqlens-batch": (lambda m: _gru(m)(torch.randn(2, 5, 6), cu_seqlens=torch.tensor([0, 5])), ["cu_seqlens"]),
    "newton_iters": (lambda m: _gru(m, newton_iters=0), ["newton_iters"]),
    "clip": (lambda m: _gru(m, clip=-0.5), ["clip"]),
    "init": (lambda m: _gru(m, init="xavier"), ["init"]),
    "fallback_tol": (lambda m: _gru(m, fallback_tol=0.0), ["fallback_tol"]),
}


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(case, mode):
    call, names = BAD_INPUTS[case]
    with pytest.raises(ValueError) as info:
        call(mode)
    message = str(info.value)
    assert "\n" not in message, f"message is not one line: {message!r}"
    for name in names:
        assert re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message), f"{name!r} not named in {message!r}"


# ------------------------------------------------------------------------------------------ the scans
SCAN_T = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65]


def _scan_inputs(K, T, seed):
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 if K == 1 else 0.5  # keeps the products of blocks bounded
    J = (torch.rand(3, T, K, K, 4, generator=g, dtype=F64) * 2 - 1) * scale
    b = torch.randn(3, T, K, 4, generator=g, dtype=F64)
    return J, b


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("T", SCAN_T)
def test_linear_scan_matches_sequential_scan(T, K, reverse):
    J, b = _scan_inputs(K, T, seed=100 * T + K)
    ignored = T - 1 if reverse else 0
    ref = sequential_scan(J, b, reverse=reverse)
    J_junk = J.clone()
    J_junk[:, ignored] = 1e3  # documented as ignored (the adjoint relies on it: a wrapped-around J lands there)
    got = linear_scan(J_junk, b, reverse=reverse)
    assert got.shape == b.shape
    assert rel_err(got, ref) <= 1e-12


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("T", [1, 2, 5, 16])
def test_sequential_scan_matches_dense_solve(T, K, reverse):
    """The scan oracle itself, against the block-bidiagonal system solved densely per (batch, channel)."""
    J, b = _scan_inputs(K, T, seed=7 * T + K)
    ref = torch.empty_like(b)
    for bi in range(b.shape[0]):
        for n in range(b.shape[-1]):
            M = torch.eye(T * K, dtype=F64)
            for t in range(T):
                s = t + 1 if reverse else t - 1
                if 0 <= s < T:
                    M[t * K : (t + 1) * K, s * K : (s + 1) * K] = -J[bi, t, :, :, n]
            ref[bi, :, :, n] = torch.linalg.solve(M, b[bi, :, :, n].reshape(T * K)).reshape(T, K)
    assert rel_err(sequential_scan(J, b, reverse=reverse), ref) <= 1e-12


# ----------------------------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_clip_equals_hand_clamped_weights(kind, mode):
    cell = make_cell(kind, 8, 8, 2, dtype=F64, clip=0.5, newton_iters=12)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for w in cell.recurrent_weights():
            w.copy_(torch.rand(w.shape, generator=g, dtype=F64) * 3 - 1.5)  # about 2/3 beyond ±0.5
    clamped = make_cell(kind, 8, 8, 2, dtype=F64, clip=None, newton_iters=12)
    clamped.load_state_dict(cell.state_dict())
    with torch.no_grad():
        for w in clamped.recurrent_weights():
            w.copy_(torch.where(w > 0.5, 0.5, torch.where(w < -0.5, -0.5, w)))
    x, state, wy, ws = make_data(cell, 2, 21)
    got = run(cell, x, state, wy, ws, mode)
    ref = run(clamped, x, state, wy, ws, "sequential")
    recurrent = {"d" + n for n, p in cell.named_parameters() if any(p is w for w in cell.recurrent_weights())}
    assert recurrent == ({"dA"} if kind == "gru" else {"dA", "dC"})
    assert_close({k: v for k, v in got.items() if k not in recurrent},
                 {k: v for k, v in ref.items() if k not in recurrent}, 1e-10, f"{kind} {mode}")
    for key in recurrent:
        w = getattr(cell, key[1:])
        out = w.detach().abs() > 0.5
        assert out.any() and (~out).any()
        assert got[key][out].abs().max().item() == 0.0, f"{key}: clipped entries got a gradient"
        assert rel_err(got[key][~out], ref[key][~out]) <= 1e-10, key


# ----------------------------------------------------------------------------- residual and tolerance
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_track_residual(kind):
    cell = make_cell(kind, 8, 12, 2)
    x = make_data(cell, 2, 40)[0].float()
    assert cell.last_residual is None
    cell.track_residual = True
    residual = {}
    for iters in (1, 3):
        cell.newton_iters = iters
        cell(x)
        r = cell.last_residual
        assert isinstance(r, torch.Tensor) and r.dim() == 0 and torch.isfinite(r), r
        residual[iters] = r.item()
    assert residual[3] < 1e-5, residual
    assert residual[1] > 1e-5 and residual[1] > 100 * residual[3], residual
    cell.track_residual = False
    cell(x)
    assert cell.last_residual is None


def test_tracked_residual_is_the_step_residual():
    """``last_residual`` is max_t |h_t − f(h_{t−1}, x_t)|, recomputed here with ``step`` (float64, 1 it; the
    fallback off, so y is Newton's iterate)."""
    cell = make_cell("gru", 8, 12, 2, dtype=F64, newton_iters=1, fallback_tol=None)
    x, state, _, _ = make_data(cell, 2, 40)
    cell.track_residual = True
    with torch.no_grad():
        y = cell(x, state)
    prev = torch.cat([state.unsqueeze(1), y[:, :-1]], dim=1)
    stepped = torch.stack([cell.step(x[:, t], prev[:, t])[0] for t in range(x.shape[1])], dim=1)
    expected = (stepped - y).abs().max()
    assert rel_err(cell.last_residual, expected) <= 1e-10


@pytest.mark.parametrize("tol", [1e-4, 1e-7])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_newton_tol_stops_early_within_tolerance(kind, tol, monkeypatch):
    solves = []
    real_scan = pararnn_solve.linear_scan

    def counting_scan(*args, **kwargs):
        solves.append(1)
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(pararnn_solve, "linear_scan", counting_scan)
    cell = make_cell(kind, 8, 12, 2, dtype=F64, newton_iters=20, newton_tol=tol, fallback_tol=None)
    x, state, _, _ = make_data(cell, 2, 50)
    with torch.no_grad():
        y = cell(x, state)
        n_tol = len(solves)
        cell.newton_tol = 0.0
        solves.clear()
        cell(x, state)
        assert len(solves) == 20  # without a tolerance every iteration runs
    y_ref = oracle_run(cell, x, state, torch.zeros_like(y), torch.zeros_like(state))["y"]
    assert 1 <= n_tol <= 5, f"newton_tol={tol} ran {n_tol} iterations"
    err = (y - y_ref).abs().max().item()
    assert err <= tol, f"max |parallel − oracle| = {err:.1e} > newton_tol = {tol:g}"


@pytest.mark.parametrize("mode", ["parallel", "triton"])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_cell_counts_newton_fallbacks(kind, mode):
    """A forward that Newton cannot solve in 3 iterations (recurrent weights U(±3), no clip) is re-solved
    exactly and counted in ``cell.newton_fallbacks``; an ordinary one (paper init) is not. The op's own test
    (test_pararnn_op) checks the values; here the module's counter and tolerance reach it.

    Mutation: the module not passing its counter to the op -> fails."""
    cell = make_cell(kind, 8, 8, 2, mode=mode, dtype=torch.float32)
    x, state, wy, ws = make_data(cell, 2, 40)
    run(cell, x, state, wy, ws, mode)
    assert cell.newton_fallbacks.item() == 0
    with torch.no_grad():
        for w in cell.recurrent_weights():
            w.uniform_(-3.0, 3.0)
    got = run(cell, x, state, wy, ws, mode)
    newton_ran = not (mode == "triton" and kind == "lstm")  # the LSTM's Triton forward is the exact sweep
    assert (cell.newton_fallbacks.item() > 0) == newton_ran
    assert rel_err(got["y"], oracle_run(cell, x, state, wy, ws)["y"]) <= 1e-5


# ------------------------------------------------------------------------------------ triton fallback
@pytest.mark.parametrize("how", ["missing", "unavailable"])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_triton_mode_falls_back_to_parallel(kind, how, monkeypatch):
    if how == "missing":
        hide_kernels(monkeypatch)
    else:
        fake_kernels(monkeypatch, available=False)
    cell = make_cell(kind, 6, 10, 2)
    x, state, wy, ws = make_data(cell, 2, 13)
    par = run(cell, x, state, wy, ws, "parallel")
    with pytest.warns(UserWarning, match="triton"):
        tri = run(cell, x, state, wy, ws, "triton")
    for key in par:
        assert torch.equal(tri[key], par[key]), f"fallback differs from parallel in {key}"
    assert_close(tri, oracle_run(cell, x, state, wy, ws), 1e-5, f"{kind} triton fallback")


def test_triton_mode_without_fused_kernel_falls_back(monkeypatch):
    fake_kernels(monkeypatch, available=True)  # kernels "available", but a custom cell has none
    cell = make_cell("block2", 6, 8, 2)
    x, state, wy, ws = make_data(cell, 2, 9)
    with pytest.warns(UserWarning, match="no fused kernel"):
        tri = run(cell, x, state, wy, ws, "triton")
    assert_close(tri, oracle_run(cell, x, state, wy, ws), 1e-5, "block2 triton fallback")
