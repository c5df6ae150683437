"""The config mechanism (training/config.py) and train.py's command line, in process: every key
overridable, defaults in one place, typed values, one-line errors that create nothing, relative paths,
the memory pre-flight and the no-progress detector.

``train.main`` is called in this process: a bad command fails before any training, so no subprocess is
needed (tests/test_train.py runs the real command line).
"""
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

import train
from training.common import REPO_ROOT, ConfigError
from training.config import (
    Config,
    DataConfig,
    JobConfig,
    ModelConfig,
    SyntheticConfig,
    TrainerConfig,
    WandbConfig,
    _field_docs,
    compose,
)
from training.memory import estimate_bytes

CONFIGS = REPO_ROOT / "configs"
GROUPS = {"model": ModelConfig, "data": DataConfig, "trainer": TrainerConfig, "wandb": WandbConfig}


def composed(*overrides: str) -> dict:
    return compose(JobConfig, str(CONFIGS), "config", list(overrides))


def run_main(capsys, tmp_path, *overrides: str) -> tuple[int, str, Path]:
    """``train.main`` with ``run_dir`` in ``tmp_path``; (exit code, stderr, run_dir)."""
    run_dir = tmp_path / "run"
    code = train.main([f"run_dir={run_dir}", *overrides])
    return code, capsys.readouterr().err, run_dir


# ---- every key overridable, defaults in one place ----------------------------------------------------
def test_every_schema_key_is_in_the_composed_config():
    """Each group of the default config has exactly the schema's keys, so every key can be overridden
    without ``+``. Mutation: drop ``- schema`` from configs/config.yaml -> fails (trainer.lr missing)."""
    cfg = composed()
    for name, cls in GROUPS.items():
        assert set(cfg[name]) == {f.name for f in dataclasses.fields(cls)}, name


def test_lr_and_short_runs_override_the_default_config(caplog):
    """``trainer.lr=...`` works without ``+`` (issue 14) and ``trainer.max_steps=5`` clamps the preset's
    20 warm-up steps with a warning saying what was set. Mutation: the clamp in TrainerConfig.check
    removed -> fails (warm-up stays 20)."""
    job = train.load_job(["trainer.lr=1e-3", "trainer.max_steps=5"])
    assert job.lr == 1e-3 and job.trainer.max_steps == 5
    assert job.trainer.warmup_steps == 5
    assert "trainer.warmup_steps=20 is longer than trainer.max_steps=5" in caplog.text
    assert train.load_job([]).lr == ModelConfig.from_dict(yaml.safe_load(open(CONFIGS / "model/paragru_tiny.yaml"))).lr


def test_paper_preset_lr_follows_the_batch_by_the_square_root_rule(capsys, tmp_path):
    """The paper-size presets name the batch their LR belongs to (``model.batch_tokens``); a smaller batch
    scales ``model.lr`` by sqrt(tokens per step / batch_tokens) (``trainer.lr_scaling=sqrt``, the default);
    ``trainer.lr`` and ``lr_scaling=none`` take the LR as given, a larger batch never scales it up, a preset
    without batch_tokens is unchanged, and train.py's optimizer steps with the scaled LR (the logged LR of a
    run against the same run unscaled). Mutation: ``lr_scale`` returning 1.0 -> fails."""
    small = ["model=transformer_7b", "trainer.batch_size=16", "data.seq_len=2048"]
    assert train.load_job(small).lr == pytest.approx(3e-3 * math.sqrt(16 * 2048 / (2048 * 2048)), rel=1e-12)
    assert train.load_job([*small, "trainer.lr_scaling=none"]).lr == 3e-3
    assert train.load_job([*small, "trainer.lr=1e-3"]).lr == 1e-3
    assert train.load_job(["model=transformer_7b", "trainer.batch_size=4096", "data.seq_len=2048"]).lr == 3e-3
    tiny = yaml.safe_load(open(CONFIGS / "model/transformer_tiny.yaml"))
    assert "batch_tokens" not in tiny and train.load_job(["model=transformer_tiny"]).lr == tiny["lr"]

    shrunk = ["model=transformer_7b", "model.config.hidden_size=32", "model.config.num_hidden_layers=1",
              "model.config.num_attention_heads=2", "+model.config.intermediate_size=64", "trainer.batch_size=2",
              "data.seq_len=64", "trainer.max_steps=1", "trainer.warmup_steps=1", "trainer.val_every=100"]
    logged = {}
    for scaling in ("sqrt", "none"):
        code, err, run_dir = run_main(capsys, tmp_path / scaling, *shrunk, f"trainer.lr_scaling={scaling}")
        assert code == 0, err
        logged[scaling] = next(json.loads(line)["lr"] for line in open(run_dir / "metrics.jsonl") if '"lr"' in line)
    assert logged["sqrt"] / logged["none"] == pytest.approx(math.sqrt(2 * 64 / (2048 * 2048)), rel=1e-6)


