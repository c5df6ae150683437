"""Comparison report over run dirs: a markdown + CSV table and PNG plots.

    python -m eval.report runs/gru runs/lstm runs/mamba2 runs/transformer --out reports/400m [--peak-tflops 989]

Per run dir it reads (every file and key optional): ``config.yaml`` (model, trainer.max_steps, data),
``summary.json`` (params, tokens, val_loss / val_ppl / val_bpb), ``metrics.jsonl`` (training lines: step,
tokens, loss, tokens_per_s, peak_mem_gib; validation lines: ``"split": "validation"``),
``eval/downstream_*.json`` (``eval.main``), ``eval/perplexity.json`` and ``loss_by_position.json``.
``eval.compare`` adds what only it knows (a failed run's reason, the processes' peak memory).

Every run gets a row and its curves, whatever state it is in: **finished**, **34/200 steps** (stopped or
still running: no summary.json), **failed** (with the last error line), **not started**; a run without
downstream results says **not evaluated** and is left out of the downstream plot. Columns:

* params / non-emb: all parameters / without the input embedding and the LM head (``models.count``);
* tokens/s: the median over the logged windows after the first (which holds compilation and autotuning);
* MFU: tokens/s × training FLOPs per token / the device's peak (``--peak-tflops``; bf16 dense for a GPU
  run), with the FLOPs as ``models.count.flops_per_token`` counts them: ``6N`` and ``model`` (+ attention,
  Mamba2's SSD, ParaRNN's Newton solve);
* peak mem: the largest ``peak_mem_gib`` (CUDA, allocated) of the training lines, else the training
  process's peak resident memory when ``eval.compare`` measured it (``RSS``);
* time: training wall-clock, the sum of the logged windows (first step, validation and checkpoints
  included; start-up and the final export not).

Writes to ``--out``: ``report.md``, ``report.csv``, ``loss_curves.png`` (training and validation loss vs
tokens and vs training time), ``downstream_accuracy.png`` and ``loss_by_position.png`` (perplexity in
log-spaced position bins). A plot without data says so on the image.
"""
from __future__ import annotations

import argparse
import bisect
import csv
import glob
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK_LABELS = {  # upstream task -> short label (paper's Table 5 names where it has one)
    "arc_challenge": "ARC-C", "arc_easy": "ARC-E", "hellaswag": "HSwag", "openbookqa": "OBQA",
    "winogrande": "WinoG", "piqa": "PIQA", "mmlu": "MMLU", "boolq": "BoolQ", "sciq": "SciQ",
    "social_iqa": "SIQA", "commonsense_qa": "CSQA", "copa": "COPA", "lambada_openai": "LAMBADA",
    "lambada_standard": "LAMBADA-std",
}
TASK_ORDER = list(TASK_LABELS)
# bf16 dense peak TFLOP/s by device name (what the MFU of a GPU run is measured against)
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}


def peak_tflops(device_name: str | None) -> float | None:
    """The bf16 dense peak of a CUDA device from its name (``torch.cuda.get_device_name``), if known."""
    return next((v for k, v in PEAK_TFLOPS.items() if device_name and k in device_name), None)


