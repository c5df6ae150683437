"""Corpus statistics the evaluation code and the README need.

* :func:`token_byte_lengths` - UTF-8 bytes per token id, for bits-per-byte. For byte-level BPE
  (GPT-2) it is exact: every character of a vocabulary entry stands for one byte through GPT-2's
  ``bytes_to_unicode`` table, so the byte lengths of the tokens of any text add up to
  ``len(text.encode("utf-8"))``, even when a multi-byte character is split across tokens.
  Special tokens (EOS, ...) count 0 bytes. Other tokenizers get a SentencePiece-style
  approximation (``▁`` = one space, ``<0xAB>`` = one byte).
* :func:`unigram_perplexity` / :func:`unigram_baseline` - the perplexity (and bits per byte) of
  an add-one-smoothed unigram model counted on the train split and evaluated on exactly the
  target tokens the model is evaluated on (the ``labels`` of :func:`data.pipeline.pack_validation_rows`),
  a floor any language model should beat.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .pipeline import ConfigError, DataConfig, DocumentSource, encode_document, pack_validation_rows


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (as in OpenAI's encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _special_ids(tokenizer) -> set:
    ids = set(int(i) for i in tokenizer.all_special_ids)
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return ids


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """LongTensor [len(tokenizer)]: number of UTF-8 bytes each token id decodes to (specials: 0)."""
    n = len(tokenizer)
    special = _special_ids(tokenizer)
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    pieces: list[str | None] = tokenizer.convert_ids_to_tokens(list(range(n)))
    byte_chars = set(bytes_to_unicode().values())
    regular = [p for i, p in enumerate(pieces) if i not in special and i not in added and p is not None]
    byte_level = all(set(p) <= byte_chars for p in regular)
    out = torch.zeros(n, dtype=torch.long)
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            continue
        if i in added:  # user-added, non-special: stored as raw text
            out[i] = len(str(added[i].content).encode("utf-8"))
        elif byte_level:
            out[i] = len(piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[i] = 1  # SentencePiece byte fallback
        else:
            out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out


@dataclass(frozen=True)
class UnigramBaseline:
    perplexity: float
    bits_per_byte: float
    nll_per_token: float  # nats
    train_tokens: int
    eval_tokens: int
    eval_bytes: int


def _split_stream(cfg: DataConfig, tokenizer, split: str, max_tokens: int | None) -> np.ndarray:
    """One pass over ``split`` (file order, unsharded) as the packed token stream ``[EOS]+doc ...``."""
    eos = int(tokenizer.eos_token_id)
    source = DocumentSource(cfg, split, rank=0, world_size=1, repeat=False, shuffle_buffer=0)
    chunks: list[np.ndarray] = []
    total = 0
    while max_tokens is None or total < max_tokens:
        text = source.next_text()
        if text is None:
            break
        ids = np.asarray([eos] + encode_document(tokenizer, text), dtype=np.int64)
        chunks.append(ids)
        total += len(ids)
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    return stream if max_tokens is None else stream[:max_tokens]


def unigram_baseline(cfg: DataConfig, tokenizer, split: str = "validation",
                     max_train_tokens: int | None = None) -> UnigramBaseline:
    """Add-one-smoothed unigram model over ``len(tokenizer)`` ids, counted on the train stream
    (one pass, at most ``max_train_tokens``; set it for huge hub corpora) and evaluated on the
    targets of ``split``: for "validation" the labels of ``pack_validation_rows(cfg, tokenizer)``
    (what the model's validation loss averages over, world size 1); for "train" the train
    stream itself minus its first token."""
    cfg.check()
    vocab = len(tokenizer)
    train = _split_stream(cfg, tokenizer, "train", max_train_tokens)
    if split == "validation":
        rows = pack_validation_rows(cfg, tokenizer)
        targets = np.asarray([t for r in rows for t in r.tokens[1:]], dtype=np.int64)
    elif split == "train":
        targets = train[1:]
    else:
        raise ConfigError(f"unigram_perplexity: split must be 'train' or 'validation', got {split!r}")
    if len(targets) == 0:
        raise ConfigError(f"data config '{cfg.name}': no {split} tokens to evaluate on")
    counts = np.bincount(train, minlength=vocab).astype(np.float64)
    logp = np.log(counts + 1.0) - math.log(len(train) + vocab)
    nll = float(-logp[targets].sum())
    nbytes = int(token_byte_lengths(tokenizer).numpy()[targets].sum())
    return UnigramBaseline(
        perplexity=math.exp(nll / len(targets)),
        bits_per_byte=nll / math.log(2) / nbytes if nbytes else float("nan"),
        nll_per_token=nll / len(targets),
        train_tokens=int(len(train)),
        eval_tokens=int(len(targets)),
        eval_bytes=nbytes,
    )


def unigram_perplexity(cfg: DataConfig, tokenizer, split: str = "validation",
                       max_train_tokens: int | None = None) -> float:
    """Perplexity of the train-split unigram model (add-one smoothing) on ``split``'s targets."""
    return unigram_baseline(cfg, tokenizer, split, max_train_tokens).perplexity