def test_default_config_is_the_dataclass_defaults():
    """The default presets (trainer=cpu, data=sotu) add nothing to the dataclass defaults: one default per
    key. Mutation: ``max_steps: 300`` in configs/trainer/cpu.yaml -> fails."""
    cfg = composed()
    assert cfg["trainer"] == TrainerConfig().to_dict()
    assert cfg["data"] == DataConfig().to_dict()
    assert cfg["wandb"] == WandbConfig().to_dict()


@pytest.mark.parametrize("group", ["trainer", "data"])
def test_presets_state_only_what_differs(group):
    """Every key a trainer/data preset sets differs from the default it would inherit (its ``defaults:``
    parent's, else the dataclass's). Mutation: ``grad_accum: 1`` added to configs/trainer/gpu.yaml -> fails."""
    kinds = {"text": DataConfig, "synthetic": SyntheticConfig}  # a data preset's `source` picks its dataclass
    for path in sorted((CONFIGS / group).glob("*.yaml")):
        preset = yaml.safe_load(path.read_text()) or {}
        parents = [p for p in preset.pop("defaults", []) if p != "_self_"]
        cls = kinds[preset.pop("source", "text")] if group == "data" else GROUPS[group]
        base = composed(f"{group}={parents[0]}")[group] if parents else cls.schema()
        same = {k: v for k, v in preset.items() if base.get(k) == v}
        assert not same, f"{path.name} restates defaults: {same}"


def test_arch_choices_are_the_registry_architectures():
    """``model.arch``'s Literal names exactly the architectures models/registry.py builds."""
    from typing import get_args, get_type_hints

    from models.registry import arch_names

    assert set(get_args(get_type_hints(ModelConfig)["arch"])) == set(arch_names())


def test_every_field_has_a_docstring_and_help_lists_it(capsys):
    """torchtitan style: one docstring per field, printed by ``train.py --help`` with the default.
    Mutation: delete the docstring under ``trainer.z_loss`` -> fails."""
    for cls in (JobConfig, *GROUPS.values(), SyntheticConfig):
        docs = _field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: no docstring for {missing}"
    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "trainer.z_loss=0.0001" in out and "Coefficient of the z-loss" in out and "run_dir=null" in out
    assert "trainer.strategy=single  [single | ddp | fsdp2 | deepspeed]" in out


# ---- types and ranges ------------------------------------------------------------------------------
@dataclasses.dataclass
class Example(Config):
    KEY = "ex"
    n: int = 1
    """An int."""
    x: float = 1.0
    """A number."""
    flag: bool = False
    """A bool."""
    name: str = "a"
    """A string."""
    maybe: int | None = None
    """An int or null."""
    items: list[str] = dataclasses.field(default_factory=list)
    """Strings."""
    pair: tuple[float, float] = (0.0, 1.0)
    """Two numbers."""
    mode: Literal["a", "b"] = "a"
    """A choice."""
    stage: Literal[1, 2] = 1
    """A numeric choice."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Anything."""