@dataclass
class Run:
    path: Path
    name: str
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    train: list = field(default_factory=list)
    validation: list = field(default_factory=list)
    downstream: dict = field(default_factory=dict)  # "<task>|<shots>" -> result entry
    downstream_meta: list = field(default_factory=list)  # (file, preset, data_source, limit)
    perplexity: dict = field(default_factory=dict)
    loss_by_position: dict = field(default_factory=dict)
    note: dict = field(default_factory=dict)  # from eval.compare: {"state": "failed", "reason", "peak_rss_gib"}
    counts: dict = field(default_factory=dict)  # params, non_embedding, flops_6n, flops_model (when buildable)
    warnings: list = field(default_factory=list)

    # ---- derived values (None when unknown) --------------------------------------------------------
    def _get(self, *path, default=None):
        node: Any = self.config
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    @property
    def arch(self):
        arch = self._get("model", "arch") or self.summary.get("arch")
        cell = self._get("model", "config", "cell")
        return f"{arch} ({cell})" if arch == "pararnn" and cell else arch

    @property
    def model_name(self):
        name = self._get("model", "name") or self.summary.get("model")
        return name if isinstance(name, str) else None

    @property
    def params(self):
        for value in (self.summary.get("params"), self.counts.get("params")):
            if value is not None:
                return value
        return next((m["params"] for m in self.downstream_meta if m.get("params") is not None), None)

    @property
    def tokens(self):
        if self.summary.get("tokens") is not None:
            return self.summary["tokens"]
        seen = [r["tokens"] for r in self.train + self.validation if isinstance(r.get("tokens"), (int, float))]
        return max(seen) if seen else None

    @property
    def max_steps(self):
        return self._get("trainer", "max_steps")

    @property
    def steps(self):
        if self.summary.get("step") is not None:
            return self.summary["step"]
        seen = [r["step"] for r in self.train if isinstance(r.get("step"), int)]
        return max(seen) if seen else 0

    @property
    def state(self) -> str:
        """``failed`` | ``finished`` | ``unfinished`` | ``not started``."""
        if self.note.get("state") == "failed":
            return "failed"
        if self.summary:
            return "finished"
        return "unfinished" if self.train else "not started"

    @property
    def status(self) -> str:
        """The state as the table shows it: ``finished``, ``34/200 steps``, ``failed at 34/200 steps: <reason>``."""
        progress = f"{self.steps}/{self.max_steps} steps" if self.max_steps else f"{self.steps} steps"
        if self.state == "failed":
            where = f" at {progress}" if self.train else ""
            return f"failed{where}: {self.note.get('reason') or 'no reason recorded'}"
        if self.state == "unfinished":
            return progress
        return self.state

    @property
    def evaluated(self) -> bool:
        return bool(self.downstream)

    def _val(self, key):
        if self.summary.get(key) is not None:
            return self.summary[key]
        vals = [r for r in self.validation if r.get(key) is not None]
        if vals:
            return vals[-1][key]
        return self.perplexity.get({"val_ppl": "ppl", "val_loss": "loss", "val_bpb": "bpb"}[key])

    @property
    def val_ppl(self):
        ppl = self._val("val_ppl")
        if ppl is None and self._val("val_loss") is not None:
            ppl = math.exp(min(self._val("val_loss"), 700))
        return ppl

    @property
    def val_bpb(self):
        return self._val("val_bpb")

    @property
    def tokens_per_s(self):
        vals = [r["tokens_per_s"] for r in self.train if isinstance(r.get("tokens_per_s"), (int, float))]
        if vals:
            return statistics.median(vals[1:] if len(vals) > 2 else vals)
        return self.summary.get("tokens_per_s")

    def mfu(self, peak: float | None, kind: str) -> float | None:
        flops = self.counts.get(f"flops_{kind}")
        if not (peak and flops and self.tokens_per_s):
            return None
        return self.tokens_per_s * flops / (peak * 1e12)

    @property
    def peak_mem(self) -> tuple[float | None, str]:
        cuda = [r["peak_mem_gib"] for r in self.train if isinstance(r.get("peak_mem_gib"), (int, float))]
        if cuda:
            return max(cuda), "CUDA"
        return self.note.get("peak_rss_gib"), "RSS"

    # ---- curves ------------------------------------------------------------------------------------
    def train_curve(self) -> list[tuple[float, float, float]]:
        """``(tokens, seconds, loss)`` per training line; seconds = the sum of the logged windows so far."""
        out, seconds, prev = [], 0.0, 0
        for r in sorted(self.train, key=lambda r: r.get("step", 0)):
            tokens, loss, rate = r.get("tokens"), r.get("loss"), r.get("tokens_per_s")
            if not isinstance(tokens, (int, float)) or not isinstance(loss, (int, float)):
                continue
            if isinstance(rate, (int, float)) and rate > 0:
                seconds += (tokens - prev) / rate
            prev = tokens
            out.append((tokens, seconds, loss))
        return out

    def validation_curve(self) -> list[tuple[float, float | None, float]]:
        """``(tokens, seconds, val_loss)``; seconds interpolated over the training line's tokens."""
        train = self.train_curve()
        xs, ts = [p[0] for p in train], [p[1] for p in train]

        def at(tokens):
            if not xs:
                return None
            i = bisect.bisect_left(xs, tokens)
            if i == 0:
                return ts[0] * tokens / xs[0] if xs[0] else ts[0]
            if i >= len(xs):
                return ts[-1]
            return ts[i - 1] + (ts[i] - ts[i - 1]) * (tokens - xs[i - 1]) / max(xs[i] - xs[i - 1], 1)

        pts = sorted((r["tokens"], r["val_loss"]) for r in self.validation
                     if isinstance(r.get("tokens"), (int, float)) and isinstance(r.get("val_loss"), (int, float)))
        return [(tok, at(tok), loss) for tok, loss in pts]

    @property
    def label(self) -> str:
        """The run's name in legends, with its state when it is not simply finished."""
        marks = [] if self.state == "finished" else [self.status if self.state == "unfinished" else self.state]
        return f"{self.name} ({', '.join(marks)})" if marks else self.name


