#!/usr/bin/env python3
"""ParaGRU / ParaLSTM cells on a GPU: Newton accuracy, kernel variants, whole-cell timings and errors.

Sections (flags; default: all). Correctness of the GPU paths against a float64 oracle is
``benchmarks/check_gpu.py``'s job.

* ``--iters``: Newton forward error and in-kernel residual vs iterations (fp32, recurrent weights
  U(±0.5) and U(±0.9)), with the kernel time.
* ``--kernels``: kernel-only timings of ``solve_forward``/``solve_backward`` per method and launch
  configuration (bf16 P, B = 8), with registers/spills of each compiled kernel; the Newton forward also
  with the convergence check (``fallback_tol``: per-chain residual + the gated sweep launch). Inputs in
  the LM's layout (``--layout lm``, the default: head-split P, bias, clip, resets) or a dense P alone
  (``contiguous``, as docs/kernels.md's tables were measured); at B8·T2048·N2048 the GRU scan backward
  takes twice as long in the LM's layout.
* ``--cells``: the whole cell (input projection GEMM + kernels + projection backward) forward and
  forward+backward, bf16, B = 8, H = 2: ``models.pararnn`` in mode "triton" and "parallel" (torch),
  variants ``models.<mode>[:recompute][:nocheck]`` (``:recompute``: ``save_projection = False``, P
  recomputed in the backward; ``:nocheck``: ``fallback_tol = None``, no Newton convergence check);
  GEMM-only rows (the cell's projection and its closed-form backward); peak memory.
* ``--errors``: whole-cell errors of y and every gradient against a float32 sequential run
  (``models.pararnn`` mode "sequential", same weights) at B8·T2048·N1024; times that run once.

Timing: ``triton.testing.do_bench`` (CUDA events, warm-up, median). Results go to ``--out``
(``results.json``, ``log.txt``, ``ir.tar``) and a short table is printed last.

Example: ``python benchmarks/bench_cells.py --out $OUT``
"""
import argparse
import contextlib
import copy
import io
import json
import os
import sys
import tarfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

from kernels.pararnn import api, solve_backward, solve_forward  # noqa: E402
from models.pararnn.pararnn_math import GRU, LSTM  # noqa: E402
from models.pararnn.pararnn_solve import project_heads, project_heads_backward, sequential  # noqa: E402

# Reference parallel_FUSED (Apple ml-pararnn) on one H200, bf16, B = 8 (docs/reference-h200.md): the whole
# cell (fwd, fwd+bwd) and its fused kernels alone (fwd kernel, bwd kernel), ms.
REF = {  # (cell, T, N): (cell fwd, cell fwd+bwd, fwd kernel, bwd kernel)
    ("gru", 512, 1024): (1.114, 2.691, 0.628, 0.269), ("gru", 2048, 1024): (1.574, 6.663, 0.702, 0.345),
    ("gru", 4096, 1024): (2.505, 12.092, 0.767, 0.426), ("gru", 2048, 2048): (3.247, 13.612, 1.336, 0.641),
    ("gru", 4096, 2048): (5.049, 25.238, 1.504, 0.830),
    ("lstm", 512, 1024): (1.169, 3.123, 0.615, 0.262), ("lstm", 2048, 1024): (2.776, 8.369, 1.370, 0.553),
    ("lstm", 4096, 1024): (5.114, 16.057, 2.737, 1.091), ("lstm", 2048, 2048): (5.256, 16.678, 2.713, 1.093),
    ("lstm", 4096, 2048): (10.162, 32.357, 5.400, 2.135),
}
REF_FUSED = {key: v[:2] for key, v in REF.items()}
REF_KERNEL = {key: v[2:] for key, v in REF.items()}
MAIN = (2048, 1024)
SHAPES = [(512, 1024), (2048, 1024), (4096, 1024), (2048, 2048), (4096, 2048)]
BATCH = 8
HEADS = 2

DEV = "cuda"
DRY = False
LAYOUT = "lm"  # --layout
LOWP = torch.bfloat16  # the low-precision dtype benchmarked (fp16 in the CPU dry run: bf16 is broken there)

RESULTS = {"env": {}, "kernels": [], "cells": [], "errors": [], "failures": []}
LOG = []
OUT = "."


