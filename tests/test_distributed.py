"""Distributed training on CPU (gloo): DDP, FSDP2 and DeepSpeed ZeRO against one process, sharded
checkpoints (layout, export, resume on another world size) and the SLURM scripts.

Every run is a real ``train.py`` (through tests/train_entry.py) on a tiny ParaGRU (hidden 32, 1 layer,
seq 32, global batch 4, 10 steps) and on a data set whose documents are one row each, so 1 and 2
processes see the same rows in every global batch (tests/distributed_helpers.py).
"""
import json
import os
import shlex
import subprocess

import distributed_helpers as h
import pytest

ROOT = h.ROOT
FP32_CPU = ["trainer.device=cpu", "trainer.precision=fp32"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return h.reference(tmp_path_factory)


def _two_process_run(tmp_path_factory, reference, name, overrides, **env):
    ref_dir, data = reference
    run_dir = tmp_path_factory.mktemp(name)
    _, output = h.run(run_dir, [*data, *overrides], nproc=2, **env)
    return run_dir, output


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory, reference):
    return _two_process_run(tmp_path_factory, reference, "fsdp2", ["trainer=fsdp2", *FP32_CPU])


def _assert_matches_reference(run_dir, reference, strategy):
    s = h.summary(run_dir)
    assert s["world_size"] == 2 and s["strategy"] == strategy and s["step"] == h.STEPS
    h.assert_close(h.losses(run_dir), h.losses(reference[0]), tol=1e-4)


def _export_equals_checkpointed_weights(run_dir, checkpoint_dir, out_dir, expected: dict, tol: float):
    """``python -m eval.export``'s path (in this process, no process group) gives the weights that the live
    export at the end of training wrote, and both equal ``expected``: the checkpointed model read without
    eval.export or save_hf (not the export compared with itself). Mutation: add 1e-3 to a weight in
    ``save_hf`` -> fails."""
    import torch
    from safetensors.torch import load_file

    from eval.export import export_checkpoint

    export_checkpoint(str(run_dir), str(checkpoint_dir), str(out_dir))
    live, offline = load_file(run_dir / "hf" / "model.safetensors"), load_file(out_dir / "model.safetensors")
    assert sorted(live) == sorted(offline) == sorted(expected)
    for key in live:
        assert torch.equal(live[key], offline[key]), key
        assert (offline[key].float() - expected[key].float()).abs().max().item() <= tol, key
    assert json.load(open(out_dir / "config.json"))["architectures"] == ["ParaRNNForCausalLM"]


def _reference_weights(reference) -> dict:
    """The single-process reference run's last checkpoint (same training in fp32), read with safetensors."""
    from safetensors.torch import load_file

    return load_file(reference[0] / "checkpoints" / f"step_{h.STEPS:07d}" / "model.safetensors")


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path_factory, reference):
    run_dir, _ = _two_process_run(tmp_path_factory, reference, "ddp", ["trainer=ddp", *FP32_CPU])
    _assert_matches_reference(run_dir, reference, "ddp")
    ckpt = run_dir / "checkpoints" / "step_0000010"
    assert {"model.safetensors", "optimizer.bin", "data_rank0.pt", "data_rank1.pt"} <= set(os.listdir(ckpt))


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_and_checkpoint_exports(fsdp2_run, reference, tmp_path):
    run_dir, _ = fsdp2_run
    _assert_matches_reference(run_dir, reference, "fsdp2")
    ckpt = run_dir / "checkpoints" / "step_0000010"
    shards = sorted(os.listdir(ckpt / "model_optim"))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "optimizer.bin").exists()
    manifest = json.load(open(ckpt / "manifest.json"))
    assert manifest["world_size"] == 2 and "model_optim/__1_0.distcp" in manifest["files"]
    # exactly the DCP checkpoint's model, consolidated by torch's own converter
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt / "model_optim", tmp_path / "consolidated.pt")
    consolidated = torch.load(tmp_path / "consolidated.pt", weights_only=False)["model"]
    _export_equals_checkpointed_weights(run_dir, ckpt, tmp_path / "export", consolidated, tol=0.0)
    # and the single-process model's (same training, fp32)
    _export_equals_checkpointed_weights(run_dir, ckpt, tmp_path / "export", _reference_weights(reference), tol=1e-4)


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_on_another_world_size(fsdp2_run, reference, tmp_path):
    """2 ranks -> 1: DCP reshards model and optimizer; the data restarts (with a warning)."""
    import shutil

    src, _ = fsdp2_run
    run_dir = tmp_path / "resharded"
    shutil.copytree(src, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_0000010")
    for name in ("summary.json", "hf"):
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    _, output = h.run(run_dir, [*reference[1], "trainer=fsdp2", *FP32_CPU], nproc=1)
    assert "written by 2 processes, resumed on 1" in output
    assert "resumed from" in output and "step_0000005" in output
    got = h.losses(run_dir)
    assert h.summary(run_dir)["world_size"] == 1 and sorted(got) == list(range(1, 11))
    # restored weights: the restarted data (rows the model has seen) costs less than at step 5, and far
    # less than for a fresh model (step 1)
    assert got[6] < got[5] - 0.1 and got[6] < got[1] - 0.3


@pytest.mark.slow
def test_deepspeed_zero3_trains_like_one_process_and_checkpoint_exports(tmp_path_factory, reference, tmp_path):
    run_dir, _ = _two_process_run(tmp_path_factory, reference, "zero3", ["trainer=deepspeed_zero3", *FP32_CPU],
                                  TEST_SKIP_DS_SHM="1")
    _assert_matches_reference(run_dir, reference, "deepspeed")
    ckpt = run_dir / "checkpoints" / "step_0000010"
    files = set(os.listdir(ckpt / "pytorch_model"))
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files, files
    _export_equals_checkpointed_weights(run_dir, ckpt, tmp_path / "export", _reference_weights(reference), tol=1e-4)


@pytest.mark.parametrize("arch, config, n_layers", [
    ("pararnn", {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2}, 2),
    ("transformer", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}, 2),
    ("mamba2", {"hidden_size": 32, "num_hidden_layers": 2, "head_dim": 16, "state_size": 8, "n_groups": 1,
                "chunk_size": 16}, 2),
])
def test_every_architecture_shards_per_block(arch, config, n_layers):
    """FSDP2 finds each model's decoder blocks (``_no_split_modules``, else its gradient-checkpointing
    layers: Mamba2's names HF's ``Mamba2Block``) and no parameter is 0-dim (fully_shard and ZeRO
    cannot shard those)."""
    from models.registry import build_model
    from training.distributed import decoder_blocks

    model = build_model(arch, config, 1000)
    blocks = decoder_blocks(model)
    assert len(blocks) == n_layers and all(b in list(model.modules()) for b in blocks)
    assert all(p.dim() > 0 for p in model.parameters())