@pytest.mark.parametrize("values, message", [
    ({"n": "abc"}, "ex.n: expected an int, got 'abc'"),
    ({"n": True}, "ex.n: expected an int, got True"),
    ({"n": 2.5}, "ex.n: expected an int, got 2.5"),
    ({"x": float("inf")}, "ex.x: expected a finite number, got inf"),
    ({"x": float("nan")}, "ex.x: expected a finite number, got nan"),
    ({"x": "1e-3"}, "ex.x: expected a number, got '1e-3'"),
    ({"x": False}, "ex.x: expected a number, got False"),
    ({"flag": 1}, "ex.flag: expected a bool (true/false), got 1"),
    ({"name": 3}, "ex.name: expected a string, got 3"),
    ({"maybe": "x"}, "ex.maybe: expected an int, got 'x'"),
    ({"items": [1]}, "ex.items: item 0: expected a string, got 1"),
    ({"pair": [1.0]}, "ex.pair: expected 2 values, got 1: [1.0]"),
    ({"mode": "c"}, "ex.mode: expected one of 'a', 'b'; got 'c'"),
    ({"stage": True}, "ex.stage: expected one of 1, 2; got True"),
    ({"extra": 3}, "ex.extra: expected a mapping, got 3"),
    ({"nope": 1}, "ex.nope: unknown key (known: n, x, flag, name, maybe, items, pair, mode, stage, extra)"),
    ({"n": "???"}, "ex.n: missing value"),
])
def test_type_errors_name_the_key(values, message):
    """Checks from the annotations, one line naming the key. Mutation: ``_type_problem`` accepting a bool
    for an int (drop the ``not isinstance(value, bool)``) -> the ``True`` row fails."""
    with pytest.raises(ConfigError) as err:
        Example.from_dict(values)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_lossless_conversions_only():
    ex = Example.from_dict({"n": 1e4, "x": 2, "maybe": None, "items": "one", "pair": [1, 2], "stage": 2})
    assert (ex.n, ex.x, ex.items, ex.pair, ex.stage) == (10000, 2.0, ["one"], (1.0, 2.0), 2)
    assert type(ex.n) is int and type(ex.x) is float and type(ex.pair[0]) is float


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=abc", "error: trainer.max_steps: expected an int, got 'abc'"),
    ("model.lr=.inf", "error: model.lr: expected a number, got '.inf'"),
    ("model.lr=inf", "error: model.lr: expected a finite number, got inf"),
    ("model.lr=-0.01", "error: model.lr=-0.01: the learning rate must be > 0"),
    ("trainer.lr=0", "error: trainer.lr=0.0: the learning rate must be > 0"),
    ("trainer.no_such_key=1", "error: trainer.no_such_key: unknown key (known: device, precision"),
    ("+trainer.no_such_key=1", "error: trainer.no_such_key: unknown key (known: device, precision"),
    ("no_such_key=1", "error: no_such_key: unknown key (known: model, data, trainer, wandb, run_dir, seed)"),
    ("model=no_such_model", "error: model=no_such_model: no such preset in configs/model/ (available: mamba2_125m, "
                            "mamba2_1b, "),
    ("model.config.no_such_key=1", "error: model.config.no_such_key: not in the config (to add a key, write "
                                   "+model.config.no_such_key=1)"),
    ("trainer.strategy=zero", "error: trainer.strategy: expected one of 'single', 'ddp', 'fsdp2', 'deepspeed'"),
    ("data=local", "error: data.train_files=[]: no files (set data.train_files=[PATH, ...])"),
    ("data.train_files=[/no/such/file.jsonl]", "error: data.train_files: data file not found: '/no/such/file.jsonl'"),
    ("trainer.batch_size=6 trainer.grad_accum=4", "error: trainer.batch_size=6: not divisible by trainer.grad_accum=4"),
    ("trainer.max_steps", "error: cannot parse"),
])
def test_bad_config_fails_in_one_line_and_creates_nothing(capsys, tmp_path, override, message):
    """Issue 12's rows (max_steps=abc, lr=.inf, lr=-0.01) and their neighbours: exit 2, one line on stderr,
    no traceback, no run_dir. Mutation: ``to_container(resolve=True)`` / the type check skipped in
    ``from_dict`` -> the max_steps row fails with a TypeError instead."""
    code, err, run_dir = run_main(capsys, tmp_path, *override.split())
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), err
    assert not run_dir.exists()


