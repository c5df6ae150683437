"""Helpers of tests/test_distributed.py, tests/test_fault_tolerance.py and tests/test_slurm.py: tiny
runs of train.py in several CPU processes (gloo), a data set on which every world size sees the same
global batches, and a shared single-process reference run.

Launching: ``torchrun --nproc_per_node N`` (``launch="torchrun"``); as ``slurm/`` does with ``srun``,
N plain processes given ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``
(``launch="ranks"``), which is what lets a test signal one rank; or the real ``slurm/*.sbatch`` script
under the emulated SLURM of tests/fake_slurm.py (:func:`submit`).
"""
import json
import os
import random
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "tests", "train_entry.py")
FAKE_SLURM = os.path.join(ROOT, "tests", "fake_slurm.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_distributed import kill_tree  # noqa: E402  (SIGKILL a launcher and all its workers)

SEQ_LEN = 32
STEPS = 10
# hidden 32, 1 layer, seq 32, global batch 4: ~3M parameters, nearly all of them the two embeddings.
TINY = [
    "model=paragru_tiny", "model.config.hidden_size=32", "model.config.num_hidden_layers=1",
    f"data.seq_len={SEQ_LEN}", "data.validation_rows=8", "trainer.batch_size=4", f"trainer.max_steps={STEPS}",
    "trainer.warmup_steps=2", "trainer.log_every=1", "trainer.val_every=5", "trainer.val_batches=1",
    "trainer.ckpt_every=5", "trainer.keep_last=10", "trainer.device=cpu", "trainer.precision=fp32",
    "trainer.grad_clip=0.5",  # below the tiny model's gradient norms (~0.8): clipping is exercised
]
WORDS = ("the of and to in is was for on that with as by at from his it an were are which be this or had not but "
         "have their one all been has they more who its also when first after time other new years two into can "
         "some there than only most may over these many would such about her three where him year up out world "
         "war made used later city known under people state during part").split()


def uniform_data(directory) -> list:
    """Hydra overrides for a local data set whose documents are exactly one row each (``SEQ_LEN - 1``
    one-token words after the EOS), in one file. Sharded every world_size-th document, the global batch
    of every step is then the same set of rows for 1 and 2 processes."""
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(0)
    for split, n in (("train", 400), ("validation", 16)):
        with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": "".join(" " + rng.choice(WORDS) for _ in range(SEQ_LEN - 1))}) + "\n")
    return ["data=local", "data.format=json", f"data.train_files=[{directory}/train.jsonl]",
            f"data.validation_files=[{directory}/validation.jsonl]", "data.shuffle_buffer=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU",
                         "RUN_DIR", "REPO", "PYTHON") and not k.startswith(("SLURM_", "FAKE_SLURM_"))}
    return {**base, "OMP_NUM_THREADS": "1", **extra}


def command(run_dir, overrides, nproc: int = 1, launch: str = "torchrun") -> list:
    args = [ENTRY, f"run_dir={run_dir}", *TINY, *overrides]
    if nproc > 1 and launch == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), *args]
    return [sys.executable, *args]


def start(run_dir, overrides, nproc: int = 1, launch: str = "torchrun", **extra_env) -> list:
    """Start a run; returns its processes (one per rank for ``launch="ranks"``, else one)."""
    cmd = command(run_dir, overrides, nproc, launch)
    if launch != "ranks" or nproc == 1:
        return [subprocess.Popen(cmd, cwd=ROOT, env=env(**extra_env), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)]
    port = free_port()
    return [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True,
                             env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                                     MASTER_PORT=str(port), **extra_env))
            for r in range(nproc)]


def submit(run_dir, overrides, sbatch_args=("--nodes=2", "--ntasks-per-node=2"), script="train_multinode.sbatch",
           **extra_env) -> subprocess.Popen:
    """``sbatch slurm/<script> TINY overrides`` to the emulated SLURM (tests/fake_slurm.py), one CPU per
    rank, ``RUN_DIR=run_dir``; the job runs in the foreground of the returned process (which takes the
    signals a scheduler would send), its ranks through the emulated srun."""
    cmd = [sys.executable, FAKE_SLURM, "sbatch", "--cpus-per-task=1", *sbatch_args, os.path.join("slurm", script),
           *TINY, *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(PYTHON=sys.executable, RUN_DIR=str(run_dir), **extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(procs, timeout: int = 600) -> tuple:
    """Wait for ``start``'s processes: (list of return codes, joined output). On a timeout every process
    of the run is killed, torchrun's workers too (they run in sessions of their own)."""
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_tree(p)
        raise
    return [p.returncode for p in procs], "\n".join(outputs)


def run(run_dir, overrides=(), nproc: int = 1, launch: str = "torchrun", check: bool = True, **extra_env):
    codes, output = finish(start(run_dir, list(overrides), nproc, launch, **extra_env))
    if check and any(codes):
        raise AssertionError(f"train.py failed {codes}:\n{output[-6000:]}")
    return codes, output


def losses(run_dir) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def summary(run_dir) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def assert_close(got: dict, expected: dict, tol: float = 1e-4) -> None:
    assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
    worst = max(abs(got[s] - expected[s]) for s in expected)
    assert worst < tol, {s: (got[s], expected[s]) for s in expected}


def reference(tmp_path_factory) -> tuple:
    """The single-process run on the uniform data, made once per test session (shared by both files)."""
    base = tmp_path_factory.getbasetemp()
    data = uniform_data(base / "uniform_data")
    run_dir = base / "reference_single"
    if not (run_dir / "summary.json").exists():
        run(run_dir, data)
    return run_dir, data
