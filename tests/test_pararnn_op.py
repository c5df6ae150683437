"""The ParaRNN op (``para_gru``, ``para_lstm``) on plain tensors, against the tests' own sequential oracle.

fla-style: the public function is called without any module, over odd shapes (T = 1, T not a multiple of
any tile, B·N not a multiple of the kernels' channel tile, several heads), with resets and initial states,
and its output, final state and every gradient (x, B, b, A, C, h0) are compared with autograd through
:mod:`tests.pararnn_oracle` in float64. Modes "sequential" and "parallel" in fp64, fp32 and bf16 (bf16 against
the oracle on the same bf16-rounded inputs, looser tolerance); mode "triton" through Triton's interpreter on
the smallest cases (~90 µs per scanned element there). Every call counts Newton fallbacks: none may happen
on these well-conditioned cases.

The Newton fallback (a forward whose final residual is above ``fallback_tol`` is solved again exactly):
an unconverged 3-iteration Newton (large recurrent weights, no clip) gives the exact result with it and a
measurably wrong one without it.
"""
import pytest
import torch

from models.pararnn import para_gru, para_lstm
from tests import pararnn_oracle as oracle
from tests.helpers import rel_err

F64 = torch.float64
OPS = {"gru": para_gru, "lstm": para_lstm}

CASES = {  # name: (B, T, D_in, N, H, initial state, reset positions [(b, t)])
    "T1": (1, 1, 4, 4, 1, True, []),
    "T2-noh0": (2, 2, 6, 6, 2, False, [(1, 1)]),
    "odd": (3, 7, 6, 10, 2, True, [(0, 0), (1, 3)]),  # B·N = 30: not a multiple of the channel tile (16)
    "heads3": (2, 33, 12, 6, 3, True, [(1, 16)]),  # T = 33: past four 8-step tiles
    "T64": (1, 64, 8, 12, 4, True, [(0, 32)]),
    "heads5": (2, 45, 15, 10, 5, False, [(0, 44)]),
}
PRECISIONS = {  # name: (dtype, newton_iters, relative tolerance on every output and gradient)
    "fp64": (F64, 12, 1e-10),
    "fp64-3it": (F64, 3, 1e-5),  # what 3 Newton iterations reach here (the LSTM leaves 3e-6 on heads5)
    "fp32": (torch.float32, 3, 1e-5),
    "bf16": (torch.bfloat16, 3, 1e-2),
}
TRITON_CASES = ("T1", "odd", "heads3")  # the interpreter is slow: the smallest that cover the odd shapes