def test_hydra_parse_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"^cannot parse override 'trainer.lr=\[1,'"):
        composed("trainer.lr=[1,")


# ---- run_dir and relative paths -------------------------------------------------------------------
def test_unwritable_run_dir_fails_in_one_line(capsys, tmp_path):
    """A run_dir that cannot be created (its parent is a file; for a non-root user also a read-only
    directory) gives one line naming it, and nothing else is left behind. Mutation: ``open_run_dir``'s
    OSError handler removed -> a NotADirectoryError traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    targets = [blocker / "run"]
    if os.geteuid() != 0:  # root writes through any mode bits
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        targets.append(read_only / "run")
    for run_dir in targets:
        code = train.main([f"run_dir={run_dir}", "model.config.hidden_size=32", "data.seq_len=32",
                           "data.validation_rows=8"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"error: run_dir={run_dir}: cannot write there")
        assert not run_dir.exists()


def test_relative_paths_are_relative_to_the_current_directory(monkeypatch, tmp_path):
    """One rule for data files, tokenizer and run_dir: the current directory (the shipped defaults are
    absolute; ``${repo:...}`` names a repository file from anywhere). Mutation: ``resolve_path`` back to
    resolving against the repository root -> the local data file is 'not found'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "d" / f"{split}.jsonl").write_text('{"text": "hello world"}\n')
    job = train.load_job(["data=local", "data.train_files=[d/train.jsonl]", "data.validation_files=[d/*.jsonl]",
                          "data.tokenizer=${repo:data/tokenizer/gpt2}", "run_dir=out/run"])
    assert job.data.train_files == [str(tmp_path / "d" / "train.jsonl")]
    assert job.data.validation_files == [str(tmp_path / "d" / "*.jsonl")]
    assert job.data.tokenizer == str(REPO_ROOT / "data" / "tokenizer" / "gpt2")
    assert job.run_dir == str(tmp_path / "out" / "run")
    default = train.load_job([])
    assert default.run_dir == str(tmp_path / "runs" / "paragru_tiny")
    assert all(os.path.isfile(p) for p in default.data.train_files + default.data.validation_files)
    with pytest.raises(ConfigError, match="data.train_files: data file not found: 'data/sotu/train.jsonl.gz'"):
        train.load_job(["data.train_files=[data/sotu/train.jsonl.gz]"])  # repo-relative, but not from here


# ---- memory pre-flight ---------------------------------------------------------------------------
def test_memory_estimate_matches_a_hand_count():
    """The formula of training/memory.py on numbers worked by hand. Mutation: ZeRO-2 sharding the
    weights too -> fails."""
    p, v, h, layers, b, t = 1000, 64, 8, 2, 3, 5
    plain = estimate_bytes(params=p, vocab=v, hidden=h, layers=layers, micro_batch=b, seq_len=t, arch="pararnn",
                           bf16=False, strategy="single", zero_stage=2, world_size=4, gradient_checkpointing=False)
    assert plain == {"state": 16_000, "logits": 15 * 64 * 16, "blocks": 15 * 8 * 4 * 2 * 16}
    zero2 = estimate_bytes(params=p, vocab=v, hidden=h, layers=layers, micro_batch=b, seq_len=t, arch="transformer",
                           bf16=True, strategy="deepspeed", zero_stage=2, world_size=4, gradient_checkpointing=True)
    assert zero2 == {"state": 4000 + 1000 + 2000, "logits": 15 * 64 * 12, "blocks": 15 * 8 * 2 * (2 + 16),
                     "attention_mask": 3 * 5 * 5}


def test_memory_preflight_refuses_a_run_that_cannot_fit(capsys, tmp_path):
    """``data.seq_len=100000`` (issue 12: OOM-killed after 4 minutes) stops before training in one line
    stating the estimate and the limit, and creates nothing; ``trainer.memory_check=false`` lets it
    through the check. Mutation: ``check_memory`` comparing with 1000x the free memory -> fails."""
    code, err, run_dir = run_main(capsys, tmp_path, "data.seq_len=100000")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: memory: this run needs at least ") and " GiB is " in lines[0]
    need, free = (float(s.split(" GiB")[0]) for s in (lines[0].split("at least ")[1], lines[0].split(" but ")[1]))
    assert need > free
    assert not run_dir.exists()


