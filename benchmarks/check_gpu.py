#!/usr/bin/env python3
"""One command that checks the GPU-only paths, each against an independent reference; PASS/FAIL table last.

    python benchmarks/check_gpu.py --out DIR                               # one H200, ~2-3 minutes
    TRITON_INTERPRET=1 python benchmarks/check_gpu.py --small --out DIR    # CPU, tiny shapes, Triton interpreter

Sections (``--only kernels,conv,mamba2,training``; default all):

* ``kernels``: the ParaGRU/ParaLSTM Triton kernels with their GPU launch configs and, on a GPU, the PTX
  fast-math branch (``kernels/pararnn/_math.py``: ``ex2.approx.ftz``/``rcp.approx.ftz``), in fp32 and bf16
  against a float64 sequential oracle (``models.pararnn``'s torch loop, no Triton). (a) Each method
  (Newton, sweep) forced, forward trajectory and backward (dP, dA, dC, dbias, dh0 along the oracle's
  trajectory), with h0, resets, odd T and N, T = 1, a long T, and the model's fused layout (head-split P,
  bias and clip 0.5 in the kernel, a gradient for h alone). (b) The whole op ``para_gru``/``para_lstm`` in
  mode "triton" at shapes where :func:`kernels.pararnn.pick_method` chooses each kernel family in each
  direction: y, the final state and every gradient (x, B, b, A, C, h0). (c) The Newton fallback: chains
  that 3 iterations leave unconverged are re-solved exactly (and counted), converged ones untouched.
* ``conv``: the ParaRNN block's fused causal conv + SiLU kernel (``kernels.conv``), eager and compiled, fp32 and
  bf16, against the block's torch conv in float64 (output, dv, dweight, dbias) on packed documents.
* ``mamba2``: the vendored Triton SSD (``models/mamba2/ssd``) on packed rows with document resets
  (``seq_idx``) against ``ssd_chunked`` in float64 (output and the gradients of x, dt, A, B, C, D, dt_bias),
  and a small ``Mamba2DocForCausalLM``: Triton path vs torch path (logits and gradients, fp32 and bf16
  autocast) and a packed row vs its documents alone. On a GPU the SSD kernels run with one launch config
  each (``MAMBA_DETERMINISTIC=1``: no autotuning, which alone takes minutes); ``--mamba2-autotune`` checks
  the autotuned configs training uses instead. Tolerances: fp32 5e-3 (the kernels' ``tl.dot`` runs fp32 in
  TF32), bf16 5e-2, on the norm-relative error.
* ``training``: each architecture (ParaGRU, ParaLSTM, Mamba2, Transformer; small models, default modes:
  Triton on a GPU) trained for 20 AdamW steps on packed rows of a learnable synthetic sequence (each token
  the previous + 1, documents of random length, ``position_ids`` restarting at 0) in fp32 and under bf16
  autocast from the same init and data: the per-step losses must agree within 0.1 (absolute), and the fp32
  loss must fall by at least 2.0 (0.05 with ``--small``; on a CPU run at full size it fell by 5.7 to 6.5).

Errors are max|a − b| / max|b| (kernels) or ||a − b|| / ||b|| (mamba2). ``--out DIR`` writes
``results.json``. Exit status 1 on any failure (an exception in a section is a failure, not a skip).
"""
import argparse
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROWS: list[dict] = []
FP32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def record(section: str, case: str, what: str, err: float, tol: float | None) -> bool:
    """One checked quantity; ``tol=None`` only reports. NaN never passes."""
    ok = tol is None or err <= tol
    ROWS.append(dict(section=section, case=case, what=what, err=err, tol=tol, ok=ok))
    flag = "" if tol is None else ("ok" if ok else f"FAIL (tol {tol:g})")
    print(f"{section:<8} {case:<58} {what:<10} {err:.2e}  {flag}", flush=True)
    return ok


