"""Comparison report over run dirs: a markdown + CSV table and PNG plots.

    python -m eval.report runs/gru runs/lstm runs/mamba2 runs/transformer --out reports/400m

Per run dir it reads (every file and key optional):
``config.yaml`` (model.name, model.arch, data.name), ``summary.json`` (params, tokens, val_loss,
val_ppl, val_bpb, tokens_per_s), ``metrics.jsonl`` (validation lines: ``"split": "validation"``,
tokens, val_loss; training lines: tokens_per_s), ``eval/downstream_*.json`` (``eval.main`` /
``run_downstream`` results), ``eval/perplexity.json`` and ``loss_by_position.json``.

Writes to ``--out``: ``report.md``, ``report.csv``, ``val_loss_vs_tokens.png``,
``downstream_accuracy.png`` and ``loss_by_position.png`` (a plot without data says so on the image).
"""
from __future__ import annotations

import argparse
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
        if self.summary.get("params") is not None:
            return self.summary["params"]
        for meta in self.downstream_meta:
            if meta.get("params") is not None:
                return meta["params"]
        return None

    @property
    def tokens(self):
        if self.summary.get("tokens") is not None:
            return self.summary["tokens"]
        seen = [r["tokens"] for r in self.train + self.validation if isinstance(r.get("tokens"), (int, float))]
        return max(seen) if seen else None

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
        if self.summary.get("tokens_per_s") is not None:
            return self.summary["tokens_per_s"]
        vals = [r["tokens_per_s"] for r in self.train if isinstance(r.get("tokens_per_s"), (int, float))]
        return statistics.median(vals) if vals else None


def _read_json(path: Path, run: Run) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:
        run.warnings.append(f"{path.name}: unreadable ({type(exc).__name__}: {exc})")
        return None


def load_run(path: str | os.PathLike, presets: list[str] | None = None) -> Run:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"run dir {path}: no such directory")
    run = Run(path=p.resolve(), name=p.resolve().name)
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


BASE_COLUMNS = ["run", "model", "arch", "params", "tokens", "val_ppl", "val_bpb", "tokens_per_s"]


def table_rows(runs: list[Run]) -> tuple[list[str], list[dict]]:
    cols = task_columns(runs)
    header = BASE_COLUMNS + [f"{k} {m}" for k, m in cols]
    rows = []
    for r in runs:
        row = {"run": r.name, "model": r.model_name, "arch": r.arch, "params": r.params, "tokens": r.tokens,
               "val_ppl": r.val_ppl, "val_bpb": r.val_bpb, "tokens_per_s": r.tokens_per_s}
        for k, m in cols:
            row[f"{k} {m}"] = r.downstream.get(k, {}).get(m)
        rows.append(row)
    return header, rows


def write_csv(path: Path, runs: list[Run]) -> None:
    header, rows = table_rows(runs)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})


def markdown_table(runs: list[Run]) -> str:
    cols = task_columns(runs)
    head = ["run", "model", "arch", "params", "tokens", "val PPL", "val bpb", "tokens/s"]
    labels = []
    for k, m in cols:
        entry = next((r.downstream[k] for r in runs if k in r.downstream), None)
        labels.append(f"{task_label(k, entry)} {m.replace('acc_norm', 'acc_n')}")
    lines = ["| " + " | ".join(head + labels) + " |", "|" + "---|" * (len(head) + len(labels))]
    for r in runs:
        cells = [r.name, r.model_name or "", r.arch or "", _fmt_int(r.params), _fmt_int(r.tokens),
                 _fmt(r.val_ppl), _fmt(r.val_bpb, 3), _fmt_int(r.tokens_per_s)]
        for k, m in cols:
            v = r.downstream.get(k, {}).get(m)
            cells.append("" if v is None else f"{100 * v:.2f}")
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


def plot_val_loss(runs: list[Run], path: Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for r in runs:
        pts = sorted((row["tokens"], row["val_loss"]) for row in r.validation
                     if isinstance(row.get("tokens"), (int, float)) and isinstance(row.get("val_loss"), (int, float)))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=r.name)
            drawn = True
    if drawn:
        xs = [row["tokens"] for r in runs for row in r.validation if isinstance(row.get("tokens"), (int, float))]
        if min(xs) > 0 and max(xs) / min(xs) > 100:
            ax.set_xscale("log")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    else:
        _empty(ax, "no validation lines in metrics.jsonl")
    ax.set_title("Validation loss vs tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_downstream(runs: list[Run], path: Path) -> bool:
    plt = _plt()
    cols = task_columns(runs)
    metrics = [m for m in ("acc", "acc_norm") if any(c[1] == m for c in cols)]
    fig, axes = plt.subplots(max(1, len(metrics)), 1, figsize=(max(7, 0.9 * len(cols) + 3), 3.6 * max(1, len(metrics))),
                             squeeze=False)
    if not metrics:
        _empty(axes[0][0], "no downstream results (eval/downstream_*.json)")
        axes[0][0].set_title("Downstream accuracy")
    for ax, metric in zip(axes[:, 0], metrics):
        keys = [k for k, m in cols if m == metric]
        width = 0.8 / max(1, len(runs))
        for i, r in enumerate(runs):
            vals = [r.downstream.get(k, {}).get(metric) for k in keys]
            xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(keys))]
            ax.bar(xs, [100 * v if v is not None else 0 for v in vals], width=width, label=r.name)
        labels = [task_label(k, next((r.downstream[k] for r in runs if k in r.downstream), None)) for k in keys]
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"Downstream {metric} (task(shots))")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return bool(metrics)


