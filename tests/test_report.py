"""eval.report: markdown + CSV table and PNG plots from run dirs (complete and incomplete ones)."""
import csv
import json
import math
from pathlib import Path

import pytest

from eval import report


def _downstream(acc):
    def entry(task, upstream, shots, a, norm=True):
        e = {"task": task, "upstream_task": upstream, "num_fewshot": shots, "acc": a, "acc_stderr": 0.01,
             "n_samples": 50}
        if norm:
            e.update(acc_norm=a + 0.01, acc_norm_stderr=0.01)
        return e

    results = {
        "local_arc_challenge|25": entry("local_arc_challenge", "arc_challenge", 25, acc),
        "local_arc_challenge|3": entry("local_arc_challenge", "arc_challenge", 3, acc + 0.02),
        "local_winogrande|5": entry("local_winogrande", "winogrande", 5, acc + 0.1, norm=False),
        "local_mmlu|0": entry("local_mmlu", "mmlu", 0, 0.25, norm=False),
    }
    return {"preset": "paper", "data_source": "data_root", "limit": None, "lm_eval_version": "0.4.13",
            "results": results, "skipped": {}, "lm_eval_config": {"model_num_parameters": 1234}}


@pytest.fixture()
def run_dirs(tmp_path):
    # a complete run
    a = tmp_path / "gru_400m"
    (a / "eval").mkdir(parents=True)
    (a / "config.yaml").write_text("model:\n  name: paragru_400m\n  arch: pararnn\ndata:\n  name: slimpajama\n")
    with open(a / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "tokens": 1000 * step, "loss": 5 - 0.5 * step, "lr": 1e-3,
                                "grad_norm": 1.0, "tokens_per_s": 5000.0 + step, "newton_residual": 1e-6}) + "\n")
            f.write(json.dumps({"split": "validation", "step": step, "tokens": 1000 * step,
                                "val_loss": 5.2 - 0.5 * step,
                                "val_ppl": math.exp(5.2 - 0.5 * step), "val_bpb": 1.5}) + "\n")
    (a / "summary.json").write_text(json.dumps({"params": 406_000_000, "tokens": 5000, "val_loss": 2.7,
                                                "val_ppl": 14.88, "val_bpb": 1.1, "tokens_per_s": 5003.0}))
    (a / "eval" / "downstream_paper.json").write_text(json.dumps(_downstream(0.3)))
    (a / "loss_by_position.json").write_text(json.dumps(
        {"by": "row", "position": list(range(300)), "loss": [3 + 2 / (p + 1) for p in range(300)],
         "tokens": [8] * 300}))
    # an incomplete one: no summary, a truncated metrics line, no loss_by_position, a partial eval
    b = tmp_path / "mamba2_400m"
    (b / "eval").mkdir(parents=True)
    (b / "config.yaml").write_text("model:\n  arch: mamba2\n")
    (b / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "tokens": 1000, "loss": 4.0, "tokens_per_s": 7000.0}) + "\n"
        + json.dumps({"split": "validation", "step": 1, "tokens": 1000, "val_loss": 4.5}) + "\n"
        + '{"split": "validation", "step": 2, "tok')
    partial = _downstream(0.35)
    del partial["results"]["local_mmlu|0"]
    (b / "eval" / "downstream_paper.json").write_text(json.dumps(partial))
    return a, b


def test_report_renders_table_and_plots(run_dirs, tmp_path):
    import matplotlib.image as mpimg

    out = tmp_path / "report"
    res = report.make_report([str(p) for p in run_dirs], out)
    md = (out / "report.md").read_text()
    lines = [l for l in md.splitlines() if l.startswith("| ")]
    assert len(lines) == 3  # header + two runs
    assert "ARC-C(25) acc" in lines[0] and "ARC-C(3) acc_n" in lines[0] and "MMLU(0) acc" in lines[0]
    gru = next(l for l in lines if l.startswith("| gru_400m"))
    cells = [c.strip() for c in gru.strip("|").split("|")]
    assert cells[:8] == ["gru_400m", "paragru_400m", "pararnn", "406M", "5k", "14.88", "1.100", "5k"]
    assert "30.00" in cells and "25.00" in cells
    mamba = next(l for l in lines if l.startswith("| mamba2_400m"))
    assert f"{math.exp(4.5):.2f}" in mamba and "| mamba2 |" in mamba  # ppl from the last readable validation line
    assert "1 unreadable line(s) skipped" in md

    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["gru_400m", "mamba2_400m"]
    assert float(rows[0]["local_arc_challenge|25 acc"]) == pytest.approx(0.3)
    assert rows[1]["local_mmlu|0 acc"] == "" and float(rows[1]["tokens_per_s"]) == 7000.0

    assert res["plotted"] == {"val_loss": True, "downstream": True, "loss_by_position": True}
    for key in ("val_loss", "downstream", "loss_by_position"):
        path = Path(res["files"][key])
        assert path.stat().st_size > 1000
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert f"]({path.name})" in md


def test_report_from_real_loss_by_position_and_empty_run(tmp_path):
    import matplotlib.image as mpimg
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from eval.perplexity import write_loss_by_position

    run = tmp_path / "tiny"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    tokens = torch.randint(0, 61, (2, 17))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(16).repeat(2, 1)}
    write_loss_by_position(run, model, [batch])
    empty = tmp_path / "empty"
    empty.mkdir()
    res = report.make_report([run, empty], tmp_path / "out")
    assert res["plotted"] == {"val_loss": False, "downstream": False, "loss_by_position": True}
    for path in res["files"].values():
        assert Path(path).stat().st_size > 0
        if path.endswith(".png"):
            assert mpimg.imread(path).size > 0
    assert "| tiny |" in (tmp_path / "out" / "report.md").read_text()


def test_report_cli(run_dirs, tmp_path, capsys):
    assert report.main([str(run_dirs[0]), "--out", str(tmp_path / "r"), "--presets", "paper"]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    assert report.main([str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
    assert "run dir" in capsys.readouterr().err
