"""Hydra entry: downstream evaluation (lm-eval) of one or several checkpoints or run dirs.

    python -m eval.main checkpoints=[runs/gru,runs/mamba2] tasks=paper limit=100 batch_size=8 device=cpu
    python -m eval.main --config-name paper checkpoints=[runs/gru] data_root=../shared/data/eval device=cuda
    python -m eval.main checkpoints=[runs/gru/hf] tasks=[local_arc_easy,local_arc_challenge:25] limit=50
    python -m eval.main checkpoints=[runs/gru] tasks=smoke perplexity=true  # + val ppl/bpb, loss_by_position.json
    python -m eval.main checkpoints=[~/SmolLM2-135M] perplexity=true perplexity_data=corpus.jsonl

A checkpoint is a run dir (``<run_dir>/hf/config.json``) or an exported HF directory. Results go to
``<run_dir>/eval/downstream_<preset>.json`` (lm-eval version and task configs included); with
``perplexity=true`` also ``<run_dir>/eval/perplexity.json`` and ``<run_dir>/loss_by_position.json``:
the run's own validation rows (packed, as train.py validates), or ``perplexity_data`` (a corpus file or
``datasets`` name, per-document windows; protocols in ``eval/perplexity.py``).
Configs: ``configs/eval/`` (default.yaml; presets smoke, paper, mamba_zeroshot). Bad input (a missing
checkpoint, an unknown preset or task, a missing data file) stops before any model is loaded, with a
one-line error naming the key or path.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from eval.downstream import check_data, quiet_libraries, resolve_data_root, resolve_tasks
from training.common import REPO_ROOT, ConfigError

CONFIG_DIR = str(REPO_ROOT / "configs" / "eval")
log = logging.getLogger("eval.main")


@dataclasses.dataclass
class Checkpoint:
    given: str
    run_dir: Path  # where eval/ outputs go
    hf_dir: Path  # what HFLM loads

    @property
    def name(self) -> str:
        return self.run_dir.name


def resolve_checkpoint(path: str) -> Checkpoint:
    """A run dir (with ``hf/config.json``) or an exported HF directory (with ``config.json``)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        raise ConfigError(f"checkpoints: {path}: no such directory")
    p = p.resolve()
    if (p / "hf" / "config.json").is_file():
        return Checkpoint(str(path), p, p / "hf")
    if (p / "config.json").is_file():
        parent = p.parent
        is_run = any((parent / f).is_file() for f in ("config.yaml", "metrics.jsonl", "summary.json"))
        return Checkpoint(str(path), parent if is_run else p, p)
    raise ConfigError(f"checkpoints: {path}: neither a run dir with hf/config.json nor an exported HF "
                          f"model directory with config.json")


def run_info(run_dir: Path) -> dict[str, Any]:
    """What the run dir says about the model (all optional): arch, name, params, tokens, data."""
    info: dict[str, Any] = {"run_dir": str(run_dir)}
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        try:
            cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False)
            model = cfg.get("model", {}) if isinstance(cfg, dict) else {}
            info["arch"] = model.get("arch")
            info["model_name"] = model.get("name")
            data = cfg.get("data", {}) if isinstance(cfg, dict) else {}
            info["data_name"] = data.get("name") if isinstance(data, dict) else None
        except Exception as exc:  # a broken config.yaml must not stop the evaluation
            info["config_error"] = f"{type(exc).__name__}: {exc}"
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
            info.update({k: s.get(k) for k in ("params", "tokens", "val_loss", "val_ppl", "val_bpb") if k in s})
        except Exception as exc:
            info["summary_error"] = f"{type(exc).__name__}: {exc}"
    return info


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


@dataclasses.dataclass
class PerplexityPlan:
    """What ``perplexity=true`` scores for one checkpoint, resolved (and its files checked) before any model loads."""

    data: Any  # training.config.DataConfig: the run's own (its validation rows, as in training) or perplexity_data
    protocol: str  # "packed" | "documents" (eval/perplexity.py states both)
    own: bool  # the run's own validation rows (exactly what train.py validates on)


