"""``python -m eval.export`` against the checkpoint it exports, a clean loading process, and fast failures.

The run directory here is made by hand (config.yaml + one checkpoint written with safetensors and a
manifest), so the export is compared with weights it did not produce, without a training run.
"""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from tests.helpers import rel_err, run_outside_repo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"model": {"name": "tiny", "arch": "pararnn", "lr": 1e-3, "weight_decay": 0.0,
                    "config": {"cell": "lstm", "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2}},
          "data": {"tokenizer": "data/tokenizer/gpt2"}}
PROMPT_NOISE = ("custom code", "[y/N]", "hf.co/", "to instantiate a model of type")


def make_run(run_dir) -> str:
    """A run_dir with config.yaml and checkpoint step 7 holding a randomly initialised model (trained-looking:
    weights perturbed away from the init so that no default initialisation could reproduce them)."""
    import json

    from models.registry import build_model
    from training.checkpoint import MANIFEST, manifest_files

    torch.manual_seed(0)
    model = build_model("pararnn", CONFIG["model"]["config"], 50257)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    ckpt = os.path.join(run_dir, "checkpoints", "step_0000007")
    os.makedirs(ckpt)
    save_file(state, os.path.join(ckpt, "model.safetensors"))
    with open(os.path.join(ckpt, MANIFEST), "w") as f:
        json.dump({"step": 7, "world_size": 1, "files": manifest_files(ckpt)}, f)
    OmegaConf.save(OmegaConf.create(CONFIG), os.path.join(run_dir, "config.yaml"))
    return ckpt


@pytest.mark.slow
def test_export_equals_the_checkpoint_in_a_clean_process_without_prompts(tmp_path):
    """``python -m eval.export RUN`` -> RUN/hf, loaded in a clean process (repo off the path, stdin closed)
    with ``trust_remote_code=True`` for model and tokenizer, gives the logits of a model built from
    config.yaml with the checkpoint's model.safetensors read by safetensors; no trust prompt, hub link or
    model-type warning is printed. Mutation: add 1e-3 to a weight in ``save_hf`` -> fails."""
    from models.registry import build_model

    run_dir = tmp_path / "run"
    ckpt = make_run(run_dir)
    proc = subprocess.run([sys.executable, "-m", "eval.export", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and f"exported to {run_dir}/hf" in proc.stdout, proc.stderr[-3000:]

    model = build_model("pararnn", CONFIG["model"]["config"], 50257).eval()
    model.load_state_dict(load_file(os.path.join(ckpt, "model.safetensors")))
    ids = torch.randint(0, 50257, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import importlib.util, torch
        assert importlib.util.find_spec("models") is None, "the repo must not be importable here"
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained("{run_dir}/hf", trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained("{run_dir}/hf", trust_remote_code=True).eval()
        ref = torch.load("{tmp_path}/expected.pt")
        with torch.no_grad():
            logits = model(ref["ids"]).logits
        torch.save(logits, "{tmp_path}/got.pt")
        print("OK", type(model).__name__, type(tok).__name__, tok.eos_token_id)
    """)
    loaded = run_outside_repo(script, tmp_path, HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "OK ParaRNNForCausalLM GPT2Tokenizer 50256" in loaded.stdout
    output = loaded.stdout + loaded.stderr
    assert not [noise for noise in PROMPT_NOISE if noise in output], output
    expected = torch.load(tmp_path / "expected.pt")["logits"]
    assert rel_err(torch.load(tmp_path / "got.pt"), expected) < 1e-6


def test_export_of_a_missing_run_dir_fails_fast_with_one_line(tmp_path):
    """A missing run_dir, a directory that is not a run, a --checkpoint that is not a directory: one line,
    exit 2, in under 5 s, and checked before torch, transformers, accelerate or datasets are imported.
    Mutation: ``import torch`` back at the top of eval/export.py -> torch imported -> fails."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    OmegaConf.save(OmegaConf.create(CONFIG), run_dir / "config.yaml")
    missing = tmp_path / "does_not_exist"
    cases = [([str(missing)], f"error: run directory {missing} not found"),
             ([str(tmp_path)], f"error: {tmp_path}/config.yaml not found: is {tmp_path} a run directory of train.py?"),
             ([str(run_dir), "--checkpoint", str(missing)], f"error: --checkpoint {missing}: not a directory")]
    for args, expected in cases:
        start = time.time()
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "eval.export", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        elapsed = time.time() - start
        lines = proc.stderr.splitlines()
        assert proc.returncode == 2 and [l for l in lines if not l.startswith("import time:")] == [expected], lines
        imported = {l.split("|")[-1].strip() for l in lines if l.startswith("import time:")}
        assert not imported & {"torch", "transformers", "accelerate", "datasets"}, sorted(imported)
        assert elapsed < 5, elapsed
