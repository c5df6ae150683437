"""Tests of the data pipeline (data/pipeline.py, data/packing.py, data/stats.py).

Every expected value is computed independently of the code under test: token ids come from the
bare `tokenizers` library reading data/tokenizer/gpt2/tokenizer.json (not from transformers),
documents are read with gzip/json, and the packed stream is rebuilt by hand as
`[EOS] + ids(doc)` per document. Small jsonl fixtures keep the file fast; the embedded SOTU
corpus is used only where the real file matters.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from data.pipeline import (
    ConfigError,
    DataConfig,
    PackedStream,
    load_dataset_call,
    load_tokenizer,
    validation_batches,
)
from data.stats import token_byte_lengths, unigram_perplexity
from training.common import REPO_ROOT

TOKENIZER_DIR = REPO_ROOT / "data" / "tokenizer" / "gpt2"
EOS = 50256
SEQ = 16


# ------------------------------------------------------------------------------------------------
# independent reference
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref_tok() -> Tokenizer:
    tk = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    tk.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is plain text
    return tk


@pytest.fixture(scope="module")
def hf_tok():
    return load_tokenizer(str(TOKENIZER_DIR))


def ref_ids(ref_tok: Tokenizer, text: str) -> list[int]:
    return ref_tok.encode(text, add_special_tokens=False).ids


def ref_stream(ref_tok: Tokenizer, texts: Sequence[str]) -> tuple[list[int], list[int]]:
    """Token stream and position ids of one pass: [EOS] + ids(doc) per non-empty document."""
    tokens: list[int] = []
    positions: list[int] = []
    for text in texts:
        if not text:
            continue
        ids = [EOS] + ref_ids(ref_tok, text)
        tokens += ids
        positions += list(range(len(ids)))
    return tokens, positions


WORDS = ("the union is strong and congress shall make no law respecting liberty commerce treaty "
         "naïve café 日本 🙂 <|endoftext|> revenue navy").split()


def make_docs(n: int, prefix: str = "doc") -> list[dict[str, object]]:
    """Documents of varied length (a few tokens up to ~5 rows), each starting with a unique tag."""
    docs = []
    for i in range(n):
        length = [3, 40, 7, 1, 22, 70, 12, 5][i % 8]
        body = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(length))
        docs.append({"id": f"{prefix}-{i}", "text": f"[{prefix} {i}] {body}."})
    return docs


def write_jsonl(path: Path, rows: Sequence[dict[str, object]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def fixture_config(tmp_path: Path, train_docs, val_docs=None, n_files: int = 1, **kw) -> DataConfig:
    """Train docs split round-robin-free into `n_files` consecutive files."""
    per = math.ceil(len(train_docs) / n_files)
    files = [write_jsonl(tmp_path / f"train-{k:02d}.jsonl", train_docs[k * per:(k + 1) * per]) for k in range(n_files)]
    val = write_jsonl(tmp_path / "val.jsonl.gz", val_docs if val_docs is not None else make_docs(9, "val"))
    return DataConfig(name="fixture", format="json", train_files=files, validation_files=[val],
                      tokenizer=str(TOKENIZER_DIR), seq_len=kw.pop("seq_len", SEQ), **kw)


def take_rows(stream: PackedStream, n_batches: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(input rows, label rows, position rows) of `n_batches` batches, checking dtypes and shapes."""
    inputs, labels, positions = [], [], []
    for _ in range(n_batches):
        batch = next(stream)
        for key in ("input_ids", "labels", "position_ids"):
            assert batch[key].dtype == torch.long and batch[key].shape == (stream.batch_size, stream.cfg.seq_len)
        inputs += batch["input_ids"].tolist()
        labels += batch["labels"].tolist()
        positions += batch["position_ids"].tolist()
    return inputs, labels, positions


