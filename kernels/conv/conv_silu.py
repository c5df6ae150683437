"""``u = SiLU(conv(v))``: the short causal depthwise conv of the ParaRNN block, fused with its SiLU, whose window
never reaches back across a document start. The reference math is ``models/pararnn/pararnn_conv.py``'s
``CausalDepthwiseConv`` (then ``F.silu``)::

    u[b, t, d] = SiLU(bias[d] + Σ_{i < K, i ≤ pos[b, t]} weight[d, K-1-i] · v[b, t-i, d])

where ``pos`` is the position in the document (``position_ids``, restarting at 0 where a document starts;
None: one document per row, ``pos = t``).

Why a kernel: compiled, Inductor's fused kernels for this conv (forward, the recomputed forward, the input
gradient, the weight-gradient reduction) took ~19 ms of the 1B ParaGRU's ~290-ms training step on an H200
at ~0.8 TB/s (``benchmarks/RESULTS.md``); here the forward reads v once and writes u once, in fp32 inside.

* forward: one program per ``[BLOCK_T, BLOCK_D]`` tile of one row, the K taps as K shifted (cached) loads;
* backward: (1) the pre-activation recomputed, ``g = du · SiLU'(pre)`` written once in du's dtype (fp32
  moved the bf16 check's dv error only 6.9e-3 -> 5.9e-3: most of it is du's and dv's own rounding), and
  per-tile partial sums of ``g · v[t-i]`` (weight) and ``g`` (bias), summed over the tiles outside
  (deterministic, no atomics);
  (2) ``dv[t] = Σ_j weight[:, K-1-j] · g[t+j]`` over the taps whose output lies in v's document.

Both directions are ``torch.library`` custom ops (``causal_conv::silu_fwd`` / ``silu_bwd`` with fake
implementations), so ``torch.compile`` traces a block around them without a graph break; eager calls go
through the same ops. Shapes: ``v [B, T, D]`` (last dim contiguous, any other strides: the block passes a
half of its input projection's output), ``weight [D, K]``, ``bias [D]``, ``positions [B, T]`` integer or None;
``u`` is ``[B, T, D]`` in v's dtype, contiguous.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_T, BLOCK_D, NUM_WARPS = 32, 128, 4


@triton.jit
def _positions(POS, b, t, mt, sPb, sPt, HAS_POS: tl.constexpr):
    """Each step's position in its document; without positions, t (one document per row)."""
    if HAS_POS:
        # int32 like t: Triton needs both branches' types equal (the interpreter does not check it)
        return tl.load(POS + b * sPb + t * sPt, mask=mt, other=0).to(tl.int32)
    return t


@triton.jit
def _tap(V, b, t, d, mt, md, pos, i, sVb, sVt):
    """``v[t - i]`` (fp32) where tap i of output t lies in t's document, else 0."""
    ok = mt & (t >= i) & (pos >= i)
    return tl.load(V + b * sVb + (t - i).to(tl.int64)[:, None] * sVt + d[None, :],
                   mask=ok[:, None] & md[None, :], other=0.0).to(tl.float32)


