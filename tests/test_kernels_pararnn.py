"""The ParaGRU/ParaLSTM Triton kernels (``kernels.pararnn``) against the tests' float64 sequential oracle.

Runs on CPU through Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``) or on a
GPU. Shapes are tiny because the interpreter is slow; the interpreter's tiles are small too
(``CONFIGS["interpret"]``: 8-step time tiles, 16-channel tiles, 4-step sweep chunks), so the list
below still covers T = 1, odd T, T not a multiple of the tile, several tiles, odd N, N not a
multiple of the channel tile, B = 1 and 2, resets mid-sequence / at t = 0 / on a tile boundary,
with and without h0.

Every output and gradient (h, dP, dA, dC, dh0) is compared by max-abs error relative to the
oracle's max-abs value; fp32 must be within 1e-5, fp16 within 1e-2; NaN never passes.
"""
import functools

import pytest
import torch

from kernels.pararnn import available, solve_backward, solve_forward
from tests import pararnn_oracle
from tests.pararnn_oracle import sequential

CELLS = ("gru", "lstm")
METHODS = ("newton", "sweep")
K_OF = {"gru": 1, "lstm": 2}
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name: (B, T, N, with h0, reset positions [(b, t), ...])
CASES = {
    "T1": (1, 1, 5, True, []),
    "odd": (2, 21, 20, True, [(0, 7), (1, 0), (1, 16)]),
    "noh0": (1, 17, 9, False, []),
    "tiles": (2, 16, 16, False, [(0, 5), (1, 8)]),
}
FP16_CASES = ("odd", "noh0")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got − ref| / max|ref|; fails on NaN/inf in either tensor."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all(), "non-finite values in the result"
    assert torch.isfinite(ref).all(), "non-finite values in the reference"
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make_inputs(cell: str, case: str, dtype: torch.dtype, seed: int = 0):
    """Inputs in ``dtype`` (params fp32) and the same values in float64 for the oracle."""
    B, T, N, with_h0, resets = CASES[case]
    K = K_OF[cell]
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(B, T, 3, N, generator=g).to(dtype)
    A = (torch.rand(3, N, generator=g) * 1.8 - 0.9).float()
    C = (torch.rand(2, N, generator=g) * 1.8 - 0.9).float() if cell == "lstm" else None
    h0 = (0.5 * torch.randn(B, K, N, generator=g)).float() if with_h0 else None
    reset = None
    if resets:
        reset = torch.zeros(B, T, dtype=torch.bool)
        for b, t in resets:
            reset[b, t] = True
    grad = torch.randn(B, T, K, N, generator=g)
    return P, A, C, h0, reset, grad


@functools.cache
def oracle(cell: str, case: str, dtype: torch.dtype):
    """float64 sequential trajectory and autograd gradients of ``Σ h·grad`` (inputs rounded to dtype)."""
    P, A, C, h0, reset, grad = make_inputs(cell, case, dtype)
    leaves = [P.double().requires_grad_(), A.double().requires_grad_()]
    C64 = C.double().requires_grad_() if C is not None else None
    h064 = h0.double().requires_grad_() if h0 is not None else None
    h = sequential(cell, leaves[0], leaves[1], C64, h064, reset)
    wrt = leaves + [x for x in (C64, h064) if x is not None]
    grads = torch.autograd.grad((h * grad.double()).sum(), wrt)
    dP, dA = grads[0], grads[1]
    rest = list(grads[2:])
    dC = rest.pop(0) if C64 is not None else None
    dh0 = rest.pop(0) if h064 is not None else None
    return h.detach(), dP, dA, dC, dh0


def _dev(x):
    return None if x is None else x.to(DEVICE)


def test_available():
    assert available()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype,case", [(torch.float32, c) for c in CASES] +
                         [(torch.float16, c) for c in FP16_CASES],
                         ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
