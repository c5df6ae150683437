"""Addressing and parameter loads shared by the ParaRNN kernels.

The projection ``P`` (and its gradient ``dP``) may be head-split: the cell's input map is
block-diagonal over heads, so one batched GEMM per head writes ``[H, B, T, G, N/H]``, and channel
``n`` lives at ``(n // NH) * sH + n % NH`` (``NH = N/H`` channels per head, ``sH`` the head stride).
Reading that layout directly spares a relayout copy in the forward and two in the backward. When a
program's ``BLOCK_N`` channels lie inside one head (``IN_HEAD``: ``NH % BLOCK_N == 0``, or one head),
the offsets are a scalar base plus ``arange``, so the compiler still sees contiguous channels.

The recurrent weights may be clipped (``|a| ≤ clip``, the paper's LM setting): the kernels clamp
them on load, and the backward masks their gradients where the clamp was active (torch's
``clamp`` gradient: passes where ``-clip ≤ a ≤ clip``), so no clamp op runs outside.
"""
import triton
import triton.language as tl


@triton.jit
def chan_offsets(pid_n, NH, sH, BLOCK_N: tl.constexpr, IN_HEAD: tl.constexpr):
    """Memory offsets ``[BLOCK_N]`` of program ``pid_n``'s channels in a head-split layout."""
    n0 = pid_n * BLOCK_N
    if IN_HEAD:
        head = n0 // NH
        return head * sH + (n0 - head * NH) + tl.arange(0, BLOCK_N)
    else:
        offs = n0 + tl.arange(0, BLOCK_N)
        return (offs // NH) * sH + offs % NH


@triton.jit
def load_weight(ptr, offs_n, mask_n, clip, HAS_CLIP: tl.constexpr):
    """One row of a diagonal recurrent weight as fp32 ``[BLOCK_N]``, clamped to ``±clip`` if asked."""
    w = tl.load(ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_CLIP:
        w = tl.minimum(tl.maximum(w, -clip), clip)
    return w


@triton.jit
def load_weights3(ptr, N, offs_n, mask_n, clip, HAS_CLIP: tl.constexpr):
    """Rows 0–2 of a ``[3, N]`` recurrent weight (:func:`load_weight` each)."""
    return (load_weight(ptr, offs_n, mask_n, clip, HAS_CLIP), load_weight(ptr + N, offs_n, mask_n, clip, HAS_CLIP),
            load_weight(ptr + 2 * N, offs_n, mask_n, clip, HAS_CLIP))


@triton.jit
def load_weights2(ptr, N, offs_n, mask_n, clip, HAS_CLIP: tl.constexpr):
    """Rows 0–1 of the LSTM's ``[2, N]`` peepholes (:func:`load_weight` each)."""
    return load_weight(ptr, offs_n, mask_n, clip, HAS_CLIP), load_weight(ptr + N, offs_n, mask_n, clip, HAS_CLIP)


@triton.jit
def store_weight_grad(ptr, acc, w_ptr, offs_n, mask_n, clip, HAS_CLIP: tl.constexpr):
    """Store a weight-gradient partial; zero where the forward's clamp was active."""
    if HAS_CLIP:
        w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = tl.where(tl.abs(w) <= clip, acc, 0.0)
    tl.store(ptr + offs_n, acc, mask=mask_n)


@triton.jit
def store_partials(part, N, offs_n, mask_n, W, clip, g0, g1, g2, b0, b1, b2,
                   HAS_CLIP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A program's partial sums for three weight rows (``W``, masked by the clip) and, after them,
    the three bias rows: rows 0–2 of ``part`` get ``g*``, rows 3–5 ``b*`` (if ``HAS_BIAS``)."""
    store_weight_grad(part, g0, W, offs_n, mask_n, clip, HAS_CLIP)
    store_weight_grad(part + N, g1, W + N, offs_n, mask_n, clip, HAS_CLIP)
    store_weight_grad(part + 2 * N, g2, W + 2 * N, offs_n, mask_n, clip, HAS_CLIP)
    if HAS_BIAS:
        tl.store(part + 3 * N + offs_n, b0, mask=mask_n)
        tl.store(part + 4 * N + offs_n, b1, mask=mask_n)
        tl.store(part + 5 * N + offs_n, b2, mask=mask_n)


@triton.jit
def load_bias(ptr, offs_n, mask_n, HAS_BIAS: tl.constexpr):
    """One row of the projection bias as fp32 ``[BLOCK_N]`` (zeros when there is none)."""
    if HAS_BIAS:
        return tl.load(ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        return tl.zeros(offs_n.shape, dtype=tl.float32)


@triton.jit
def load_biases3(ptr, N, offs_n, mask_n, HAS_BIAS: tl.constexpr):
    """The three rows of the ``[3, N]`` projection bias (:func:`load_bias` each)."""
    return (load_bias(ptr, offs_n, mask_n, HAS_BIAS), load_bias(ptr + N, offs_n, mask_n, HAS_BIAS),
            load_bias(ptr + 2 * N, offs_n, mask_n, HAS_BIAS))


@triton.jit
def load3(ptr, stride, mask):
    """Three tiles ``ptr``, ``ptr + stride``, ``ptr + 2·stride`` (the gates of P), in storage dtype."""
    return (tl.load(ptr, mask=mask, other=0.0), tl.load(ptr + stride, mask=mask, other=0.0),
            tl.load(ptr + 2 * stride, mask=mask, other=0.0))


@triton.jit
def load_gates(ptr, stride, mask, b0, b1, b2):
    """The three gate tiles of P as fp32 with the bias rows ``b0, b1, b2 [BLOCK_N]`` added."""
    x0, x1, x2 = load3(ptr, stride, mask)
    return (x0.to(tl.float32) + b0[None, :], x1.to(tl.float32) + b1[None, :],
            x2.to(tl.float32) + b2[None, :])


@triton.jit
def store3(ptr, stride, x0, x1, x2, mask):
    """Store three gate tiles (cast to the destination dtype)."""
    ty = ptr.dtype.element_ty
    tl.store(ptr, x0.to(ty), mask=mask)
    tl.store(ptr + stride, x1.to(ty), mask=mask)
    tl.store(ptr + 2 * stride, x2.to(ty), mask=mask)


@triton.jit
def unconverged(res_row, offs_n, mask_n, tol):
    """How many of the channels ``offs_n`` have a residual above ``tol`` or not finite (NaN compares false)."""
    r = tl.load(res_row + offs_n, mask=mask_n, other=0.0)
    return tl.sum((~(r <= tol) & mask_n).to(tl.int32), axis=0)
