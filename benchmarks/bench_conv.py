#!/usr/bin/env python3
"""The ParaRNN block's conv + SiLU on one GPU: the fused kernel (``kernels.conv``) against the torch form, eager
and compiled (what ``trainer.compile`` runs without ``model.config.fused_conv``).

    python benchmarks/bench_conv.py --out DIR                 # B8·T2048·D2048 bf16, documents of 512 (the 1B step)
    TRITON_INTERPRET=1 python benchmarks/bench_conv.py --small # CPU smoke run of the script (times meaningless)

Rows: ``torch`` (``F.silu(CausalDepthwiseConv(v, positions))``, eager), ``torch compiled`` (the same under
``torch.compile``), ``kernel`` and ``kernel compiled``; each forward alone and forward + backward (v, weight
and bias gradients), with v a strided half of a ``[B, T, 2D]`` tensor as the block passes it. Times: the median
of ``triton.testing.do_bench`` (CUDA events), ms per call; ×24 layers is the 1B step's share. Also each row's
largest difference from the torch form (output and dv). ``--out DIR`` writes ``bench_conv.json``; the table is
printed last.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--doc-len", type=int, default=512)
    parser.add_argument("--small", action="store_true", help="B2·T64·D32 (CPU with TRITON_INTERPRET=1)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpreting:
        print("error: no CUDA device; for a CPU run use TRITON_INTERPRET=1 ... --small", file=sys.stderr)
        return 2
    import triton

    from kernels.conv import causal_conv_silu
    from models.pararnn.pararnn_conv import CausalDepthwiseConv

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, T, D = (2, 64, 32) if args.small else (args.batch, args.seq, args.dim)
    dtype = torch.float32 if interpreting else torch.bfloat16  # the interpreter has no bf16 math
    torch.manual_seed(0)
    conv = CausalDepthwiseConv(D, 4).to(dev)
    with torch.no_grad():
        conv.weight.normal_(0, 0.5)
    wide = torch.randn(B, T, 2 * D, device=dev, dtype=dtype, requires_grad=True)
    doc_len = 20 if args.small else args.doc_len
    positions = (torch.arange(T, device=dev) % doc_len).expand(B, T)
    du = torch.randn(B, T, D, device=dev, dtype=dtype)

    def torch_form(v):
        return F.silu(conv(v, positions))

    def kernel(v):
        return causal_conv_silu(v, conv.weight, conv.bias, positions)

    impls = {"torch": torch_form, "torch compiled": torch.compile(torch_form, fullgraph=True),
             "kernel": kernel, "kernel compiled": torch.compile(kernel, fullgraph=True)}
    params = [wide, conv.weight, conv.bias]

    def timed(fn):
        if interpreting:
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
        return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=params, return_mode="median")

    ref = torch_form(wide[..., :D])
    (ref_dv,) = torch.autograd.grad(ref, wide, du)
    rows = []
    for name, fn in impls.items():
        u = fn(wide[..., :D])
        (dv,) = torch.autograd.grad(u, wide, du)
        fwd = timed(lambda: fn(wide[..., :D]))
        both = timed(lambda: fn(wide[..., :D]).backward(du))
        rows.append({"impl": name, "B": B, "T": T, "D": D, "dtype": str(dtype)[6:], "fwd_ms": fwd, "fwd_bwd_ms": both,
                     "max_diff_u": (u - ref).abs().max().item(), "max_diff_dv": (dv - ref_dv).abs().max().item()})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_conv.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\nconv + SiLU, B{B}·T{T}·D{D} {str(dtype)[6:]}, documents of {doc_len}, K 4; ms per call "
          f"(x24: the 1B step's 24 layers)")
    print("| impl | fwd | fwd+bwd | fwd+bwd x24 | max diff u / dv vs torch |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {24 * r['fwd_bwd_ms']:.1f} | "
              f"{r['max_diff_u']:.1e} / {r['max_diff_dv']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
