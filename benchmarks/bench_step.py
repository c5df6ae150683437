"""Time one training step (forward, fused loss, backward, fused AdamW) of model presets, eager and under
``trainer.compile``, on one device; ends by itself within ``--budget`` seconds.

    python benchmarks/bench_step.py --out benchmarks/results/step_1b          # the 1B presets, one H200
    python benchmarks/bench_step.py --profile compile --out benchmarks/results/step_1b   # + kernel time by kind
    python benchmarks/bench_step.py --tiny --profile --out /tmp/bench_step    # CPU smoke run, tiny presets
    python benchmarks/bench_step.py --presets paragru_1b paragru_1b:recompute_elementwise=true --modes compile

A preset may carry model-config overrides, ``NAME:KEY=VALUE[,KEY=VALUE]`` (values read as YAML): a row of
its own, labelled with them.

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
gets ``bench_step.json`` and the tables as ``bench_step.md``.

``--profile [MODE ...]``: after the timed steps, ``--profile-steps`` more under ``torch.profiler``, their device time
(kernel time on CUDA; the ops' own CPU time on the CPU) bucketed by :func:`bucket` into GEMMs, the mixer
(ParaRNN cell / attention / SSD), norms and elementwise, loss, optimizer and other, per step; a second
table (rows of the modes named, every row if none). Steps and peak memory are measured before the profiler
starts.
"""
import argparse
import json
import os
import re
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
BUCKETS = ("gemm", "mixer", "norm_elementwise", "loss", "optimizer", "other")
# bucket()'s rules, first match wins. A kernel is matched by its name, then by the CPU ops it was launched
# from (innermost first). Loss and optimizer by their ranges: the loss's head GEMMs count as loss.
_OPTIMIZER = re.compile(r"Optimizer\.(step|zero_grad)|multi_tensor_apply|fused_adam", re.I)
_LOSS = re.compile(r"lm_loss|LinearCrossEntropy")  # LMObjective's record_function range, its backward node
# Mixer kernels before GEMMs: cutlass attention kernels (fmha_cutlass*, cudnn sdpa sm90) match both.
_MIXER_KERNEL = re.compile(r"flash|fmha|attention|sdpa|(gru|lstm)_(newton|sweep)_|chunk_scan|chunk_state|"
                           r"state_passing|bmm_chunk|chunk_cumsum", re.I)
_GEMM = re.compile(r"gemm|sm90|cutlass|cublas|ampere|nvjet|triton_tem|^aten::(mm|addmm|bmm|baddbmm|_scaled_mm)$", re.I)
# The ops that hold a mixer's elementwise work: the ParaRNN op (eager Function, compiled custom ops), SSD.
# Mamba2's torch SSD (the CPU's) has no op of its own: there its work counts as elementwise.
_MIXER_OP = re.compile(r"^ParaRNNFunction|^pararnn::|^MambaChunkScanCombinedFn|^mamba2_ssd::|scaled_dot_product")
# The ParaRNN block's fused conv + SiLU (kernels.conv) is the block's glue, as Inductor's conv kernels were.
_ELEMENTWISE = re.compile(r"triton_(poi|red|per)|elementwise|vectorized|reduce|norm|copy|cat|fill|memset|"
                          r"memcpy|conv_silu_|^aten::", re.I)


def bucket(name: str, parents: list[str]) -> str:
    """The category of a kernel (or CPU op) ``name`` launched from the CPU ops ``parents`` (innermost first)."""
    if any(_OPTIMIZER.search(n) for n in (name, *parents)):
        return "optimizer"
    if any(_LOSS.search(n) for n in (name, *parents)):
        return "loss"
    if _MIXER_KERNEL.search(name):
        return "mixer"
    if _GEMM.search(name):
        return "gemm"
    if any(_MIXER_OP.search(n) for n in (name, *parents)):
        return "mixer"
    if _ELEMENTWISE.search(name):
        return "norm_elementwise"
    return "other"