def plan_perplexity(ckpt: Checkpoint, cfg: DictConfig) -> PerplexityPlan:
    """``perplexity_data`` (a corpus file or datasets name) if given, else the run's own data config
    (``<run_dir>/config.yaml``). Raises :class:`ConfigError` naming the key or file."""
    from eval.perplexity import PROTOCOLS, corpus_config
    from training.config import DataConfig
    from training.run_dir import load_saved_config

    if cfg.perplexity_protocol is not None and cfg.perplexity_protocol not in PROTOCOLS:
        raise ConfigError(f"perplexity_protocol={cfg.perplexity_protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if cfg.perplexity_data:
        data = corpus_config(str(cfg.perplexity_data), str(cfg.perplexity_text_field))
        if cfg.perplexity_seq_len is not None:
            data.seq_len = int(cfg.perplexity_seq_len)
        return PerplexityPlan(data, cfg.perplexity_protocol or "documents", own=False)
    saved = load_saved_config(str(ckpt.run_dir))
    if saved is None:
        raise ConfigError(f"perplexity=true: {ckpt.given} has no run config ({ckpt.run_dir / 'config.yaml'}); "
                          f"set perplexity_data=FILE_OR_DATASET to score it on a corpus")
    dcfg = DataConfig.from_dict(saved.get("data"))
    if cfg.perplexity_rows is not None:
        dcfg.validation_rows = int(cfg.perplexity_rows)
    if cfg.perplexity_seq_len is not None:
        dcfg.seq_len = int(cfg.perplexity_seq_len)
    dcfg.check()
    return PerplexityPlan(dcfg, cfg.perplexity_protocol or "packed", own=True)


def run_perplexity(ckpt: Checkpoint, cfg: DictConfig, out_dir: Path, plan: PerplexityPlan,
                   model: Any = None) -> dict[str, Any]:
    """Loss / ppl / bpb (``<out_dir>/perplexity.json``) and ``<run_dir>/loss_by_position.json`` per ``plan``."""
    from data import pipeline
    from data.stats import token_byte_lengths
    from eval.perplexity import (
        check_packed_isolation,
        document_batches,
        evaluate_perplexity,
        load_causal_lm,
        packed_batches,
        read_documents,
        write_loss_by_position,
    )

    tokenizer = pipeline.load_tokenizer(str(cfg.tokenizer or ckpt.hf_dir), bool(cfg.trust_remote_code))
    batch_size = int(cfg.perplexity_batch_size)
    if plan.own and plan.protocol == "packed":
        batches = pipeline.validation_batches(plan.data, tokenizer, batch_size=batch_size)
    else:
        docs = read_documents(plan.data, tokenizer, cfg.perplexity_rows if not plan.own else None)
        make = packed_batches if plan.protocol == "packed" else document_batches
        batches = make(docs, plan.data.seq_len, batch_size, int(tokenizer.eos_token_id))
    if model is None:
        model = load_causal_lm(ckpt.hf_dir, cfg.dtype, bool(cfg.trust_remote_code))
    if plan.protocol == "packed":
        check_packed_isolation(model, cfg.device)
    res = evaluate_perplexity(model, batches, byte_lengths=token_byte_lengths(tokenizer), device=cfg.device)
    extra = {"data": plan.data.name, "seq_len": plan.data.seq_len, "protocol": plan.protocol}
    res.update(extra, rows=sum(int(b["input_ids"].shape[0]) for b in batches))
    write_loss_by_position(ckpt.run_dir, model, batches, device=cfg.device, extra=extra)
    from eval.downstream import write_json

    write_json(out_dir / "perplexity.json", res)
    return res


@dataclasses.dataclass
class EvalPlan:
    """What ``cfg`` asks for, resolved and checked (checkpoints, tasks, data files) before any model loads."""

    checkpoints: list[Checkpoint]
    preset: str
    specs: list
    limit: Any
    data_root: Path
    perplexity: dict[str, PerplexityPlan]  # by Checkpoint.given; empty unless perplexity=true


def plan(cfg: DictConfig) -> EvalPlan:
    """Validate everything ``run`` will need; raises :class:`ConfigError` naming the key or path."""
    checkpoints = _plain(cfg.checkpoints)
    if isinstance(checkpoints, str):
        checkpoints = [checkpoints]
    if not checkpoints:
        raise ConfigError("checkpoints: none given (e.g. checkpoints=[runs/my_run])")
    preset, specs, limit = resolve_tasks(_plain(cfg.tasks), cfg.num_fewshot, _plain(cfg.limit))
    data_root = resolve_data_root(cfg.data_root)
    check_data(data_root, sorted({s.task for s in specs if s.is_local}))
    ckpts = [resolve_checkpoint(c) for c in checkpoints]
    if cfg.tokenizer is not None and not Path(str(cfg.tokenizer)).is_dir():
        raise ConfigError(f"tokenizer: {cfg.tokenizer}: no such directory")
    perplexity = {ckpt.given: plan_perplexity(ckpt, cfg) for ckpt in ckpts} if cfg.perplexity else {}
    return EvalPlan(ckpts, cfg.preset or preset, specs, limit, data_root, perplexity)


def evaluate(ckpt: Checkpoint, cfg: DictConfig, p: EvalPlan) -> dict[str, Any]:
    """Downstream tasks (and perplexity) of one checkpoint, loaded once; writes ``downstream_<preset>.json``."""
    from data.pipeline import load_tokenizer
    from eval.downstream import run_downstream, summary_table, write_json
    from eval.perplexity import load_causal_lm

    out_dir = Path(cfg.output_dir) / ckpt.name if cfg.output_dir else ckpt.run_dir / "eval"
    out_path = out_dir / f"downstream_{p.preset}.json"
    log.info("%s: downstream %s (%d tasks, limit %s) -> %s", ckpt.given, p.preset, len(p.specs), p.limit, out_path)
    model = load_causal_lm(ckpt.hf_dir, cfg.dtype, bool(cfg.trust_remote_code))
    tokenizer = load_tokenizer(str(Path(str(cfg.tokenizer or ckpt.hf_dir)).resolve()), bool(cfg.trust_remote_code))
    res = run_downstream(
        model, tokenizer, tasks=[{"task": s.task, "num_fewshot": s.num_fewshot} for s in p.specs], limit=p.limit,
        batch_size=cfg.batch_size, device=cfg.device, output_path=None, data_root=p.data_root, hub=bool(cfg.hub),
        max_length=cfg.max_length, seed=int(cfg.seed), log_samples=bool(cfg.log_samples),
        extra_info={"checkpoint": str(ckpt.hf_dir), "run": run_info(ckpt.run_dir)},
    )
    res["preset"] = p.preset
    res["eval_config"] = _plain(cfg)
    if cfg.perplexity:
        plan_ = p.perplexity[ckpt.given]
        log.info("%s: perplexity (%s, %s)", ckpt.given, plan_.protocol, plan_.data.name)
        res["perplexity"] = run_perplexity(ckpt, cfg, out_dir, plan_, model=model)
    write_json(out_path, res)
    print(f"== {ckpt.given} ({p.preset}) -> {out_path}")
    print(summary_table(res))
    if "perplexity" in res:
        r = res["perplexity"]
        print(f"perplexity ({r['protocol']}, {r['data']}): loss={r['loss']:.4f} ppl={r['ppl']:.3f} bpb={r['bpb']} "
              f"tokens={r['tokens']}")
    return res


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Validate everything, then evaluate each checkpoint; returns the result dicts."""
    p = plan(cfg)
    return [evaluate(ckpt, cfg, p) for ckpt in p.checkpoints]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="default")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    try:
        run(cfg)
    except ConfigError as exc:
        print(f"eval.main: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
