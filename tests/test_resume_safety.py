"""A resume never damages a run (training/run_dir.py) and restores everything random.

Units check the key classification and the history on plain dicts; the slow tests run ``train.py``: a
refused resume leaves every byte of run_dir as it was, an allowed one is recorded and takes effect, and a
run killed and resumed with dropout and document shuffling on reproduces the uninterrupted run bit-exactly.
"""
import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from training.common import ConfigError
from training.run_dir import HISTORY, check_resume, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {
    "run_dir": "runs/x", "seed": 1,
    "model": {"name": "m", "arch": "pararnn", "lr": 3e-3, "weight_decay": 1e-3,
              "config": {"cell": "gru", "hidden_size": 64, "num_heads": 2, "mode": "auto"}},
    "data": {"name": "sotu", "format": "json", "train_files": ["data/sotu/train.jsonl.gz"],
             "tokenizer": "data/tokenizer/gpt2", "seq_len": 256, "shuffle_buffer": 0},
    "trainer": {"strategy": "single", "zero_stage": 2, "max_steps": 200, "warmup_steps": 20, "lr": None,
                "log_every": 10, "ckpt_every": 50, "keep_last": 2, "betas": [0.9, 0.95]},
    "wandb": {"mode": "disabled"},
}


def with_changes(config: dict, **dotted) -> dict:
    config = copy.deepcopy(config)
    for key, value in dotted.items():
        *path, last = key.split("__")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with the BASE config and one checkpoint."""
    save_config(str(tmp_path), BASE, {})
    (tmp_path / "checkpoints" / "step_0000050").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize("change, shown", [
    ({"model__config__hidden_size": 128}, "model.config.hidden_size=64; this command asks for 128"),
    ({"model__arch": "transformer"}, "model.arch=pararnn; this command asks for transformer"),
    ({"model__config__clip": 1.0}, "model.config.clip=<unset>; this command asks for 1.0"),
    ({"data__tokenizer": "/elsewhere/gpt2"},
     "data.tokenizer=data/tokenizer/gpt2; this command asks for /elsewhere/gpt2"),
    ({"data__train_files": ["other.jsonl"]}, 'data.train_files=["data/sotu/train.jsonl.gz"]; this command asks for '
                                             '["other.jsonl"]'),
    ({"trainer__strategy": "fsdp2"}, "trainer.strategy=single; this command asks for fsdp2"),
    ({"model__lr": 1e-3}, "model.lr=0.003; this command asks for 0.001"),
    ({"trainer__betas": [0.9, 0.99]}, "trainer.betas=[0.9, 0.95]; this command asks for [0.9, 0.99]"),
])
def test_breaking_change_is_refused_with_one_line_naming_the_key(run_dir, change, shown):
    """Mutation: ``is_breaking`` returns False for model.config keys -> hidden_size and clip pass -> fails."""
    with pytest.raises(ConfigError) as err:
        check_resume(str(run_dir), with_changes(BASE, **change))
    assert str(err.value) == (f"run_dir {run_dir} was trained with {shown} (start a new run_dir, or restore "
                              f"the key)")


def test_several_breaking_keys_are_all_named(run_dir):
    request = with_changes(BASE, model__config__hidden_size=128, data__tokenizer="/other")
    with pytest.raises(ConfigError, match=r"trained with data.tokenizer=data/tokenizer/gpt2, "
                                          r"model.config.hidden_size=64; this command asks for data.tokenizer=/other, "
                                          r"model.config.hidden_size=128 \(start a new run_dir, or restore these "
                                          r"keys\)"):
        check_resume(str(run_dir), request)


@pytest.mark.parametrize("change", [
    {"trainer__max_steps": 400}, {"trainer__warmup_steps": 5}, {"trainer__log_every": 1}, {"trainer__keep_last": 5},
    {"data__seq_len": 512}, {"data__shuffle_buffer": 100}, {"wandb__mode": "offline"}, {"seed": 7},
    {"model__config__mode": "sequential"}, {"trainer__strategy": "ddp"},
    {"trainer__zero_stage": 3},  # only between two DeepSpeed runs does the stage change the checkpoint
    {"data__tokenizer": os.path.join(ROOT, "data", "tokenizer", "gpt2")},  # the same directory, spelt absolute
    {"run_dir": "/somewhere/else"},
])
def test_harmless_change_is_allowed(run_dir, change, monkeypatch):
    """Mutation: ``is_breaking`` returns True for every key -> fails."""
    monkeypatch.chdir(ROOT)  # where the relative tokenizer path resolves, whether against the repo or the cwd
    changes = check_resume(str(run_dir), with_changes(BASE, **change))
    assert list(changes) == ([] if "run_dir" in change or "data__tokenizer" in change
                             else [k.replace("__", ".") for k in change])


def test_deepspeed_stage_change_is_refused_between_deepspeed_runs(tmp_path):
    ds = with_changes(BASE, trainer__strategy="deepspeed")
    save_config(str(tmp_path), ds, {})
    (tmp_path / "checkpoints" / "step_0000001").mkdir(parents=True)
    with pytest.raises(ConfigError, match="trainer.zero_stage=2; this command asks for 3"):
        check_resume(str(tmp_path), with_changes(ds, trainer__zero_stage=3))


def test_without_a_checkpoint_any_change_is_allowed_and_recorded(tmp_path):
    save_config(str(tmp_path), BASE, {})
    request = with_changes(BASE, model__config__hidden_size=128)
    changes = check_resume(str(tmp_path), request)
    assert changes == {"model.config.hidden_size": (64, 128)}
    save_config(str(tmp_path), request, changes)
    history = [json.loads(line) for line in open(tmp_path / HISTORY)]
    assert [h["event"] for h in history] == ["first config", "resumed with changes"]
    assert history[0]["config"] == BASE
    assert history[1]["changed"] == {"model.config.hidden_size": {"old": 64, "new": 128}}


def test_history_is_append_only_and_keeps_a_config_from_before_it(tmp_path):
    """A run_dir written before the history existed: its config is kept as the history's first line.
    Mutation: open the history with "w" -> the first lines are lost -> fails."""
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(BASE), tmp_path / "config.yaml")
    first = with_changes(BASE, trainer__max_steps=300)
    second = with_changes(first, trainer__log_every=5)
    for request in (first, second):
        save_config(str(tmp_path), request, check_resume(str(tmp_path), request))
    history = [json.loads(line) for line in open(tmp_path / HISTORY)]
    assert [h["event"] for h in history] == ["first config", "resumed with changes", "resumed with changes"]
    assert history[0]["config"] == BASE
    assert history[1]["changed"] == {"trainer.max_steps": {"old": 200, "new": 300}}
    assert history[2]["changed"] == {"trainer.log_every": {"old": 10, "new": 5}}
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml")) == second


def test_unreadable_saved_config_is_refused_not_overwritten(tmp_path):
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config.yaml cannot be read .* repair or remove it"):
        check_resume(str(tmp_path), BASE)


# ---- through train.py ------------------------------------------------------------------------------
TINY = ["model.config.hidden_size=32", "model.config.num_hidden_layers=1", "data.seq_len=32",
        "data.validation_rows=4", "trainer.batch_size=4", "trainer.max_steps=2", "trainer.warmup_steps=1",
        "trainer.log_every=1", "trainer.val_every=2", "trainer.val_batches=1", "trainer.ckpt_every=1",
        "trainer.keep_last=10"]


def train(run_dir, *overrides, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"run_dir={run_dir}", *TINY, *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def tree_hashes(root) -> dict:
    """Every file and directory under ``root``: SHA-256 of files, None for directories."""
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(base, name), root)] = None
        for name in files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.mark.slow
def test_refused_resume_leaves_run_dir_byte_identical_and_allowed_one_takes_effect(tmp_path):
    """A finished run re-run with another model size: exit 2, the one-line error, and not one byte of run_dir
    changed (the export of the run still works). Then a longer max_steps: recorded in the
    history and config.yaml, and the first resumed step trains with the new schedule's lr (the old one had
    decayed to 0). Mutations: call ``save_config`` before ``check_resume`` in train.py -> config.yaml
    differs -> fails; ``output_subdir: .hydra`` in configs/config.yaml -> .hydra/ rewritten -> fails; drop
    the ``scheduler.step()`` re-derivation after loading in train.py -> step 3 trains at lr 0 -> fails."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    train(run_dir)
    before = tree_hashes(run_dir)
    proc = train(run_dir, "model.config.hidden_size=64", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"error: run_dir {run_dir} was trained with model.config."
                                                    f"hidden_size=32; this command asks for 64 (start a new run_dir, "
                                                    f"or restore the key)")
    assert tree_hashes(run_dir) == before

    from eval.export import export_checkpoint
    export_checkpoint(str(run_dir), out_dir=str(tmp_path / "export"))  # the run's config.yaml still builds it

    train(run_dir, "trainer.max_steps=3")
    history = [json.loads(line) for line in open(run_dir / HISTORY)]
    assert history[-1]["changed"] == {"trainer.max_steps": {"old": 2, "new": 3}}
    assert "trainer.max_steps=3" in history[-1]["argv"]
    step2 = load_file(run_dir / "checkpoints" / "step_0000002" / "model.safetensors")
    step3 = load_file(run_dir / "checkpoints" / "step_0000003" / "model.safetensors")
    moved = max((step3[k] - step2[k]).abs().max().item() for k in step2)
    assert moved > 1e-5, "the resumed step did not train: it used the old schedule's final lr (0)"


TRANSFORMER_RANDOM = ["model=transformer_tiny", "+model.config.attention_dropout=0.2", "data.shuffle_buffer=8",
                      "trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.val_every=4"]


def losses(run_dir) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_killed_run_with_dropout_and_shuffling_resumes_bit_exactly(tmp_path):
    """The "same RNG" claim with randomness after init: attention dropout (torch's RNG) and the document
    shuffle buffer (the data state's RNG). SIGKILL after the step-2 checkpoint, re-run: the losses equal the
    uninterrupted run's bit for bit. Mutation: in ``Checkpointer.load`` keep the process's RNG state
    (``torch.get_rng_state()`` before ``load_state``, set back after) -> other dropout masks -> fails."""
    full = tmp_path / "full"
    train(full, *TRANSFORMER_RANDOM)
    killed = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"run_dir={killed}", *TINY, *TRANSFORMER_RANDOM]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "step_0000002" / "manifest.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (killed / "summary.json").exists()
    resumed = train(killed, *TRANSFORMER_RANDOM)
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert losses(killed) == losses(full)