def _read_json(path: Path, run: Run) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:
        run.warnings.append(f"{path.name}: unreadable ({type(exc).__name__}: {exc})")
        return None


def _counts(run: Run) -> dict:
    """Parameters, non-embedding parameters and FLOPs per token of the run's model, built on the meta device
    as train.py builds it (vocabulary from the export, else the run's tokenizer); empty if it cannot be built."""
    model_cfg, seq_len = run._get("model"), run._get("data", "seq_len")
    if not isinstance(model_cfg, dict) or not model_cfg.get("arch"):
        return {}
    try:
        from models.count import build_meta, count_params, embedding_params, flops_per_token
        from models.registry import padded_vocab

        hf_config = run.path / "hf" / "config.json"
        if hf_config.is_file():
            vocab = json.loads(hf_config.read_text())["vocab_size"]
        else:
            from data.pipeline import load_tokenizer

            vocab = padded_vocab(len(load_tokenizer(run._get("data", "tokenizer") or "data/tokenizer/gpt2")))
        model = build_meta(model_cfg, vocab)
        n = count_params(model)
        out = {"params": n, "non_embedding": n - embedding_params(model)}
        if isinstance(seq_len, int):
            flops = flops_per_token(model, seq_len)
            out.update(flops_6n=flops["6N"], flops_model=flops["model"])
        return out
    except Exception as exc:  # a report is still written without counts
        run.warnings.append(f"parameter count: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return {}


def load_run(path: str | os.PathLike, presets: list[str] | None = None, note: dict | None = None) -> Run:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"run dir {path}: no such directory")
    run = Run(path=p.resolve(), name=p.resolve().name, note=dict(note or {}))
    if (p / "config.yaml").is_file():
        try:
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(OmegaConf.load(p / "config.yaml"), resolve=False)
            run.config = cfg if isinstance(cfg, dict) else {}
        except Exception as exc:
            run.warnings.append(f"config.yaml: unreadable ({type(exc).__name__})")
    if (p / "summary.json").is_file():
        run.summary = _read_json(p / "summary.json", run) or {}
    if (p / "metrics.jsonl").is_file():
        bad = 0
        for line in (p / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(row, dict):
                continue
            (run.validation if row.get("split") == "validation" or "val_loss" in row else run.train).append(row)
        if bad:
            run.warnings.append(f"metrics.jsonl: {bad} unreadable line(s) skipped")
    for f in sorted(glob.glob(str(p / "eval" / "downstream_*.json"))):
        if presets and Path(f).stem[len("downstream_"):] not in presets:
            continue
        d = _read_json(Path(f), run)
        if not isinstance(d, dict):
            continue
        run.downstream.update(d.get("results") or {})
        cfg = d.get("lm_eval_config") or {}
        run.downstream_meta.append({"file": os.path.relpath(f, p), "preset": d.get("preset"),
                                    "data_source": d.get("data_source"), "limit": d.get("limit"),
                                    "params": cfg.get("model_num_parameters"), "skipped": d.get("skipped") or {}})
    if (p / "eval" / "perplexity.json").is_file():
        run.perplexity = _read_json(p / "eval" / "perplexity.json", run) or {}
    if (p / "loss_by_position.json").is_file():
        run.loss_by_position = _read_json(p / "loss_by_position.json", run) or {}
    run.counts = _counts(run)
    return run


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------
def _task_sort_key(key: str):
    task, _, shots = key.partition("|")
    upstream = task[len("local_"):] if task.startswith("local_") else task
    order = TASK_ORDER.index(upstream) if upstream in TASK_ORDER else len(TASK_ORDER)
    return (order, upstream, -int(shots or 0))


def task_label(key: str, entry: dict | None = None) -> str:
    task, _, shots = key.partition("|")
    upstream = (entry or {}).get("upstream_task") or (task[len("local_"):] if task.startswith("local_") else task)
    return f"{TASK_LABELS.get(upstream, upstream)}({shots or 0})"


def task_columns(runs: list[Run]) -> list[tuple[str, str]]:
    """``[(task_key, metric)]``: acc, and acc_norm where a run has it."""
    keys = sorted({k for r in runs for k in r.downstream}, key=_task_sort_key)
    cols = []
    for k in keys:
        for metric in ("acc", "acc_norm"):
            if any(r.downstream.get(k, {}).get(metric) is not None for r in runs):
                cols.append((k, metric))
    return cols


def _fmt_int(x):
    if x is None:
        return ""
    x = float(x)
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def _fmt(x, digits=2):
    return "" if x is None else f"{x:.{digits}f}"


def _fmt_pct(x):
    return "" if x is None else f"{100 * x:.3g}%"


def _fmt_mem(run: Run) -> str:
    value, kind = run.peak_mem
    return "" if value is None else f"{value:.2f} ({kind})" if kind == "RSS" else f"{value:.2f}"


def _seconds(run: Run):
    curve = run.train_curve()
    return curve[-1][1] if curve else None


BASE_COLUMNS = ["run", "status", "model", "arch", "params", "non_embedding", "tokens", "train_s", "val_ppl", "val_bpb",
                "tokens_per_s", "mfu_6n", "mfu_model", "peak_mem_gib", "peak_mem_kind"]


def table_rows(runs: list[Run], peak: float | None = None) -> tuple[list[str], list[dict]]:
    cols = task_columns(runs)
    header = BASE_COLUMNS + [f"{k} {m}" for k, m in cols]
    rows = []
    for r in runs:
        mem, kind = r.peak_mem
        row = {"run": r.name, "status": r.status, "model": r.model_name, "arch": r.arch, "params": r.params,
               "non_embedding": r.counts.get("non_embedding"), "tokens": r.tokens, "train_s": _seconds(r),
               "val_ppl": r.val_ppl, "val_bpb": r.val_bpb, "tokens_per_s": r.tokens_per_s,
               "mfu_6n": r.mfu(peak, "6n"), "mfu_model": r.mfu(peak, "model"), "peak_mem_gib": mem,
               "peak_mem_kind": kind if mem is not None else None}
        for k, m in cols:
            row[f"{k} {m}"] = r.downstream.get(k, {}).get(m)
        rows.append(row)
    return header, rows


def write_csv(path: Path, runs: list[Run], peak: float | None = None) -> None:
    header, rows = table_rows(runs, peak)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})