def make_inputs(cell, case, amp=0.5, seed=0):
    """Float64 leaves of the op: x, B, b, A, C (LSTM), h0 (or None), reset (or None), and loss weights."""
    Bsz, T, D, N, H, with_h0, resets = CASES[case]
    K = oracle.STATE_BLOCKS[cell]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bsz, T, D, generator=g, dtype=F64)
    B = torch.randn(H, D // H, 3, N // H, generator=g, dtype=F64) * (3.0 / (D // H)) ** 0.5
    b = 0.3 * torch.randn(3, N, generator=g, dtype=F64)
    A = (torch.rand(3, N, generator=g, dtype=F64) * 2 - 1) * amp
    C = (torch.rand(2, N, generator=g, dtype=F64) * 2 - 1) * amp if cell == "lstm" else None
    h0 = (torch.rand(Bsz, K, N, generator=g, dtype=F64) * 1.8 - 0.9) if with_h0 else None
    reset = None
    if resets:
        reset = torch.zeros(Bsz, T, dtype=torch.bool)
        for bi, t in resets:
            reset[bi, t] = True
    wy = torch.randn(Bsz, T, N, generator=g, dtype=F64)
    ws = torch.randn(Bsz, K, N, generator=g, dtype=F64)
    return dict(x=x, B=B, b=b, A=A, C=C, h0=h0), reset, (wy, ws)


def forward_backward(fn, leaves, reset, weights, dtype):
    """``fn(reset=..., **leaves)`` in ``dtype``, then the gradients of a fixed linear loss on (y, h_T)."""
    leaves = {k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
    y, final = fn(reset=reset, **leaves)
    wy, ws = weights
    ((y.double() * wy).sum() + (final.double() * ws).sum()).backward()
    out = {"y": y.detach(), "final": final.detach()}
    out.update({"d" + k: v.grad for k, v in leaves.items() if v is not None})
    return out


def op_call(cell, **kwargs):
    def call(x, B, b, A, C, h0, reset):
        rw = (A,) if cell == "gru" else (A, C)
        return OPS[cell](x, B, b, *rw, h0=h0, reset=reset, **kwargs)
    return call


def oracle_call(cell):
    return lambda x, B, b, A, C, h0, reset: oracle.apply(cell, x, B, b, A, C, h0, reset)


def assert_close(got, ref, tol, what):
    assert set(got) == set(ref), (set(got), set(ref))
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    bad = {k: f"{e:.1e}" for k, e in errs.items() if e > tol}
    assert not bad, f"{what}: relative error above {tol:g}: {bad} (all: { {k: f'{e:.0e}' for k, e in errs.items()} })"


def check_op(cell, case, mode, precision):
    dtype, iters, tol = PRECISIONS[precision]
    leaves, reset, weights = make_inputs(cell, case)
    if dtype != F64:  # the oracle sees the same rounded inputs the op sees
        leaves = {k: None if v is None else v.to(dtype).double() for k, v in leaves.items()}
    ref = forward_backward(oracle_call(cell), leaves, reset, weights, F64)
    count = torch.zeros((), dtype=torch.int64)
    got = forward_backward(op_call(cell, mode=mode, newton_iters=iters, fallback_count=count), leaves, reset,
                           weights, dtype)
    assert got["y"].dtype == dtype
    assert_close(got, ref, tol, f"{cell} {case} {mode} {precision}")
    assert count.item() == 0, f"{count.item()} Newton fallbacks on a well-conditioned case"


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_op_matches_oracle(cell, mode, case, precision):
    """Mutation: the GRU's reset gate applied after the diagonal (``a_c h r`` -> ``a_c h``) in pararnn_math -> fails;
    the adjoint's roll dropped (J_t instead of J_{t+1}) -> fails."""
    check_op(cell, case, mode, precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", TRITON_CASES)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_op_triton_matches_oracle(cell, case, precision):
    """The op's Triton path (the fused kernels, interpreted on CPU) on tensors."""
    check_op(cell, case, "triton", precision)


def test_op_rejects_bad_mode():
    leaves, reset, _ = make_inputs("gru", "T1")
    with pytest.raises(ValueError, match="mode"):
        para_gru(leaves["x"], leaves["B"], leaves["b"], leaves["A"], mode="fused")


# ----------------------------------------------------------------------------------------- Newton fallback
HARD = dict(case="T64", amp=3.0)  # recurrent weights U(±3), no clip: 3 Newton iterations do not converge


@pytest.mark.parametrize("mode", ["parallel", "triton"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_unconverged_newton_falls_back_to_the_exact_solution(cell, mode):
    """With the fallback (default ``fallback_tol``), an unconverged forward gives the exact trajectory and
    gradients and is counted; without it the same call is measurably wrong. (The LSTM's Triton forward is the
    exact sweep at every shape, so there the check has nothing to correct: see test_kernels_pararnn for the
    LSTM Newton kernel's fallback.)

    Mutation: the check skipped in ``_torch_forward`` / the sweep's gate never re-solving -> fails."""
    leaves, reset, weights = make_inputs(cell, HARD["case"], amp=HARD["amp"], seed=3)
    ref = forward_backward(oracle_call(cell), leaves, reset, weights, F64)
    count = torch.zeros((), dtype=torch.int64)
    got = forward_backward(op_call(cell, mode=mode, fallback_count=count), leaves, reset, weights, torch.float32)
    assert rel_err(got["y"], ref["y"]) <= 1e-5
    assert_close(got, ref, 1e-4, f"{cell} {mode} with the fallback")  # the gradients of the exact trajectory
    newton_ran = not (mode == "triton" and cell == "lstm")
    assert (count.item() > 0) == newton_ran, count
    off = forward_backward(op_call(cell, mode=mode, fallback_tol=None), leaves, reset, weights, torch.float32)
    if newton_ran:
        assert rel_err(off["y"], ref["y"]) > 1e-3, "the hard case converged: it no longer tests the fallback"


def test_fallback_residual_and_count_are_reported():
    """``return_residual`` gives Newton's own final residual (before the re-solve), the count the number of
    chains (batch row, channel) re-solved; a tolerance above the residual leaves the result alone."""
    leaves, reset, _ = make_inputs("gru", HARD["case"], amp=HARD["amp"], seed=3)
    args = {k: v.float() for k, v in leaves.items() if v is not None}
    count = torch.zeros((), dtype=torch.int64)
    with torch.no_grad():
        y_fb, _, res = para_gru(reset=reset, fallback_count=count, return_residual=True, **args)
        y_off, _, res_off = para_gru(reset=reset, fallback_tol=None, return_residual=True, **args)
        y_loose, _ = para_gru(reset=reset, fallback_tol=2 * res_off.item(), fallback_count=count, **args)
    assert res.item() == res_off.item() > 1e-3
    assert 0 < count.item() <= leaves["x"].shape[0] * leaves["A"].shape[1]
    assert torch.equal(y_loose, y_off) and not torch.equal(y_fb, y_off)


def test_non_finite_newton_result_is_resolved(monkeypatch):
    """A NaN in Newton's trajectory (a diverged solve) counts as unconverged: the chain is solved again.

    Mutation: ``bad = chains > fallback_tol`` in ``_torch_forward`` (NaN compares false) -> fails."""
    from models.pararnn import pararnn_op

    newton = pararnn_op.newton

    def diverged(*args, **kwargs):
        h = newton(*args, **kwargs)
        h[0, 3:, :, 2] = float("nan")
        return h

    monkeypatch.setattr(pararnn_op, "newton", diverged)
    leaves, reset, weights = make_inputs("gru", "odd")
    ref = forward_backward(oracle_call("gru"), leaves, reset, weights, F64)
    count = torch.zeros((), dtype=torch.int64)
    got = forward_backward(op_call("gru", mode="parallel", fallback_count=count), leaves, reset, weights, torch.float32)
    assert_close(got, ref, 1e-5, "gru with a NaN chain re-solved")
    assert count.item() >= 1
