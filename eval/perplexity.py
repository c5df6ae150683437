"""Perplexity, bits per byte and loss by token position: of any causal LM, on any corpus, without
letting one document see another.

    python -m eval.perplexity MODEL_DIR --data FILE_OR_DATASET [--protocol documents|packed] [--seq-len 2048]
    python -m eval.perplexity runs/gru/hf --data ../shared/data/corpus/sotu/validation.jsonl.gz --device cuda
    python -m eval.perplexity ~/SmolLM2-135M --data wikitext --name wikitext-2-raw-v1 --split test --max-docs 200

``MODEL_DIR`` is an exported HF directory (``run_dir/hf``, or any ``AutoModelForCausalLM`` directory; a
run dir is accepted for ``run_dir/hf``). ``--data`` is a local file or glob (``.json``/``.jsonl`` (``.gz``),
``.parquet``, ``.txt``: one document per file, or per line/paragraph with ``--sample-by``) or a
``datasets`` name (streamed; ``--name`` its config, ``--split`` the split).

**Protocol.** Every document becomes ``[EOS] + tokens + [EOS]`` (the EOS before a document is its
start marker, the one after it the end to predict), exactly as the training stream lays documents out;
every token after the first is a target once, scored with the document's earlier tokens only.

* ``documents`` (default): each document alone, cut into windows of ``seq_len + 1`` tokens that
  overlap by one (a window after the first sees only its own part of the document, from position 0),
  right-padded (padding after the last target of a causal model changes nothing; pad targets are
  ignored). Nothing can cross a document for any causal LM.
* ``packed``: the documents back to back in rows of ``seq_len + 1`` tokens (the training layout,
  ``data/packing.py``; the last, shorter row is kept) with ``position_ids`` restarting at 0 at each
  document. The model must reset there: before scoring, a two-document row is checked against its
  documents run alone, and a model that lets them see each other is refused (e.g. transformers'
  ``Mamba2ForCausalLM``; exports of this project's Mamba2 are loaded into its own class, which resets).
  Documents cut by a row boundary continue in the next row without their beginning, so ``packed``
  reads a little higher than ``documents`` at the same ``seq_len``.

In both, the model is called with ``use_cache=False`` (transformers builds the packed-document mask
only when no cache is built, and an export's config says ``use_cache: true``).

* loss = total NLL (nats) / number of target tokens; ppl = exp(loss)
* bpb  = total NLL / (ln 2 * total UTF-8 bytes of the target tokens), with
  ``byte_lengths[token_id]`` the byte length of each token (``data.stats.token_byte_lengths``;
  EOS and other special tokens count 0 bytes, so bpb spreads their NLL over the text's bytes).

The library functions take the data pipeline's batches: dicts of LongTensors ``[B, T]`` with
``input_ids``, ``labels`` (already shifted: ``labels[:, t]`` is the target of ``input_ids[:, t]``;
``-100`` is ignored) and optionally ``position_ids``. Under ``torch.distributed`` the sums are
all-reduced (``all_reduce="auto"``), so every rank gets the global numbers for its share of the rows.
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.common import ConfigError

IGNORE_INDEX = -100


def _is_hf_model(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(getattr(model, "module", model), PreTrainedModel)  # DDP / DeepSpeed wrap it in .module


def _logits(model, batch: Mapping[str, torch.Tensor], device) -> torch.Tensor:
    kwargs = {"input_ids": batch["input_ids"].to(device)}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"].to(device)
    if _is_hf_model(model):
        # With a cache, transformers ignores the document starts in position_ids (and an export says use_cache: true).
        kwargs["use_cache"] = False
    out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def _token_nll(model, batch: Mapping[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL in float32 ``[B, T]`` (0 where ignored) and the label mask ``[B, T]``."""
    logits = _logits(model, batch, device)
    labels = batch["labels"].to(logits.device)
    mask = labels != IGNORE_INDEX
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none",
                          ignore_index=IGNORE_INDEX).view(labels.shape)
    return nll * mask, mask