def test_forward_and_backward(cell, method, dtype, case):
    P, A, C, h0, reset, grad = make_inputs(cell, case, dtype)
    h_ref, dP_ref, dA_ref, dC_ref, dh0_ref = oracle(cell, case, dtype)
    tol = TOL[dtype]
    h, res = solve_forward(cell, _dev(P), _dev(A), _dev(C), _dev(h0), _dev(reset), residual=True, method=method)
    assert h.dtype == dtype and tuple(h.shape) == tuple(h_ref.shape)
    assert res.dim() == 0 and res.dtype == torch.float32
    assert float(res) <= 1e-5
    assert rel_err(h, h_ref) <= tol
    # backward along the oracle's trajectory (the contract: h is treated as exact)
    dP, dA, dC, db, dh0 = solve_backward(cell, _dev(P), _dev(A), _dev(C), _dev(h0), _dev(reset),
                                         _dev(h_ref.to(dtype)), _dev(grad.to(dtype)), method=method)
    assert db is None
    assert dP.dtype == dtype and dA.dtype == torch.float32
    assert rel_err(dP, dP_ref) <= tol
    assert rel_err(dA, dA_ref) <= tol
    if cell == "lstm":
        assert dC.dtype == torch.float32 and rel_err(dC, dC_ref) <= tol
    else:
        assert dC is None
    if h0 is None:
        assert dh0 is None
    else:
        assert dh0.dtype == torch.float32 and rel_err(dh0, dh0_ref) <= tol


