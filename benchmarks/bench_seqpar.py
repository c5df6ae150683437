#!/usr/bin/env python3
"""Sequence parallelism on two GPUs: a ParaGRU layer and a 1B training step with the time axis split.

One command starts two processes (one per GPU, NCCL). First a correctness check: ParaGRU and ParaLSTM
layers (d = 2048) split over the two GPUs against one GPU, fp32, batch 2, T = 16,384, with a document
starting at the second chunk's first step, one spanning both chunks and an initial state (output and
every gradient; PASS at ≤ 1e-5 relative). Then, on the Triton path, bf16, batch 1:

* the ParaGRU layer of the 1B model (d = 2048, 4 heads: projection GEMM + Newton solve forward, adjoint +
  GEMMs backward) at T = 65,536: one GPU alone, then the sequence split over the two GPUs (each holds
  32,768 steps): time of a forward + backward (the slower rank's, median of 3), peak memory per GPU;
* the communication alone: every collective the split layer issued in one forward + backward (recorded
  by ``pararnn_seqpar.record_collectives``), replayed with the same sizes and timed;
* the longest T one GPU fits (T doubled from 65,536 until out of memory), then the split layer at twice
  that T (if the per-token memory measured at 65,536 says it fits, with a 15 % margin);
* a ``paragru_1b`` training step (bf16 autocast, AdamW, gradients averaged by DDP) at T = 32,768: one GPU,
  then the sequence over two GPUs (``trainer.sequence_parallel=2``'s layout).

    python benchmarks/bench_seqpar.py --out DIR               # 2 GPUs, about 3 minutes
    python benchmarks/bench_seqpar.py --small --out DIR       # 2 CPU processes (gloo, Triton interpreter)

Writes ``DIR/bench_seqpar.json`` and ``DIR/bench_seqpar.md`` (the table, printed last). Every process it
starts runs with ``NCCL_NVLS_ENABLE=0`` and ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time

SMALL = "--small" in sys.argv
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
if SMALL:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything defines a Triton kernel

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {  # width, heads, layer T, training-step preset and T, repetitions, largest T tried alone, check T
    "full": dict(width=2048, heads=4, layer_T=65536, preset="paragru_1b", step_T=32768, reps=3, max_T=2 ** 23,
                 check_T=16384),
    "small": dict(width=32, heads=2, layer_T=64, preset="paragru_tiny", step_T=64, reps=2, max_T=256, check_T=64),
}
MEMORY_MARGIN = 0.85  # run the split layer at a longer T only if its predicted peak is below this share


# ------------------------------------------------------------------------------------------------ timing
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def timed(fn, device, reps: int, group=None) -> list:
    """Seconds per call of ``fn`` (the slowest rank's when ``group`` is set), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if group is not None:
            dist.barrier(group=group)
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        elapsed = torch.tensor(time.perf_counter() - start)
        if group is not None:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        times.append(elapsed.item())
    return times


def gathered_max(value: float | None, group) -> float | None:
    if value is None:
        return None
    t = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


# ------------------------------------------------------------------------------------------------- layer
def layer_call(size: dict, T: int, device, group):
    """A fwd+bwd closure of the ParaGRU layer on this rank's ``T / ranks`` steps."""
    from models.pararnn import ParaGRU

    ranks = 1 if group is None else dist.get_world_size(group)
    torch.manual_seed(0)
    cell = ParaGRU(size["width"], size["width"], size["heads"], mode="triton", clip=0.5).to(device)
    cell.seq_group = group
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(1, T // ranks, size["width"], device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(1, T // ranks, size["width"], device=device, dtype=dtype)

    def step():
        cell(x).backward(gy)
    return step


def measure_layer(size: dict, T: int, device, group, reps: int) -> dict:
    reset_peak(device)
    step = layer_call(size, T, device, group)
    times = timed(step, device, reps, group)
    row = {"T": T, "gpus": 1 if group is None else dist.get_world_size(group), "ms": 1e3 * statistics.median(times),
           "peak_gib": peak_gib(device)}
    if group is not None:
        from models.pararnn.pararnn_seqpar import record_collectives

        with record_collectives() as log:
            step()
        sync(device)
        row["peak_gib"] = gathered_max(row["peak_gib"], group)
        row["collectives"] = log
    row["tokens_per_s"] = T / (row["ms"] / 1e3)
    return row


def replay(log: list, device, group, reps: int) -> dict:
    """The recorded collectives alone, same sizes and order: ms per forward + backward's worth."""
    size = dist.get_world_size(group)
    bufs = [(kind, torch.zeros(numel, dtype=dtype, device=device),
             [torch.empty(numel, dtype=dtype, device=device) for _ in range(size)]) for kind, numel, dtype in log]

    def run():
        for kind, t, parts in bufs:
            if kind == "all_gather":
                dist.all_gather(parts, t, group=group)
            else:
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    times = timed(run, device, reps, group)
    return {"ms": 1e3 * statistics.median(times), "count": len(log),
            "kib_per_rank": sum(t.numel() * t.element_size() for _, t, _ in bufs) / 1024}


def longest_alone(size: dict, device, reps: int) -> dict:
    """The longest T (doubling) the layer's fwd+bwd fits on one device, measured there."""
    best, T = None, size["layer_T"]
    while T <= size["max_T"]:
        try:
            row = measure_layer(size, T, device, None, 1)
        except torch.OutOfMemoryError:
            break
        best, T = row, 2 * T
        if row["ms"] > 20_000:
            break
    reset_peak(device)
    return best


def check_layer(size: dict, cell_kind: str, device, group) -> dict | None:
    """The split layer against one device, fp32, batch 2 at ``check_T``: row 0 with a document starting at
    the second chunk's first step and one inside the first chunk, row 1 one document over both chunks, an
    initial state; carries guessed from 8 steps only. Relative errors of y and every gradient (rank 0's
    dict; None elsewhere)."""
    from models.pararnn import ParaGRU, ParaLSTM
    from models.pararnn import pararnn_seqpar as seqpar

    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    T, width = size["check_T"], size["width"]
    n = T // ranks
    torch.manual_seed(0)
    cell = (ParaGRU if cell_kind == "gru" else ParaLSTM)(width, width, size["heads"], mode="triton", clip=0.5)
    cell.to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, width, generator=g).to(device)
    gy = torch.randn(2, T, width, generator=g).to(device)
    state = (torch.rand(2, cell.state_blocks * width, generator=g) - 0.5).to(device)
    reset = torch.zeros(2, T, dtype=torch.bool, device=device)
    reset[0, n] = reset[0, n // 2] = True

    def run(xs, rs, gys, seq_group):
        cell.zero_grad()
        cell.seq_group = seq_group
        xs = xs.detach().requires_grad_()
        s0 = state.detach().requires_grad_()
        y = cell(xs, state=s0, reset=rs)
        y.backward(gys)
        out = {"y": y.detach(), "dx": xs.grad, "dstate": s0.grad,
               **{f"d{k}": p.grad for k, p in cell.named_parameters()}}
        cell.seq_group = None
        return out

    part = slice(rank * n, (rank + 1) * n)
    window, seqpar.WINDOW = seqpar.WINDOW, 8  # guesses from 8 steps: wrong, so the settling rounds must work
    got = run(x[:, part], reset[:, part], gy[:, part], group)
    seqpar.WINDOW = window
    for key in ("y", "dx"):
        parts = [torch.empty_like(got[key]) for _ in range(ranks)]
        dist.all_gather(parts, got[key].contiguous(), group=group)
        got[key] = torch.cat(parts, dim=1)
    for key, value in got.items():
        if key not in ("y", "dx"):
            dist.all_reduce(value, group=group)
    if rank != 0:
        return None
    ref = run(x, reset, gy, None)
    return {k: ((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref}


# --------------------------------------------------------------------------------------- training step
def step_call(size: dict, device, group):
    """One paragru_1b (or tiny) training step closure on this rank's chunk of a T-token row."""
    import torch.nn.functional as F
    import yaml

    from models.registry import build_model

    with open(os.path.join(ROOT, "configs", "model", f"{size['preset']}.yaml")) as f:
        preset = yaml.safe_load(f)  # plain YAML: the GPU machine has no omegaconf
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(preset["arch"], {**preset["config"], "mode": "triton"})
    ranks, rank = 1, 0
    if group is not None:
        model.set_sequence_parallel(group)
        ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                                          else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    T = size["step_T"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50000, (1, T + 1), generator=g)
    n = T // ranks
    inputs, labels = ids[:, rank * n:(rank + 1) * n].to(device), ids[:, rank * n + 1:(rank + 1) * n + 1].to(device)
    positions = torch.arange(rank * n, (rank + 1) * n, device=device)[None]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with amp:
            logits = model(input_ids=inputs, position_ids=positions).logits
        F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in model.parameters())


def measure_step(size: dict, device, group, reps: int) -> dict:
    reset_peak(device)
    try:
        step, params = step_call(size, device, group)
        times = timed(step, device, reps, group)
    except torch.OutOfMemoryError:
        if group is not None:
            raise  # the other rank is inside a collective: nothing sensible to do but stop
        return {"T": size["step_T"], "gpus": 1, "note": "out of memory"}
    ms = 1e3 * statistics.median(times)
    row = {"T": size["step_T"], "gpus": 1 if group is None else dist.get_world_size(group), "ms": ms,
           "tokens_per_s": size["step_T"] / (ms / 1e3), "params": params, "peak_gib": peak_gib(device)}
    if group is not None:
        row["peak_gib"] = gathered_max(row["peak_gib"], group)
    del step
    reset_peak(device)
    return row


# ---------------------------------------------------------------------------------------------- workers
def worker(rank: int, world: int, port: int, small: bool, out_path: str) -> None:
    from datetime import timedelta

    from training.sequence_parallel import setup

    cuda = torch.cuda.is_available() and not small
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.set_num_threads(1 if not cuda else torch.get_num_threads())
    # host-side numbers (timings, decisions) go through gloo, tensors on the GPUs through NCCL
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=timedelta(minutes=20))
    group = setup(world, rank, world).group
    size = SIZES["small" if small else "full"]
    reps = size["reps"]
    rows = {}
    log = lambda msg: print(f"[rank {rank}] {msg}", flush=True) if rank == 0 else None  # noqa: E731

    for kind in ("gru", "lstm"):
        log(f"check: {kind} layer split vs one device, fp32, T={size['check_T']}")
        rows[f"check_{kind}"] = check_layer(size, kind, device, group)
    T = size["layer_T"]
    if rank == 0:
        log(f"layer, T={T}, one device")
        rows["layer_one"] = measure_layer(size, T, device, None, reps)
    dist.barrier(group=group)
    log(f"layer, T={T}, {world} devices")
    rows["layer_split"] = measure_layer(size, T, device, group, reps)
    log("collectives alone")
    rows["comm"] = replay(rows["layer_split"].pop("collectives"), device, group, reps)
    if rank == 0:
        log("longest T on one device")
        rows["layer_one_longest"] = longest_alone(size, device, reps)
    dist.barrier(group=group)
    longest = torch.tensor(rows["layer_one_longest"]["T"] if rank == 0 and rows["layer_one_longest"] else T)
    dist.broadcast(longest, src=0, group=group)
    T2 = 2 * int(longest)
    per_token = (rows["layer_split"]["peak_gib"] or 0.0) / (T / world)
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 30 if cuda else 0.0
    fits = not cuda or per_token * T2 / world < MEMORY_MARGIN * total_gib
    if fits:
        log(f"layer, T={T2}, {world} devices")
        rows["layer_split_longer"] = measure_layer(size, T2, device, group, 1)
        rows["layer_split_longer"].pop("collectives")
    if rank == 0:
        log(f"{size['preset']} step, T={size['step_T']}, one device")
        rows["step_one"] = measure_step(size, device, None, reps)
    dist.barrier(group=group)
    log(f"{size['preset']} step, T={size['step_T']}, {world} devices")
    rows["step_split"] = measure_step(size, device, group, reps)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({k: v for k, v in rows.items() if v is not None}, f, default=str)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- report
LABELS = [
    ("layer_one", "ParaGRU layer fwd+bwd"), ("layer_split", "ParaGRU layer fwd+bwd, split"),
    ("comm", "  its collectives alone"), ("layer_one_longest", "layer, longest T one device fits"),
    ("layer_split_longer", "layer, split, 2x that T"), ("step_one", "{preset} training step"),
    ("step_split", "{preset} training step, split"),
]


def table(rows: dict, size: dict) -> str:
    lines = ["| what | T | GPUs | ms | tokens/s | peak GiB per GPU | note |", "|---|---|---|---|---|---|---|"]
    for key, label in LABELS:
        r = rows.get(key)
        label = label.format(preset=size["preset"])
        if r is None:
            lines.append(f"| {label} | | | | | | not run |")
        elif key == "comm":
            lines.append(f"| {label} | | 2 | {r['ms']:.2f} | | | {r['count']} collectives, "
                         f"{r['kib_per_rank']:.0f} KiB per rank |")
        elif "ms" not in r:
            lines.append(f"| {label} | {r['T']:,} | {r['gpus']} | | | | {r['note']} |")
        else:
            peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
            lines.append(f"| {label} | {r['T']:,} | {r['gpus']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {peak} |"
                         f" |")
    for kind in ("gru", "lstm"):
        errs = rows.get(f"check_{kind}")
        if errs:
            worst = max(errs.values())
            lines.append(f"| check: {kind} layer split == one device (fp32, T={size['check_T']:,}) | | 2 | | | | "
                         f"{'PASS' if worst <= 1e-5 else 'FAIL'}: worst relative error {worst:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for bench_seqpar.json and bench_seqpar.md")
    parser.add_argument("--small", action="store_true", help="tiny sizes on 2 CPU processes (gloo, Triton interpreter)")
    args = parser.parse_args()
    if not args.small and torch.cuda.device_count() < 2:
        sys.exit("error: bench_seqpar needs 2 CUDA devices (or --small on the CPU)")
    os.makedirs(args.out, exist_ok=True)
    raw = os.path.join(args.out, "bench_seqpar.raw.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    mp.spawn(worker, args=(2, port, args.small, raw), nprocs=2, join=True)
    with open(raw) as f:
        rows = json.load(f)
    os.remove(raw)
    size = SIZES["small" if args.small else "full"]
    env = {"device": torch.cuda.get_device_name(0) if not args.small else "cpu", "torch": torch.__version__,
           "small": args.small, "seconds": round(time.perf_counter() - start, 1), **size}
    text = table(rows, size)
    with open(os.path.join(args.out, "bench_seqpar.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "bench_seqpar.md"), "w") as f:
        f.write(text + "\n")
    print(f"\n{env['device']}, torch {env['torch']}, {env['seconds']} s")
    print(text)


if __name__ == "__main__":
    main()