def _default_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _place(model, device) -> torch.device:
    """The device to run on; the model is moved only if it is elsewhere (a prepared DDP / DeepSpeed
    model already on ``device`` is left alone)."""
    current = _default_device(model)
    if device is None:
        return current
    device = torch.device(device)
    same = current.type == device.type and (device.index is None or current.index == device.index)
    if not same and hasattr(model, "to"):
        model.to(device)
    return device


def _distributed(all_reduce: bool | str) -> bool:
    import torch.distributed as dist

    return (dist.is_available() and dist.is_initialized()) if all_reduce == "auto" else bool(all_reduce)


def _maybe_all_reduce(values: torch.Tensor, all_reduce: bool | str, device: torch.device,
                      op: str = "sum") -> torch.Tensor:
    """All-reduce a CPU tensor (through ``device``, so NCCL gets a CUDA tensor) when distributed."""
    if not _distributed(all_reduce):
        return values
    import torch.distributed as dist

    moved = values.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return moved.cpu()


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


class _EvalMode:
    def __init__(self, model):
        self.model, self.was_training = model, getattr(model, "training", False)

    def __enter__(self):
        if hasattr(self.model, "eval"):
            self.model.eval()
        return self

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()


@torch.no_grad()
def evaluate_perplexity(model, batches: Iterable[Mapping[str, torch.Tensor]],
                        byte_lengths: Sequence[int] | torch.Tensor | None = None,
                        device: str | torch.device | None = None, max_batches: int | None = None,
                        all_reduce: bool | str = "auto") -> dict[str, Any]:
    """Mean NLL over all label tokens, its perplexity and (with ``byte_lengths``) bits-per-byte.

    Returns ``{"loss", "ppl", "bpb" (None without byte_lengths), "tokens", "bytes", "nll_sum"}``."""
    device = _place(model, device)
    table = None
    if byte_lengths is not None:
        table = torch.as_tensor(byte_lengths, dtype=torch.float64)
    sums = torch.zeros(3, dtype=torch.float64)  # nll, tokens, bytes
    with _EvalMode(model):
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            nll, mask = _token_nll(model, batch, device)
            sums[0] += nll.double().sum().cpu()
            sums[1] += mask.sum().cpu()
            if table is not None:
                labels = batch["labels"].cpu()
                m = labels != IGNORE_INDEX
                sums[2] += table[labels[m]].sum()
    sums = _maybe_all_reduce(sums, all_reduce, device)
    nll_sum, tokens, n_bytes = float(sums[0]), int(sums[1]), float(sums[2])
    loss = nll_sum / tokens if tokens else float("nan")
    return {
        "loss": loss,
        "ppl": _exp(loss) if tokens else float("nan"),
        "bpb": (nll_sum / (math.log(2) * n_bytes)) if (table is not None and n_bytes > 0) else None,
        "tokens": tokens,
        "bytes": int(n_bytes) if table is not None else None,
        "nll_sum": nll_sum,
    }


@torch.no_grad()
def loss_by_position(model, batches: Iterable[Mapping[str, torch.Tensor]], device: str | torch.device | None = None,
                     by: str = "row", max_positions: int | None = None, max_batches: int | None = None,
                     return_counts: bool = False, all_reduce: bool | str = "auto"):
    """Mean NLL per token position: ``tensor[T]``.

    ``by="row"``: position ``t`` within the packed row (index of the input token, 0..T-1).
    ``by="document"``: position within the document (``position_ids`` of the input token); the
    length is ``max_positions`` (default: the largest position seen + 1, under DDP pass it), positions
    never seen are NaN. With ``return_counts`` also the number of tokens per position."""
    if by not in ("row", "document"):
        raise ValueError(f"by must be 'row' or 'document', got {by!r}")
    device = _place(model, device)
    sums = torch.zeros(0, dtype=torch.float64)
    counts = torch.zeros(0, dtype=torch.float64)

    def grow(n):
        nonlocal sums, counts
        if n > sums.numel():
            sums = torch.cat([sums, sums.new_zeros(n - sums.numel())])
            counts = torch.cat([counts, counts.new_zeros(n - counts.numel())])

    with _EvalMode(model):
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            nll, mask = _token_nll(model, batch, device)
            nll, mask = nll.double().cpu(), mask.cpu()
            if by == "row":
                grow(nll.shape[1])
                sums[: nll.shape[1]] += nll.sum(0)
                counts[: nll.shape[1]] += mask.sum(0)
            else:
                pos = batch["position_ids"].cpu()
                keep = mask if max_positions is None else mask & (pos < max_positions)
                p = pos[keep]
                if p.numel():
                    grow(int(p.max()) + 1)
                    sums.index_add_(0, p, nll[keep])
                    counts.index_add_(0, p, torch.ones_like(nll[keep]))
    if max_positions is not None:
        grow(max_positions)
        sums, counts = sums[:max_positions], counts[:max_positions]
    elif _distributed(all_reduce):  # ranks may have seen different lengths: agree on the longest
        grow(int(_maybe_all_reduce(torch.tensor([sums.numel()], dtype=torch.float64), all_reduce, device, "max")[0]))
    both = _maybe_all_reduce(torch.stack([sums, counts]), all_reduce, device)
    sums, counts = both[0], both[1]
    mean = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
    return (mean, counts) if return_counts else mean


