#!/usr/bin/env python3
"""Throughput and memory of train.py per model preset, strategy and number of GPUs.

Each configuration ``PRESET:TRAINER:GPUS`` runs the real ``train.py`` under ``torchrun --standalone``
(``trainer=TRAINER``: a file of configs/trainer/, e.g. ddp, fsdp2, deepspeed_zero2, deepspeed_zero3,
gpu) with the preset's full schedule (so the LR is as in a real run), logs every step, and is stopped
(SIGKILL of torchrun and its workers: no checkpoint, no export) once ``--warmup + --steps`` steps are logged.
Reported per configuration, over the ``--steps`` steps after the first ``--warmup``:

* tokens/s per GPU: the median over steps of train.py's ``tokens_per_s`` (global, timed by rank 0
  between two logged steps) divided by the number of GPUs, and the mean;
* peak memory per GPU: train.py's ``peak_mem_gib`` / ``peak_mem_reserved_gib`` (torch allocator, rank
  0) and the largest ``nvidia-smi`` reading of any of the run's GPUs (all memory of the process,
  CUDA context included), polled every 0.5 s;
* the loss of the last step (a sanity check), the parameter count, the command line.

Results: ``--out DIR`` gets ``bench_distributed.json`` and ``bench_distributed.md`` (the table, also
printed), and per configuration ``<config>.log`` (train.py's output) and ``<config>.metrics.jsonl``.

    python benchmarks/bench_distributed.py --out /tmp/bench \\
        --config paragru_1b:ddp:2 --config paragru_1b:fsdp2:2 --config paragru_7b:fsdp2:2
    python benchmarks/bench_distributed.py --config transformer_1b:deepspeed_zero3:2 --batch-size 16 \\
        --seq-len 2048 -- data=fineweb_edu          # after "--": extra Hydra overrides for every run

Defaults: global batch 8 x GPUs sequences of 2048 tokens, the embedded corpus (data=sotu), bf16,
10 warm-up + 20 measured steps. Memory numbers depend on the batch: compare at equal batch per GPU.
A CPU smoke run: ``--precision fp32 --seq-len 64 --batch-size 4 -- trainer.device=cpu`` (DeepSpeed on
CPU first JIT-builds an op for a minute or more; on GPUs it does not).
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_CONFIGS = ["paragru_1b:ddp:2", "paragru_1b:fsdp2:2", "paragru_7b:fsdp2:2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_params(preset: str):
    try:
        from models.count import build_meta, load_preset
        from models.count import count_params as count

        return count(build_meta(load_preset(preset)))
    except Exception:  # noqa: BLE001 - a count is a nicety; the benchmark does not need it
        return None


def gpu_memory_mib() -> dict:
    """{gpu index: used MiB} from nvidia-smi, or {} where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {int(i): float(m) for i, m in (line.split(",") for line in out.strip().splitlines() if "," in line)}


def descendants(pid: int) -> list:
    """Every process below ``pid`` (from /proc). torchrun starts its workers in sessions of their own,
    so killing torchrun's process group would leave them running."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a run (torchrun and its workers, and anything they started): no checkpoint, no export."""
    if proc.poll() is None:
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def command(preset: str, trainer: str, gpus: int, run_dir: str, args) -> list:
    batch = args.batch_size or 8 * gpus
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
            "--master_port", str(free_port()), os.path.join(ROOT, "train.py"),
            f"run_dir={run_dir}", f"model={preset}", f"trainer={trainer}", f"trainer.batch_size={batch}",
            f"trainer.grad_accum={args.grad_accum}", f"data.seq_len={args.seq_len}", "trainer.log_every=1",
            "trainer.val_every=1000000000", "trainer.ckpt_every=1000000000", "trainer.val_batches=1",
            f"trainer.precision={args.precision}", *args.overrides]


