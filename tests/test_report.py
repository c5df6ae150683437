"""eval.report: markdown + CSV table and PNG plots from run dirs in every state (finished, unfinished, failed,
not evaluated). The plots are checked on their data (matplotlib lines, bars and legends), the table on its text."""
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


TOKENS_PER_STEP = 1000


def _config(path, preset, arch, max_steps=200, **model_config):
    model_config = model_config or {"hidden_size": 32, "num_hidden_layers": 1}
    lines = [f"model:\n  name: {preset}\n  arch: {arch}\n  config:"]
    lines += [f"    {k}: {v}" for k, v in model_config.items()]
    lines += [f"trainer:\n  max_steps: {max_steps}\ndata:\n  name: sotu\n  seq_len: 64\n"]
    (path / "config.yaml").write_text("\n".join(lines))


def _metrics(path, steps, rate, val_every=None, bad_tail=False):
    """A training line every 10 steps (window rate ``rate`` tokens/s, loss 5 - step/100) and validation lines."""
    with open(path / "metrics.jsonl", "w") as f:
        for step in range(10, steps + 1, 10):
            f.write(json.dumps({"step": step, "tokens": TOKENS_PER_STEP * step, "loss": 5 - step / 100,
                                "tokens_per_s": rate, "peak_mem_gib": 1.5}) + "\n")
            if val_every and step % val_every == 0:
                f.write(json.dumps({"split": "validation", "step": step, "tokens": TOKENS_PER_STEP * step,
                                    "val_loss": 5.2 - step / 100, "val_ppl": math.exp(5.2 - step / 100),
                                    "val_bpb": 1.5}) + "\n")
        if bad_tail:
            f.write('{"split": "validation", "step": 2, "tok')


@pytest.fixture()
def run_dirs(tmp_path):
    """Four runs of 200 steps: two finished and evaluated (gru, lstm), one stopped at step 34 before its first
    validation and not evaluated (mamba2), one finished without downstream results (transformer)."""
    dirs = {}
    for name, arch, extra in (("gru", "pararnn", {"cell": "gru", "num_heads": 2}),
                              ("lstm", "pararnn", {"cell": "lstm", "num_heads": 2}),
                              ("mamba2", "mamba2", {"head_dim": 16, "state_size": 8}),
                              ("transformer", "transformer", {"num_attention_heads": 2})):
        d = tmp_path / f"{name}_tiny"
        (d / "eval").mkdir(parents=True)
        _config(d, f"{name}_tiny", arch, hidden_size=32, num_hidden_layers=1, **extra)
        dirs[name] = d
    for name, rate in (("gru", 5000.0), ("lstm", 4000.0), ("transformer", 8000.0)):
        _metrics(dirs[name], 200, rate, val_every=50)
        (dirs[name] / "summary.json").write_text(json.dumps({"params": 406_000_000, "step": 200, "tokens": 200_000,
                                                             "val_loss": 3.2, "val_ppl": 24.5, "val_bpb": 1.1}))
    _metrics(dirs["mamba2"], 34, 2000.0, val_every=50, bad_tail=True)  # lines at 10, 20, 30; no validation yet
    for name, acc in (("gru", 0.3), ("lstm", 0.35)):
        (dirs[name] / "eval" / "downstream_paper.json").write_text(json.dumps(_downstream(acc)))
    (dirs["gru"] / "loss_by_position.json").write_text(json.dumps(
        {"by": "row", "position": list(range(300)), "loss": [3 + 2 / (p + 1) for p in range(300)],
         "tokens": [8] * 300}))
    return dirs


def _runs(run_dirs, notes=None):
    return [report.load_run(d, note=(notes or {}).get(name)) for name, d in run_dirs.items()]


def test_curves_draw_every_run_and_mark_the_unfinished(run_dirs):
    """Training and validation lines for every run vs tokens and vs training time; the run stopped before its
    first validation is drawn (training line only) and labelled 34/200. Mutation: ``figure_curves`` drawing
    validation lines only (the old plot) -> mamba2 has no line, fails."""
    fig = report.figure_curves(_runs(run_dirs))
    by_tokens, by_time = fig.axes
    for ax in (by_tokens, by_time):
        labels = [l.get_label() for l in ax.get_lines()]
        assert sorted(labels) == sorted(["gru_tiny train", "gru_tiny validation", "lstm_tiny train",
                                         "lstm_tiny validation", "mamba2_tiny (30/200 steps) train",
                                         "transformer_tiny train", "transformer_tiny validation"])
    lines = {l.get_label(): l for l in by_tokens.get_lines()}
    assert list(lines["mamba2_tiny (30/200 steps) train"].get_xdata()) == [10_000, 20_000, 30_000]
    assert list(lines["gru_tiny validation"].get_xdata()) == [50_000, 100_000, 150_000, 200_000]
    times = {l.get_label(): l for l in by_time.get_lines()}
    # training time = tokens / the window rate; validation points at the time of their step
    assert times["lstm_tiny train"].get_xdata()[-1] == pytest.approx(200_000 / 4000)
    assert list(times["gru_tiny validation"].get_xdata()) == pytest.approx([10, 20, 30, 40])
    assert lines["gru_tiny validation"].get_ydata()[-1] == pytest.approx(5.2 - 2)
    legend = [t.get_text() for t in by_time.get_legend().get_texts()]
    assert "mamba2_tiny (30/200 steps) train" in legend


