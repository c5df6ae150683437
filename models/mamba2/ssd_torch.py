"""Pure-torch Mamba-2 pieces that respect document boundaries (``seq_idx``): the chunked SSD scan, the
causal depthwise conv, and a sequential per-step recurrence used as the reference in tests.

``seq_idx[b, t]`` numbers the documents of a packed row (non-decreasing; equal ids = same document).
Nothing crosses a boundary: at the first token of a document the SSM state restarts from zero and the
conv sees zeros in place of the previous document's tokens. ``seq_idx=None`` means one document per row.

Notation (as mamba-ssm): x [b, l, h, p] (p = head_dim), dt [b, l, h] (after softplus and clamping),
A [h] (negative), B and C [b, l, g, n] (g groups shared by h/g heads each, n = state size), D [h].
The recurrence per head is

    S_t = exp(dt_t·A) · S_{t-1} · [same document as t-1] + dt_t · x_t ⊗ B_t        (S: [p, n])
    y_t = S_t · C_t + D · x_t
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def seq_idx_from_position_ids(position_ids: Tensor | None) -> Tensor | None:
    """Document ids (int32, starting at 0 in each row) from packed ``position_ids``; None if no row is packed.

    A new document starts wherever the position does not continue the previous one (``diff != 1``),
    the same rule as ``transformers.masking_utils.find_packed_sequence_indices``, so the Transformer's
    block-diagonal mask and Mamba2's resets agree on where documents start (a restart at 0 is the
    contract; a row that begins mid-document at position k > 0 is one document).
    """
    if position_ids is None:
        return None
    first = position_ids[:, :1] - 1
    starts = torch.diff(position_ids, prepend=first, dim=-1) != 1
    seq_idx = starts.cumsum(-1, dtype=torch.int32)
    if not torch.compiler.is_compiling() and not bool((seq_idx[:, -1] > 0).any()):
        return None
    return seq_idx


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None) -> Tensor:
    """Causal depthwise conv over time of ``x`` [b, l, c] with ``weight`` [c, k]; taps from another document are zero.

    Written as a sum of k shifted copies (k = 4) so that each tap can be masked per position; with
    ``seq_idx=None`` it equals ``F.conv1d(..., padding=k-1, groups=c)[..., :l]`` (HF's torch path).
    The result is in ``weight``'s dtype like HF's: each product promotes x to it (as a cast of x first would,
    exactly), without keeping an upcast copy of x for the backward.
    """
    b, l, c = x.shape
    k = weight.shape[-1]
    padded = F.pad(x, (0, 0, k - 1, 0))                                   # [b, l + k - 1, c]
    if seq_idx is not None:
        seq_padded = F.pad(seq_idx, (k - 1, 0), value=-1)                 # pad ids match nothing
    out = x * weight[:, k - 1]                                            # the current token's tap
    for j in range(k - 1):                                                # tap j looks back k - 1 - j steps
        tap = padded[:, j:j + l]
        if seq_idx is not None:
            tap = tap * (seq_padded[:, j:j + l] == seq_idx).unsqueeze(-1).to(tap.dtype)
        out = out + tap * weight[:, j]
    if bias is not None:
        out = out + bias
    return out


def _segsum(a: Tensor) -> Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for j <= i, -inf above the diagonal.

    Computed with a masked cumsum rather than a difference of cumsums, which loses precision for
    long chunks with strong decay.
    """
    length = a.shape[-1]
    a = a[..., None].expand(*a.shape, length)                              # [..., i(src), j]
    strict = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~strict, 0)
    out = torch.cumsum(a, dim=-2)
    keep = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~keep, -torch.inf)


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                D: Tensor | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """Chunked SSD scan (Mamba-2's "minimal discrete" algorithm) with document resets; returns y [b, l, h, p].

    Computes in float32 (float64 stays float64) and returns x's dtype. Per chunk of ``chunk_size``
    steps: (1) the intra-chunk output as a masked attention-like product, (2) each chunk's final
    state from its own tokens, (3) the states carried across chunks, (4) their contribution to each
    output. Resets enter as masks: a pair (source s, target t) only contributes when both lie in the
    same document, and a carried state only reaches tokens of the document it belongs to.
    """
    b, l, h, p = x.shape
    g = B.shape[2]
    dtype = x.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    x, dt, A, B, C = (t.to(work) for t in (x, dt, A, B, C))
    B = B.repeat_interleave(h // g, dim=2)                                # [b, l, h, n]
    C = C.repeat_interleave(h // g, dim=2)

    pad = (-l) % chunk_size
    if pad:
        # Zero dt on the padding: no decay, no input; the padded outputs are cut off below.
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    nc = (l + pad) // chunk_size

    def chunks(t):
        return t.reshape(b, nc, chunk_size, *t.shape[2:])

    xdt = chunks(x * dt[..., None])                                       # [b, c, s, h, p]
    Bc, Cc = chunks(B), chunks(C)                                         # [b, c, s, h, n]
    dA = chunks(dt * A).permute(0, 3, 1, 2)                               # [b, h, c, s]
    dA_cum = torch.cumsum(dA, dim=-1)

    # (1) Intra-chunk: y_t += sum_{s<=t} C_t·B_s exp(dA_{s+1..t}) dt_s x_s  (same document only).
    decay = torch.exp(_segsum(dA))                                        # [b, h, c, t, s]
    if seq_idx is not None:
        sc = seq_idx.reshape(b, nc, chunk_size)
        same = (sc[:, :, :, None] == sc[:, :, None, :])                   # [b, c, t, s]
        decay = decay * same[:, None].to(work)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, decay, xdt)

    # (2) Each chunk's final state from its own tokens, keeping only the document alive at its end.
    to_end = torch.exp(dA_cum[..., -1:] - dA_cum)                         # [b, h, c, s]
    if seq_idx is not None:
        last = sc[:, :, -1]                                               # [b, c] document at each chunk end
        to_end = to_end * (sc == last[..., None])[:, None].to(work)
    states = torch.einsum("bcshn,bhcs,bcshp->bchpn", Bc, to_end, xdt)

    # (3) Carry states across chunks: state at the start of chunk c = sum over earlier chunk ends
    # z < c of exp(total decay in between) · state_z, if no document starts in between.
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)  # index 0: the zero initial state
    chunk_decay = torch.exp(_segsum(F.pad(dA_cum[..., -1], (1, 0))))     # [b, h, c+1, c+1]
    if seq_idx is not None:
        # Document id at each chunk boundary (boundary 0 = row start, boundary c = end of chunk c-1).
        # Ids never decrease, so equal ids at two boundaries <=> no document starts between them.
        ends = torch.cat([sc[:, :1, 0], last], dim=1)                     # [b, c+1]
        chunk_decay = chunk_decay * (ends[:, :, None] == ends[:, None, :])[:, None].to(work)
    carried = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]  # [b, c, h, p, n] at chunk starts

    # (4) Carried state -> outputs of the chunk, for tokens still in the document the state belongs to.
    from_start = torch.exp(dA_cum)                                        # [b, h, c, l]
    if seq_idx is not None:
        from_start = from_start * (sc == ends[:, :-1, None])[:, None].to(work)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, carried, from_start)

    y = y.reshape(b, nc * chunk_size, h, p)[:, :l]
    if D is not None:
        y = y + x[:, :l] * D.to(work)[:, None]
    return y.to(dtype)


def ssd_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """The recurrence in the module docstring, one step at a time (reference for tests; slow)."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    B = B.repeat_interleave(h // g, dim=2)
    C = C.repeat_interleave(h // g, dim=2)
    state = x.new_zeros(b, h, p, n)
    ys = []
    for t in range(l):
        keep = torch.exp(dt[:, t] * A)                                    # [b, h]
        if seq_idx is not None and t > 0:
            keep = keep * (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)[:, None]
        state = state * keep[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", state, C[:, t])
        if D is not None:
            y = y + D[:, None] * x[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1)