@triton.jit
def _pre(V, W, BIAS, b, t, d, mt, md, pos, sVb, sVt, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The conv's pre-activation of a tile, fp32."""
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    acc += tl.load(BIAS + d, mask=md, other=0.0).to(tl.float32)[None, :]
    for i in tl.static_range(K):
        w = tl.load(W + d * K + (K - 1 - i), mask=md, other=0.0).to(tl.float32)
        acc += _tap(V, b, t, d, mt, md, pos, i, sVb, sVt) * w[None, :]
    return acc


@triton.jit
def conv_silu_fwd_kernel(V, W, BIAS, POS, U, T, D, sVb, sVt, sPb, sPt,
                         K: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mt, md = t < T, d < D
    pos = _positions(POS, b, t, mt, sPb, sPt, HAS_POS)
    acc = _pre(V, W, BIAS, b, t, d, mt, md, pos, sVb, sVt, K, BLOCK_T, BLOCK_D)
    u = acc * tl.sigmoid(acc)
    tl.store(U + (b * T + t.to(tl.int64))[:, None] * D + d[None, :], u.to(U.dtype.element_ty),
             mask=mt[:, None] & md[None, :])


@triton.jit
def conv_silu_bwd_pre_kernel(V, W, BIAS, POS, DU, G, PART, T, D, sVb, sVt, sPb, sPt, sDb, sDt,
                             K: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``G = du · SiLU'(pre)`` ([B, T, D], contiguous) and the tile's partial sums: ``PART[row, i, d] =
    Σ_t G · v[t-i]`` (weight column K-1-i) for i < K, ``PART[row, K, d] = Σ_t G`` (bias)."""
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mt, md = t < T, d < D
    m2 = mt[:, None] & md[None, :]
    pos = _positions(POS, b, t, mt, sPb, sPt, HAS_POS)
    acc = _pre(V, W, BIAS, b, t, d, mt, md, pos, sVb, sVt, K, BLOCK_T, BLOCK_D)
    du = tl.load(DU + b * sDb + t.to(tl.int64)[:, None] * sDt + d[None, :], mask=m2, other=0.0).to(tl.float32)
    sig = tl.sigmoid(acc)
    g = tl.where(m2, du * sig * (1.0 + acc * (1.0 - sig)), 0.0)
    tl.store(G + (b * T + t.to(tl.int64))[:, None] * D + d[None, :], g.to(G.dtype.element_ty), mask=m2)
    row = PART + (b * tl.num_programs(0) + tl.program_id(0)) * (K + 1) * D
    for i in tl.static_range(K):
        tl.store(row + i * D + d, tl.sum(g * _tap(V, b, t, d, mt, md, pos, i, sVb, sVt), axis=0), mask=md)
    tl.store(row + K * D + d, tl.sum(g, axis=0), mask=md)


@triton.jit
def conv_silu_bwd_input_kernel(G, W, POS, DV, T, D, sPb, sPt,
                               K: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``dv[t] = Σ_j weight[:, K-1-j] · G[t+j]``, over the taps j whose output t+j is in the sequence and, with
    positions, in v[t]'s document (``pos[t+j] ≥ j``)."""
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mt, md = t < T, d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        ok = mt & (t + j < T)
        ok = ok & (_positions(POS, b, t + j, ok, sPb, sPt, HAS_POS) >= j)
        w = tl.load(W + d * K + (K - 1 - j), mask=md, other=0.0).to(tl.float32)
        g = tl.load(G + (b * T + (t + j).to(tl.int64))[:, None] * D + d[None, :],
                    mask=ok[:, None] & md[None, :], other=0.0).to(tl.float32)
        acc += g * w[None, :]
    tl.store(DV + (b * T + t.to(tl.int64))[:, None] * D + d[None, :], acc.to(DV.dtype.element_ty),
             mask=mt[:, None] & md[None, :])


def _prep(v: Tensor, weight: Tensor, positions: Tensor | None):
    if v.dim() != 3 or weight.dim() != 2 or weight.shape[0] != v.shape[-1]:
        raise ValueError(f"causal_conv_silu: v must be [B, T, D] and weight [D, K], got {tuple(v.shape)} and "
                         f"{tuple(weight.shape)}")
    if positions is not None and tuple(positions.shape) != tuple(v.shape[:2]):
        raise ValueError(f"causal_conv_silu: positions must be [B, T] = {tuple(v.shape[:2])}, got "
                         f"{tuple(positions.shape)}")
    v = v if v.stride(-1) == 1 else v.contiguous()
    B, T, D = v.shape
    pos = positions if positions is not None else weight  # never read without HAS_POS
    s_pos = (positions.stride(0), positions.stride(1)) if positions is not None else (0, 0)
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D), B)
    consts = dict(K=weight.shape[1], HAS_POS=positions is not None, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
                  num_warps=NUM_WARPS)
    return v, B, T, D, pos, s_pos, grid, consts


@torch.library.custom_op("causal_conv::silu_fwd", mutates_args=())
def _forward(v: Tensor, weight: Tensor, bias: Tensor, positions: Tensor | None) -> Tensor:
    v, B, T, D, pos, s_pos, grid, consts = _prep(v, weight, positions)
    u = torch.empty(B, T, D, device=v.device, dtype=v.dtype)
    if u.numel():
        conv_silu_fwd_kernel[grid](v, weight.contiguous(), bias.contiguous(), pos, u, T, D, v.stride(0), v.stride(1),
                                   *s_pos, **consts)
    return u


@_forward.register_fake
def _(v, weight, bias, positions):
    return v.new_empty(v.shape)


@torch.library.custom_op("causal_conv::silu_bwd", mutates_args=())
def _backward(du: Tensor, v: Tensor, weight: Tensor, bias: Tensor,
              positions: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    v, B, T, D, pos, s_pos, grid, consts = _prep(v, weight, positions)
    du = du if du.stride(-1) == 1 else du.contiguous()
    K = weight.shape[1]
    w = weight.contiguous()
    g = torch.empty(B, T, D, device=v.device, dtype=torch.promote_types(du.dtype, v.dtype))
    part = torch.empty(grid[0] * B, K + 1, D, device=v.device, dtype=torch.float32)  # every entry written
    dv = torch.empty(B, T, D, device=v.device, dtype=v.dtype)
    if dv.numel():
        conv_silu_bwd_pre_kernel[grid](v, w, bias.contiguous(), pos, du, g, part, T, D, v.stride(0), v.stride(1),
                                       *s_pos, du.stride(0), du.stride(1), **consts)
        conv_silu_bwd_input_kernel[grid](g, w, pos, dv, T, D, *s_pos, **consts)
    sums = part.sum(0)  # [K + 1, D]: row i is weight column K-1-i, row K the bias
    return dv, sums[:K].flip(0).t().to(weight.dtype).contiguous(), sums[K].to(bias.dtype).clone()


@_backward.register_fake
def _(du, v, weight, bias, positions):
    return (v.new_empty(v.shape), torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(bias, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:
    v, weight, bias, positions = inputs
    ctx.save_for_backward(v, weight, bias, positions)


def _autograd(ctx, du):
    v, weight, bias, positions = ctx.saved_tensors
    dv, dweight, dbias = torch.ops.causal_conv.silu_bwd(du, v, weight, bias, positions)
    return dv, dweight, dbias, None


_forward.register_autograd(_autograd, setup_context=_setup_context)


def causal_conv_silu(v: Tensor, weight: Tensor, bias: Tensor, positions: Tensor | None = None) -> Tensor:
    """``SiLU(conv(v))`` (see the module docstring): ``v [B, T, D]``, ``weight [D, K]``, ``bias [D]``,
    ``positions [B, T]`` integer or None -> ``u [B, T, D]`` in v's dtype. Differentiable in v, weight, bias."""
    return torch.ops.causal_conv.silu_fwd(v, weight, bias, positions)
