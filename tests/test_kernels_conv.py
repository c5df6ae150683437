"""The fused causal conv + SiLU kernel (``kernels.conv``) against a float64 loop over steps and taps.

Runs on CPU through Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``) or on a GPU.
The output and every gradient (v, weight, bias) are compared by max-abs error relative to the reference's
max-abs value, fp32 within 1e-5; shapes cover T not a multiple of the 32-step tile (and more than one tile),
D not a multiple of the channel tile, documents starting at t = 0, mid-tile and on a tile boundary, one
document per row (no positions), K = 4 (the presets') and 3, and v a strided half of a wider tensor (as the
block passes it).

Mutations seen failing: the taps' document mask dropped (``& (pos >= i)`` in ``_tap``) -> the
output and every gradient; the input gradient's document mask dropped -> dv; the weight gradient's column
order not flipped -> dweight.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.conv import causal_conv_silu
from models.pararnn.pararnn_conv import CausalDepthwiseConv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(v, weight, bias, positions):
    """SiLU of the conv by loops: tap i of output t reads v[t - i] if it is in t's document."""
    B, T, D = v.shape
    K = weight.shape[1]
    rows = []
    for b in range(B):
        outs = []
        for t in range(T):
            pos = t if positions is None else int(positions[b, t])
            acc = bias.clone()
            for i in range(K):
                if i <= pos and t - i >= 0:
                    acc = acc + weight[:, K - 1 - i] * v[b, t - i]
            outs.append(acc)
        rows.append(torch.stack(outs))
    return F.silu(torch.stack(rows))


def doc_positions(B, T, starts):
    """position_ids restarting at 0 at each (row, step) in starts (and at t = 0)."""
    pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        p = 0
        for t in range(T):
            p = 0 if t == 0 or (b, t) in starts else p + 1
            pos[b, t] = p
    return pos


def rel_err(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


CASES = {  # name: (B, T, D, K, document starts or None for no positions)
    "docs": (2, 37, 20, 4, {(0, 5), (0, 32), (1, 1), (1, 34)}),
    "one_doc": (1, 70, 9, 4, None),
    "k3_tile_start": (2, 33, 130, 3, {(0, 31), (1, 32)}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_conv_silu_matches_the_loop(name):
    B, T, D, K, starts = CASES[name]
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(B, T, 2 * D, generator=gen)
    weight = torch.randn(D, K, generator=gen) * 0.5
    bias = torch.randn(D, generator=gen) * 0.1
    du = torch.randn(B, T, D, generator=gen)
    positions = None if starts is None else doc_positions(B, T, starts)

    leaves = [t.double().requires_grad_() for t in (wide, weight, bias)]
    ref = reference(leaves[0][..., :D], leaves[1], leaves[2], positions)
    ref_grads = torch.autograd.grad((ref * du.double()).sum(), leaves)

    mine = [t.to(DEVICE).requires_grad_() for t in (wide, weight, bias)]
    v = mine[0][..., :D]  # strided: the block's conv input is half of its projection's output
    assert v.stride(-1) == 1 and not v.is_contiguous()
    u = causal_conv_silu(v, mine[1], mine[2], None if positions is None else positions.to(DEVICE))
    grads = torch.autograd.grad((u * du.to(DEVICE)).sum(), mine)

    assert rel_err(u, ref) < 1e-5
    assert rel_err(grads[0][..., :D], ref_grads[0][..., :D]) < 1e-5  # dv
    assert grads[0][..., D:].abs().max() == 0  # the other half of the wide tensor has no gradient
    assert rel_err(grads[1], ref_grads[1]) < 1e-5  # dweight
    assert rel_err(grads[2], ref_grads[2]) < 1e-5  # dbias


def test_block_conv_uses_the_kernel_in_mode_triton_and_agrees_with_the_torch_form():
    """``CausalDepthwiseConv.silu(fused=True)`` is the kernel (where it can run) and equals the torch form;
    with a prefix (sequence parallelism) it is the torch form."""
    torch.manual_seed(0)
    conv = CausalDepthwiseConv(12, 4).to(DEVICE)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    v = torch.randn(2, 19, 12, device=DEVICE)
    positions = doc_positions(2, 19, {(0, 6), (1, 11)}).to(DEVICE)
    torch_form = F.silu(conv(v, positions))
    fused = conv.silu(v, positions, fused=True)
    assert rel_err(fused, torch_form) < 1e-5
    with torch.profiler.profile() as prof:
        conv.silu(v, positions, fused=True)
    assert "causal_conv::silu_fwd" in [e.name for e in prof.events()]
    prefix = torch.randn(2, 3, 12, device=DEVICE)
    with torch.profiler.profile() as prof:
        out = conv.silu(v, positions, prefix, fused=True)
    assert "causal_conv::silu_fwd" not in [e.name for e in prof.events()]
    assert rel_err(out, F.silu(conv(v, positions, prefix))) < 1e-6


@pytest.mark.parametrize("fused_conv, mode, expected", [(True, "triton", True), (False, "triton", False),
                                                        (True, "parallel", False)])
def test_lm_calls_the_kernel_only_with_fused_conv_in_mode_triton(fused_conv, mode, expected):
    """``ParaRNNConfig.fused_conv`` switches the block's conv to the kernel, in mode "triton" only (the block's
    kernels go with the cell's). Mutation: the flag ignored -> the (False, "triton") case fails."""
    from models.registry import build_model

    torch.manual_seed(0)
    model = build_model("pararnn", dict(cell="gru", hidden_size=16, num_hidden_layers=1, num_heads=2, vocab_size=32,
                                        mode=mode, fused_conv=fused_conv), 32).to(DEVICE)
    ids = torch.randint(0, 32, (1, 12), device=DEVICE)
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(input_ids=ids, position_ids=torch.arange(12, device=DEVICE)[None] % 5)
    assert ("causal_conv::silu_fwd" in [e.name for e in prof.events()]) == expected