def log(*a):
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    LOG.append(line)


def save():
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    with open(os.path.join(OUT, "log.txt"), "w") as f:
        f.write("\n".join(LOG) + "\n")


def guarded(name):
    def deco(fn):
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:  # keep going: one broken variant must not cost the whole run
                msg = f"{name}{a}: {type(e).__name__}: {e}"
                log("FAIL", msg[:2000])
                RESULTS["failures"].append({"where": name, "args": repr(a)[:300],
                                            "error": traceback.format_exc()[-3000:]})
                save()
                return None
        return run
    return deco


def bench(fn, warmup=25, rep=100, grad_to_none=None):
    if DRY:  # CPU dry run of the script's logic (interpreter): one timed call
        t0 = time.time()
        fn()
        return 1e3 * (time.time() - t0)
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def graph_bench(fn, grad_tensors):
    """Median time of replaying ``fn`` captured in a CUDA graph: GPU time without launch overhead."""
    if DRY:
        return None
    try:
        return _graph_bench(fn, grad_tensors)
    except Exception as e:  # a capture problem must not lose the eager numbers
        log("FAIL graph", f"{type(e).__name__}: {str(e)[:500]}")
        RESULTS["failures"].append({"where": "graph", "error": traceback.format_exc()[-2000:]})
        torch.cuda.synchronize()
        return None


def _graph_bench(fn, grad_tensors):
    for t in grad_tensors:
        t.grad = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()  # grads exist now, so the graph also holds the .grad accumulation (as in training)
    ms = bench(g.replay)
    del g
    for t in grad_tensors:
        t.grad = None
    return ms


def sync():
    if not DRY:
        torch.cuda.synchronize()


def rel(got, ref):
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def compiled_kernel(call):
    """Run ``call`` (kernel launches through ``api._launch``) via Triton's own launch path and return the last
    compiled kernel it launched (registers, spills, IR), or None under the interpreter."""
    seen = []
    original = api._launch

    def spy(kern, grid, ptrs, scalars, consts, num_warps):
        seen.append(kern[grid](*ptrs, *scalars, **consts, num_warps=num_warps))

    api._launch = spy
    try:
        call()
    finally:
        api._launch = original
    return seen[-1] if seen else None


def kinfo(kernel):
    if kernel is None:
        return {}
    return {"regs": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None)}


@contextlib.contextmanager
def forced_methods(choice: dict):
    """``api.pick_method`` answers ``choice[(cell, direction, B, T, N)]`` where given, the rule elsewhere."""
    rule = api.pick_method
    api.pick_method = lambda cell, B, T, N, direction: choice.get((cell, direction, B, T, N)) or rule(
        cell, B, T, N, direction)
    try:
        yield
    finally:
        api.pick_method = rule


def exact_trajectory(cell, P, A, C):
    """The sequential recurrence (models.pararnn's torch loop) in P's dtype."""
    return sequential(GRU if cell == "gru" else LSTM, P, (A,) if C is None else (A, C), None, None)


# ====================================================================================== iterations
@guarded("iters")
def iteration_sweep(cell, amp, iters_list=(2, 3, 4, 6), B=4, T=1024, N=256):
    """Newton forward error vs iterations (fp32) on recurrent weights U(±amp), fresh per-tile init."""
    gen = torch.Generator(device=DEV).manual_seed(3)
    P = torch.randn(B, T, 3, N, device=DEV, generator=gen)
    A = (torch.rand(3, N, device=DEV, generator=gen) * 2 - 1) * amp
    C = (torch.rand(2, N, device=DEV, generator=gen) * 2 - 1) * amp if cell == "lstm" else None
    with torch.no_grad():
        ref = exact_trajectory(cell, P.double(), A.double(), None if C is None else C.double())
    for it in iters_list:
        h, res = solve_forward(cell, P, A, C, None, None, newton_iters=it, residual=True, method="newton")
        ms = bench(lambda: solve_forward(cell, P, A, C, None, None, newton_iters=it, residual=True, method="newton"))
        row = {"cell": cell, "amp": amp, "iters": it, "B": B, "T": T, "N": N, "h": rel(h, ref),
               "residual": float(res), "ms": ms}
        RESULTS.setdefault("iters", []).append(row)
        log(f"iters {cell} amp={amp} iters={it} err={row['h']:.1e} residual={row['residual']:.1e} {ms:.3f} ms")
    save()


