"""eval.compare: the whole comparison (train four architectures, evaluate, report) as one command.

The slow test runs the real command at a micro size (d=32, one block, 8 steps of 2 x 32 tokens) with one
architecture broken on purpose; the fast tests check that bad input stops before any training."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval import compare
from training.common import ConfigError

ROOT = Path(__file__).resolve().parent.parent
MICRO = ["size=tiny", "steps=8", "batch_size=2", "seq_len=32", "jobs=2", "tasks=[local_copa]", "limit=2",
         "eval_batch_size=2", "model.config.hidden_size=32", "model.config.num_hidden_layers=1", "model.lr=3e-2",
         "data.validation_rows=2", "trainer.log_every=1", "trainer.val_every=4", "trainer.val_batches=1",
         "trainer.ckpt_every=8"]
LN_V = 10.83  # ln 50304: the loss of a uniform prediction


def _compare(args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "eval.compare", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def _rows(md: str) -> tuple[list[str], dict[str, list[str]]]:
    table = [l for l in md.splitlines() if l.startswith("| ")]
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in table]
    return cells[0], {c[0]: c for c in cells[1:]}


@pytest.mark.slow
def test_micro_comparison_reports_four_rows_and_a_broken_run(tmp_path):
    """Four architectures on the same token stream; Mamba2 given an impossible chunk size (it fails in its first
    forward, after the checks) is reported as failed with its error line, the other three are trained (their
    validation loss at least 1 nat under ln V), evaluated and complete in the report. A second run of the
    command skips everything that is done. Mutation: ``train_all`` raising on a failed run (one crash ends the
    comparison) -> no evaluation, no report, fails."""
    out = tmp_path / "cmp"
    proc = _compare([*MICRO, f"out={out}", "mamba2.model.config.chunk_size=0"])
    assert proc.returncode == 1, proc.stderr[-3000:] + proc.stdout[-3000:]
    for arch in ("paragru", "paralstm", "mamba2", "transformer"):
        assert f"] {arch} train: starting 8 steps" in proc.stdout
    assert "] mamba2 train: FAILED (exit 1): ZeroDivisionError" in proc.stdout

    md = (out / "report" / "report.md").read_text()
    header, rows = _rows(md)
    assert sorted(rows) == ["mamba2_tiny", "paragru_tiny", "paralstm_tiny", "transformer_tiny"]
    assert rows["mamba2_tiny"][header.index("status")].startswith("**failed")
    assert "ZeroDivisionError" in rows["mamba2_tiny"][header.index("status")]
    for name in ("paragru_tiny", "paralstm_tiny", "transformer_tiny"):
        row = dict(zip(header, rows[name]))
        assert row["status"] == "finished", row
        for column in ("params", "non-emb", "tokens", "time", "val PPL", "val bpb", "tokens/s", "peak mem GiB",
                       "COPA(0) acc"):
            assert row[column] not in ("", "–"), (name, column, row)
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["step"] == 8 and summary["val_loss"] < LN_V - 1, (name, summary)
        assert (out / name / "eval" / "perplexity.json").is_file()
    # the same token stream: same data, seed, batch, sequence length and steps in every run's resolved config
    from omegaconf import OmegaConf

    configs = [OmegaConf.load(out / f"{a}_tiny" / "config.yaml") for a in ("paragru", "paralstm", "transformer")]
    for cfg in configs[1:]:
        assert cfg.data == configs[0].data and cfg.seed == configs[0].seed
        assert (cfg.trainer.batch_size, cfg.trainer.max_steps) == (2, 8)
    manifest = json.loads((out / "compare.json").read_text())
    assert manifest["runs"]["mamba2"]["train"]["state"] == "failed"
    assert manifest["runs"]["transformer"]["eval"]["state"] == "evaluated"
    assert manifest["runs"]["paragru"]["train"]["peak_rss_gib"] > 0.1

    # again, for the finished ones: nothing retrained or re-evaluated, the report rewritten
    stamp = (out / "paragru_tiny" / "summary.json").stat().st_mtime
    again = _compare([*MICRO, f"out={out}", "archs=[paragru,transformer]"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "] paragru train: done before" in again.stdout and "] transformer evaluate: done before" in again.stdout
    assert (out / "paragru_tiny" / "summary.json").stat().st_mtime == stamp
    assert sorted(_rows((out / "report" / "report.md").read_text())[1]) == ["paragru_tiny", "transformer_tiny"]


@pytest.mark.parametrize("args,needle", [
    (["size=huge"], "size=huge: no preset paragru_huge (sizes: 125m, 1b, 3b, 400m, 7b, "),
    (["tasks=bogus"], "tasks='bogus' is not a task preset"),
    (["steps=4", "tokens=100"], "tokens=100: give steps or tokens, not both"),
    (["archs=[paragru,rwkv]"], "archs: item 1: expected one of 'paragru', 'paralstm', 'mamba2', 'transformer'"),
    (["mamba2.trainer.batch_size=4", "archs=[paragru]"], "mamba2.*: overrides for an architecture that is not"),
    (["trainer.max_step=4"], "paragru: trainer.max_step: unknown key"),
    (["data.train_files=[/nonexistent/x.jsonl]"], "paragru: data.train_files: data file not found"),
    (["transformer.model.config.num_attention_heads=3"], "transformer: model.config for arch 'transformer':"),
    (["lr=1e-3"], "lr: not a key of the comparison"),
    (["steps=-1"], "steps=-1: must be > 0"),
])
def test_bad_input_stops_before_training(args, needle, tmp_path):
    """Every check runs before the first training: one line naming the key, nothing written.
    Mutation: ``plan_runs`` without ``check_train`` -> the data file and the head count pass, fails."""
    with pytest.raises(ConfigError) as err:
        compare.run([f"out={tmp_path / 'cmp'}", *args])
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "cmp").exists()


def test_refuses_a_run_dir_made_with_other_overrides(tmp_path):
    """A run dir with a checkpoint or a summary, made with other overrides, is refused (left as it is); one that
    failed before its first checkpoint starts anew. Mutation: ``Manifest.check`` not called -> no error, fails."""
    out = tmp_path / "cmp"
    cfg, common, per_arch = compare.parse_args([f"out={out}", "steps=4", "archs=[transformer]"])
    (run,) = compare.plan_runs(cfg, common, per_arch)
    manifest = compare.Manifest(out)
    manifest.run("transformer")["overrides"] = [*run.overrides[:-2], "trainer.max_steps=8", run.overrides[-1]]
    manifest.save()
    (run.run_dir / "checkpoints").mkdir(parents=True)
    compare.Manifest(out).check([run])  # nothing to lose yet
    (run.run_dir / "checkpoints" / "step_0000004").mkdir()
    with pytest.raises(ConfigError, match=r"transformer_tiny was trained with other overrides \(.*max_steps.*\)"):
        compare.run([f"out={out}", "steps=4", "archs=[transformer]"])


def test_last_error_line(tmp_path):
    log = tmp_path / "a.log"
    log.write_text("step 1\nTraceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n"
                   "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\ntrain: 0%|\n")
    assert compare.last_error_line(log) == "RuntimeError: CUDA out of memory"
    log.write_text("loading\nerror: data.seq_len must be positive\n")
    assert compare.last_error_line(log) == "data.seq_len must be positive"
    assert compare.last_error_line(tmp_path / "missing.log") == "no output"