# ---- SLURM ----------------------------------------------------------------------------------------
SLURM_FILES = ["train_node.sbatch", "train_multinode.sbatch", "train_array.sbatch", "eval.sbatch",
               "compare_archs.sh", "common.sh", "task.sh"]
FAKE_2_NODES = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "pretrain", "SLURM_JOB_NUM_NODES": "2",
                "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NTASKS": "8",
                "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_SUBMIT_DIR": ROOT, "DRY_RUN": "1"}


def _slurm_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RUN_DIR", "REPO"))}
    return {**env, **extra}


@pytest.mark.parametrize("name", SLURM_FILES)
def test_slurm_scripts_parse(name):
    proc = subprocess.run(["bash", "-n", os.path.join(ROOT, "slurm", name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_slurm_two_node_dry_run_prints_the_launch_command(tmp_path):
    # no scontrol here: the first node comes from SLURM_JOB_NODELIST; overrides pass through verbatim
    overrides = ["model=paragru_1b", "trainer=fsdp2", "data.train_files=[/data/a b/*.parquet]", "seed=7"]
    proc = subprocess.run(["bash", os.path.join(ROOT, "slurm", "train_multinode.sbatch"), *overrides],
                          cwd=tmp_path, env=_slurm_env(**FAKE_2_NODES, PATH="/usr/bin:/bin"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    python = os.path.join(ROOT, ".venv", "bin", "python")
    assert shlex.split(proc.stdout) == [
        "env", "MASTER_ADDR=gpu-07", "MASTER_PORT=24242",
        "srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=4",
        "bash", os.path.join(ROOT, "slurm", "task.sh"), python if os.path.exists(python) else "python",
        os.path.join(ROOT, "train.py"), *overrides, f"run_dir={ROOT}/runs/pretrain-4242"]
    assert "2 node(s) x 4 rank(s)" in proc.stderr


def test_slurm_task_wrapper_maps_slurm_variables_to_torch_distributed():
    env = _slurm_env(SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="4(x2)",
                     SLURM_NODEID="1", MASTER_ADDR="gpu-07", MASTER_PORT="24242")
    proc = subprocess.run(["bash", os.path.join(ROOT, "slurm", "task.sh"), "env"], env=env, capture_output=True,
                          text=True)
    got = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert {k: got[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu-07"}


def test_slurm_array_splits_one_token_budget_over_four_architectures(tmp_path):
    seen = {}
    for task in range(4):
        env = _slurm_env(SLURM_ARRAY_JOB_ID="900", SLURM_ARRAY_TASK_ID=str(task), SLURM_JOB_ID=str(901 + task),
                         SLURM_NTASKS_PER_NODE="8", SLURM_JOB_NODELIST="node1", SLURM_SUBMIT_DIR=ROOT,
                         DRY_RUN="1", SIZE="1b", TOKENS=str(2**30), GLOBAL_BATCH="64", SEQ_LEN="2048",
                         PATH="/usr/bin:/bin")
        proc = subprocess.run(["bash", os.path.join(ROOT, "slurm", "train_array.sbatch"), "data=fineweb_edu"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        args = shlex.split(proc.stdout)
        overrides = args[args.index(os.path.join(ROOT, "train.py")) + 1:]
        seen[task] = overrides
        assert "trainer=ddp" in overrides and "data=fineweb_edu" in overrides
        assert "trainer.max_steps=8192" in overrides and "trainer.warmup_steps=819" in overrides  # 2^30/(64*2048)
    assert [next(o for o in seen[t] if o.startswith("model=")) for t in range(4)] == [
        "model=paragru_1b", "model=paralstm_1b", "model=mamba2_1b", "model=transformer_1b"]
    assert len({next(o for o in seen[t] if o.startswith("run_dir=")) for t in range(4)}) == 4
    for t in range(4):
        preset = next(o for o in seen[t] if o.startswith("model=")).split("=")[1]
        assert os.path.exists(os.path.join(ROOT, "configs", "model", preset + ".yaml"))


def test_slurm_eval_job_passes_run_dirs_and_overrides(tmp_path):
    env = _slurm_env(DRY_RUN="1", RUN_DIRS="runs/a runs/b", SLURM_SUBMIT_DIR=ROOT)
    proc = subprocess.run(["bash", os.path.join(ROOT, "slurm", "eval.sbatch"), "tasks=paper", "limit=10"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = shlex.split(proc.stdout)
    assert args[1:] == ["-m", "eval.main", "checkpoints=[runs/a,runs/b]", "device=cuda", "tasks=paper", "limit=10"]