# ========================================================================================== kernels
def _n(bt, bn, nw):
    return ("newton", dict(BLOCK_T=bt, BLOCK_N=bn, num_warps=nw))


def _s(ch, bn, nw):
    return ("sweep", dict(CHUNK=ch, BLOCK_N=bn, num_warps=nw))


# Register counts from a local sm_90 AOT compile (kernels/pararnn/NOTES.md): all of these spill nothing.
FWD_VARIANTS = {
    "gru": [_n(128, 32, 8), _n(64, 32, 8), _s(8, 32, 1), _s(16, 32, 1), _s(32, 32, 1), _s(16, 64, 2)],
    "lstm": [_n(32, 32, 8), _n(16, 32, 4), _s(8, 32, 1), _s(16, 32, 1), _s(16, 64, 2)],
}
BWD_VARIANTS = {
    "gru": [_n(32, 32, 4), _n(64, 32, 8), _s(8, 32, 1), _s(8, 64, 2), _s(16, 32, 1)],
    "lstm": [_n(32, 32, 4), _n(16, 32, 4), _s(4, 32, 1), _s(8, 32, 1), _s(8, 64, 2)],
}


def _kernel_inputs(cell, T, N, dtype=None, B=None):
    """``(P, A, C, g, extra)``: ``extra`` the keyword arguments both solves take. ``--layout lm``: as the LM
    passes them (P a head-split view of the head-major storage its per-head GEMM writes, 4 heads; bias
    and clip 0.5 in the kernels; resets every 512 steps; the gradient of h alone); ``contiguous``: a dense
    ``[B, T, 3, N]`` P and nothing else (the layout of docs/kernels.md's tables)."""
    dtype, B = dtype or LOWP, B or BATCH
    gen = torch.Generator(device=DEV).manual_seed(1)
    K = 1 if cell == "gru" else 2
    lm = LAYOUT == "lm"
    heads = 4 if lm and N % 4 == 0 else 1
    P = torch.randn(heads, B, T, 3, N // heads, device=DEV, generator=gen).to(dtype).permute(1, 2, 3, 0, 4)
    P = P if lm else P.reshape(B, T, 3, N).contiguous()
    A = torch.rand(3, N, device=DEV, generator=gen) - 0.5
    C = torch.rand(2, N, device=DEV, generator=gen) - 0.5 if cell == "lstm" else None
    g = torch.randn(B, T, *(() if lm else (K,)), N, device=DEV, generator=gen).to(dtype)
    extra = {}
    if lm:
        extra = dict(bias=0.1 * torch.randn(3, N, device=DEV, generator=gen), clip=0.5,
                     reset=(torch.arange(T, device=DEV) % 512 == 0).expand(B, T))
    return P, A, C, g, extra


IR_DUMPS = {}


@guarded("kernels")
def kernel_variants(cell, T, N, full, B=None):
    B = B or BATCH
    P, A, C, g, extra = _kernel_inputs(cell, T, N, B=B)
    reset = extra.pop("reset", None)
    h_ref, _ = solve_forward(cell, P, A, C, None, reset, method="newton", **extra)
    fv = FWD_VARIANTS[cell] if full else [(m, None) for m in api.METHODS]
    bv = BWD_VARIANTS[cell] if full else [(m, None) for m in api.METHODS]
    fv = fv + [("newton+check", None)]  # the default Newton forward with the convergence check (no fallbacks here)
    for method, cfg in fv:
        kw = dict(method="newton", fallback_tol=1e-4) if method == "newton+check" else dict(method=method)
        call = lambda: solve_forward(cell, P, A, C, None, reset, config=cfg, **kw, **extra)
        h, _ = call()
        kernel = compiled_kernel(call)
        if full and kernel is not None and (cell, method, "fwd") not in IR_DUMPS:
            IR_DUMPS[(cell, method, "fwd")] = kernel.asm.get("ttgir", "")
        info = kinfo(kernel)
        ms = bench(call)
        row = {"cell": cell, "B": B, "T": T, "N": N, "dir": "fwd", "method": method, "cfg": cfg, "ms": ms,
               "diff_vs_newton_default": rel(h, h_ref), **info}
        RESULTS["kernels"].append(row)
        log(f"kern {cell} B{B} T{T} N{N} fwd {method:6s} {cfg} {ms:.4f} ms regs={info.get('regs')} "
            f"spills={info.get('spills')} diff={row['diff_vs_newton_default']:.1e}")
    for method, cfg in bv:
        call = lambda: solve_backward(cell, P, A, C, None, reset, h_ref, g, method=method, config=cfg, **extra)
        call()
        kernel = compiled_kernel(call)
        if full and kernel is not None and (cell, method, "bwd") not in IR_DUMPS:
            IR_DUMPS[(cell, method, "bwd")] = kernel.asm.get("ttgir", "")
        info = kinfo(kernel)
        ms = bench(call)
        row = {"cell": cell, "B": B, "T": T, "N": N, "dir": "bwd", "method": method, "cfg": cfg, "ms": ms, **info}
        RESULTS["kernels"].append(row)
        log(f"kern {cell} B{B} T{T} N{N} bwd {method:6s} {cfg} {ms:.4f} ms regs={info.get('regs')} "
            f"spills={info.get('spills')}")
    save()


# ============================================================================================ cells
def _set_variant(m, name):
    """``models.<mode>[:recompute][:nocheck]``: the cell in that mode; ``:recompute`` sets
    ``save_projection=False``, ``:nocheck`` ``fallback_tol=None``."""
    from models.pararnn import FALLBACK_TOL, MODES
    base, *opts = name.split(":")
    pkg, _, mode = base.partition(".")
    if pkg != "models" or mode not in MODES or not set(opts) <= {"recompute", "nocheck"}:
        raise ValueError(f"unknown cell variant {name!r}: expected models.<{'|'.join(MODES)}>[:recompute][:nocheck]")
    m.mode = mode
    m.save_projection = "recompute" not in opts
    m.fallback_tol = None if "nocheck" in opts else FALLBACK_TOL


def _model(cell, N, dtype, mode):
    from models.pararnn import ParaGRU, ParaLSTM
    cls = ParaGRU if cell == "gru" else ParaLSTM
    torch.manual_seed(0)
    m = cls(N, N, num_heads=HEADS, mode=mode).to(DEV).to(dtype)
    return m


def _peak(fn):
    if DRY:
        fn()
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


@guarded("cells")
def cell_rows(cell, T, N, variants, dtype=None, B=None, graphs=True):
    dtype, B = dtype or LOWP, B or BATCH
    m = _model(cell, N, dtype, "triton")
    x = torch.randn(B, T, N, device=DEV, dtype=dtype, requires_grad=True)
    gy = torch.randn(B, T, N, device=DEV, dtype=dtype)
    params = list(m.parameters())
    def fwd():
        with torch.no_grad():
            return m(x)

    def fwdbwd():
        m(x).backward(gy)

    for name in variants:
        _set_variant(m, name)
        fwd()
        fwdbwd()
        t_f = bench(fwd)
        t_fb = bench(fwdbwd, warmup=10, rep=60, grad_to_none=[x] + params)
        peak = _peak(fwdbwd)
        t_fb_graph = graph_bench(fwdbwd, [x] + params) if graphs else None
        ref = REF_FUSED.get((cell, T, N))
        row = {"cell": cell, "B": B, "T": T, "N": N, "dtype": str(dtype).split(".")[-1], "impl": name,
               "fwd_ms": t_f, "fwdbwd_ms": t_fb, "fwdbwd_graph_ms": t_fb_graph, "peak_GB": peak,
               "ref_fused_fwd_ms": ref[0] if ref else None, "ref_fused_fwdbwd_ms": ref[1] if ref else None}
        RESULTS["cells"].append(row)
        sp = f" speedup fwd {ref[0] / t_f:.2f}x fwd+bwd {ref[1] / t_fb:.2f}x" if ref and dtype == LOWP else ""
        gs = f" graph {t_fb_graph:.3f} ms" if t_fb_graph else ""
        log(f"cell {cell} T{T} N{N} {row['dtype']} {name:28s} fwd {t_f:.3f} ms fwd+bwd {t_fb:.3f} ms{gs} peak "
            f"{peak:.2f} GB{sp}")
        for p in params:
            p.grad = None
        x.grad = None
    save()


@guarded("gemm")
def gemm_rows(T, N, B=None, dtype=None):
    dtype, B = dtype or LOWP, B or BATCH
    m = _model("gru", N, dtype, "triton")  # the projection is the same for both cells
    x = torch.randn(B, T, N, device=DEV, dtype=dtype)
    with torch.no_grad():
        dP = torch.randn_like(project_heads(x, m.B))  # head-major, as the kernel writes it
        t1 = bench(lambda: project_heads(x, m.B))
        t2 = bench(lambda: project_heads_backward(x, m.B, dP, (True, True)))
    row = {"T": T, "N": N, "impl": "models.pararnn per-head bmm", "proj_fwd_ms": t1, "proj_bwd_ms": t2}
    RESULTS["cells"].append({"gemm": row})
    log(f"gemm T{T} N{N} {row['impl']} proj fwd {t1:.3f} ms  proj bwd (dx, dB) {t2:.3f} ms")
    save()


# ========================================================================================== profile
@guarded("profile")
def profile_rows(cell, T, N, variants, B=None):
    """CPU-side cost of one eager fwd+bwd (torch.profiler, top ops by self CPU time)."""
    if DRY:
        return
    from torch.profiler import ProfilerActivity, profile
    B = B or BATCH
    m = _model(cell, N, LOWP, "triton")
    x = torch.randn(B, T, N, device=DEV, dtype=LOWP, requires_grad=True)
    gy = torch.randn(B, T, N, device=DEV, dtype=LOWP)
    leaves = [x] + list(m.parameters())

    def fb():
        for t in leaves:  # as do_bench's grad_to_none: no accumulation kernels
            t.grad = None
        m(x).backward(gy)

    for name in variants:
        _set_variant(m, name)
        for _ in range(3):
            fb()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fb()
        t_cpu = (time.perf_counter() - t0) / 10  # host time per call while the queue is not full
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                fb()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
        RESULTS.setdefault("profile", []).append({"cell": cell, "T": T, "N": N, "impl": name,
                                                  "host_ms_per_call": 1e3 * t_cpu, "table": table})
        log(f"profile {cell} T{T} N{N} {name}: host {1e3 * t_cpu:.3f} ms per fwd+bwd call (5 calls profiled below)")
        log(table)
    save()


# =========================================================================================== errors
@guarded("errors")
def error_rows(cell, T, N, B=None, time_sequential=True):
    B = B or BATCH
    torch.manual_seed(0)
    m_bf = _model(cell, N, LOWP, "triton")
    m32 = copy.deepcopy(m_bf).float()  # same (bf16-rounded) weights in fp32
    m32.mode = "sequential"
    x_bf = torch.randn(B, T, N, device=DEV, dtype=LOWP)
    gy = torch.randn(B, T, N, device=DEV, dtype=torch.float32)

    def grads_of(m, x, y_fn=None):
        xx = x.detach().clone().requires_grad_()
        y = m(xx) if y_fn is None else y_fn(xx)
        params = [p for _, p in sorted(m.named_parameters())]
        gs = torch.autograd.grad((y.float() * gy).sum(), [xx] + params)
        names = ["x"] + [n for n, _ in sorted(m.named_parameters())]
        return y.detach(), dict(zip(names, gs))

    sync()
    t0 = time.time()
    y_ref, g_ref = grads_of(m32, x_bf.float())
    sync()
    t_seq_fb = time.time() - t0
    if time_sequential:
        with torch.no_grad():
            m32(x_bf.float())
            sync()
            t0 = time.time()
            m32(x_bf.float())
            sync()
            t_seq_f = time.time() - t0
        RESULTS["cells"].append({"cell": cell, "B": B, "T": T, "N": N, "dtype": "float32",
                                 "impl": "models.sequential (1 run)",
                                 "fwd_ms": 1e3 * t_seq_f, "fwdbwd_ms": 1e3 * t_seq_fb})
        log(f"cell {cell} T{T} N{N} float32 models.sequential (1 run) fwd {1e3 * t_seq_f:.1f} ms "
            f"fwd+bwd {1e3 * t_seq_fb:.1f} ms (incl. graph build)")
    variants = []
    m_tri32 = copy.deepcopy(m32)
    m_tri32.mode = "triton"
    for meth in ("newton", "sweep"):
        variants.append((f"models.triton fp32 [{meth}]", m_tri32, x_bf.float(), meth))
        variants.append((f"models.triton {str(LOWP)[6:]} [{meth}]", m_bf, x_bf, meth))
    for name, m, x, meth in variants:
        with forced_methods({(cell, d, B, T, N): meth for d in ("fwd", "bwd")}):
            y, g = grads_of(m, x)
        row = {"cell": cell, "B": B, "T": T, "N": N, "impl": name, "y": rel(y, y_ref)}
        for k in g_ref:
            row["d" + k] = rel(g[k], g_ref[k])
        RESULTS["errors"].append(row)
        log("err", " ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    save()


# ============================================================================================= main
def main():
    global OUT, DEV, DRY, MAIN, BATCH, LOWP, LAYOUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--iters", action="store_true")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--layout", choices=("lm", "contiguous"), default="lm",
                    help="--kernels inputs: as the LM passes them, or a dense P alone (see _kernel_inputs)")
    ap.add_argument("--cells", action="store_true")
    ap.add_argument("--errors", action="store_true")
    ap.add_argument("--cell", default="gru,lstm")
    ap.add_argument("--shapes", default=",".join(f"{t}x{n}" for t, n in SHAPES))
    ap.add_argument("--dry", action="store_true", help="CPU interpreter dry run with tiny shapes")
    ap.add_argument("--cell-variants", default="models.triton",
                    help="comma-separated models.<mode>[:recompute][:nocheck] (recompute: save_projection=False; "
                         "nocheck: fallback_tol=None)")
    args = ap.parse_args()
    if not (args.iters or args.kernels or args.cells or args.errors):
        args.iters = args.kernels = args.cells = args.errors = True
    OUT, LAYOUT = args.out, args.layout
    if args.dry:
        DEV, DRY, MAIN, BATCH, LOWP = "cpu", True, (16, 32), 2, torch.float16
        shapes_default = "16x32,8x32"
        if args.shapes == ",".join(f"{t}x{n}" for t, n in SHAPES):
            args.shapes = shapes_default
    os.makedirs(OUT, exist_ok=True)
    cells = args.cell.split(",")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    RESULTS["env"] = {"torch": torch.__version__, "triton": triton.__version__,
                      "gpu": "cpu (dry run)" if DRY else torch.cuda.get_device_name(0), "argv": sys.argv}
    log("env", RESULTS["env"])
    t_start = time.time()
    choice = {}  # (cell, direction, B, T, N) -> the method --kernels found faster
    if args.iters:
        for cell in cells:
            for amp in (0.5, 0.9):
                iteration_sweep(cell, amp, iters_list=(2, 3, 4, 6) if not DRY else (3,),
                                B=4 if not DRY else 1, T=1024 if not DRY else 20, N=256 if not DRY else 16)
        log(f"-- iterations done {time.time() - t_start:.0f}s")
    if args.kernels:
        for cell in cells:
            kernel_variants(cell, *MAIN, True)
        for T, N in shapes:
            if (T, N) == MAIN:
                continue
            for cell in cells:
                kernel_variants(cell, T, N, False)
        for cell in ([] if DRY else cells):  # small B·N
            for B, T, N in ((1, 4096, 256), (1, 16384, 1024), (2, 4096, 1024), (4, 2048, 1024), (16, 2048, 1024)):
                kernel_variants(cell, T, N, False, B=B)
        # per shape, the faster method (its best config) decides the whole-cell rows below
        best = {}
        for r in RESULTS["kernels"]:
            key = (r["cell"], r["dir"], r["B"], r["T"], r["N"])
            if r["method"] in api.METHODS and (key not in best or r["ms"] < best[key][1]):
                best[key] = (r["method"], r["ms"])
        choice = {k: v[0] for k, v in best.items()}
        RESULTS["method_choice"] = {"|".join(map(str, k)): v for k, v in choice.items()}
        log("method choice:", RESULTS["method_choice"])
        log(f"-- kernels done {time.time() - t_start:.0f}s")
    if args.cells:
        gemm_rows(*MAIN)
        with forced_methods(choice):
            for cell in cells:
                cell_rows(cell, *MAIN, args.cell_variants.split(",") + ["models.triton:recompute",
                                                                        "models.triton:nocheck"])
                cell_rows(cell, *MAIN, ["models.parallel"], graphs=False)
                cell_rows(cell, *MAIN, ["models.triton"], dtype=torch.float32)
            for T, N in shapes:
                if (T, N) == MAIN:
                    continue
                for cell in cells:
                    cell_rows(cell, T, N, args.cell_variants.split(",") + ["models.triton:nocheck"])
        log(f"-- cells done {time.time() - t_start:.0f}s")
        for cell in cells:
            profile_rows(cell, 512, 1024, ["models.triton"])
        log(f"-- profile done {time.time() - t_start:.0f}s")
    if args.errors:
        for cell in cells:
            error_rows(cell, *MAIN)
        log(f"-- errors done {time.time() - t_start:.0f}s")
    if IR_DUMPS:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for (cell, method, d), text in IR_DUMPS.items():
                data = text.encode()
                info = tarfile.TarInfo(f"{cell}_{method}_{d}.ttgir")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with open(os.path.join(OUT, "ir.tar"), "wb") as f:
            f.write(buf.getvalue())
    save()
    # ------------------------------------------------------------------ summary table (printed last)
    print("\n==== summary ====")
    print(f"failures: {len(RESULTS['failures'])}")
    best = {}
    for r in RESULTS["kernels"]:
        key = (r["cell"], r["B"], r["T"], r["N"], r["dir"], r["method"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    print("kernel best per method (ms):  cell B T N dir method ms cfg | ref fused kernel")
    for key, r in sorted(best.items()):
        rk = REF_KERNEL.get((r["cell"], r["T"], r["N"])) if r["B"] == BATCH else None
        rs = f"{rk[0] if r['dir'] == 'fwd' else rk[1]:.3f}" if rk else "-"
        print(f"  {key[0]:4s} B{key[1]} T{key[2]:5d} N{key[3]:4d} {key[4]} {key[5]:6s} {r['ms']:.3f} {r['cfg']} | {rs}")
    for r in RESULTS.get("iters", []):
        print(f"  iters {r['cell']} amp={r['amp']} n={r['iters']} err={r['h']:.1e} res={r['residual']:.1e} "
              f"{r['ms']:.3f} ms")
    print("whole cell (ms):  cell T N dtype impl fwd fwd+bwd [graph] peakGB | ref FUSED fwd fwd+bwd | speedup "
          "fwd+bwd eager [graph]")
    for r in RESULTS["cells"]:
        if "gemm" in r:
            g = r["gemm"]
            print(f"  gemm T{g['T']} N{g['N']} {g['impl']}: proj fwd {g['proj_fwd_ms']:.3f} bwd {g['proj_bwd_ms']:.3f}")
            continue
        rf = r.get("ref_fused_fwdbwd_ms")
        gr = r.get("fwdbwd_graph_ms")
        sp = f"{rf / r['fwdbwd_ms']:.2f}x" if rf and r.get("dtype") == "bfloat16" else "-"
        if sp != "-" and gr:
            sp += f" [{rf / gr:.2f}x]"
        gs = f"[{gr:.3f}]" if gr else ""
        print(f"  {r['cell']:4s} T{r['T']:5d} N{r['N']:4d} {r['dtype']:8s} {r['impl']:24s} {r['fwd_ms']:8.3f} "
              f"{r['fwdbwd_ms']:8.3f} {gs:9s} "
              f"{r.get('peak_GB', float('nan')):.2f} | {r.get('ref_fused_fwd_ms') or '-'} {rf or '-'} | {sp}")
    print("errors vs fp32 sequential (rel max-abs):")
    for r in RESULTS["errors"]:
        print("  " + " ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                              if k not in ("B", "T", "N")))
    print(f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
