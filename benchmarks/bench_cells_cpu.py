"""CPU timing of ParaGRU / ParaLSTM: sequential loop vs parallel Newton (torch), forward and forward+backward.

Usage::

    python benchmarks/bench_cells_cpu.py [--out benchmarks/results/cells_cpu.json] [--repeats 3]

Times are the median of up to ``--repeats`` runs (after one warm-up) measured with ``time.perf_counter``,
float32, paper initialisation, 3 Newton iterations, D_in = N, 2 heads. "fwd" runs under ``torch.no_grad()``;
"fwd+bwd" is the forward with autograd on plus ``backward()`` of ``y.sum()``. A measurement whose warm-up is
slow gets fewer repeats (at least 1) so that the whole run stays under ~2 minutes; the JSON records how many.
``--threads`` defaults to 1: on a small shared CPU, intra-op threads mostly add contention. The JSON also
records the load average, since numbers taken on a busy machine are only rough.

``--check-cost`` instead measures what the Newton convergence check (``fallback_tol``) costs on the host, in
CPU time of this process (``time.process_time``, robust to a busy machine): the torch path's forward with
and without it, and the Triton path's host-side Python (``kernels.pararnn.solve_forward`` with the launches
replaced by no-ops: argument building, the residual buffer, the second launch's arguments) with and without.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.pararnn.pararnn_cells import ParaGRU, ParaLSTM  # noqa: E402
from models.pararnn.pararnn_op import FALLBACK_TOL  # noqa: E402

CELLS = {"ParaGRU": ParaGRU, "ParaLSTM": ParaLSTM}


def _median_time(fn, repeats: int, budget_s: float) -> tuple:
    """Median seconds over up to ``repeats`` runs after a warm-up; fewer runs if one takes long."""
    start = time.perf_counter()
    fn()  # warm-up
    warm = time.perf_counter() - start
    n = max(1, min(repeats, int(budget_s / max(warm, 1e-9))))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), n


def bench(cell_name: str, B: int, T: int, N: int, heads: int, repeats: int, budget_s: float = 2.0) -> dict:
    torch.manual_seed(0)
    cell = CELLS[cell_name](N, N, heads, newton_iters=3)
    x = torch.randn(B, T, N)
    result = {"cell": cell_name, "B": B, "T": T, "N": N, "heads": heads}
    for mode in ("sequential", "parallel"):
        cell.mode = mode

        def forward():
            with torch.no_grad():
                cell(x)

        def forward_backward():
            xg = x.clone().requires_grad_()
            cell.zero_grad(set_to_none=True)
            cell(xg).sum().backward()

        result[f"{mode}_fwd_s"], result[f"{mode}_fwd_n"] = _median_time(forward, repeats, budget_s)
        result[f"{mode}_fwdbwd_s"], result[f"{mode}_fwdbwd_n"] = _median_time(forward_backward, repeats, budget_s)
    result["speedup_fwd"] = result["sequential_fwd_s"] / result["parallel_fwd_s"]
    result["speedup_fwdbwd"] = result["sequential_fwdbwd_s"] / result["parallel_fwdbwd_s"]
    return result


def _cpu_median(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def check_cost(batch: int, heads: int) -> list[dict]:
    """Host CPU time of the Newton convergence check (see the module docstring); prints a table."""
    from kernels.pararnn import api

    rows = []
    print("torch path, parallel forward (no_grad), ms of CPU time: without check / with check (fallback_tol)")
    for cls in (ParaGRU, ParaLSTM):
        for T, N in ((256, 256), (1024, 256)):
            torch.manual_seed(0)
            cell = cls(N, N, heads, mode="parallel")
            x = torch.randn(batch, T, N)
            times = {}
            for tol in (None, FALLBACK_TOL):
                cell.fallback_tol = tol
                with torch.no_grad():
                    times[tol] = _cpu_median(lambda: cell(x), 5)
            rows.append({"path": "torch", "cell": cls.__name__, "B": batch, "T": T, "N": N,
                         "off_ms": 1e3 * times[None], "on_ms": 1e3 * times[FALLBACK_TOL]})
            print(f"  {cls.__name__} B{batch} T{T} N{N}: {1e3 * times[None]:.2f} / {1e3 * times[FALLBACK_TOL]:.2f} "
                  f"(+{100 * (times[FALLBACK_TOL] / times[None] - 1):.1f}%)")
    print("triton path, host Python of solve_forward (launches replaced by no-ops), µs: without / with check")
    launch = api._launch
    api._launch = lambda *args: None
    try:
        for cell in ("gru", "lstm"):
            B, T, N = 8, 512, 1024
            P = torch.randn(B, T, 3, N, dtype=torch.bfloat16)
            A, C = torch.rand(3, N) - 0.5, (torch.rand(2, N) - 0.5 if cell == "lstm" else None)
            bias, count = torch.zeros(3, N), torch.zeros((), dtype=torch.int64)
            reset = torch.zeros(B, T, dtype=torch.bool)
            us = {}
            for tol in (None, FALLBACK_TOL):
                call = lambda: api.solve_forward(cell, P, A, C, None, reset, method="newton", bias=bias, clip=0.5,
                                                 fallback_tol=tol, fallback_count=count)
                us[tol] = 1e6 * _cpu_median(lambda: [call() for _ in range(200)], 5) / 200
            rows.append({"path": "triton host", "cell": cell, "B": B, "T": T, "N": N,
                         "off_us": us[None], "on_us": us[FALLBACK_TOL]})
            print(f"  {cell} newton B{B} T{T} N{N}: {us[None]:.1f} / {us[FALLBACK_TOL]:.1f} "
                  f"(+{us[FALLBACK_TOL] - us[None]:.1f} µs)")
    finally:
        api._launch = launch
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "cells_cpu.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of repeats per measurement")
    parser.add_argument("--check-cost", action="store_true", help="only the Newton check's host cost (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    if args.check_cost:
        rows = check_cost(args.batch, args.heads)
        if os.path.dirname(args.out):
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                "timer": "time.process_time, median of 5", "load_average": load_before},
                       "results": rows}, f, indent=2)
        print(f"wrote {args.out}")
        return

    rows = []
    header = (f"{'cell':9s} {'B':>2s} {'T':>5s} {'N':>4s} | {'seq fwd':>9s} {'par fwd':>9s} {'x':>6s} | "
              f"{'seq f+b':>9s} {'par f+b':>9s} {'x':>6s}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, times in ms "
          f"(median of <= {args.repeats}); x = sequential / parallel; load average {load_before[0]:.1f}")
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for cell_name in CELLS:
        for N in args.widths:
            for T in args.lengths:
                r = bench(cell_name, args.batch, T, N, args.heads, args.repeats, args.budget)
                rows.append(r)
                print(f"{cell_name:9s} {r['B']:2d} {T:5d} {N:4d} | {1e3 * r['sequential_fwd_s']:9.2f} "
                      f"{1e3 * r['parallel_fwd_s']:9.2f} {r['speedup_fwd']:6.2f} | "
                      f"{1e3 * r['sequential_fwdbwd_s']:9.2f} {1e3 * r['parallel_fwdbwd_s']:9.2f} "
                      f"{r['speedup_fwdbwd']:6.2f}", flush=True)
    total = time.perf_counter() - start

    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor(), "dtype": "float32",
            "newton_iters": 3, "repeats": args.repeats, "timer": "time.perf_counter, median after 1 warm-up",
            "fwd": "torch.no_grad()", "fwdbwd": "y.sum().backward() with input requiring grad",
            "total_seconds": total, "load_average_before": load_before, "load_average_after": os.getloadavg()}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    print(f"wrote {args.out} ({total:.0f} s)")


if __name__ == "__main__":
    main()