def write_loss_by_position(run_dir: str | os.PathLike, model, batches: Iterable[Mapping[str, torch.Tensor]],
                           device: str | torch.device | None = None, by: str = "row",
                           max_batches: int | None = None, extra: Mapping[str, Any] | None = None,
                           filename: str = "loss_by_position.json") -> Path:
    """Compute :func:`loss_by_position` and write ``<run_dir>/loss_by_position.json``:
    ``{"by", "position": [...], "loss": [...], "ppl": [...], "tokens": [...], "mean_loss", ...extra}``
    (NaN entries become null; ``ppl`` of a position is exp of its mean loss). ``eval.report`` plots it."""
    batches = list(batches) if not isinstance(batches, (list, tuple)) else batches
    mean, counts = loss_by_position(model, batches, device=device, by=by, max_batches=max_batches, return_counts=True)
    total = counts.sum().item()
    finite = lambda x: None if (x is None or not math.isfinite(x)) else float(x)  # noqa: E731
    payload: dict[str, Any] = {
        "by": by,
        "position": list(range(mean.numel())),
        "loss": [finite(v) for v in mean.tolist()],
        "ppl": [finite(_exp(v)) if math.isfinite(v) else None for v in mean.tolist()],
        "tokens": [int(c) for c in counts.tolist()],
        "mean_loss": finite((torch.nan_to_num(mean) * counts).sum().item() / total) if total else None,
    }
    if extra:
        payload.update(dict(extra))
    path = Path(run_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------
# Any model, any corpus (the command line)
# ------------------------------------------------------------------------------------------------
PROTOCOLS = ("documents", "packed")
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}


def corpus_config(data: str, text_field: str = "text", split: str = "validation", name: str | None = None,
                  sample_by: str = "document"):
    """A ``training.config.DataConfig`` whose validation split is ``data``: a local file or glob (relative to
    the working directory, else to the repository root) or a ``datasets`` name. Checked, nothing opened."""
    from training.config import DataConfig

    path = Path(os.path.expanduser(data))
    matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else ([str(path)] if path.exists() else [])
    if matches or Path(data).suffix.lower().removesuffix(".gz") in LOCAL_SUFFIXES or data.endswith(".gz"):
        files = [str(Path(m).resolve()) for m in matches] or [data]  # not found here: the repo root, or an error
        suffixes = {Path(f[:-3] if f.endswith(".gz") else f).suffix.lower() for f in files}
        formats = {LOCAL_SUFFIXES.get(x) for x in suffixes}
        if len(formats) != 1 or None in formats:
            raise ConfigError(f"--data {data}: cannot tell the format from {sorted(suffixes)} "
                              f"(known: {', '.join(sorted(LOCAL_SUFFIXES))}, optionally .gz)")
        fmt = formats.pop()
        cfg = DataConfig(name=Path(files[0]).name, format=fmt, train_files=files, validation_files=files,
                         text_field=text_field, load_kwargs={"sample_by": sample_by} if fmt == "text" else {})
    else:
        cfg = DataConfig(name=data, format="hub", hub_path=data, hub_name=name, train_split=split,
                         validation_split=split, text_field=text_field, validation_rows=1)
    cfg.check()
    return cfg


