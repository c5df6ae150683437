#!/usr/bin/env python3
"""Two emulated SLURM nodes with one GPU each train exactly as a plain 2-GPU ``torchrun`` (issue 20).

    python benchmarks/check_multinode_gpu.py --out $OUT            # paragru_1b, FSDP2, 10 steps, 2 GPUs
    python benchmarks/check_multinode_gpu.py --cpu --out /tmp/mn   # CPU smoke: tiny ParaGRU, gloo, 2 x 1 rank

The same ``train.py`` overrides (default: ``model=paragru_1b trainer=fsdp2``, global batch 16 x 1024
tokens of the embedded corpus, warm-up 2 of 10 steps) run

1. ``torchrun --standalone --nproc_per_node 2 train.py ...`` (each rank sees both GPUs, uses cuda:RANK);
2. ``tests/fake_slurm.py sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=1 slurm/train_multinode.sbatch ...``:
   the real SLURM script; each emulated node sees one GPU (as cuda:0); ranks from srun's variables
   through slurm/task.sh, NCCL rendezvous at the first node (env://);
3. only when 1 and 2 differ: run 1 again, which measures torchrun's own run-to-run difference;
4. with ``--separate-hosts``: run 2 with ``NCCL_HOSTID`` per node, so that NCCL treats the ranks as two
   hosts and uses its network transport (reported, not part of PASS).

Every run is stopped (SIGKILL of the whole process tree: no checkpoint, no export) once ``--steps``
steps are logged. PASS: the emulated run's losses equal torchrun's, or differ by at most
max(2 x torchrun's run-to-run difference, 1e-3) at every step; and the loss fell by at least 0.5
(``--cpu``: 0.2) from step 1 to the last (it learns). Every child runs with NCCL_NVLS_ENABLE=0 and
TORCH_SYMM_MEM_DISABLE_MULTICAST=1. Writes ``check_multinode.json`` under ``--out``; prints the loss
columns and PASS/FAIL last; exits 1 on FAIL.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_distributed import free_port, kill_tree  # noqa: E402

GPU_OVERRIDES = ["model=paragru_1b", "trainer=fsdp2", "trainer.batch_size=16", "data.seq_len=1024"]
CPU_OVERRIDES = ["model=paragru_tiny", "model.config.hidden_size=32", "model.config.num_hidden_layers=1",
                 "trainer=fsdp2", "trainer.device=cpu", "trainer.precision=fp32", "trainer.batch_size=4",
                 "data.seq_len=32", "model.lr=1e-2"]
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def overrides(args, run_dir: str) -> list:
    base = CPU_OVERRIDES if args.cpu else GPU_OVERRIDES
    return [*base, f"trainer.max_steps={args.steps}", "trainer.warmup_steps=2", "trainer.log_every=1",
            "trainer.val_every=1000000", "trainer.ckpt_every=1000000", "trainer.val_batches=1", *args.overrides]


def launch(kind: str, run_dir: str, args, log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "FAKE_SLURM_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                         "MASTER_ADDR", "MASTER_PORT", "RUN_DIR")}
    env.update(NCCL_ENV, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1" if args.cpu else "4"),
               TOKENIZERS_PARALLELISM="false")
    if kind == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--master_port", str(free_port()), os.path.join(ROOT, "train.py"), f"run_dir={run_dir}",
               *overrides(args, run_dir)]
    else:
        gpus = [] if args.cpu else ["--gpus-per-node=1"]
        cmd = [sys.executable, os.path.join(ROOT, "tests", "fake_slurm.py"), "sbatch", "--nodes=2",
               "--ntasks-per-node=1", "--cpus-per-task=1" if args.cpu else "--cpus-per-task=4", *gpus,
               os.path.join("slurm", "train_multinode.sbatch"), *overrides(args, run_dir)]
        env.update(PYTHON=sys.executable, RUN_DIR=run_dir)
        if not args.cpu:  # the GPUs fake_slurm hands out, one per node (without nvidia-smi too)
            import torch

            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            env["FAKE_SLURM_GPUS"] = visible or ",".join(str(i) for i in range(torch.cuda.device_count()))
        if kind == "emulated, NCCL_HOSTID per node":
            env["FAKE_SLURM_NCCL_HOSTID"] = "1"
    print(f"== {kind}: {' '.join(cmd)}", flush=True)
    log.write(f"== {kind}: {' '.join(cmd)}\n")
    log.flush()
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def run(kind: str, args, scratch: str, log) -> dict:
    run_dir = tempfile.mkdtemp(prefix="run_", dir=scratch)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    start, losses = time.time(), {}
    proc = launch(kind, run_dir, args, log)
    try:
        while proc.poll() is None and len(losses) < args.steps and time.time() - start < args.timeout:
            time.sleep(0.5)
            if os.path.exists(metrics):
                with open(metrics) as f:
                    losses = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r and "split" not in r}
    finally:
        kill_tree(proc)
        shutil.rmtree(run_dir, ignore_errors=True)
    wall = round(time.time() - start, 1)
    print(f"   {len(losses)} steps in {wall} s", flush=True)
    return {"kind": kind, "losses": losses, "wall_s": wall,
            "error": None if len(losses) >= args.steps else f"{len(losses)} of {args.steps} steps logged (see log)"}


def max_diff(a: dict, b: dict) -> float:
    return max(abs(a[s] - b[s]) for s in a) if sorted(a) == sorted(b) else float("inf")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu", action="store_true", help="tiny ParaGRU on the CPU (gloo): a smoke run")
    parser.add_argument("--separate-hosts", action="store_true",
                        help="also the emulated run with NCCL_HOSTID per node (NCCL's inter-host transport)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per run")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "multinode"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="check_multinode_")
    with open(os.path.join(args.out, "check_multinode.log"), "w") as log:
        runs = [run("torchrun", args, scratch, log), run("emulated 2 nodes", args, scratch, log)]
        reference, emulated = runs[0]["losses"], runs[1]["losses"]
        noise = 0.0
        if reference and emulated and reference != emulated:
            runs.append(run("torchrun again", args, scratch, log))
            noise = max_diff(runs[2]["losses"], reference)
        if args.separate_hosts:
            runs.append(run("emulated, NCCL_HOSTID per node", args, scratch, log))
    shutil.rmtree(scratch, ignore_errors=True)

    tolerance = max(2 * noise, 1e-3)
    worst = max_diff(emulated, reference) if reference and emulated else float("inf")
    floor = 0.2 if args.cpu else 0.5
    learns = bool(reference) and reference[max(reference)] < reference[1] - floor
    ok = all(r["error"] is None for r in runs[:2]) and worst <= tolerance and learns
    result = {"overrides": overrides(args, "RUN_DIR"), "runs": runs, "max_abs_diff": worst,
              "torchrun_run_to_run": noise, "tolerance": tolerance, "identical": reference == emulated,
              "learns": learns, "pass": ok}
    with open(os.path.join(args.out, "check_multinode.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n| step | " + " | ".join(r["kind"] for r in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for step in range(1, args.steps + 1):
        cells = [f"{r['losses'][step]:.6f}" if step in r["losses"] else "-" for r in runs]
        print(f"| {step} | " + " | ".join(cells) + " |")
    for r in runs:
        if r["error"]:
            print(f"{r['kind']}: {r['error']}")
    print(f"\nmax |emulated - torchrun| = {worst:.3g} (tolerance {tolerance:.3g}; identical: {reference == emulated}); "
          f"loss {reference.get(1, float('nan')):.4f} -> {reference.get(args.steps, float('nan')):.4f}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
