"""Fault tolerance: stop on a signal (alone, through the SLURM script and requeue, on one rank of
two), resume after SIGKILL, fall back from a corrupted checkpoint, skip and stop on non-finite losses.

Resumed runs must reproduce the losses of the uninterrupted single-process reference run of
tests/distributed_helpers.py (bit-exactly on one process, within 1e-4 on two).
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import distributed_helpers as h
import pytest

ROOT = h.ROOT
FP32_CPU = ["trainer.device=cpu", "trainer.precision=fp32"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return h.reference(tmp_path_factory)


def _wait_for_checkpoint(run_dir, step, procs, timeout=300):
    marker = os.path.join(run_dir, "checkpoints", f"step_{step:07d}", "manifest.json")
    deadline = time.time() + timeout
    while not os.path.exists(marker) and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.02)
    assert os.path.exists(marker), f"no step-{step} checkpoint"


def _two_ranks_past_step_5(reference, run_dir, trainer):
    """Two ranks of the reference run's job under ``trainer``, started in ``run_dir``, once step 5's checkpoint
    exists: (reference run dir, run dir, overrides, rank processes)."""
    ref_dir, data = reference
    overrides = [*data, f"trainer={trainer}", *FP32_CPU]
    ranks = h.start(run_dir, overrides, nproc=2, launch="ranks")
    _wait_for_checkpoint(run_dir, 5, ranks)
    return ref_dir, run_dir, overrides, ranks


def _steps(run_dir):
    names = os.listdir(os.path.join(run_dir, "checkpoints"))
    return sorted(int(n.split("_")[1]) for n in names if n.startswith("step_") and not n.endswith(".tmp"))


@pytest.mark.slow
def test_slurm_usr1_checkpoints_requeues_and_resumes(reference, tmp_path):
    """The whole preemption path of slurm/: USR1 to the batch script -> forwarded to the rank -> it
    checkpoints after its step and exits 75 -> the script calls `scontrol requeue` -> the requeued job
    (same job id, same run_dir) resumes to the reference losses. srun and scontrol are stand-ins."""
    ref_dir, data = reference
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $# -gt 0 && $1 == -* ]]; do shift; done\n'
                                  'export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    env = {**h.env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "31337", "SLURM_JOB_NAME": "ft",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS_PER_NODE": "1", "SLURM_SUBMIT_DIR": ROOT,
           "RUN_DIR": str(run_dir), "PYTHON": sys.executable, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(h.free_port())}
    cmd = ["bash", os.path.join(ROOT, "slurm", "train_node.sbatch"), *h.TINY, *data]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    _wait_for_checkpoint(run_dir, 5, [job])
    job.send_signal(signal.SIGUSR1)
    output = job.communicate(timeout=300)[0]
    assert job.returncode == 0, output[-3000:]
    assert "received SIGUSR1" in output and "requeueing job 31337" in output
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "31337"]
    assert not (run_dir / "summary.json").exists() and _steps(run_dir)[-1] > 5

    env["SLURM_RESTART_COUNT"] = "1"
    requeued = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "resumed from" in requeued.stdout + requeued.stderr
    assert h.losses(run_dir) == h.losses(ref_dir)  # bit-exact on one process


@pytest.mark.slow
def test_sigterm_to_one_of_two_ranks_stops_both_after_a_checkpoint(reference, tmp_path):
    ref_dir, run_dir, overrides, ranks = _two_ranks_past_step_5(reference, tmp_path / "sigterm", "ddp")
    ranks[1].send_signal(signal.SIGTERM)
    codes, output = h.finish(ranks)
    assert codes == [75, 75], output[-3000:]  # training/preemption.py: EXIT_REQUEUE
    stopped = _steps(run_dir)[-1]
    assert 5 < stopped < h.STEPS and not (run_dir / "summary.json").exists()
    assert f"stopped after step {stopped}; checkpoint written; re-run the same command" in output
    h.run(run_dir, overrides, nproc=2, launch="ranks")
    h.assert_close(h.losses(run_dir), h.losses(ref_dir), tol=1e-4)


@pytest.mark.slow
def test_sigkilled_fsdp2_run_resumes_from_its_sharded_checkpoint(reference, tmp_path):
    ref_dir, run_dir, overrides, ranks = _two_ranks_past_step_5(reference, tmp_path / "sigkill", "fsdp2")
    for rank in ranks:
        os.killpg(rank.pid, signal.SIGKILL)
    codes, _ = h.finish(ranks)
    assert codes == [-9, -9] and not (run_dir / "summary.json").exists()
    _, output = h.run(run_dir, overrides, nproc=2, launch="ranks")
    assert "resumed from" in output
    h.assert_close(h.losses(run_dir), h.losses(ref_dir), tol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", ["zeroed header", "4 KiB overwritten"])
def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, corrupt):
    """The newest checkpoint corrupted without changing its size: the re-run warns naming the file, resumes
    from step 5 and reproduces the reference losses. Mutation: ``verify`` checks sizes only -> safetensors
    error (zeroed header) or a run resumed from garbage weights (4 KiB) -> fails."""
    ref_dir, data = reference
    run_dir = tmp_path / "corrupted"
    shutil.copytree(ref_dir, run_dir, ignore=shutil.ignore_patterns("hf", "summary.json"))
    SAME_SIZE_CORRUPTIONS[corrupt](run_dir / "checkpoints" / "step_0000010" / "model.safetensors")
    _, output = h.run(run_dir, data)
    assert ("step_0000010 is incomplete or corrupted: model.safetensors is corrupted (its SHA-256 differs from the "
            "manifest's); falling back") in output
    assert "resumed from" in output and "step_0000005 (step 5" in output
    assert h.losses(run_dir) == h.losses(ref_dir)


@pytest.mark.slow
def test_export_of_a_run_with_a_corrupted_newest_checkpoint_uses_the_older_one(reference, tmp_path, capsys):
    """``python -m eval.export RUN`` skips the corrupted step 10 (warning naming the file) and exports step 5's
    weights, read back from both files with safetensors; naming the corrupted checkpoint explicitly fails
    with one line, exit 2. Mutation: ``verify`` checks sizes only -> step 10's damaged file is exported or
    the export fails with a SafetensorError -> fails."""
    import torch
    from safetensors.torch import load_file

    from eval.export import main as export_main

    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir, ignore=shutil.ignore_patterns("hf"))
    newest = run_dir / "checkpoints" / "step_0000010"
    overwrite_middle(newest / "model.safetensors")
    with pytest.warns(UserWarning, match="step_0000010 is incomplete or corrupted: model.safetensors is corrupted"):
        export_main([str(run_dir), "--out", str(tmp_path / "hf")])
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    older = load_file(run_dir / "checkpoints" / "step_0000005" / "model.safetensors")
    assert sorted(exported) == sorted(older) and all(torch.equal(exported[k], older[k]) for k in older)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(run_dir), "--checkpoint", str(newest), "--out", str(tmp_path / "hf2")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: checkpoint {newest} is incomplete or corrupted: model.safetensors is corrupted")


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(reference, tmp_path):
    """NaN losses come from tests/train_entry.py (TEST_NAN_STEPS): step 3 is skipped and counted; three
    in a row (steps 6-8, trainer.max_nonfinite_steps=3) stop the run with one clear line."""
    _, data = reference
    run_dir = tmp_path / "nan"
    codes, output = h.run(run_dir, [*data, "trainer.max_nonfinite_steps=3"], check=False, TEST_NAN_STEPS="3,6,7,8")
    assert codes == [1], output[-3000:]
    assert "error: stopping at step 8: 3 non-finite losses" in output and "Traceback" not in output
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if "loss" in line]
    by_step = {r["step"]: r for r in records if "split" not in r}
    assert by_step[3]["loss"] != by_step[3]["loss"]  # NaN
    assert by_step[4]["nonfinite_steps"] == 1 and by_step[5]["nonfinite_steps"] == 1
    assert all(by_step[s]["loss"] == by_step[s]["loss"] for s in (4, 5))  # training went on, finite
    assert not (run_dir / "summary.json").exists()


# ---- units (no training run) ----------------------------------------------------------------------
class FakeAccelerator:
    """What Checkpointer.save needs from accelerate, for one process."""
    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path)
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(b"w" * 100)


def test_checkpoints_are_atomic_verified_and_pruned(tmp_path):
    from training.checkpoint import Checkpointer, is_complete, list_checkpoints

    ckpt = Checkpointer(FakeAccelerator(), str(tmp_path), keep_last=2)
    for step in (1, 2, 3):
        ckpt.save(step, {"pos": step})
    names = sorted(os.listdir(tmp_path))
    assert names == ["step_0000002", "step_0000003"]  # keep_last=2, no .tmp left behind
    manifest = json.load(open(tmp_path / "step_0000003" / "manifest.json"))
    assert manifest["step"] == 3 and set(manifest["files"]) == {"model.safetensors", "data_rank0.pt"}
    weights = tmp_path / "step_0000003" / "model.safetensors"
    assert manifest["files"]["model.safetensors"] == {"size": 100, "sha256": hashlib.sha256(weights.read_bytes())
                                                      .hexdigest()}
    (tmp_path / "step_0000004.tmp").mkdir()  # a save that died before its rename: never a candidate
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == names
    assert ckpt.latest().endswith("step_0000003")
    os.remove(tmp_path / "step_0000003" / "manifest.json")  # died between rename and... / manifest lost
    with pytest.warns(UserWarning, match="step_0000003 is incomplete or corrupted: no manifest.json"):
        assert ckpt.latest().endswith("step_0000002")
    with open(tmp_path / "step_0000002" / "model.safetensors", "ab") as f:
        f.write(b"x")  # size no longer matches the manifest
    assert not is_complete(str(tmp_path / "step_0000002"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ckpt.latest() is None


def zero_header(path):
    """Bytes 8-200 zeroed: the safetensors header, same size."""
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(bytes(193))


def overwrite_middle(path):
    """4 KiB of 0x7f bytes in the middle of the file (float32 3.4e38s in the tensor data), same size."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x7f" * 4096)