@pytest.mark.parametrize("cell", CELLS)
def test_newton_iterations_converge(cell):
    """More Newton iterations -> closer to the exact trajectory; 3 reach fp32 accuracy."""
    P, A, C, h0, reset, _ = make_inputs(cell, "odd", torch.float32)
    h_ref = oracle(cell, "odd", torch.float32)[0]
    errs = []
    for iters in (1, 3):
        h, res = solve_forward(cell, _dev(P), _dev(A), _dev(C), _dev(h0), _dev(reset), newton_iters=iters,
                               residual=True, method="newton")
        errs.append(rel_err(h, h_ref))
    assert errs[1] <= 1e-5 < errs[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cell", CELLS)
def test_general_strides(cell, method):
    """Strided P (time and gate strides), non-contiguous h0/reset/grad and a permuted h."""
    P, A, C, h0, reset, grad = make_inputs(cell, "odd", torch.float32)
    B, T, _, N = P.shape
    K = K_OF[cell]
    P_big = torch.randn(B, 2 * T, 4, N)
    P_big[:, ::2, 1:] = P
    Ps = P_big[:, ::2, 1:]
    h0s = h0.transpose(1, 2).contiguous().transpose(1, 2)
    rst_big = torch.zeros(B, T, 2, dtype=torch.bool)
    rst_big[..., 0] = reset
    rs = rst_big[..., 0]
    h_ref, dP_ref, dA_ref, dC_ref, dh0_ref = oracle(cell, "odd", torch.float32)
    h, _ = solve_forward(cell, _dev(Ps), _dev(A), _dev(C), _dev(h0s), _dev(rs), method=method)
    assert rel_err(h, h_ref) <= 1e-5
    g_big = torch.zeros(B, T, K, N + 3)
    g_big[..., :N] = grad
    hs = h_ref.float().permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # last dim not contiguous
    dP, dA, dC, _, dh0 = solve_backward(cell, _dev(Ps), _dev(A), _dev(C), _dev(h0s), _dev(rs), _dev(hs),
                                        _dev(g_big[..., :N]), method=method)
    assert rel_err(dP, dP_ref) <= 1e-5
    assert rel_err(dA, dA_ref) <= 1e-5
    assert rel_err(dh0, dh0_ref) <= 1e-5
    if cell == "lstm":
        assert rel_err(dC, dC_ref) <= 1e-5


# name: (B, T, heads, channels per head, reset positions); the interpreter's channel tile is 16, so
# "split5" has tiles straddling heads (per-channel offsets) and "split16" one head per tile.
HEAD_CASES = {"split5": (2, 13, 4, 5, [(1, 6)]), "split16": (1, 11, 2, 16, [])}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", HEAD_CASES)
def test_fused_bias_clip_heads(cell, method, case):
    """The cell's fast path: head-split P as per-head GEMMs write it, the bias added and the recurrent
    weights clamped inside the kernels, the gradient of the h part alone (LSTM: none for c). Oracle:
    float64 autograd through ``clamp`` and the sequential loop on the bias-added, head-merged P."""
    B, T, H, NH, resets = HEAD_CASES[case]
    N, K, clip = H * NH, K_OF[cell], 0.5
    g = torch.Generator().manual_seed(3)
    P = torch.randn(B, T, 3, N, generator=g)
    bias = 0.5 * torch.randn(3, N, generator=g)
    A = torch.rand(3, N, generator=g) * 1.8 - 0.9  # about 45% of the entries beyond the clip
    C = torch.rand(2, N, generator=g) * 1.8 - 0.9 if cell == "lstm" else None
    h0 = 0.5 * torch.randn(B, K, N, generator=g)
    reset = torch.zeros(B, T, dtype=torch.bool)
    for b, t in resets:
        reset[b, t] = True
    gy = torch.randn(B, T, N, generator=g)
    # head-major storage [H, B, T, 3, NH], seen as [B, T, 3, H, NH]
    Ph = P.view(B, T, 3, H, NH).permute(3, 0, 1, 2, 4).contiguous().permute(1, 2, 3, 0, 4)
    assert Ph.stride(3) == B * T * 3 * NH

    leaves = [t.double().requires_grad_() for t in (P, bias, A, h0)]
    C64 = C.double().requires_grad_() if C is not None else None
    clamp = lambda w: w.clamp(-clip, clip)  # noqa: E731
    h_ref = sequential(cell, leaves[0] + leaves[1], clamp(leaves[2]), None if C64 is None else clamp(C64),
                       leaves[3], reset)
    wrt = leaves + ([C64] if C64 is not None else [])
    refs = torch.autograd.grad((h_ref[:, :, -1] * gy.double()).sum(), wrt)

    h, _ = solve_forward(cell, _dev(Ph), _dev(A), _dev(C), _dev(h0), _dev(reset), bias=_dev(bias), clip=clip,
                         method=method)
    assert rel_err(h, h_ref) <= 1e-5
    dP, dA, dC, db, dh0 = solve_backward(cell, _dev(Ph), _dev(A), _dev(C), _dev(h0), _dev(reset),
                                         _dev(h_ref.float()), _dev(gy), bias=_dev(bias), clip=clip, method=method)
    assert dP.shape == Ph.shape and dP.stride() == Ph.stride()  # written in the head-major layout
    got = [dP.reshape(B, T, 3, N), db, dA, dh0] + ([dC] if cell == "lstm" else [])
    for name, a, r in zip(["dP", "dbias", "dA", "dh0", "dC"], got, refs):
        assert rel_err(a, r) <= 1e-5, name
    assert (dA.cpu()[A.abs() > clip] == 0).all()


def test_bad_inputs():
    P = torch.randn(1, 4, 3, 8)
    A = torch.randn(3, 8)
    with pytest.raises(ValueError):
        solve_forward("rnn", P, A, None, None, None)
    with pytest.raises(ValueError):
        solve_forward("lstm", P, A, None, None, None)  # no C
    with pytest.raises(ValueError):
        solve_forward("gru", P, A, None, torch.zeros(1, 2, 8), None)  # h0 with K = 2
    with pytest.raises(ValueError):
        solve_forward("gru", P, A, None, None, torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        solve_forward("gru", P, A, None, None, None, method="magic")


@pytest.mark.parametrize("variant", ["plain", "clip_state", "recompute"])
@pytest.mark.parametrize("cell", CELLS)
def test_model_triton_mode_matches_oracle(cell, variant):
    """``models.pararnn`` cells: mode="triton" (these kernels) vs the float64 oracle with the same weights.

    "clip_state": recurrent weights clipped at 0.5 (about half of them beyond it) and a loss on the
    returned final state too (the backward's slow path with a full state gradient). "recompute":
    ``save_projection = False`` (P redone in the backward)."""
    pararnn = pytest.importorskip("models.pararnn")
    cls = pararnn.ParaGRU if cell == "gru" else pararnn.ParaLSTM
    torch.manual_seed(1)
    B, T, D, N = 2, 19, 16, 16
    K = K_OF[cell]
    clip = 0.5 if variant == "clip_state" else None
    m32 = cls(D, N, num_heads=2, mode="triton", clip=clip).to(DEVICE)
    m32.save_projection = variant != "recompute"
    if clip:
        with torch.no_grad():
            for w in m32.recurrent_weights():
                w.uniform_(-1.0, 1.0)
    x = torch.randn(B, T, D, device=DEVICE)
    state = 0.5 * torch.randn(B, K * N, device=DEVICE)
    reset = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    reset[1, 9] = True
    w = torch.randn(B, T, N, device=DEVICE)
    ws = torch.randn(B, K * N, device=DEVICE)
    names = sorted(n for n, _ in m32.named_parameters())

    def loss_and_grads(y, final, leaves):
        loss = (y * w.to(y.dtype)).sum() + ((final.reshape(B, K * N) * ws.to(y.dtype)).sum() if clip else 0.0)
        return torch.autograd.grad(loss, leaves)

    xx, ss = x.clone().requires_grad_(), state.clone().requires_grad_()
    y32, f32 = m32(xx, state=ss, reset=reset, return_state=True)
    params = dict(m32.named_parameters())
    g32 = loss_and_grads(y32, f32, [xx, ss] + [params[n] for n in names])
    p64 = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    x64, s64 = x.double().requires_grad_(), state.double().requires_grad_()
    y64, f64 = pararnn_oracle.apply(cell, x64, p64["B"], p64["b"], p64["A"], p64.get("C"), s64.reshape(B, K, N),
                                    reset, clip)
    g64 = loss_and_grads(y64, f64, [x64, s64] + [p64[n] for n in names])
    assert rel_err(y32, y64) <= 1e-5
    assert rel_err(f32, f64.reshape(B, K * N)) <= 1e-5
    for name, a, b in zip(["x", "state"] + names, g32, g64):
        assert rel_err(a, b) <= 1e-5, name


@pytest.mark.parametrize("cell", CELLS)
def test_newton_fallback_resolves_unconverged_chains(cell):
    """``solve_forward(method="newton", fallback_tol=...)``: the gated sweep re-solves exactly the chains whose
    Newton residual is above the tolerance and counts them; converged chains are left as Newton wrote them.
    Half the channels get recurrent weights U(±3) (3 iterations do not converge), half U(±0.3).

    Mutation: the sweep's gate returning for every program (``n_bad >= 0``) -> fails; the Newton kernel's
    residual left at 0 -> fails."""
    B, T, N = 2, 24, 32  # two 16-channel tiles: the hard half and the easy half
    g = torch.Generator().manual_seed(5)
    P = 2.0 * torch.randn(B, T, 3, N, generator=g)
    amp = torch.cat([torch.full((N // 2,), 3.0), torch.full((N // 2,), 0.3)])
    A = (torch.rand(3, N, generator=g) * 2 - 1) * amp
    C = (torch.rand(2, N, generator=g) * 2 - 1) * amp if cell == "lstm" else None
    h0 = 0.5 * torch.randn(B, K_OF[cell], N, generator=g)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[1, 11] = True
    ref = sequential(cell, P.double(), A.double(), None if C is None else C.double(), h0.double(), reset)
    args = [_dev(t) for t in (P, A, C, h0, reset)]
    h_off, res = solve_forward(cell, *args, residual=True, method="newton")
    count = torch.zeros((), dtype=torch.int64, device=DEVICE)
    h_fb, res_fb = solve_forward(cell, *args, residual=True, method="newton", fallback_tol=1e-4, fallback_count=count)
    hard, easy = (slice(0, N // 2), slice(N // 2, N))
    assert rel_err(h_off[..., hard], ref[..., hard]) > 1e-3  # Newton alone is wrong on the hard half
    assert rel_err(h_fb, ref) <= 1e-5
    assert float(res_fb) == float(res) > 1e-4  # the residual reported is Newton's own
    assert 0 < int(count) <= B * N // 2  # only chains of the hard half were unconverged
    assert torch.equal(h_fb[..., easy], h_off[..., easy])  # the easy tile was not touched


@pytest.mark.parametrize("cell", CELLS)
def test_newton_fallback_is_a_no_op_when_converged(cell):
    P, A, C, h0, reset, _ = make_inputs(cell, "odd", torch.float32)
    args = [_dev(t) for t in (P, A, C, h0, reset)]
    count = torch.zeros((), dtype=torch.int64, device=DEVICE)
    h_fb, _ = solve_forward(cell, *args, method="newton", fallback_tol=1e-4, fallback_count=count)
    h_off, _ = solve_forward(cell, *args, method="newton")
    assert int(count) == 0 and torch.equal(h_fb, h_off)


def test_pick_method_rule():
    from kernels.pararnn import pick_method

    assert pick_method("gru", 8, 2048, 1024, "fwd") == "newton"
    assert pick_method("gru", 8, 2048, 2048, "fwd") == "sweep"
    assert pick_method("lstm", 1, 4096, 256, "fwd") == "sweep"
    assert pick_method("gru", 8, 2048, 1024, "bwd") == "newton"
    assert pick_method("gru", 8, 2048, 2048, "bwd") == "sweep"
    assert pick_method("lstm", 4, 2048, 1024, "bwd") == "newton"
    assert pick_method("lstm", 8, 2048, 1024, "bwd") == "sweep"


def test_launch_cache_dispatch(monkeypatch):
    """``api._launch`` (GPU only; here with a stand-in kernel): the first launch of a key goes through
    Triton, a repeat calls the compiled launcher with every argument in signature order, and any
    change Triton could specialise on (dtype, alignment, an int's value, constexprs, warps) misses."""
    from kernels.pararnn import api

    calls = []

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def run(self, *a):
            calls.append(("fast", a))

    class Kernel:
        arg_names = ["X", "n", "FLAG", "BLOCK"]

        def __getitem__(self, grid):
            return lambda *a, **k: (calls.append(("triton", grid, a, k)), Compiled())[1]

    class Driver:
        class active:
            @staticmethod
            def get_current_stream(device):
                return "stream"

    monkeypatch.setattr(api, "_INTERPRET", False)
    monkeypatch.setattr(api, "_driver", Driver)
    monkeypatch.setattr(api, "_LAUNCHERS", {})
    kern, x = Kernel(), torch.zeros(64)
    consts = {"BLOCK": 16, "FLAG": True}
    api._launch(kern, (2, 3), (x,), (32,), consts, 4)
    api._launch(kern, (2, 3), (torch.ones(64),), (32,), consts, 4)  # another tensor, same key
    assert [c[0] for c in calls] == ["triton", "fast"]
    assert calls[0][2:] == ((x, 32), {"BLOCK": 16, "FLAG": True, "num_warps": 4})
    assert calls[1][1][:9] == (2, 3, 1, "stream", "fn", "meta", None, None, None)
    assert calls[1][1][10:] == (32, True, 16)
    for ptrs, scalars, cst, nw in (((x,), (48,), consts, 4),
                                   ((x.double(),), (32,), consts, 4),
                                   ((x[1:],), (32,), consts, 4),      # 4-byte aligned
                                   ((x,), (32,), {"BLOCK": 16, "FLAG": False}, 4),
                                   ((x,), (32,), consts, 8)):
        calls.clear()
        api._launch(kern, (2, 3), ptrs, scalars, cst, nw)
        assert [c[0] for c in calls] == ["triton"], (scalars, cst, nw)


@pytest.mark.parametrize("cell", CELLS)
def test_lm_training_matches_parallel_mode(cell):
    """The whole LM (packed documents, clip 0.5) trained for a few steps with mode="triton" follows
    the same losses and weights as with the torch "parallel" mode (fp32). Plain SGD: Adam's
    normalisation would turn 1e-7 differences in near-zero gradients into lr-sized steps."""
    pytest.importorskip("models.pararnn")
    from models.pararnn import ParaRNNConfig
    from models.pararnn.modeling_pararnn import ParaRNNForCausalLM

    B, T, V = 2, 24, 96
    g = torch.Generator().manual_seed(0)
    # learnable rows (each token is the previous one + 1), so the loss has somewhere to go
    batches = [(torch.randint(0, V, (B, 1), generator=g) + torch.arange(T)) % V for _ in range(6)]
    position_ids = torch.cat([torch.arange(10), torch.arange(T - 10)]).repeat(B, 1)  # two documents per row
    runs = {}
    for mode in ("triton", "parallel"):
        # N(0, 0.02) outside the cells: SGD at lr 0.5 on DCLM's 9x larger weights at d = 32 amplifies fp32
        # rounding over the six steps past the tolerance (1.02e-5), in both modes alike
        config = ParaRNNConfig(cell=cell, vocab_size=V, hidden_size=32, num_hidden_layers=2, num_heads=2,
                               mode=mode, bos_token_id=0, eos_token_id=0, initializer_range=0.02)
        torch.manual_seed(0)
        model = ParaRNNForCausalLM(config).to(DEVICE)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for ids in batches:
            ids = ids.to(DEVICE)
            loss = model(input_ids=ids, position_ids=position_ids.to(DEVICE), labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[mode] = (losses, [p.detach().clone() for p in model.parameters()])
    (l_t, p_t), (l_p, p_p) = runs["triton"], runs["parallel"]
    assert max(abs(a - b) for a, b in zip(l_t, l_p)) <= 1e-5 * abs(l_p[0]), (l_t, l_p)
    assert l_p[-1] < l_p[0] - 0.1, l_p  # it trained
    for a, b in zip(p_t, p_p):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("mode", ["parallel", "triton"])
@pytest.mark.parametrize("cell", CELLS)
def test_recomputed_projection_under_autocast(cell, mode):
    """``save_projection = False`` redoes P in the backward under the forward's autocast state, so
    the gradients equal those of the saved-P run (fp32 weights, fp16 autocast: the backward itself
    does not run under autocast, and a plain recompute would be fp32)."""
    pararnn = pytest.importorskip("models.pararnn")
    cls = pararnn.ParaGRU if cell == "gru" else pararnn.ParaLSTM
    torch.manual_seed(2)
    m = cls(16, 16, num_heads=2, mode=mode).to(DEVICE)
    x = torch.randn(2, 11, 16, device=DEVICE)
    w = torch.randn(2, 11, 16, device=DEVICE)
    grads = []
    for save in (True, False):
        m.save_projection = save
        xx = x.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.float16):
            y = m(xx)
        grads.append(torch.autograd.grad((y.float() * w).sum(), [xx] + list(m.parameters())))
    for a, b in zip(*grads):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cell", CELLS)
def test_head_split_projection_past_int32_offsets(cell, method):
    """A head-split P of 3.2e9 elements (1 x 2^19+3 steps x 3 gates x 4 heads of 512, as per-head GEMMs
    lay it out: head stride largest): the last head's states and dP equal those of that head solved
    alone, whose offsets fit 32 bits. Before chan_offsets' head index became int64, bench_seqpar's longest-T
    search hit an illegal memory access at this size (T = 2^19, d = 2048, 4 heads); this test itself has run
    only against the fixed kernels (its four cases passed on an H200), not against the int32 version."""
    heads, NH, T = 4, 512, 2 ** 19 + 3
    g = torch.Generator(device="cuda").manual_seed(0)
    P_heads = torch.randn(heads, 1, T, 3, NH, device="cuda", dtype=torch.bfloat16, generator=g)
    A = torch.rand(3, heads * NH, device="cuda", generator=g) - 0.5
    C = torch.rand(2, heads * NH, device="cuda", generator=g) - 0.5 if cell == "lstm" else None
    last = slice((heads - 1) * NH, heads * NH)
    P_last = P_heads[-1].clone()
    A_last, C_last = A[:, last].contiguous(), (C[:, last].contiguous() if C is not None else None)

    h, _ = solve_forward(cell, P_heads.permute(1, 2, 3, 0, 4), A, C, None, None, method=method)
    h_last, _ = solve_forward(cell, P_last, A_last, C_last, None, None, method=method)
    assert rel_err(h[..., last], h_last) <= 1e-2
    grad = torch.randn(1, T, heads * NH, device="cuda", dtype=torch.bfloat16, generator=g)
    dP = solve_backward(cell, P_heads.permute(1, 2, 3, 0, 4), A, C, None, None, h, grad, method=method)[0]
    dP_last = solve_backward(cell, P_last, A_last, C_last, None, None, h_last, grad[..., last].contiguous(),
                             method=method)[0]
    assert rel_err(dP[..., -1, :], dP_last) <= 1e-2