def record_true(section: str, case: str, what: str, holds: bool) -> bool:
    """A yes/no check, as an error of 0 (holds) or 1 against a tolerance of 0."""
    return record(section, case, what, 0.0 if holds else 1.0, 0.0)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape or not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape or not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tol_of(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == FP32 else 1e-2


# ================================================================================================= kernels
def _math_of(cell: str):
    from models.pararnn import GRU, LSTM
    return GRU if cell == "gru" else LSTM


def kernel_oracle(cell, P, A, C, h0, reset, g, bias=None, clip=None):
    """float64 trajectory and autograd gradients ``(h, dP, dbias, dA, dC, dh0)`` of ``Σ h·g`` (``g [B, T, N]``:
    a gradient for the h part alone) through the torch sequential loop."""
    from models.pararnn.pararnn_solve import sequential

    leaves = [None if t is None else t.double().requires_grad_() for t in (P, bias, A, C, h0)]
    Pq, bq, Aq, Cq, hq = leaves
    clamp = (lambda w: w.clamp(-clip, clip)) if clip else (lambda w: w)
    rp = (clamp(Aq),) if Cq is None else (clamp(Aq), clamp(Cq))
    keep = None if reset is None else (~reset).double()[:, :, None, None]
    h = sequential(_math_of(cell), Pq if bq is None else Pq + bq, rp, hq, keep)
    out = h if g.dim() == 4 else h[:, :, -1]
    wrt = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((out * g.double()).sum(), wrt))
    return (h.detach(), *(next(grads) if t is not None else None for t in leaves))