def markdown_table(runs: list[Run], peak: float | None = None) -> str:
    cols = task_columns(runs)
    head = ["run", "status", "arch", "params", "non-emb", "tokens", "time", "val PPL", "val bpb", "tokens/s",
            "MFU 6N", "MFU model", "peak mem GiB"]
    labels = []
    for k, m in cols:
        entry = next((r.downstream[k] for r in runs if k in r.downstream), None)
        labels.append(f"{task_label(k, entry)} {m.replace('acc_norm', 'acc_n')}")
    lines = ["| " + " | ".join(head + labels) + " |", "|" + "---|" * (len(head) + len(labels))]
    for r in runs:
        seconds = _seconds(r)
        status = r.status if r.evaluated or not cols else f"{r.status}, not evaluated"
        cells = [r.name, f"**{status}**" if status != "finished" else status, r.arch or "", _fmt_int(r.params),
                 _fmt_int(r.counts.get("non_embedding")), _fmt_int(r.tokens),
                 "" if seconds is None else f"{seconds:.0f} s", _fmt(r.val_ppl), _fmt(r.val_bpb, 3),
                 _fmt_int(r.tokens_per_s), _fmt_pct(r.mfu(peak, "6n")), _fmt_pct(r.mfu(peak, "model")), _fmt_mem(r)]
        for k, m in cols:
            v = r.downstream.get(k, {}).get(m)
            cells.append(("–" if not r.evaluated else "") if v is None else f"{100 * v:.2f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _empty(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Debiased exponential moving average (logged training losses are single steps: noisy)."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def figure_curves(runs: list[Run]):
    """Training loss (smoothed, solid) and validation loss (dashed, dots) vs tokens (left) and vs training time
    (right), one colour per run; every run with a training line is drawn, finished or not."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    drawn = False
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        train, val = r.train_curve(), r.validation_curve()
        for ax, x in ((axes[0], 0), (axes[1], 1)):
            if train:
                ax.plot([p[x] for p in train], _smooth([p[2] for p in train]), color=color, lw=1.6,
                        label=f"{r.label} train")
            pts = [p for p in val if p[x] is not None]
            if pts:
                ax.plot([p[x] for p in pts], [p[2] for p in pts], color=color, ls="--", marker="o", ms=4, lw=1,
                        label=f"{r.label} validation")
        drawn = drawn or bool(train or val)
    if drawn:
        for ax, xlabel in zip(axes, ("tokens seen", "training time (s)")):
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("loss (nats/token)")
        axes[0].set_title("Loss vs tokens")
        axes[1].set_title("Loss vs training time")
        axes[1].legend(fontsize=8, loc="upper right")
    else:
        _empty(axes[0], "no training or validation lines in metrics.jsonl")
        axes[1].set_axis_off()
    fig.tight_layout()
    return fig


def figure_downstream(runs: list[Run]):
    """Grouped bars per task, only for the runs that were evaluated (the others are named in the title)."""
    plt = _plt()
    evaluated = [r for r in runs if r.evaluated]
    cols = task_columns(evaluated)
    metrics = [m for m in ("acc", "acc_norm") if any(c[1] == m for c in cols)]
    fig, axes = plt.subplots(max(1, len(metrics)), 1, figsize=(max(7, 0.9 * len(cols) + 3), 3.6 * max(1, len(metrics))),
                             squeeze=False)
    missing = [r.name for r in runs if not r.evaluated]
    note = f" (not evaluated: {', '.join(missing)})" if missing else ""
    if not metrics:
        _empty(axes[0][0], "no downstream results (eval/downstream_*.json)")
        axes[0][0].set_title("Downstream accuracy")
    for ax, metric in zip(axes[:, 0], metrics):
        keys = [k for k, m in cols if m == metric]
        width = 0.8 / max(1, len(evaluated))
        for i, r in enumerate(evaluated):
            vals = [r.downstream.get(k, {}).get(metric) for k in keys]
            xs = [j + (i - (len(evaluated) - 1) / 2) * width for j in range(len(keys))]
            ax.bar(xs, [100 * v if v is not None else 0 for v in vals], width=width, label=r.label,
                   color=f"C{runs.index(r) % 10}")
        labels = [task_label(k, next((r.downstream[k] for r in evaluated if k in r.downstream), None)) for k in keys]
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"Downstream {metric} (task(shots)){note}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def position_bins(pts: list[tuple[int, float, float]], n_bins: int = 40) -> list[tuple[float, float, float]]:
    """``pts``: (position, mean loss, tokens). Token-weighted means in log-spaced bins of position:
    ``[(mean position, mean loss, tokens)]`` (per-position means are noisy: few tokens at each long position)."""
    top = max(p for p, _, _ in pts) + 1
    edges = sorted({int(round(top ** (i / n_bins))) for i in range(n_bins + 1)} | {0, top + 1})
    out, j = [], 0
    pts = sorted(pts)
    for hi in edges[1:]:
        num = den = pos = 0.0
        while j < len(pts) and pts[j][0] < hi:
            p, l, c = pts[j]
            w = max(float(c or 0), 1e-12)
            num, den, pos = num + l * w, den + w, pos + p * w
            j += 1
        if den > 0:
            out.append((pos / den, num / den, den))
    return out


def figure_loss_by_position(runs: list[Run]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn, kinds = False, set()
    for i, r in enumerate(runs):
        d = r.loss_by_position
        loss = d.get("loss") or []
        pos = d.get("position") or list(range(len(loss)))
        counts = d.get("tokens") or [1] * len(loss)
        pts = [(p, l, c) for p, l, c in zip(pos, loss, counts) if isinstance(l, (int, float))]
        if pts:
            binned = position_bins(pts)
            ax.plot([p + 1 for p, _, _ in binned], [math.exp(min(l, 700)) for _, l, _ in binned], lw=1.6, marker=".",
                    color=f"C{i % 10}", label=r.label)
            kinds.add(d.get("by", "row"))
            drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.set_yscale("log")
        where = "document" if kinds == {"document"} else "row"
        ax.set_xlabel(f"token position in the {where} (1-based; log-spaced bins)")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    else:
        _empty(ax, "no loss_by_position.json in the run dirs")
    ax.set_title("Perplexity vs token position")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def make_report(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike, title: str = "ParaRNN-LM comparison",
                presets: list[str] | None = None, notes: dict[str, dict] | None = None,
                peak: float | None = None, preamble: str = "") -> dict:
    """Write the report; ``presets`` restricts the downstream files read (``eval/downstream_<preset>.json``;
    default: all, later files win for a task|shots present in several); ``notes`` (by run dir name) carries
    what the run dirs cannot say (``eval.compare``: a failure and its reason, peak RSS); ``peak``: the
    device's peak TFLOP/s for the MFU columns; ``preamble``: markdown put before the table."""
    notes = notes or {}
    runs = [load_run(p, presets, notes.get(Path(p).resolve().name)) for p in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out / "report.md",
        "csv": out / "report.csv",
        "curves": out / "loss_curves.png",
        "downstream": out / "downstream_accuracy.png",
        "loss_by_position": out / "loss_by_position.png",
    }
    plt = _plt()
    for key, make in (("curves", figure_curves), ("downstream", figure_downstream),
                      ("loss_by_position", figure_loss_by_position)):
        fig = make(runs)
        fig.savefig(files[key], dpi=120)
        plt.close(fig)
    write_csv(files["csv"], runs, peak)
    sources = []
    for r in runs:
        for m in r.downstream_meta:
            src = m.get("data_source") or "?"
            sources.append(f"- `{r.name}`: `{m['file']}` (preset {m.get('preset')}, data: {src}, "
                           f"limit: {m.get('limit')})")
            for key, why in (m.get("skipped") or {}).items():
                sources.append(f"  - skipped {key}: {why}")
        if r.perplexity:
            sources.append(f"- `{r.name}`: `eval/perplexity.json` ({r.perplexity.get('protocol', 'packed')} rows "
                           f"of {r.perplexity.get('seq_len')} tokens, {r.perplexity.get('data')})")
        for w in r.warnings:
            sources.append(f"- `{r.name}`: {w}")
    md = [f"# {title}", ""]
    if preamble:
        md += [preamble, ""]
    md += ["Runs: " + ", ".join(f"`{r.path}`" for r in runs), "",
           "Status: **failed** runs give their last error line, **N/M steps** marks a run without summary.json "
           "(stopped or still running), **not evaluated** a run without downstream results (`–`). params: all "
           "parameters; non-emb: without the input embedding and the LM head. time: training wall-clock. val PPL "
           "/ bpb: the final validation values. tokens/s: median over the logged windows after the first. MFU: "
           "training FLOPs per token (6N, and `model` with attention / SSD / Newton work, `models.count`) × "
           "tokens/s / the device's bf16 peak" + (f" ({peak:g} TFLOP/s)" if peak else " (not given: blank)")
           + ". Downstream columns are `task(shots) metric` in percent (acc_n = acc_norm).", "",
           markdown_table(runs, peak), ""]
    if any((m.get("data_source") or "").startswith("shipped") for r in runs for m in r.downstream_meta):
        md += ["**Note:** some downstream numbers come from the small slices shipped in `eval/tasks/data` "
               "(50 documents per task); they are smoke tests, not benchmark results.", ""]
    md += ["## Loss vs tokens and vs training time", "",
           "Solid: training loss (moving average of the logged steps); dashed with dots: validation loss.", "",
           f"![loss curves]({files['curves'].name})", "",
           "## Downstream accuracy", "", f"![downstream]({files['downstream'].name})", "",
           "## Perplexity vs token position", "", f"![loss by position]({files['loss_by_position'].name})", ""]
    if sources:
        md += ["## Sources and notes", ""] + sources + [""]
    files["markdown"].write_text("\n".join(md), encoding="utf-8")
    return {"runs": [r.name for r in runs], "files": {k: str(v) for k, v in files.items()},
            "states": {r.name: r.status for r in runs}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.report", description="Markdown/CSV/PNG report over run dirs.")
    ap.add_argument("run_dirs", nargs="+", help="run directories (config.yaml, metrics.jsonl, summary.json, eval/)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--title", default="ParaRNN-LM comparison")
    ap.add_argument("--presets", nargs="*", default=None,
                    help="only these downstream files (eval/downstream_<preset>.json), e.g. --presets paper")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"the device's bf16 peak for the MFU columns (e.g. {PEAK_TFLOPS['H200']} for an H200)")
    args = ap.parse_args(argv)
    missing = [d for d in args.run_dirs if not Path(d).is_dir()]
    if missing:
        print(f"eval.report: error: run dir {missing[0]}: no such directory", file=sys.stderr)
        return 2
    res = make_report(args.run_dirs, args.out, args.title, args.presets, peak=args.peak_tflops)
    for k, v in res["files"].items():
        print(f"{k:17s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