def unpack(inputs: list[list[int]], labels: list[list[int]]) -> list[int]:
    """Token stream from rows, dropping the one-token overlaps (asserting that they overlap)."""
    stream = list(inputs[0]) + [labels[0][-1]]
    for k in range(1, len(inputs)):
        assert inputs[k][0] == labels[k - 1][-1], f"row {k} does not start with row {k - 1}'s last token"
        stream += labels[k]
    return stream


def split_docs(tokens: list[int]) -> list[list[int]]:
    """Complete documents (EOS ... up to the next EOS) of a token stream; a trailing partial one is dropped."""
    starts = [i for i, t in enumerate(tokens) if t == EOS]
    return [tokens[a + 1:b] for a, b in zip(starts, starts[1:])]


# ------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------
def test_packing_matches_reference_over_three_epochs(tmp_path, ref_tok, hf_tok):
    docs = make_docs(13) + [{"id": "empty", "text": ""}]
    cfg = fixture_config(tmp_path, docs)
    ref_tokens, ref_pos = ref_stream(ref_tok, [d["text"] for d in docs])
    epochs = 3
    ref_tokens, ref_pos = ref_tokens * epochs, ref_pos * epochs
    n_rows = (len(ref_tokens) - 1) // SEQ
    batch = 3
    stream = PackedStream(cfg, hf_tok, batch_size=batch)
    inputs, labels, positions = take_rows(stream, n_rows // batch)
    assert stream.epoch == epochs - 1

    assert unpack(inputs, labels) == ref_tokens[: len(inputs) * SEQ + 1]
    for k, (inp, lab, pos) in enumerate(zip(inputs, labels, positions)):
        assert inp == ref_tokens[k * SEQ:(k + 1) * SEQ]
        assert lab == ref_tokens[k * SEQ + 1:(k + 1) * SEQ + 1]  # labels = inputs shifted by one
        assert lab[:-1] == inp[1:]
        assert pos == ref_pos[k * SEQ:(k + 1) * SEQ]
        assert [p == 0 for p in pos] == [t == EOS for t in inp]  # positions restart exactly at EOS
    # a long document continues across rows and keeps counting
    assert max(max(p) for p in positions) > 2 * SEQ
    # the literal "<|endoftext|>" inside documents did not become an EOS id
    assert sum(t == EOS for t in ref_tokens) == epochs * 13


def test_exclude_filter_drops_documents(tmp_path, ref_tok, hf_tok):
    docs = make_docs(10)
    for i, d in enumerate(docs):
        d["meta"] = {"set_name": "RedPajamaBookSub" if i % 3 == 0 else "RedPajamaC4"}
    cfg = fixture_config(tmp_path, docs, exclude_field="meta.set_name", exclude_values=["RedPajamaBookSub"])
    kept = [d["text"] for i, d in enumerate(docs) if i % 3 != 0]
    ref_tokens, _ = ref_stream(ref_tok, kept)
    inputs, labels, _ = take_rows(PackedStream(cfg, hf_tok, batch_size=1), (len(ref_tokens) - 1) // SEQ)
    assert unpack(inputs, labels) == ref_tokens[: len(inputs) * SEQ + 1]


# ------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_resume_is_token_exact_across_epochs(tmp_path, ref_tok, hf_tok, shuffle_buffer):
    docs = make_docs(11)
    cfg = fixture_config(tmp_path, docs, n_files=2, shuffle_buffer=shuffle_buffer, seed=3)
    epoch_tokens = len(ref_stream(ref_tok, [d["text"] for d in docs])[0])
    batch = 2
    total = (3 * epoch_tokens) // (SEQ * batch)  # about three epochs
    boundary = epoch_tokens // (SEQ * batch)  # the batch in which epoch 1 starts
    full = PackedStream(cfg, hf_tok, batch_size=batch)
    want_in, want_lab, want_pos = take_rows(full, total)
    want = unpack(want_in, want_lab)

    if shuffle_buffer == 0:  # file order: the uninterrupted stream itself equals the reference
        ref_tokens, _ = ref_stream(ref_tok, [d["text"] for d in docs] * 3)
        assert want == ref_tokens[: len(want)]
    else:  # each epoch is a permutation of the documents, not the file order
        doc_ids = [ref_ids(ref_tok, d["text"]) for d in docs]
        seen = split_docs(want)[: 2 * len(docs)]
        for e in range(2):
            epoch_docs = seen[e * len(docs):(e + 1) * len(docs)]
            assert sorted(epoch_docs) == sorted(doc_ids)
            assert epoch_docs != doc_ids

    for k in (1, boundary, boundary + 1, 2 * boundary + 1):
        first = PackedStream(cfg, hf_tok, batch_size=batch)
        got_in, got_lab, got_pos = take_rows(first, k)
        state = first.state_dict()
        saved = json.dumps(state)
        take_rows(first, 2)  # keep going: the saved state must not change underneath
        assert json.dumps(state) == saved
        resumed = PackedStream(cfg, hf_tok, batch_size=batch)
        resumed.load_state_dict(json.loads(saved))
        more_in, more_lab, more_pos = take_rows(resumed, total - k)
        assert unpack(got_in + more_in, got_lab + more_lab) == want, f"resume after {k} batches"
        assert got_pos + more_pos == want_pos


def test_resume_rejects_other_world_size(tmp_path, hf_tok):
    cfg = fixture_config(tmp_path, make_docs(6), n_files=2)
    s = PackedStream(cfg, hf_tok, batch_size=1, rank=0, world_size=2)
    next(s)
    other = PackedStream(cfg, hf_tok, batch_size=1, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="world_size"):
        other.load_state_dict(s.state_dict())


# ------------------------------------------------------------------------------------------------
# sharding
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_files", [1, 2, 3])
def test_two_ranks_cover_every_document_once(tmp_path, ref_tok, hf_tok, n_files):
    docs = make_docs(15)
    cfg = fixture_config(tmp_path, docs, n_files=n_files)
    all_ids = [ref_ids(ref_tok, d["text"]) for d in docs]
    total_tokens = len(ref_stream(ref_tok, [d["text"] for d in docs])[0])
    per_rank: list[list[str]] = []
    for rank in range(2):
        stream = PackedStream(cfg, hf_tok, batch_size=1, rank=rank, world_size=2)
        inputs, labels, _ = take_rows(stream, total_tokens // SEQ + 8)  # > one epoch of this rank
        rank_docs = split_docs(unpack(inputs, labels))
        first_epoch = rank_docs[: next(i for i in range(1, len(rank_docs)) if rank_docs[i] in rank_docs[:i])]
        assert len(set(map(tuple, first_epoch))) == len(first_epoch)
        per_rank.append([ref_tok.decode(d) for d in first_epoch])
    texts = [d["text"] for d in docs]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(texts)  # together: every document exactly once
    assert not set(per_rank[0]) & set(per_rank[1])
    assert all(len(r) >= 4 for r in per_rank)
    assert sorted(all_ids) == sorted(ref_ids(ref_tok, t) for t in per_rank[0] + per_rank[1])


def test_sotu_two_ranks_start_with_their_documents(monkeypatch, tmp_path, ref_tok, hf_tok):
    """The embedded corpus, default config (relative paths, from another cwd): one file, so the
    ranks take every other speech; each rank's first row is its first speech."""
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(seq_len=64)
    with gzip.open(REPO_ROOT / "data" / "sotu" / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        speeches = [json.loads(next(f)) for _ in range(2)]
    for rank in range(2):
        inputs, labels, positions = take_rows(PackedStream(cfg, hf_tok, batch_size=2, rank=rank, world_size=2), 1)
        expected = [EOS] + ref_ids(ref_tok, speeches[rank]["text"])
        assert unpack(inputs, labels) == expected[: 2 * 64 + 1]
        assert positions[1] == list(range(64, 128))


# ------------------------------------------------------------------------------------------------
# validation data
# ------------------------------------------------------------------------------------------------
def test_validation_batches_match_reference_and_split_across_ranks(tmp_path, ref_tok, hf_tok):
    val_docs = make_docs(9, "val")
    cfg = fixture_config(tmp_path, make_docs(4), val_docs, validation_rows=7)
    ref_tokens, ref_pos = ref_stream(ref_tok, [d["text"] for d in val_docs])
    assert (len(ref_tokens) - 1) // SEQ > 7  # the cap applies

    def rows_of(batches):
        return tuple([r for b in batches for r in b[key].tolist()] for key in ("input_ids", "labels", "position_ids"))

    one = validation_batches(cfg, hf_tok, batch_size=3, rank=0, world_size=1)
    assert [b["input_ids"].shape[0] for b in one] == [3, 3, 1]
    inputs, labels, positions = rows_of(one)
    assert unpack(inputs, labels) == ref_tokens[: 7 * SEQ + 1]
    assert positions == [ref_pos[k * SEQ:(k + 1) * SEQ] for k in range(7)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(one, validation_batches(cfg, hf_tok, 3)) for k in a)

    # 2 ranks: 7 rows -> 6 usable, dealt round-robin; same number of rows on each rank
    for rank in range(2):
        inputs, labels, _ = rows_of(validation_batches(cfg, hf_tok, batch_size=2, rank=rank, world_size=2))
        assert inputs == [ref_tokens[k * SEQ:(k + 1) * SEQ] for k in range(rank, 6, 2)]
        assert labels == [ref_tokens[k * SEQ + 1:(k + 1) * SEQ + 1] for k in range(rank, 6, 2)]


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_missing_file_names_the_file(tmp_path, hf_tok):
    cfg = fixture_config(tmp_path, make_docs(3))
    cfg.train_files = cfg.train_files + [str(tmp_path / "no_such_shard.jsonl")]
    with pytest.raises(ConfigError) as err:
        PackedStream(cfg, hf_tok, batch_size=1)
    msg = str(err.value)
    assert "no_such_shard.jsonl" in msg and "train_files" in msg and "\n" not in msg

    cfg = fixture_config(tmp_path, make_docs(3))
    cfg.validation_files = ["nowhere/val-*.jsonl.gz"]  # relative glob, resolved against the current directory
    with pytest.raises(ConfigError, match=r"data.validation_files: glob 'nowhere/val-\*\.jsonl\.gz' matches no file"):
        cfg.check()


@pytest.mark.parametrize("key,value", [("seq_len", 0), ("seq_len", -5), ("format", "csv"), ("shuffle_buffer", -1)])
def test_bad_values_name_the_key(tmp_path, key, value):
    cfg = fixture_config(tmp_path, make_docs(3))
    setattr(cfg, key, value)
    with pytest.raises(ConfigError) as err:
        PackedStream(cfg, tokenizer=None, batch_size=1)  # fails before the tokenizer is loaded
    assert key in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_and_missing_text_field(tmp_path, hf_tok):
    with pytest.raises(ConfigError, match="data.seqlen: unknown key"):
        DataConfig.from_dict({"name": "x", "seqlen": 8})
    cfg = fixture_config(tmp_path, make_docs(3), text_field="content")
    with pytest.raises(ConfigError, match=r"text_field: \S+train-00.jsonl line 1 has no field 'content' "
                                          r"\(fields: id, text\)$"):
        next(PackedStream(cfg, hf_tok, batch_size=1))


def _parquet_bytes(tmp_path: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a parquet document"] * 4}), tmp_path / "p.parquet")
    return (tmp_path / "p.parquet").read_bytes()


BAD_FILES = {  # file name, format, content (bytes or a function of tmp_path), expected cause
    "empty": ("x.jsonl", "json", b"", r"is empty$"),
    "empty gzip": ("x.jsonl.gz", "json", gzip.compress(b""), r"is empty \(no bytes after decompression\)$"),
    "latin-1": ("x.jsonl", "json", b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
                r"is not UTF-8 text \(line 2, byte 28: invalid continuation byte\); convert it to UTF-8$"),
    "parquet read as json": ("x.parquet", "json", _parquet_bytes, r"is a parquet file, but data.format=json"),
    "parquet read as text": ("x.parquet", "text", _parquet_bytes, r"is a parquet file, but data.format=text"),
    "jsonl read as parquet": ("x.jsonl", "parquet", b'{"text": "a"}\n',
                              r"is not a parquet file \(no PAR1 magic bytes\), but data.format=parquet"),
    "plain text read as json": ("x.txt", "json", b"just some text\n", r"is not JSON lines"),
}


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_file_fails_with_one_line_naming_file_and_cause(tmp_path, hf_tok, case, split):
    """Each bad file, as the train or the validation file, stops with one ConfigError line that names the
    file and says what is wrong, before any training (the reader's StopIteration / UnicodeDecodeError /
    ArrowInvalid name neither). Mutation: drop the ``file_problem`` call in ``resolve_data_files`` -> the
    empty / parquet / latin-1 cases fail (the reader's error, or no error for a parquet file read as text)."""
    name, fmt, content, cause = BAD_FILES[case]
    bad = tmp_path / "bad" / name
    bad.parent.mkdir()
    bad.write_bytes(content(tmp_path) if callable(content) else content)
    good = write_jsonl(tmp_path / "good.jsonl", make_docs(6))
    if fmt == "parquet":
        good = str(tmp_path / "good.parquet")
        Path(good).write_bytes(_parquet_bytes(tmp_path))
    files = {"train_files": [good], "validation_files": [good], f"{split}_files": [str(bad)]}
    cfg = DataConfig(name="bad", format=fmt, tokenizer=str(TOKENIZER_DIR), seq_len=SEQ, **files)
    with pytest.raises(ConfigError) as err:
        if split == "train":
            next(PackedStream(cfg, hf_tok, batch_size=1))
        else:
            validation_batches(cfg, hf_tok, batch_size=1)
    msg = str(err.value)
    assert msg.startswith(f"data.{split}_files: {bad} "), msg
    assert re.search(cause, msg) and "\n" not in msg, msg


def test_directory_as_data_file_says_it_is_a_directory(tmp_path, hf_tok):
    """Mutation: drop the ``os.path.isdir`` branch of ``resolve_data_files`` -> "data file not found" -> fails."""
    cfg = fixture_config(tmp_path, make_docs(3))
    cfg.train_files = [str(tmp_path)]
    with pytest.raises(ConfigError, match=rf"data.train_files: '{re.escape(str(tmp_path))}' is a directory, not a data "
                                          r"file \(list its files"):
        PackedStream(cfg, hf_tok, batch_size=1)


FILLER = [{"text": f"document {i} " + "word " * 60} for i in range(300)]  # > 64 KiB: past the first-bytes checks


@pytest.mark.parametrize("bad_line, cause", [
    (b'{"text": "caf\xe9"}', r"is not UTF-8 text \(line 301, byte \d+: invalid continuation byte\)"),
    (b'{"text": "unclosed"', r"line 301 is not valid JSON"),
    (b'{"content": "no text field"}', r"line 301 has no field 'text' \(fields: content\)"),
])
def test_error_deep_inside_a_file_names_file_and_line(tmp_path, hf_tok, bad_line, cause):
    """An error the reader raises lazily, deep in the second train file (beyond what the first-bytes checks
    read), is reported as one line naming that file and the line. Mutation: in ``DocumentSource._pull``
    let the reader's exception through (no ``reading_error``) -> UnicodeDecodeError / ArrowInvalid -> fails."""
    first = write_jsonl(tmp_path / "first.jsonl", make_docs(4))
    second = tmp_path / "second.jsonl"
    write_jsonl(second, FILLER)
    with open(second, "ab") as f:
        f.write(bad_line + b"\n")
    assert second.stat().st_size > 64 << 10
    cfg = DataConfig(name="deep", format="json", train_files=[first, str(second)], validation_files=[first],
                     tokenizer=str(TOKENIZER_DIR), seq_len=256)
    stream = PackedStream(cfg, hf_tok, batch_size=8)
    with pytest.raises(ConfigError) as err:
        for _ in range(100):
            next(stream)
    msg = str(err.value)
    assert str(second) in msg and re.search(cause, msg) and "\n" not in msg, msg


@pytest.mark.slow
def test_train_py_reports_a_lazy_data_error_as_one_line(tmp_path):
    """Through train.py: a validation file whose bad bytes lie past the first-bytes checks (so the reader
    fails inside the stream, while train.py builds its validation batches) gives ``error: ...`` naming
    the file, exit 2 and no traceback. Mutation: remove ``ConfigError`` from train.py's ``except`` -> a
    traceback, exit 1 -> fails."""
    import subprocess
    import sys

    val = tmp_path / "val.jsonl"
    write_jsonl(val, FILLER)
    with open(val, "ab") as f:
        f.write(b'{"text": "caf\xe9"}\n')
    overrides = ["model.config.hidden_size=32", "model.config.num_hidden_layers=1", "data.seq_len=32",
                 "data.validation_rows=null", f"data.validation_files=[{val}]", "trainer.max_steps=2",
                 "trainer.warmup_steps=1", "trainer.batch_size=2", f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *overrides], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    byte = val.stat().st_size - 4
    assert errors == [f"error: data.validation_files: {val} is not UTF-8 text (line 301, byte {byte}: "
                      f"invalid continuation byte); convert it to UTF-8"], proc.stderr[-3000:]


def test_hub_call_is_built_offline():
    cfg = DataConfig.from_dict({
        "name": "slimpajama", "format": "hub", "hub_path": "DKYoon/SlimPajama-6B", "train_split": "train",
        "validation_split": "validation", "validation_rows": 512,
        "exclude_field": "meta.redpajama_set_name", "exclude_values": "RedPajamaBookSub",
    })
    assert cfg.exclude_values == ["RedPajamaBookSub"]
    assert load_dataset_call(cfg, "train") == (("DKYoon/SlimPajama-6B", None), {"split": "train", "streaming": True})
    assert load_dataset_call(cfg, "validation")[1]["split"] == "validation"
    with pytest.raises(ConfigError, match="validation_rows"):
        DataConfig(format="hub", hub_path="x/y", validation_rows=None).check()


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------
def test_token_byte_lengths_sum_to_utf8_length(ref_tok, hf_tok):
    lengths = token_byte_lengths(hf_tok)
    assert lengths.dtype == torch.long and lengths.shape == (50257,)
    assert lengths[EOS] == 0 and bool((lengths[:EOS] >= 1).all())
    texts = [
        "Hello world", "naïve café — déjà vu", "日本語のテキストです。", "emoji 🙂👍🏽 family 👩‍👩‍👧",
        "tabs\tand\nnewlines  \n", "Ελληνικά и русский текст", "a literal <|endoftext|> in text", " ̈combining",
    ]
    for text in texts:
        ids = ref_ids(ref_tok, text)
        assert int(lengths[ids].sum()) == len(text.encode("utf-8")), text
        assert int(lengths[[EOS] + ids + [EOS]].sum()) == len(text.encode("utf-8"))


def test_unigram_perplexity_matches_hand_computation(tmp_path, ref_tok, hf_tok):
    train_docs, val_docs = make_docs(6), make_docs(5, "val")
    cfg = fixture_config(tmp_path, train_docs, val_docs)
    train_tokens, _ = ref_stream(ref_tok, [d["text"] for d in train_docs])
    val_tokens, _ = ref_stream(ref_tok, [d["text"] for d in val_docs])
    targets = val_tokens[1: 1 + ((len(val_tokens) - 1) // SEQ) * SEQ]  # the labels of the validation rows
    counts, n, v = Counter(train_tokens), len(train_tokens), 50257
    expected = math.exp(-sum(math.log((counts[t] + 1) / (n + v)) for t in targets) / len(targets))
    assert unigram_perplexity(cfg, hf_tok, "validation") == pytest.approx(expected, rel=1e-9)