def breakdown(events, steps: int) -> dict:
    """Milliseconds per step by bucket from ``prof.events()``: device kernels on CUDA (each with the CPU op
    that launched it and that op's parents), else every CPU op's own time; plus each bucket's largest
    entries, as kernel <- ops (to see what the rules put where)."""
    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    # Each CPU op lists the kernels it launched (``kernels``: name, device, duration in us), in every torch
    # this runs on; the device events' own link to their op (``linked_correlation_id``) is not in torch 2.11.
    # A user range (record_function: lm_loss, Optimizer.step) also lists its GPU-side span under its own name:
    # time its kernels already count (the H200 run without this filter summed to ~2x the step). Inductor's
    # launch ranges also carry their kernel's name, but they are not user annotations: their kernels count.
    # CUPTI's "Command Buffer Full" marker (a launch that waited for room in the queue) lists its kernel again,
    # with a bogus duration: on the H200, 456 ms of AdamW per 318-ms step, beside the 12 ms under the op.
    launched = [(k.name, e, k.duration) for e in cpu for k in e.kernels
                if not (e.is_user_annotation and k.name == e.name) and e.name != "Command Buffer Full"]
    items = []
    for name, op, us in launched or [(e.name, e.cpu_parent, e.self_cpu_time_total) for e in cpu]:
        parents = []
        while op is not None:
            parents.append(op.name)
            op = op.cpu_parent
        items.append((name, parents, us))
    kernels = bool(launched)
    ms = dict.fromkeys(BUCKETS, 0.0)
    named: dict[str, dict[str, float]] = {b: {} for b in BUCKETS}
    for name, parents, us in items:
        b = bucket(name, parents)
        ms[b] += us / 1e3 / steps
        key = f"{name[:100]} <- {' < '.join(parents[:3])}"  # the kernel and the ops it came from
        named[b][key] = named[b].get(key, 0.0) + us / 1e3 / steps
    top = {b: dict(sorted(v.items(), key=lambda kv: -kv[1])[:6]) for b, v in named.items() if v}
    return {"ms": ms, "total_ms": sum(ms.values()), "device": "cuda" if kernels else "cpu", "top": top}


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
    name, _, overrides = args.row_preset.partition(":")
    with open(os.path.join(ROOT, "configs", "model", f"{name}.yaml")) as f:
        preset = yaml.safe_load(f)
    arch, config = preset["arch"], preset["config"]
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        config[key] = yaml.safe_load(value)
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
    profile = None
    if args.profile is not None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        try:  # the row's step time and memory are measured already: a profiler failure must not lose them
            with profiler(activities=activities) as prof:
                for _ in range(args.profile_steps):
                    step()
                if cuda:
                    torch.cuda.synchronize()
            profile = breakdown(prof.events(), args.profile_steps)
        except Exception as err:  # recorded in the row and its table
            profile = {"error": f"{type(err).__name__}: {err}"}
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
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "profile": profile}


def spawn(args, preset: str, mode: str, timeout: float) -> dict:
    """``run_row`` in a child process (its own session, so a timeout ends its compile workers too)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--row-preset", preset, "--row-mode", mode,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--doc-len", str(args.doc_len), "--device", args.device, "--layers", str(args.layers)]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    if args.profile is not None and (not args.profile or mode in args.profile):
        cmd += ["--profile", "--profile-steps", str(args.profile_steps)]
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
    return {**row, "error": failure_reason(err, proc.returncode)}


def failure_reason(stderr: str, returncode: int) -> str:
    """One line for a failed row: out of memory, else the last exception line of the traceback (Triton's
    compilation errors end in source lines and a caret, not in the exception), else the last line."""
    if "OutOfMemoryError" in stderr or "out of memory" in stderr:
        return "out of memory"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return (raised or lines or [f"exit {returncode}"])[-1][:200]


def tables(rows: list[dict]) -> str:
    """The step table, and the profiler's breakdown of the rows that have one (ms per step, share)."""
    lines = ["| preset | mode | layers | B×T | step ms | tokens/s | MFU 6N | MFU model | peak GiB | first step s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['mode']} | | | {r['error']} | | | | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['preset']} | {r['mode']} | {r['layers']} | {r['batch']}×{r['seq']} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {pct(r['mfu_6N'])} | {pct(r['mfu_model'])} | {peak} | "
                     f"{r['first_step_s']:.1f} |")
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        device = next((r["profile"]["device"] for r in profiled if "device" in r["profile"]), "cpu")
        lines += ["", "Profiler: " + ("kernel" if device == "cuda" else "CPU op")
                  + " time per step, ms (share); mixer = ParaRNN cell / attention / SSD; loss includes the head GEMMs",
                  "", "| preset | mode | " + " | ".join(BUCKETS) + " | total |",
                  "|---|---|" + "---|" * (len(BUCKETS) + 1)]
        for r in profiled:
            p = r["profile"]
            if "error" in p:
                lines.append(f"| {r['preset']} | {r['mode']} | profiler failed: {p['error']} |")
                continue
            cells = [f"{p['ms'][b]:.1f} ({100 * p['ms'][b] / max(p['total_ms'], 1e-9):.0f}%)" for b in BUCKETS]
            lines.append(f"| {r['preset']} | {r['mode']} | " + " | ".join(cells) + f" | {p['total_ms']:.1f} |")
    return "\n".join(lines)


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
    parser.add_argument("--profile", nargs="*", choices=MODES, default=None,
                        help="also a profiler breakdown of the rows of these modes (none named: every row)")
    parser.add_argument("--profile-steps", type=int, default=2, help="steps under the profiler (after the timed ones)")
    parser.add_argument("--out", default=None, help="directory for bench_step.json and bench_step.md")
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
    table = tables(rows)
    print("\n" + table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_step.json"), "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "bench_step.md"), "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