def test_downstream_plot_lists_evaluated_runs_only(run_dirs):
    """Bars and legend for the evaluated runs; the others named in the title. Mutation: bars for every run
    (the old plot) -> four legend entries, fails."""
    fig = report.figure_downstream(_runs(run_dirs))
    acc_ax = fig.axes[0]
    assert [t.get_text() for t in acc_ax.get_legend().get_texts()] == ["gru_tiny", "lstm_tiny"]
    assert "not evaluated: mamba2_tiny, transformer_tiny" in acc_ax.get_title()
    heights = [p.get_height() for p in acc_ax.patches]
    assert len(heights) == 2 * 4 and heights[0] == pytest.approx(30.0)  # ARC-C(25) acc of gru first


def test_loss_by_position_is_binned(run_dirs):
    """300 positions become at most 41 log-spaced bins; the bins keep every token and the token-weighted mean
    loss, and a decreasing curve stays decreasing. Mutation: bins weighted by position count instead of tokens
    -> the means differ, fails."""
    pts = [(p, 3 + 2 / (p + 1), 300 - p) for p in range(300)]
    bins = report.position_bins(pts)
    assert 10 < len(bins) <= 41
    assert sum(b[2] for b in bins) == sum(c for _, _, c in pts)
    mean = sum(l * c for _, l, c in pts) / sum(c for _, _, c in pts)
    assert sum(b[1] * b[2] for b in bins) / sum(b[2] for b in bins) == pytest.approx(mean, rel=1e-12)
    assert [b[1] for b in bins] == sorted((b[1] for b in bins), reverse=True)
    fig = report.figure_loss_by_position(_runs(run_dirs))
    (line,) = fig.axes[0].get_lines()
    assert line.get_label() == "gru_tiny" and len(line.get_xdata()) == len(report.position_bins(
        [(p, 3 + 2 / (p + 1), 8) for p in range(300)]))


def test_report_marks_states_in_the_table(run_dirs, tmp_path):
    """The markdown and CSV rows: finished, 30/200 steps, not evaluated (downstream cells '–'), failed with its
    reason (a note from eval.compare); counts built from the config; PNGs readable. Mutation: ``Run.status``
    without the step count -> '30/200 steps' missing, fails."""
    import matplotlib.image as mpimg

    broken = tmp_path / "broken_tiny"
    broken.mkdir()
    _config(broken, "broken_tiny", "transformer", num_attention_heads=2)
    _metrics(broken, 12, 3000.0)
    notes = {"broken_tiny": {"state": "failed", "reason": "RuntimeError: boom", "peak_rss_gib": 2.5}}
    out = tmp_path / "report"
    res = report.make_report([*run_dirs.values(), broken], out, notes=notes, peak=100.0)
    md = (out / "report.md").read_text()
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.strip("|").split("|")]
            for l in md.splitlines() if l.startswith("| ") and not l.startswith("| run ")}
    assert rows["gru_tiny"][1] == "finished"
    assert rows["broken_tiny"][1] == "**failed at 10/200 steps: RuntimeError: boom, not evaluated**"
    assert rows["mamba2_tiny"][1] == "**30/200 steps, not evaluated**"
    assert rows["transformer_tiny"][1] == "**finished, not evaluated**"
    header = [c.strip() for c in md.splitlines()[next(i for i, l in enumerate(md.splitlines())
                                                      if l.startswith("| run "))].strip("|").split("|")]
    arc = header.index("ARC-C(25) acc")
    assert rows["gru_tiny"][arc] == "30.00" and rows["mamba2_tiny"][arc] == "–" and rows["transformer_tiny"][arc] == "–"
    assert rows["gru_tiny"][header.index("tokens/s")] == "5k"  # median of the windows after the first
    assert rows["gru_tiny"][header.index("time")] == "40 s"
    assert rows["gru_tiny"][header.index("peak mem GiB")] == "1.50"
    assert rows["broken_tiny"][header.index("peak mem GiB")] == "1.50"  # CUDA lines win over the RSS note
    assert "1 unreadable line(s) skipped" in md
    with open(out / "report.csv") as f:
        csv_rows = {r["run"]: r for r in csv.DictReader(f)}
    gru = csv_rows["gru_tiny"]
    assert float(gru["local_arc_challenge|25 acc"]) == pytest.approx(0.3)
    assert csv_rows["mamba2_tiny"]["local_mmlu|0 acc"] == ""
    # counts of the config's model with the GPT-2 tokenizer's padded vocabulary: non-embedding = every parameter
    # but the two vocabulary tables; MFU = tokens/s x FLOPs per token / peak
    from models.count import build_meta, flops_per_token

    model = build_meta({"arch": "pararnn", "config": {"cell": "gru", "hidden_size": 32, "num_hidden_layers": 1,
                                                      "num_heads": 2}}, 50304)
    assert int(gru["non_embedding"]) == sum(p.numel() for n, p in model.named_parameters()
                                            if "embed_tokens" not in n and "lm_head" not in n)
    flops = flops_per_token(model, 64)
    assert float(gru["mfu_6n"]) == pytest.approx(5000 * flops["6N"] / 100e12)
    assert float(gru["mfu_model"]) == pytest.approx(5000 * flops["model"] / 100e12)
    for key in ("curves", "downstream", "loss_by_position"):
        path = Path(res["files"][key])
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
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
    assert res["states"] == {"tiny": "not started", "empty": "not started"}
    for path in res["files"].values():
        assert Path(path).stat().st_size > 0
        if path.endswith(".png"):
            assert mpimg.imread(path).size > 0
    assert "| tiny |" in (tmp_path / "out" / "report.md").read_text()


def test_report_cli(run_dirs, tmp_path, capsys):
    assert report.main([str(run_dirs["gru"]), "--out", str(tmp_path / "r"), "--presets", "paper"]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    assert report.main([str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
    assert "run dir" in capsys.readouterr().err