def _log_bins(pts, n_bins: int = 120):
    """Token-weighted mean loss in log-spaced position bins (long rows are noisy per position)."""
    top = max(p for p, _, _ in pts) + 1
    edges = sorted({int(round(top ** (i / n_bins))) for i in range(n_bins + 1)} | {0, top + 1})
    out, j = [], 0
    pts = sorted(pts)
    for hi in edges[1:]:
        num = den = 0.0
        ps = []
        while j < len(pts) and pts[j][0] < hi:
            p, l, c = pts[j]
            w = max(float(c or 0), 1e-12)
            num, den = num + l * w, den + w
            ps.append(p)
            j += 1
        if ps:
            out.append((statistics.fmean(ps), num / den))
    return out


def plot_loss_by_position(runs: list[Run], path: Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn, kinds = False, set()
    for r in runs:
        d = r.loss_by_position
        loss = d.get("loss") or []
        pos = d.get("position") or list(range(len(loss)))
        counts = d.get("tokens") or [1] * len(loss)
        pts = [(p, l, c) for p, l, c in zip(pos, loss, counts) if isinstance(l, (int, float))]
        pts = _log_bins(pts) if len(pts) > 256 else [(p, l) for p, l, _ in pts]
        if pts:
            ax.plot([p[0] + 1 for p in pts], [math.exp(min(p[1], 700)) for p in pts], lw=1, label=r.name)
            kinds.add(d.get("by", "row"))
            drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.set_yscale("log")
        where = "document" if kinds == {"document"} else "row"
        ax.set_xlabel(f"token position in the {where} (1-based)")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    else:
        _empty(ax, "no loss_by_position.json in the run dirs")
    ax.set_title("Perplexity vs token position")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def make_report(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike, title: str = "ParaRNN-LM comparison",
                presets: list[str] | None = None) -> dict:
    """Write the report; ``presets`` restricts the downstream files read (``eval/downstream_<preset>.json``;
    default: all, later files win for a task|shots present in several)."""
    runs = [load_run(p, presets) for p in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out / "report.md",
        "csv": out / "report.csv",
        "val_loss": out / "val_loss_vs_tokens.png",
        "downstream": out / "downstream_accuracy.png",
        "loss_by_position": out / "loss_by_position.png",
    }
    drawn = {
        "val_loss": plot_val_loss(runs, files["val_loss"]),
        "downstream": plot_downstream(runs, files["downstream"]),
        "loss_by_position": plot_loss_by_position(runs, files["loss_by_position"]),
    }
    write_csv(files["csv"], runs)
    notes = []
    for r in runs:
        for m in r.downstream_meta:
            src = m.get("data_source") or "?"
            notes.append(f"- `{r.name}`: `{m['file']}` (preset {m.get('preset')}, data: {src}, "
                         f"limit: {m.get('limit')})")
            for key, why in (m.get("skipped") or {}).items():
                notes.append(f"  - skipped {key}: {why}")
        for w in r.warnings:
            notes.append(f"- `{r.name}`: {w}")
    md = [f"# {title}", "", "Runs: " + ", ".join(f"`{r.path}`" for r in runs), "",
          "Downstream columns are `task(shots) metric` in percent (acc_n = acc_norm); val PPL / bpb are the final "
          "validation values (summary.json, else the last validation line of metrics.jsonl).", "",
          markdown_table(runs), ""]
    if any(m.get("data_source", "").startswith("shipped") for r in runs for m in r.downstream_meta):
        md += ["**Note:** some downstream numbers come from the small slices shipped in `eval/tasks/data` "
               "(50 documents per task); they are smoke tests, not benchmark results.", ""]
    md += ["## Validation loss vs tokens", "", f"![validation loss]({files['val_loss'].name})", "",
           "## Downstream accuracy", "", f"![downstream]({files['downstream'].name})", "",
           "## Perplexity vs token position", "", f"![loss by position]({files['loss_by_position'].name})", ""]
    if notes:
        md += ["## Sources and notes", ""] + notes + [""]
    files["markdown"].write_text("\n".join(md), encoding="utf-8")
    return {"runs": [r.name for r in runs], "files": {k: str(v) for k, v in files.items()}, "plotted": drawn}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.report", description="Markdown/CSV/PNG report over run dirs.")
    ap.add_argument("run_dirs", nargs="+", help="run directories (config.yaml, metrics.jsonl, summary.json, eval/)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--title", default="ParaRNN-LM comparison")
    ap.add_argument("--presets", nargs="*", default=None,
                    help="only these downstream files (eval/downstream_<preset>.json), e.g. --presets paper")
    args = ap.parse_args(argv)
    missing = [d for d in args.run_dirs if not Path(d).is_dir()]
    if missing:
        print(f"eval.report: error: run dir {missing[0]}: no such directory", file=sys.stderr)
        return 2
    res = make_report(args.run_dirs, args.out, args.title, args.presets)
    for k, v in res["files"].items():
        print(f"{k:17s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