def read_documents(cfg, tokenizer, max_docs: int | None = None) -> list[list[int]]:
    """Token ids (no special tokens) of the documents of ``cfg``'s validation split, in file order."""
    from data.pipeline import DocumentSource, encode_document

    source = DocumentSource(cfg, "validation", repeat=False, shuffle_buffer=0)
    docs: list[list[int]] = []
    while max_docs is None or len(docs) < max_docs:
        text = source.next_text()
        if text is None:
            break
        docs.append(encode_document(tokenizer, text))
    return docs


def _pad_batch(windows: list[list[int]], positions: bool, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(w) for w in windows) - 1
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : len(w) - 1] = torch.tensor(w[:-1])
        labels[i, : len(w) - 1] = torch.tensor(w[1:])
    batch = {"input_ids": ids, "labels": labels}
    if positions:
        batch["position_ids"] = torch.arange(width).expand(len(windows), -1).clone()
    return batch


def document_batches(docs: Sequence[Sequence[int]], seq_len: int, batch_size: int,
                     eos_id: int) -> list[dict[str, torch.Tensor]]:
    """The ``documents`` protocol: each ``[EOS] + doc + [EOS]`` alone, in windows of ``seq_len + 1`` tokens
    overlapping by one, right-padded (targets ``-100``); no ``position_ids`` (every window starts at 0).
    Windows are batched longest first, so padding stays small."""
    windows = []
    for doc in docs:
        seq = [eos_id, *doc, eos_id]
        windows += [seq[i:i + seq_len + 1] for i in range(0, len(seq) - 1, seq_len)]
    windows.sort(key=len, reverse=True)
    return [_pad_batch(windows[i:i + batch_size], False, eos_id) for i in range(0, len(windows), batch_size)]