def run_config(spec: str, args, out_dir: str) -> dict:
    preset, trainer, gpus = spec.split(":")
    gpus = int(gpus)
    name = spec.replace(":", "_")
    run_dir = tempfile.mkdtemp(prefix=f"bench_{name}_", dir=args.scratch)
    cmd = command(preset, trainer, gpus, run_dir, args)
    result = {"config": spec, "preset": preset, "trainer": trainer, "gpus": gpus, "params": count_params(preset),
              "batch_size": args.batch_size or 8 * gpus, "seq_len": args.seq_len, "command": " ".join(cmd)}
    print(f"== {spec}: {' '.join(cmd)}", flush=True)
    log_path = os.path.join(out_dir, f"{name}.log")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4"), "TOKENIZERS_PARALLELISM": "false"}
    needed = args.warmup + args.steps
    smi_peak, records, start = {}, [], time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None and time.time() - start < args.timeout:
                for gpu, used in gpu_memory_mib().items():
                    smi_peak[gpu] = max(smi_peak.get(gpu, 0.0), used)
                if os.path.exists(metrics):
                    with open(metrics) as f:
                        records = [r for r in map(json.loads, f) if "loss" in r and "split" not in r]
                    if len(records) >= needed:
                        break
                time.sleep(0.5)
        finally:
            kill_tree(proc)
            if os.path.exists(metrics):
                shutil.copy(metrics, os.path.join(out_dir, f"{name}.metrics.jsonl"))
            shutil.rmtree(run_dir, ignore_errors=True)
    result["wall_s"] = round(time.time() - start, 1)
    if len(records) < needed:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        reason = "timeout" if time.time() - start >= args.timeout else f"exit code {proc.returncode}"
        result["error"] = f"{reason} after {len(records)} of {needed} steps; log {log_path}: ...{tail[-600:]}"
        print(f"   FAILED: {result['error']}", flush=True)
        return result
    measured = records[args.warmup:needed]
    rates = sorted(r["tokens_per_s"] / gpus for r in measured)
    result.update({
        "tokens_per_s_per_gpu": round(rates[len(rates) // 2], 1),
        "tokens_per_s_per_gpu_mean": round(sum(rates) / len(rates), 1),
        "tokens_per_s_total": round(rates[len(rates) // 2] * gpus, 1),
        "step_s": round(measured[-1]["tokens"] / measured[-1]["step"] / (rates[len(rates) // 2] * gpus), 4),
        "peak_mem_gib": measured[-1].get("peak_mem_gib"),
        "peak_mem_reserved_gib": measured[-1].get("peak_mem_reserved_gib"),
        "nvidia_smi_peak_gib": round(max(smi_peak.values()) / 1024, 2) if smi_peak else None,
        "last_loss": round(measured[-1]["loss"], 4),
    })
    print(f"   {result['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, peak {result['peak_mem_gib']} GiB", flush=True)
    return result


def table(results: list) -> str:
    head = ("| config | params | batch x seq | tokens/s/GPU (median) | step s | peak alloc GiB | "
            "peak reserved GiB | nvidia-smi GiB | loss |")
    rows = [head, "|" + "---|" * 9]
    for r in results:
        params = "-" if not r["params"] else (f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e9
                                              else f"{r['params'] / 1e6:.0f}M")
        if "error" in r:
            rows.append(f"| {r['config']} | {params} | {r['batch_size']} x {r['seq_len']} | "
                        f"FAILED: {r['error'][:80]} | | | | | |")
            continue
        rows.append(f"| {r['config']} | {params} | {r['batch_size']} x {r['seq_len']} | "
                    f"{r['tokens_per_s_per_gpu']:.0f} | {r['step_s']} | {r['peak_mem_gib']} | "
                    f"{r['peak_mem_reserved_gib']} | {r['nvidia_smi_peak_gib']} | {r['last_loss']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", default=None,
                        help=f"PRESET:TRAINER:GPUS, repeatable (default: {' '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default 8 x GPUs)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--warmup", type=int, default=10, help="logged steps left out of the numbers")
    parser.add_argument("--steps", type=int, default=20, help="logged steps measured")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per configuration")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "distributed"))
    parser.add_argument("--scratch", default=None, help="where the throwaway run dirs go (default: $TMPDIR)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = [run_config(spec, args, args.out) for spec in (args.config or DEFAULT_CONFIGS)]
    with open(os.path.join(args.out, "bench_distributed.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = table(results)
    with open(os.path.join(args.out, "bench_distributed.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
