"""``python -m data [--seq-len N] [--batch-size B] [--batches K]``: statistics of the default
(SOTU) data config: token counts, unigram-baseline perplexity / bits per byte on the validation
split, and tokenize+pack throughput of the training stream on this CPU."""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .pipeline import DataConfig, PackedStream, load_tokenizer, pack_validation_rows  # noqa: E402
from .stats import unigram_baseline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=100, help="batches to time for throughput")
    args = ap.parse_args()

    cfg = DataConfig(seq_len=args.seq_len)
    cfg.check()
    tok = load_tokenizer(cfg.tokenizer)
    print(f"config: {cfg}")

    t0 = time.perf_counter()
    base = unigram_baseline(cfg, tok, "validation")
    print(f"train stream tokens (incl. one EOS per document): {base.train_tokens}")
    n_rows = len(pack_validation_rows(cfg, tok))
    print(f"validation rows: {n_rows} x {cfg.seq_len} targets = {base.eval_tokens} tokens, "
          f"{base.eval_bytes} bytes")
    print(f"unigram (train counts, add-one) on validation targets: perplexity {base.perplexity:.1f}, "
          f"{base.nll_per_token:.4f} nats/token, {base.bits_per_byte:.4f} bits/byte  "
          f"({time.perf_counter() - t0:.1f} s)")

    stream = PackedStream(cfg, tok, batch_size=args.batch_size)
    next(stream)  # warm-up: opens the dataset
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        next(stream)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    n = args.batches * stream.tokens_per_batch
    print(f"throughput: {n} tokens in {dt:.2f} s wall = {n / dt:,.0f} tokens/s; {dc:.2f} s CPU = {n / dc:,.0f} "
          "tokens per CPU-second (tokenize + pack + collate, one process)")


if __name__ == "__main__":
    main()
