"""Time one training step (forward, fused loss, backward, fused AdamW) of model presets, eager and under
``trainer.compile``, on one device; ends by itself within ``--budget`` seconds.

    python benchmarks/bench_step.py --out benchmarks/results/step_1b          # the 1B presets, one H200
    python benchmarks/bench_step.py --tiny --out /tmp/bench_step              # CPU smoke run, tiny presets

The step is train.py's (``train_step``'s work without accelerate): bf16 autocast over fp32 weights on CUDA,
the fused chunked linear + cross-entropy + z-loss (``training.loss.LMObjective``), fused AdamW, and for
``compile`` rows every decoder block compiled as ``trainer.compile=true`` does (``training.compile``).
Random tokens in packed documents of ``--doc-len`` tokens (every architecture pays for its boundary
handling). Step time: median of ``--steps`` steps after ``--warmup`` (CUDA events; the warm-up holds the
compilation and any autotuning); peak memory: ``max_memory_allocated`` over the timed steps; MFU: 6N and
the architecture's own FLOP count (``training.flops``) against the device's peak.

Robust by construction: each row (preset × mode) runs in its own process with a time limit
(``--row-timeout``, and never past the overall ``--budget``), so an out-of-memory, a compile error or a
hang is recorded as that row's error and the next row starts on a clean device; rows that the budget
cannot fit are recorded as skipped. One JSON line per row as it finishes, the table last; ``--out DIR``
gets ``bench_step.json``.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reference first: if the budget runs out, the rows lost are the last ones.
PRESETS_1B = ["transformer_1b", "paragru_1b", "paralstm_1b", "mamba2_1b"]
PRESETS_TINY = ["transformer_tiny", "paragru_tiny", "paralstm_tiny", "mamba2_tiny"]
MODES = ("eager", "compile")


def run_row(args) -> dict:
    """One preset in one mode, in this process: the measurement (imports torch and the project here, so
    the parent stays light)."""
    import torch
    import yaml  # not omegaconf: the GPU image has no hydra-core (transformers brings PyYAML)

    sys.path.insert(0, ROOT)
    from models.registry import build_model
    from training.compile import compile_blocks
    from training.flops import flops_per_token, mean_context, peak_flops
    from training.loss import LMObjective

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    with open(os.path.join(ROOT, "configs", "model", f"{args.row_preset}.yaml")) as f:
        preset = yaml.safe_load(f)
    arch, config = preset["arch"], preset["config"]
    if args.layers:
        config["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    with device:  # initialised on the device, as train.py does (a 1B init on the CPU takes longer than a step)
        model = build_model(arch, config, 50257).train()
    params = sum(p.numel() for p in model.parameters())
    objective = LMObjective(model, 1e-4, fused=True, compiled=args.row_mode == "compile")
    if args.row_mode == "compile":
        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    ids = torch.randint(0, 50257, (args.batch, args.seq + 1), device=device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
             "position_ids": (torch.arange(args.seq, device=device) % args.doc_len).repeat(args.batch, 1)}

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, ce, _ = objective(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return ce

    times, first_s = [], None
    for i in range(args.warmup + args.steps):
        if i == args.warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # the steady state, not compilation's or autotuning's
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            ce = step()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            ce = step()
            elapsed = time.perf_counter() - t0
        if i == 0:
            first_s = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(elapsed)
    step_s = statistics.median(times)
    tokens_per_s = args.batch * args.seq / step_s
    flops = flops_per_token(arch, model.config, params, mean_context(batch["position_ids"]))
    peak = peak_flops(device, args.peak_tflops)
    return {"preset": args.row_preset, "mode": args.row_mode, "arch": arch, "params": params,
            "layers": model.config.num_hidden_layers, "batch": args.batch, "seq": args.seq,
            "step_ms": step_s * 1e3, "first_step_s": first_s, "tokens_per_s": tokens_per_s,
            "mfu_6N": flops["6N"] * tokens_per_s / peak if peak else None,
            "mfu_model": flops["model"] * tokens_per_s / peak if peak else None,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None, "loss": float(ce),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__}


def spawn(args, preset: str, mode: str, timeout: float) -> dict:
    """``run_row`` in a child process (its own session, so a timeout ends its compile workers too)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--row-preset", preset, "--row-mode", mode,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--doc-len", str(args.doc_len), "--device", args.device, "--layers", str(args.layers)]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    row = {"preset": preset, "mode": mode}
    # Triton's autotuning results on disk: the compiled row of a preset reuses what its eager row measured
    env = {"TRITON_CACHE_AUTOTUNING": "1", **os.environ}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {**row, "error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = [line for line in err.strip().splitlines() if line.strip()]
    oom = "OutOfMemoryError" in err or "out of memory" in err
    reason = "out of memory" if oom else (tail[-1][:200] if tail else f"exit {proc.returncode}")
    return {**row, "error": reason}


def print_table(rows: list[dict]) -> None:
    print("\n| preset | mode | layers | B×T | step ms | tokens/s | MFU 6N | MFU model | peak GiB | first step s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"  # noqa: E731
    for r in rows:
        if "error" in r:
            print(f"| {r['preset']} | {r['mode']} | | | {r['error']} | | | | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"| {r['preset']} | {r['mode']} | {r['layers']} | {r['batch']}×{r['seq']} | {r['step_ms']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {pct(r['mfu_6N'])} | {pct(r['mfu_model'])} | {peak} | "
              f"{r['first_step_s']:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=None, help="default: the four 1B presets (tiny: --tiny)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--tiny", action="store_true", help="tiny presets, B2·T64, 2+1 steps: a CPU smoke run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--doc-len", type=int, default=512)
    parser.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: the preset's)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: from the GPU's name")
    parser.add_argument("--row-timeout", type=float, default=120, help="seconds per row at most")
    parser.add_argument("--budget", type=float, default=390, help="seconds for all rows together")
    parser.add_argument("--out", default=None, help="directory for bench_step.json")
    parser.add_argument("--row-preset", help=argparse.SUPPRESS)  # internal: run one row in this process
    parser.add_argument("--row-mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.row_preset:
        print(json.dumps(run_row(args)), flush=True)
        return 0
    if args.tiny:
        args.batch, args.seq, args.steps, args.warmup, args.doc_len = 2, 64, 2, 1, 32
    presets = args.presets or (PRESETS_TINY if args.tiny else PRESETS_1B)
    rows, deadline = [], time.monotonic() + args.budget
    for preset in presets:
        for mode in args.modes:
            left = deadline - time.monotonic()
            if left < 20:
                rows.append({"preset": preset, "mode": mode, "error": "skipped: --budget spent"})
            else:
                rows.append(spawn(args, preset, mode, min(args.row_timeout, left)))
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_step.json"), "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