def check_kernel_case(dev, cell, B, T, N, with_h0, reset_p, dtypes, heads=0, amp=0.9, seed=0):
    """Both kernel families forced. ``heads > 0``: the model's fused layout (head-split P as the per-head GEMM
    writes it, bias and clip 0.5 in the kernel, a gradient for h alone). Newton runs 4 iterations here: with
    recurrent weights up to 0.9, 3 leave up to 3e-4 (its convergence, not a GPU-path error; the op cases and
    the fallback case below run 3)."""
    from kernels.pararnn import METHODS, solve_backward, solve_forward

    K = 1 if cell == "gru" else 2
    gen = torch.Generator(device=dev).manual_seed(seed)
    P = torch.randn(B, T, 3, N, device=dev, generator=gen)
    A = (torch.rand(3, N, device=dev, generator=gen) * 2 - 1) * amp
    C = (torch.rand(2, N, device=dev, generator=gen) * 2 - 1) * amp if cell == "lstm" else None
    h0 = 0.5 * torch.randn(B, K, N, device=dev, generator=gen) if with_h0 else None
    reset = None
    if reset_p:
        reset = torch.rand(B, T, device=dev, generator=gen) < reset_p
        reset[0, 0] = True
    g = torch.randn(B, T, K, N, device=dev, generator=gen)
    bias = clip = None
    if heads:
        bias, clip, g = 0.5 * torch.randn(3, N, device=dev, generator=gen), 0.5, g[:, :, -1]
    for dtype in dtypes:
        Pd = P.to(dtype)
        h_ref, dP_ref, db_ref, dA_ref, dC_ref, dh0_ref = kernel_oracle(cell, Pd, A, C, h0, reset, g, bias, clip)
        Pk = Pd
        if heads:  # head-major storage [H, B, T, 3, N/H] seen as [B, T, 3, H, N/H]
            Pk = Pd.view(B, T, 3, heads, N // heads).permute(3, 0, 1, 2, 4).contiguous().permute(1, 2, 3, 0, 4)
        for method in METHODS:
            case = (f"{cell} {method:6s} B{B} T{T} N{N} {str(dtype)[6:]}{' h0' if with_h0 else ''}"
                    f"{' resets' if reset_p else ''}{f' heads{heads}+bias+clip' if heads else ''}")
            for _ in range(2):  # the second launch goes through api._launch's cached launcher
                h, _ = solve_forward(cell, Pk, A, C, h0, reset, newton_iters=4, bias=bias, clip=clip, method=method)
                dP, dA, dC, db, dh0 = solve_backward(cell, Pk, A, C, h0, reset, h_ref.to(dtype), g.to(dtype),
                                                     bias=bias, clip=clip, method=method)
            tol = tol_of(dtype)
            record("kernels", case, "h", max_rel(h, h_ref), tol)
            record("kernels", case, "dP", max_rel(dP.reshape(B, T, 3, N), dP_ref), tol)
            for what, got, ref in (("dA", dA, dA_ref), ("dC", dC, dC_ref), ("dbias", db, db_ref),
                                   ("dh0", dh0, dh0_ref)):
                if ref is not None:
                    record("kernels", case, what, max_rel(got, ref), tol)


def check_op_case(dev, cell, B, T, N, heads, dtype, seed=1):
    """The op in mode "triton" as the LM calls it (projection GEMMs, kernels chosen by the rule, bias and clip
    in the kernels, resets, the Newton check on, no initial state, a loss on y) vs the same op's float64
    sequential mode: y and every gradient."""
    from kernels.pararnn import pick_method
    from models.pararnn import para_gru, para_lstm
    from models.pararnn.pararnn_op import FALLBACK_TOL

    op = para_gru if cell == "gru" else para_lstm
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(B, T, N, device=dev, generator=gen)
    W = torch.randn(heads, N // heads, 3, N // heads, device=dev, generator=gen) * (3 / (N // heads)) ** 0.5
    b = 0.3 * torch.randn(3, N, device=dev, generator=gen)
    rw = [(torch.rand(3, N, device=dev, generator=gen) * 2 - 1) * 0.9]
    if cell == "lstm":
        rw.append((torch.rand(2, N, device=dev, generator=gen) * 2 - 1) * 0.9)
    reset = torch.rand(B, T, device=dev, generator=gen) < 0.01
    wy = torch.randn(B, T, N, device=dev, generator=gen, dtype=F64)
    outs = {}
    for mode, dt in (("triton", dtype), ("sequential", F64)):
        leaves = [t.detach().to(dtype).to(dt).requires_grad_() for t in (x, W, b, *rw)]
        count = torch.zeros((), dtype=torch.int64, device=dev)
        y, _ = op(*leaves, reset=reset, mode=mode, clip=0.5, fallback_count=count)
        outs[mode] = [y, *torch.autograd.grad((y.double() * wy).sum(), leaves)], count
    methods = "/".join(pick_method(cell, B, T, N, d) for d in ("fwd", "bwd"))
    case = f"{cell} op[{methods}] B{B} T{T} N{N} H{heads} {str(dtype)[6:]} resets clip"
    names = ["y", "dx", "dB", "db", "dA"] + (["dC"] if cell == "lstm" else [])
    for name, got, ref in zip(names, outs["triton"][0], outs["sequential"][0]):
        # Newton's y is only as exact as the residual the op accepts without re-solving (FALLBACK_TOL)
        tol = max(tol_of(dtype), FALLBACK_TOL) if name == "y" and methods.startswith("newton") else tol_of(dtype)
        record("kernels", case, name, max_rel(got, ref), tol)
    record_true("kernels", case, "no fallback", int(outs["triton"][1]) == 0)


def check_fallback(dev, cell, B, T, N):
    """Newton forced, 3 iterations, half the channels with recurrent weights U(±3) (unconverged) and half
    U(±0.3): with ``fallback_tol`` the result is exact, the count positive, the converged tile unchanged."""
    from kernels.pararnn import CONFIGS, solve_forward

    gen = torch.Generator(device=dev).manual_seed(5)
    P = 2.0 * torch.randn(B, T, 3, N, device=dev, generator=gen)
    tile = CONFIGS["interpret" if dev.type == "cpu" else cell]["sweep_fwd"]["BLOCK_N"]
    amp = torch.cat([torch.full((N - tile,), 3.0), torch.full((tile,), 0.3)]).to(dev)  # the last tile converges
    A = (torch.rand(3, N, device=dev, generator=gen) * 2 - 1) * amp
    C = (torch.rand(2, N, device=dev, generator=gen) * 2 - 1) * amp if cell == "lstm" else None
    h0 = 0.5 * torch.randn(B, 1 if cell == "gru" else 2, N, device=dev, generator=gen)
    reset = torch.rand(B, T, device=dev, generator=gen) < 0.02
    from models.pararnn.pararnn_solve import sequential

    with torch.no_grad():
        rw = (A.double(),) if C is None else (A.double(), C.double())
        h_ref = sequential(_math_of(cell), P.double(), rw, h0.double(), (~reset).double()[:, :, None, None])
    count = torch.zeros((), dtype=torch.int64, device=dev)
    h_off, _ = solve_forward(cell, P, A, C, h0, reset, method="newton")
    h_fb, _ = solve_forward(cell, P, A, C, h0, reset, method="newton", fallback_tol=1e-4, fallback_count=count)
    case = f"{cell} newton+fallback B{B} T{T} N{N} fp32"
    record("kernels", case, "h", max_rel(h_fb, h_ref), 1e-5)
    record_true("kernels", case, "counted", 0 < int(count) <= B * (N - tile))
    record_true("kernels", case, "untouched", torch.equal(h_fb[..., -tile:], h_off[..., -tile:]))
    print(f"{'':<8} (without the fallback: h error {max_rel(h_off, h_ref):.1e}; re-solved {int(count)} chains)")


def section_kernels(dev: torch.device, small: bool) -> None:
    # Every distinct (kernel, dtype, flags) compiles once, 3-10 s each on a GPU host: the cases share them.
    cells = ("gru", "lstm")
    if small:
        for cell in cells:
            check_kernel_case(dev, cell, 2, 21, 20, True, 0.1, (FP32,), heads=4)
            check_op_case(dev, cell, 2, 19, 16, 2, FP32)
            check_fallback(dev, cell, 1, 24, 32)
        return
    for cell in cells:
        # fp32 to 1e-5: h0, resets, bias, clip, 25 channels per head (channel tiles straddle heads)
        check_kernel_case(dev, cell, 3, 300, 100, True, 0.01, (FP32,), heads=4)
        check_kernel_case(dev, cell, 1, 3000, 100, True, 0.002, (FP32,), heads=4)
        # the LM's layout at B·N of 1024, 8192 and 32768: each family in each direction, as the rule picks
        for dtype in (BF16, FP32):
            for B, T, N in ((2, 300, 512), (8, 256, 1024), (16, 128, 2048)):
                check_op_case(dev, cell, B, T, N, 2, dtype)
        check_fallback(dev, cell, 4, 1000, 256)


# ================================================================================================== mamba2
def packed_positions(batch: int, length: int, chunk: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of documents: row 0 has a boundary exactly on a chunk edge and one-token documents; others random."""
    rows = []
    for r in range(batch):
        lengths = [chunk, 1, 1, max(length // 3, 1)] if r == 0 else []
        while sum(lengths) < length:
            lengths.append(int(torch.randint(1, max(length // 2, 2), (1,), generator=gen)))
        pos, used = [], 0
        for n in lengths:
            n = min(n, length - used)
            if n <= 0:
                break
            pos.append(torch.arange(n))
            used += n
        rows.append(torch.cat(pos))
    return torch.stack(rows)


def mamba2_ssd(dev: torch.device, small: bool) -> None:
    from models.mamba2.ssd import mamba_chunk_scan_combined
    from models.mamba2.ssd_torch import seq_idx_from_position_ids, ssd_chunked

    if small:
        cases = [dict(b=2, l=45, h=2, p=16, g=1, n=16, chunk=16)]
    else:
        cases = [dict(b=2, l=1000, h=8, p=64, g=1, n=64, chunk=256)]  # odd length; the shapes of mamba2_model
    names = ["y", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias"]
    for c in cases:
        gen = torch.Generator().manual_seed(0)
        b, l, h, p, g, n = c["b"], c["l"], c["h"], c["p"], c["g"], c["n"]

        def r(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(dev)

        x, dt_raw, B, C, D = r(b, l, h, p), r(b, l, h, scale=0.5) - 2.0, r(b, l, g, n), r(b, l, g, n), r(h)
        A = -torch.exp(r(h, scale=0.5))
        dt_bias = r(h, scale=0.1)
        seq_idx = seq_idx_from_position_ids(packed_positions(b, l, c["chunk"], gen).to(dev))
        weight = r(b, l, h, p)

        def reference(dtype):
            """ssd_chunked in float64 from the inputs as the kernel sees them (activations rounded to dtype)."""
            acts = [t.to(dtype).double().requires_grad_() for t in (x, dt_raw, B, C)]
            params = [t.double().requires_grad_() for t in (A, D, dt_bias)]
            (xr, dtr, Br, Cr), (Ar, Dr, biasr) = acts, params
            y = ssd_chunked(xr, F.softplus(dtr + biasr), Ar, Br, Cr, c["chunk"], D=Dr, seq_idx=seq_idx)
            grads = torch.autograd.grad((y * weight.double()).sum(), [xr, dtr, Ar, Br, Cr, Dr, biasr])
            return [y, *grads]

        # Triton 3.6's CPU interpreter computes tl.dot on bf16 operands wrongly, so bf16 runs on a GPU only.
        for dtype in (FP32, BF16) if dev.type == "cuda" else (FP32,):
            ref = reference(dtype)
            xs, dts, Bs, Cs = (t.to(dtype).requires_grad_() for t in (x, dt_raw, B, C))
            As, Ds, biases = (t.float().requires_grad_() for t in (A, D, dt_bias))  # parameters stay fp32
            y = mamba_chunk_scan_combined(xs, dts, As, Bs, Cs, c["chunk"], D=Ds, dt_bias=biases,
                                          dt_softplus=True, seq_idx=seq_idx)
            grads = torch.autograd.grad((y.float() * weight).sum(), [xs, dts, As, Bs, Cs, Ds, biases])
            case = f"ssd {str(dtype)[6:]} b{b} l{l} h{h} p{p} g{g} n{n} chunk{c['chunk']} packed"
            for what, got, want in zip(names, [y, *grads], ref):
                record("mamba2", case, what, norm_rel(got, want), 5e-3 if dtype == FP32 else 5e-2)


def mamba2_model(dev: torch.device, small: bool) -> None:
    from models.mamba2 import Mamba2DocConfig, Mamba2DocForCausalLM
    from models.mamba2.ssd_torch import seq_idx_from_position_ids

    if small:
        cfg = dict(hidden_size=32, num_hidden_layers=2, head_dim=16, state_size=16, chunk_size=16, vocab_size=512)
    else:
        cfg = dict(hidden_size=256, num_hidden_layers=2, head_dim=64, state_size=64, chunk_size=256, vocab_size=4096)
    models = {}
    for use_triton in (False, True):
        torch.manual_seed(0)
        models[use_triton] = Mamba2DocForCausalLM(Mamba2DocConfig(use_triton=use_triton, **cfg)).to(dev)
    models[True].load_state_dict(models[False].state_dict())
    gen = torch.Generator().manual_seed(1)
    pos = packed_positions(2, 45 if small else 1000, cfg["chunk_size"], gen).to(dev)
    ids = torch.randint(0, cfg["vocab_size"], pos.shape, generator=gen).to(dev)
    # bf16 autocast on a GPU only (the interpreter's bf16 tl.dot, as above)
    for label, autocast in (("fp32", False), ("bf16 autocast", True)) if dev.type == "cuda" else (("fp32", False),):
        outs = []
        for model in (models[False], models[True]):
            model.zero_grad()
            with torch.autocast(dev.type, dtype=BF16, enabled=autocast):
                logits = model(input_ids=ids, position_ids=pos).logits.float()
            logits.logsumexp(-1).mean().backward()
            outs.append((logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
        (ref_logits, ref_grads), (logits, grads) = outs
        tol = 5e-2 if autocast else 5e-3
        record("mamba2", f"model triton vs torch path, {label}, packed", "logits", norm_rel(logits, ref_logits), tol)
        worst = max(ref_grads, key=lambda k: norm_rel(grads[k], ref_grads[k]))
        record("mamba2", f"model triton vs torch path, {label}, packed", "grad(max)",
               norm_rel(grads[worst], ref_grads[worst]), tol)
    with torch.no_grad():
        model = models[True]
        packed = model(input_ids=ids, position_ids=pos).logits
        seq_idx = seq_idx_from_position_ids(pos)
        worst = 0.0
        for r in range(ids.shape[0]):
            for doc in seq_idx[r].unique():
                where = (seq_idx[r] == doc).nonzero().flatten()
                s, e = where[0].item(), where[-1].item() + 1
                alone = model(input_ids=ids[r:r + 1, s:e]).logits[0]
                worst = max(worst, max_rel(packed[r, s:e], alone))
    record("mamba2", "model triton, packed row vs its documents alone (fp32)", "logits", worst, 1e-3)


def section_mamba2(dev: torch.device, small: bool) -> None:
    mamba2_ssd(dev, small)
    mamba2_model(dev, small)


# ================================================================================================ training
ARCHS = {  # name: (arch, config); small models, default modes (ParaRNN "auto": Triton on a GPU); the ParaRNN
    # kernels' flags and the Mamba2 kernels' shapes are those of the sections above (no more compiles)
    "paragru": ("pararnn", dict(cell="gru", hidden_size=128, num_hidden_layers=2, num_heads=2, clip=0.5)),
    "paralstm": ("pararnn", dict(cell="lstm", hidden_size=128, num_hidden_layers=2, num_heads=2, clip=0.5)),
    "mamba2": ("mamba2", dict(hidden_size=256, num_hidden_layers=2, expand=2, head_dim=64, state_size=64,
                              n_groups=1, chunk_size=256)),  # the kernels' shapes of the mamba2 section
    "transformer": ("transformer", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4)),
}


def synthetic_batches(steps: int, batch: int, length: int, vocab: int, seed: int = 0):
    """Packed rows of documents in which each token is the previous one + 1 (mod vocab): learnable, and a
    model that leaks state across a document start is not helped (each document starts at random)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        ids, pos = torch.empty(batch, length, dtype=torch.long), torch.empty(batch, length, dtype=torch.long)
        for r in range(batch):
            t = 0
            while t < length:
                n = min(int(torch.randint(8, max(length // 2, 9), (1,), generator=gen)), length - t)
                start = int(torch.randint(0, vocab, (1,), generator=gen))
                ids[r, t:t + n] = (start + torch.arange(n)) % vocab
                pos[r, t:t + n] = torch.arange(n)
                t += n
        batches.append((ids, pos))
    return batches


def train_losses(arch: str, config: dict, batches, vocab: int, dev: torch.device, bf16: bool) -> list[float]:
    from models.registry import build_model

    torch.manual_seed(0)
    model = build_model(arch, {**config, "vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0}).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for ids, pos in batches:
        ids, pos = ids.to(dev), pos.to(dev)
        with torch.autocast(dev.type, dtype=BF16, enabled=bf16):
            logits = model(input_ids=ids, position_ids=pos).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def section_training(dev: torch.device, small: bool) -> None:
    steps, batch, length, vocab = (6, 2, 32, 128) if small else (20, 8, 256, 512)
    drop = 0.05 if small else 2.0
    batches = synthetic_batches(steps, batch, length, vocab)
    for name, (arch, config) in ARCHS.items():
        if small:
            config = {**config, "hidden_size": 32} if arch != "mamba2" else {**config, "hidden_size": 32,
                                                                              "head_dim": 16, "chunk_size": 16}
        fp32 = train_losses(arch, config, batches, vocab, dev, bf16=False)
        bf16 = train_losses(arch, config, batches, vocab, dev, bf16=True)
        case = f"{name} {steps} steps B{batch} T{length}: fp32 {fp32[0]:.3f} -> {fp32[-1]:.3f}, bf16 -> {bf16[-1]:.3f}"
        record("training", case, "max|dloss|", max(abs(a - b) for a, b in zip(fp32, bf16)), 0.1)
        record_true("training", case, f"drop>={drop}", fp32[0] - fp32[-1] >= drop)


# ==================================================================================================== conv
def section_conv(dev: torch.device, small: bool) -> None:
    """The ParaRNN block's fused conv + SiLU kernel (``kernels.conv``), eager and inside ``torch.compile``,
    against the block's torch conv (``CausalDepthwiseConv``) in float64: the output and the gradients of v
    (a strided half of a wider tensor, as the block passes it), weight and bias, on packed documents."""
    from kernels.conv import causal_conv_silu
    from models.pararnn.pararnn_conv import CausalDepthwiseConv

    B, T, D = (2, 40, 24) if small else (4, 1000, 1024)
    gen = torch.Generator(device=dev).manual_seed(0)
    conv = CausalDepthwiseConv(D, 4).to(dev)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(D, 4, device=dev, generator=gen) * 0.5)
        conv.bias.copy_(torch.randn(D, device=dev, generator=gen) * 0.1)
    wide = torch.randn(B, T, 2 * D, device=dev, generator=gen)
    positions = torch.stack([torch.arange(T, device=dev) % n for n in (7, 300, 1000, 33)[:B]])
    du = torch.randn(B, T, D, device=dev, generator=gen)
    ref_conv = CausalDepthwiseConv(D, 4).to(dev).double()
    ref_conv.load_state_dict(conv.state_dict())
    compiled = torch.compile(lambda v, w, b, p: causal_conv_silu(v, w, b, p) * 1.0, fullgraph=True)
    for dtype in (FP32, BF16):
        # the reference sees the same (rounded) input: what is measured is the kernel's own arithmetic
        leaves = [wide.to(dtype).double().requires_grad_(), ref_conv.weight, ref_conv.bias]
        ref = F.silu(ref_conv(leaves[0][..., :D], positions))
        ref_grads = torch.autograd.grad((ref * du.double()).sum(), leaves)
        for how, fn in (("eager", causal_conv_silu), ("compiled", compiled)):
            x = wide.to(dtype).requires_grad_()
            w, b = conv.weight.detach().clone().requires_grad_(), conv.bias.detach().clone().requires_grad_()
            u = fn(x[..., :D], w, b, positions)
            grads = torch.autograd.grad((u.float() * du).sum(), (x, w, b))
            case = f"conv+silu {how} B{B} T{T} D{D} K4 {str(dtype)[6:]} documents"
            tol = tol_of(dtype)
            record("conv", case, "u", max_rel(u, ref), tol)
            record("conv", case, "dv", max_rel(grads[0][..., :D], ref_grads[0][..., :D]), tol)
            record("conv", case, "dweight", max_rel(grads[1], ref_grads[1]), tol)
            record("conv", case, "dbias", max_rel(grads[2], ref_grads[2]), tol)


# ==================================================================================================== main
SECTIONS = {"kernels": section_kernels, "conv": section_conv, "mamba2": section_mamba2,
            "training": section_training}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write results.json here")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU with TRITON_INTERPRET=1)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated of {', '.join(SECTIONS)}")
    parser.add_argument("--mamba2-autotune", action="store_true",
                        help="check the Mamba2 SSD kernels with their autotuned configs (slow: minutes)")
    args = parser.parse_args()
    only = args.only.split(",")
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        print(f"error: --only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    if not args.mamba2_autotune:
        os.environ.setdefault("MAMBA_DETERMINISTIC", "1")  # read when the SSD kernels are defined
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpreting:
        print("error: no CUDA device; for a CPU run use TRITON_INTERPRET=1 ... --small", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if interpreting else "cuda")
    import kernels  # noqa: F401  (patches the interpreter, if on, before any Triton kernel is defined)

    print(f"device: {torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu (Triton interpreter)'}, "
          f"torch {torch.__version__}", flush=True)
    t0 = time.time()
    times = {}
    for name in only:
        start = time.time()
        try:
            SECTIONS[name](dev, args.small)
        except Exception as err:  # a broken section is a failure in the table, and the others still run
            traceback.print_exc()
            record(name, "section raised", type(err).__name__, float("nan"), 0.0)
        times[name] = time.time() - start
    failed = [r for r in ROWS if not r["ok"]]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"device": str(dev), "small": args.small, "seconds": times, "rows": ROWS}, f, indent=1)
    print(f"\n==== check_gpu: {len(ROWS)} checks, {len(failed)} failed, {time.time() - t0:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())}) ====")
    print(f"{'section':<9} {'checks':>6} {'failed':>6}  result")
    for name in only:
        rows = [r for r in ROWS if r["section"] == name]
        bad = [r for r in rows if not r["ok"]]
        print(f"{name:<9} {len(rows):>6} {len(bad):>6}  {'FAIL' if bad or not rows else 'PASS'}")
    for r in failed:
        print(f"FAIL  {r['section']}: {r['case']} {r['what']} = {r['err']:.2e} (tol {r['tol']})")
    ok = not failed and all(any(r["section"] == name for r in ROWS) for name in only)
    print("PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
