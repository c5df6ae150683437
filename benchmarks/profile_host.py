#!/usr/bin/env python3
"""Where the host time of one eager ParaGRU/ParaLSTM forward+backward goes (mode "triton", one GPU).

At short sequences the cell's eager speed is set by the CPU issuing work, not by the GPU: at
B8·T512·N1024 the GPU needs ~0.25 ms per forward+backward (CUDA graph replay) while the host needed
over 1 ms. This script measures, for each cell:

* host µs per forward+backward (calls issued back to back without a sync; grads set to None first,
  as ``do_bench`` does), and the CUDA-graph GPU time for comparison;
* a ``cProfile`` of those calls: the Python functions with the most own time (what to cut);
* ``solve_forward``/``solve_backward`` (launch through ``api._launch`` + allocations + checks)
  vs replaying the same compiled kernel's launcher directly (the floor for a launch), the forward with
  and without the Newton convergence check (``fallback_tol``: a per-chain residual buffer and the gated
  sweep launch), and the host cost of the projection GEMMs (one dense mm for scale).

Writes ``host.json`` to ``--out`` and prints the tables. ``python benchmarks/profile_host.py --out $OUT``
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.bench_cells import compiled_kernel, graph_bench  # noqa: E402
from kernels.pararnn import api  # noqa: E402
from models.pararnn import FALLBACK_TOL, ParaGRU, ParaLSTM  # noqa: E402
from models.pararnn.pararnn_solve import project_heads, project_heads_backward  # noqa: E402


def host_us(fn, n=50):
    """Host µs per call of ``fn`` issued ``n`` times without a sync."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e6 * t / n


def replay_launch(call):
    """µs per launch through ``call`` (our cached launch) and through the captured compiled launcher."""
    call()
    compiled = compiled_kernel(call)
    launcher = compiled.run  # a property over ``_run`` (Triton 3.6)
    captured = []
    compiled._run = lambda *a: (captured.append(a), launcher(*a))[1]
    try:
        call()
    finally:
        compiled._run = launcher
    args = captured[-1]
    return host_us(call, 200), host_us(lambda: launcher(*args), 200)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=2)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = []
    for cls in (ParaGRU, ParaLSTM):
        torch.manual_seed(0)
        m = cls(args.N, args.N, num_heads=args.heads, mode="triton").cuda().bfloat16()
        x = torch.randn(args.B, args.T, args.N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn_like(x)
        leaves = [x] + list(m.parameters())

        def fb():
            for t in leaves:
                t.grad = None
            m(x).backward(gy)

        row = {"cell": m.math.name, "B": args.B, "T": args.T, "N": args.N,
               "host_us_fwdbwd": host_us(fb), "graph_us_fwdbwd": 1e3 * graph_bench(fb, leaves)}
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            fb()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        row["cprofile_tottime"] = buf.getvalue()
        with torch.no_grad():
            P = project_heads(x, m.B)
            C = getattr(m, "C", None)
            cell = m.math.name
            h, _ = api.solve_forward(cell, P, m.A, C, None, None, bias=m.b)
            dP = torch.randn_like(P)
            count = torch.zeros((), dtype=torch.int64, device="cuda")
            W = torch.randn(args.N, 3 * args.N, device="cuda", dtype=x.dtype)
            pieces = {
                "project_heads (bmm + views)": lambda: project_heads(x, m.B),
                "dense mm [M,D]x[D,3N] (for scale)": lambda: x.view(-1, args.N) @ W,
                "project_heads_backward (2 bmm)": lambda: project_heads_backward(x, m.B, dP, (True, True)),
                "solve_forward newton": lambda: api.solve_forward(cell, P, m.A, C, None, None, bias=m.b,
                                                                  method="newton"),
                "solve_forward newton + convergence check": lambda: api.solve_forward(
                    cell, P, m.A, C, None, None, bias=m.b, method="newton", fallback_tol=FALLBACK_TOL,
                    fallback_count=count),
                "torch.empty": lambda: torch.empty_like(x),
            }
            row["pieces_us"] = {name: host_us(fn) for name, fn in pieces.items()}
            row["launch_fwd_us"] = replay_launch(lambda: api.solve_forward(cell, P, m.A, C, None, None, bias=m.b))
            row["launch_bwd_us"] = replay_launch(
                lambda: api.solve_backward(cell, P, m.A, C, None, None, h, h[:, :, -1], bias=m.b))
        results.append(row)
        print(f"{row['cell']} B{args.B} T{args.T} N{args.N}: host {row['host_us_fwdbwd']:.0f} us per fwd+bwd, "
              f"GPU (graph) {row['graph_us_fwdbwd']:.0f} us")
        print(f"  solve_forward {row['launch_fwd_us'][0]:.1f} us, its launcher alone {row['launch_fwd_us'][1]:.1f} us")
        print(f"  solve_backward {row['launch_bwd_us'][0]:.1f} us, "
              f"its launcher alone {row['launch_bwd_us'][1]:.1f} us")
        for name, us in row["pieces_us"].items():
            print(f"  {name} {us:.1f} us")
        print(row["cprofile_tottime"])
    with open(os.path.join(args.out, "host.json"), "w") as f:
        json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