def test_memory_estimate_does_not_refuse_the_default_run():
    """The default run's floor is far below this machine's memory (a false refusal would stop `make
    train`)."""
    import psutil

    need = sum(estimate_bytes(params=13_422_210, vocab=50304, hidden=128, layers=2, micro_batch=8, seq_len=256,
                              arch="pararnn", bf16=False, strategy="single", zero_stage=2, world_size=1,
                              gradient_checkpointing=False).values())
    assert need < 2.5 * 2**30 < psutil.virtual_memory().total / 2


# ---- the no-progress detector --------------------------------------------------------------------
CHANCE = math.log(50304)


def steps_until_stop(losses_and_norms, t: TrainerConfig):
    state = train.TrainState()
    for loss, norm in losses_and_norms:
        state.step += 1
        train.check_health(state, {"loss": loss, "grad_norm": norm, "finite": math.isfinite(loss + norm)}, t, CHANCE,
                           lr=3e-3)
    return state


def test_no_progress_stops_a_dead_run():
    """``model.lr=1e6`` made every step score ln V with a zero gradient (issue 12): stopped after
    ``max_stalled_steps`` such steps, naming the key. Mutation: the grad-norm test removed from
    ``check_health`` -> the zero-gradient case does not stop."""
    t = TrainerConfig(max_steps=100, warmup_steps=2, max_stalled_steps=5)
    with pytest.raises(train.TrainingFailed, match=r"stopping at step 6: no progress in 5 steps in a row \(the "
                                                   r"gradient norm is exactly 0\).*trainer.max_stalled_steps=5"):
        steps_until_stop([(10.84, 0.9)] + [(CHANCE, 0.0)] * 10, t)
    with pytest.raises(train.TrainingFailed, match=r"stopping at step 7: .*the loss stays at 10.8258"):
        steps_until_stop([(CHANCE + 1e-5, 0.3)] * 10, t)  # at chance from step 3 (after warm-up)


def test_no_progress_does_not_fire_on_healthy_or_short_runs():
    """At initialisation a healthy run is near ln V, during warm-up and in a 5-step run; never stopped.
    Mutation: counting at-chance steps during warm-up -> the 30-step case stops."""
    t = TrainerConfig(max_steps=30, warmup_steps=20, max_stalled_steps=20)
    near_chance = [(CHANCE + 1e-4 * i, 0.5) for i in range(20)] + [(9.0 - 0.1 * i, 0.8) for i in range(10)]
    assert steps_until_stop(near_chance, t).stalled_in_row == 0
    short = TrainerConfig(max_steps=5, warmup_steps=5)
    assert steps_until_stop([(CHANCE, 0.4)] * 5, short).stalled_in_row == 0
    assert steps_until_stop([(float("nan"), 0.4)] * 4, short).nonfinite_in_row == 4  # counted, below the limit


def test_stop_at_loss_needs_a_whole_window_below_it():
    """Converged only after ``log_every`` steps in a row at or below ``stop_at_loss``: one step above it (or a
    non-finite one) starts the count again; without ``stop_at_loss`` never. Mutation: true at the first step
    below the threshold -> step 2 stops, fails."""
    t = TrainerConfig(max_steps=100, log_every=4, stop_at_loss=0.01)
    state, stops = train.TrainState(), []
    for i, loss in enumerate([0.5, 0.005, 0.005, 0.005, 0.02, 0.01, 0.004, float("nan"), 0.003, 0.003, 0.003, 0.003]):
        if train.converged(state, {"loss": loss, "finite": math.isfinite(loss)}, t):
            stops.append(i)
    assert stops == [11]
    never = TrainerConfig(max_steps=100, log_every=1)
    assert not train.converged(train.TrainState(), {"loss": 0.0, "finite": True}, never)


def test_logging_is_restored_after_main(capsys):
    """In-process runs leave logging as they found it (handlers, levels)."""
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    train.main(["trainer.max_steps=abc"])
    capsys.readouterr()
    assert (list(root.handlers), root.level) == before