def packed_batches(docs: Sequence[Sequence[int]], seq_len: int, batch_size: int,
                   eos_id: int) -> list[dict[str, torch.Tensor]]:
    """The ``packed`` protocol: the training layout (``data.packing.TokenPacker``) with a closing ``[EOS]``;
    ``position_ids`` restart at 0 at each document. The last row is filled up with a filler document whose
    targets are ignored (it comes after the real tokens and starts a document of its own)."""
    from data.packing import TokenPacker, collate_rows

    packer = TokenPacker(seq_len, eos_id)
    for doc in docs:
        packer.add_document(doc)
    packer.add_document([])  # the closing EOS: the last document's end is a target like every other's
    rows = []
    while packer.has_row():
        rows.append(packer.pop_row())
    real = len(packer)  # tokens left for the last row (the first one carried over from the row before)
    if real > 1:
        packer.add_document([eos_id] * (seq_len - real))
        rows.append(packer.pop_row())
    batches = [collate_rows(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    if real > 1:
        labels = batches[-1]["labels"].clone()  # collate_rows' labels may share storage with input_ids
        labels[-1, real - 1:] = IGNORE_INDEX
        batches[-1]["labels"] = labels
    return batches


def load_causal_lm(path: str | os.PathLike, dtype: str | None = None, trust_remote_code: bool = True):
    """``AutoModelForCausalLM.from_pretrained(path)``, except that a Mamba2 export is loaded into this
    project's ``Mamba2DocForCausalLM`` (same weights and function; it resets at document starts and runs
    the Triton scan on CUDA, where transformers' class falls back to a slow reference path)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, dtype)} if dtype not in (None, "auto") else {}
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if config.model_type == "mamba2":
        from models.mamba2 import Mamba2DocForCausalLM

        return Mamba2DocForCausalLM.from_pretrained(str(path), **kwargs)
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)


@torch.no_grad()
def check_packed_isolation(model, device=None, vocab_size: int | None = None, tol: float = 2e-2) -> float:
    """Refuse a model that lets a packed row's documents see each other (``packed`` protocol): the second
    document of a random two-document row must give the logits it gives alone (relative norm error below
    ``tol``, which admits bf16 rounding; a leak is O(1)). Returns the error."""
    device = _place(model, device)
    vocab = vocab_size or getattr(getattr(model, "config", None), "vocab_size", 256)
    ids = torch.randint(0, vocab, (1, 48), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(20), torch.arange(28)])[None]
    with _EvalMode(model):
        packed = _logits(model, {"input_ids": ids, "position_ids": pos}, device)[0, 20:].float()
        alone = _logits(model, {"input_ids": ids[:, 20:]}, device)[0].float()
    err = ((packed - alone).norm() / alone.norm().clamp_min(1e-12)).item()
    if not err < tol:
        raise ConfigError(f"{type(getattr(model, 'module', model)).__name__} lets the documents of a packed row see "
                          f"each other (relative logit change {err:.2g}): use --protocol documents")
    return err


def score(model, tokenizer, docs: Sequence[Sequence[int]], protocol: str = "documents", seq_len: int = 2048,
          batch_size: int = 8, device: str | torch.device | None = None) -> dict[str, Any]:
    """Perplexity / bpb of ``docs`` (token ids) under ``protocol``; the result says how it was computed."""
    from data.stats import token_byte_lengths

    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if protocol == "packed":
        check_packed_isolation(model, device)
    make = packed_batches if protocol == "packed" else document_batches
    batches = make(docs, seq_len, batch_size, int(tokenizer.eos_token_id))
    res = evaluate_perplexity(model, batches, byte_lengths=token_byte_lengths(tokenizer), device=device)
    res.update(protocol=protocol, seq_len=seq_len, documents=len(docs))
    return res


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m eval.perplexity", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="exported HF model directory (or a run dir with hf/)")
    ap.add_argument("--data", required=True, help="local .json/.jsonl/.parquet/.txt file or glob, or a datasets name")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--split", default="validation", help="split of a datasets name (local files: all of them)")
    ap.add_argument("--name", default=None, help="config of a datasets name (e.g. wikitext-2-raw-v1)")
    ap.add_argument("--sample-by", default="document", choices=("document", "paragraph", "line"),
                    help=".txt files: what one document is")
    ap.add_argument("--protocol", default="documents", choices=PROTOCOLS)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-docs", type=int, default=None, help="score only the first N documents")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="auto", help="auto (as saved), float32, bfloat16, ...")
    ap.add_argument("--tokenizer", default=None, help="default: the model directory's")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    try:
        model_dir = Path(args.model)
        if (model_dir / "hf" / "config.json").is_file():
            model_dir = model_dir / "hf"
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"{args.model}: no config.json (not an exported HF model directory)")
        for key in ("seq_len", "batch_size", "max_docs"):
            value = getattr(args, key)
            if value is not None and value <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {value}")
        cfg = corpus_config(args.data, args.text_field, args.split, args.name, args.sample_by)
        from data.pipeline import load_tokenizer

        tokenizer = load_tokenizer(str(Path(args.tokenizer).resolve()) if args.tokenizer else str(model_dir.resolve()))
        docs = read_documents(cfg, tokenizer, args.max_docs)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_causal_lm(model_dir, args.dtype)
        res = score(model, tokenizer, docs, args.protocol, args.seq_len, args.batch_size, device)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    res.update(model=str(model_dir), data=args.data, split=args.split if cfg.format == "hub" else None)
    print(f"{res['documents']} documents, {res['tokens']:,} target tokens ({args.protocol}, seq_len {args.seq_len}): "
          f"loss {res['loss']:.4f}  perplexity {res['ppl']:.3f}  bits/byte {res['bpb']:.4f}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0


__all__ = ["IGNORE_INDEX", "PROTOCOLS", "check_packed_isolation", "corpus_config", "document_batches",
           "evaluate_perplexity", "load_causal_lm", "loss_by_position", "packed_batches", "read_documents", "score",
           "write_loss_by_position"]


if __name__ == "__main__":
    sys.exit(main())
