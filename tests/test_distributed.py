"""Distributed training on CPU (gloo): DDP, FSDP2 and DeepSpeed ZeRO against one process, sharded
checkpoints (layout, export, resume on another world size). The SLURM scripts: tests/test_slurm.py.

Every run is a real ``train.py`` (through tests/train_entry.py) on a tiny ParaGRU (hidden 32, 1 layer,
seq 32, global batch 4, 10 steps) and on a data set whose documents are one row each, so 1 and 2
processes see the same rows in every global batch (tests/distributed_helpers.py).
"""
import json
import os

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