SAME_SIZE_CORRUPTIONS = {"zeroed header": zero_header, "4 KiB overwritten": overwrite_middle}


class WeightsAccelerator(FakeAccelerator):
    """Writes 64 KiB of weights per checkpoint."""

    def save_state(self, path):
        os.makedirs(path)
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(os.urandom(64 << 10))


@pytest.mark.parametrize("corrupt", list(SAME_SIZE_CORRUPTIONS))
def test_same_size_corruption_is_detected_by_checksum(tmp_path, corrupt):
    """A corruption that keeps the file size is caught by the manifest's SHA-256: warning naming the file,
    fallback to the older checkpoint. Mutation: compare sizes only in ``verify`` (skip the hash loop) ->
    the corrupted step 2 is returned -> fails."""
    from training.checkpoint import Checkpointer, verify

    ckpt = Checkpointer(WeightsAccelerator(), str(tmp_path), keep_last=5)
    for step in (1, 2):
        ckpt.save(step, {"pos": step})
    weights = tmp_path / "step_0000002" / "model.safetensors"
    size = weights.stat().st_size
    SAME_SIZE_CORRUPTIONS[corrupt](weights)
    assert weights.stat().st_size == size
    assert verify(str(tmp_path / "step_0000002")) == ("model.safetensors is corrupted (its SHA-256 differs from "
                                                      "the manifest's)")
    with pytest.warns(UserWarning, match=r"step_0000002 is incomplete or corrupted: model.safetensors is corrupted"):
        assert ckpt.latest().endswith("step_0000001")


def test_preemption_flag_is_set_by_sigusr1_and_sigterm_and_handlers_restored():
    from training.preemption import Preemption

    before = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        preemption = Preemption()
        assert not preemption.requested("cpu")
        os.kill(os.getpid(), sig)
        time.sleep(0.01)
        assert preemption.requested("cpu") and preemption.received == sig
        preemption.close()
    assert signal.getsignal(signal.SIGTERM) is before
