"""Streaming data pipeline: config, loading, tokenization, packing, sharding, exact resume.

What is special here:

* **Config first, heavy work second.** ``DataConfig.check()`` (:mod:`training.config`) runs before
  any dataset or tokenizer is opened and raises :class:`ConfigError` with a one-line message naming
  the offending key or file (a missing data file names the file or glob).
* **Everything streams** through ``datasets.load_dataset(..., streaming=True)``: local
  json/jsonl(.gz), parquet and text files, or a hub dataset. Relative paths are relative to the
  current directory.
* **Documents** become ``[EOS] + tokens(text)`` (see :mod:`data.packing`). Text is encoded
  with ``split_special_tokens=True``: a literal ``"<|endoftext|>"`` inside a document is
  ordinary text, so EOS ids occur only at real document starts. Documents whose text is empty
  (or ``None``) are skipped. An optional generic filter drops documents whose field
  ``exclude_field`` (dotted path, e.g. ``meta.redpajama_set_name``) has a value in
  ``exclude_values`` (compared as strings).
* **Sharding:** ``datasets.distributed.split_dataset_by_node`` per rank; by shard (file) when
  the number of shards is divisible by ``world_size``, otherwise every ``world_size``-th example.
* **Exact resume:** ``PackedStream.state_dict()`` = the HF IterableDataset's own ``state_dict()``
  taken right after the last document pulled from it + the document shuffle buffer and its RNG
  state + the packer's leftover tokens + epoch counters. Resuming continues with the next
  unseen token, also across epoch boundaries and with shuffling on. All state is JSON-serialisable.
* **Shuffling** is our own document-level buffer (``shuffle_buffer`` documents, seeded by
  ``seed``/rank/epoch) because HF's ``.shuffle(buffer_size=...)`` loses its buffer on resume.
  Its buffer (raw texts) is part of the state, so checkpoints grow with ``shuffle_buffer``.
  Across epochs the shard (file) order is additionally reshuffled by HF itself
  (``set_epoch`` is called at every epoch start; this also avoids the HF gotcha that a loaded
  state would otherwise be re-applied to every later pass).
* **Bad data fails with one line** (:class:`ConfigError`) naming the file and the cause: a directory
  or an empty file among the data files, a parquet file read as json/text or the reverse, text that is
  not UTF-8 or not JSON lines, a missing text field. Cheap checks of each local file's first 64 KiB run
  when the split is opened; an error raised later by the reader (deep inside a file) is turned into
  the same kind of line by scanning the split's files for the first offending line.
* **Single process, deterministic**: no DataLoader workers (tokenizing GPT-2 runs at ~0.4-0.6 M tokens per CPU-second).
* **Validation** rows are made from the whole (capped) validation stream, identically on every
  rank, and then dealt out round-robin; the global set of rows does not depend on the
  world size except that it is truncated to a multiple of it (so all ranks run the same number
  of forward passes, which ZeRO-3 needs).
"""
from __future__ import annotations

import bz2
import codecs
import copy
import glob as globlib
import gzip
import json
import logging
import lzma
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from training.common import ConfigError
from training.config import DataConfig

from .packing import Row, TokenPacker, collate_rows

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


SPLITS = ("train", "validation")
STATE_VERSION = 1

Batch = dict[str, torch.Tensor]


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def resolve_path(path: str) -> str:
    """Expand ``~`` and make a relative path absolute (relative to the current directory); URLs pass through."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve_data_files(patterns: Sequence[str], key: str = "files", fmt: str | None = None) -> list[str]:
    """Expand paths/globs (sorted per pattern, order of patterns kept, duplicates dropped).

    Raises :class:`ConfigError` naming the first path or glob that matches no file, a directory, an empty
    file, and (given the data ``fmt``) a file whose first bytes do not fit it (:func:`file_problem`).
    Remote URLs (``scheme://``) are passed through unchecked."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for pattern in patterns:
        resolved = resolve_path(str(pattern))
        if "://" in resolved:
            matches = [resolved]
        elif globlib.has_magic(resolved):
            matches = sorted(p for p in globlib.glob(resolved, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"{key}: glob '{pattern}' matches no file (resolved to {resolved})")
        elif os.path.isdir(resolved):
            raise ConfigError(f"{key}: '{pattern}' is a directory, not a data file (list its files, "
                              f"e.g. '{os.path.join(str(pattern), '*.jsonl')}')")
        else:
            if not os.path.isfile(resolved):
                raise ConfigError(f"{key}: data file not found: '{pattern}' (resolved to {resolved})")
            matches = [resolved]
        for match in matches:
            if match in out:
                continue
            problem = None if "://" in match else file_problem(match, fmt)
            if problem:
                raise ConfigError(f"{key}: {match} {problem}")
            out.append(match)
    return out


HEAD_BYTES = 64 << 10
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_PARQUET_MAGIC = b"PAR1"
NEWLINE = b"\n"


def _open_text_bytes(path: str):
    """The file's decompressed bytes (gzip, bzip2, xz by extension), or None for another compression."""
    ext = os.path.splitext(path)[1]
    if ext in (".zst", ".lz4", ".zip"):
        return None
    return _OPENERS.get(ext, open)(path, "rb")


def file_problem(path: str, fmt: str | None = None) -> str | None:
    """What is wrong with local data file ``path`` judged by its first bytes (None: nothing seen), as the end of
    a sentence that starts with the path: empty; for ``fmt`` "parquet", no parquet magic; for "json" / "text",
    a parquet file, undecodable compression or not UTF-8; for "json", not a JSON object or array first."""
    with open(path, "rb") as f:
        raw = f.read(len(_PARQUET_MAGIC))
    if not raw:
        return "is empty"
    is_parquet = raw == _PARQUET_MAGIC
    if fmt == "parquet":
        return None if is_parquet else ("is not a parquet file (no PAR1 magic bytes), but data.format=parquet; "
                                        "json/jsonl files need data.format=json")
    if is_parquet and fmt is not None:
        return f"is a parquet file, but data.format={fmt}; set data.format=parquet"
    opened = _open_text_bytes(path)
    if opened is None:
        return None
    try:
        with opened as f:
            head = f.read(HEAD_BYTES)
    except (OSError, EOFError, lzma.LZMAError) as err:
        return f"cannot be decompressed ({type(err).__name__}: {err})"
    if not head:
        return "is empty (no bytes after decompression)"
    if fmt in ("json", "text"):
        where = _invalid_utf8(head, final=len(head) < HEAD_BYTES)
        if where:
            return f"is not UTF-8 text ({where}); convert it to UTF-8"
    if fmt == "json":
        first = head.lstrip(codecs.BOM_UTF8).lstrip()[:1]
        if first not in (b"{", b"["):
            return (f"is not JSON lines (it starts with {head.lstrip()[:20]!r}); data.format=json reads one JSON "
                    f"object per line (plain text needs data.format=text)")
    return None


def _invalid_utf8(data: bytes, final: bool = True, offset: int = 0, line: int = 1) -> str | None:
    """Where ``data`` stops being UTF-8 ("line L, byte B"), or None (a character cut at the end of a
    non-``final`` block is not an error)."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
        return None
    except UnicodeDecodeError as err:
        return f"line {line + data.count(NEWLINE, 0, err.start)}, byte {offset + err.start}: {err.reason}"


def _scan_utf8(path: str) -> str | None:
    """The first place where a (decompressed) file is not UTF-8, or None."""
    opened = _open_text_bytes(path)
    if opened is None:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with opened as f:
        while block := f.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError:
                return _invalid_utf8(block, final=False, offset=offset, line=line) or f"byte {offset}"
            offset += len(block)
            line += block.count(NEWLINE)
    return None


def _scan_json(path: str, fields: Sequence[str]) -> str | None:
    """The first line of a JSON-lines file that is not JSON or lacks one of ``fields`` (dotted), or None."""
    opened = _open_text_bytes(path)
    if opened is None:
        return None
    with opened as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                return f"line {number} is not valid JSON ({getattr(err, 'msg', err)})"
            for dotted in fields:
                if _get_field(record, dotted) is _MISSING:
                    keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                    return f"line {number} has no field '{dotted}' (fields: {keys})"
    return None


def _scan_parquet(path: str, fields: Sequence[str]) -> str | None:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        return f"is not a readable parquet file ({_first_line(err)})"
    for dotted in fields:
        if dotted.split(".")[0] not in schema.names:
            return f"has no column '{dotted.split('.')[0]}' (columns: {', '.join(schema.names)})"
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class MissingField(KeyError):
    """An example without the configured text (or exclude) field."""

    def __init__(self, key: str, dotted: str, fields: Sequence[str]) -> None:
        super().__init__(dotted)
        self.key, self.dotted, self.fields = key, dotted, list(fields)


def reading_error(cfg: DataConfig, split: str, err: BaseException) -> ConfigError:
    """One line naming the file and the cause of ``err``, raised while reading ``split``.

    The reader's exceptions rarely say which file failed, so the split's local files are scanned for the
    first one with a problem of ``err``'s kind: the first-bytes checks, then text that is not UTF-8, then
    (json / parquet) a record that is not JSON or lacks the configured field. This reads the data once more,
    but only on the way to stopping the run."""
    fields = [cfg.text_field] + ([cfg.exclude_field] if cfg.exclude_field else [])
    if isinstance(err, MissingField):
        fields, cause = [err.dotted], (f"field '{err.dotted}' not found in a {split} example "
                                       f"(fields: {', '.join(map(str, err.fields))})")
    else:
        cause = _first_line(err)
    key = err.key if isinstance(err, MissingField) else f"data.{split}_files"
    if cfg.format == "hub":
        return ConfigError(f"{key}: reading {cfg.hub_path} (split {split}) failed: {cause}")
    files = resolve_data_files(cfg.files(split), key=key, fmt=cfg.format)  # raises for the cheap cases
    for path in files:
        problem = None
        if cfg.format in ("json", "text") and not isinstance(err, MissingField):
            where = _scan_utf8(path)
            problem = f"is not UTF-8 text ({where}); convert it to UTF-8" if where else None
        if problem is None and cfg.format == "json":
            problem = _scan_json(path, fields)
        if problem is None and cfg.format == "parquet":
            problem = _scan_parquet(path, fields)
        if problem:
            return ConfigError(f"{key}: {path} {problem}")
    where = files[0] if len(files) == 1 else f"one of {len(files)} files ({files[0]}, ...)"
    return ConfigError(f"{key}: reading {where} failed: {cause}")


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------
def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` on a local directory (relative to the current directory) or, if
    no such directory exists and the string does not look like a path, a hub name. ``trust_remote_code``:
    for a model export, whose config's ``auto_map`` AutoTokenizer reads (without it, it asks on stdin)."""
    from transformers import AutoTokenizer

    local = Path(resolve_path(name_or_path))
    looks_like_path = name_or_path.startswith((".", "/", "~")) or (os.sep in name_or_path and local.parent.exists())
    if local.is_dir():
        source = str(local)
    elif looks_like_path and not local.exists():
        raise ConfigError(f"tokenizer: directory not found: '{name_or_path}' (resolved to {local})")
    else:
        source = name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # offline hub lookups raise OSError with multi-line text
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"tokenizer: could not load '{name_or_path}': {type(exc).__name__}: {first}") from exc
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer: '{name_or_path}' has no eos token (needed as document separator)")
    return tokenizer


def encode_document(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of one document, without special tokens; special-token strings in the text are
    encoded as ordinary text (so EOS never occurs inside a document)."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def load_dataset_call(cfg: DataConfig, split: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments for ``datasets.load_dataset`` for one split
    (separate so the hub call can be checked offline)."""
    if split not in SPLITS:
        raise ConfigError(f"data config '{cfg.name}': unknown split '{split}'")
    if not cfg.has_split(split):
        key = ("validation_split" if cfg.format == "hub" else "validation_files") if split == "validation" else (
            "train_split" if cfg.format == "hub" else "train_files")
        raise ConfigError(f"data config '{cfg.name}': no {split} data ({key} is empty)")
    kwargs: dict[str, Any] = dict(cfg.load_kwargs)
    kwargs["streaming"] = True
    if cfg.format == "hub":
        kwargs["split"] = cfg.train_split if split == "train" else cfg.validation_split
        return (cfg.hub_path, cfg.hub_name), kwargs
    files = resolve_data_files(cfg.files(split), key=f"data.{split}_files", fmt=cfg.format)
    kwargs["data_files"] = {split: files}
    kwargs["split"] = split
    return (cfg.format,), kwargs


def open_split(cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1):
    """A streaming ``datasets.IterableDataset`` of one split, restricted to ``rank``'s part."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    args, kwargs = load_dataset_call(cfg, split)
    try:  # streaming still reads the first file here (to infer the schema)
        ds = datasets.load_dataset(*args, **kwargs)
    except Exception as err:
        raise reading_error(cfg, split, err) from err
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds


_MISSING = object()


def _get_field(example: Mapping[str, Any], dotted: str) -> Any:
    """``example["a"]["b"]`` for ``dotted="a.b"``, or ``_MISSING``."""
    value: Any = example
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


class DocumentSource:
    """Document texts of one split for one rank, epoch after epoch, with exact, plain-Python state.

    ``next_text()`` returns the next document text; at the end of an epoch it starts the next
    one (``repeat=True``) or returns ``None`` (``repeat=False``)."""

    def __init__(self, cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1,
                 repeat: bool = True, shuffle_buffer: int = 0) -> None:
        self.cfg = cfg
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.repeat = repeat
        self.shuffle_buffer = shuffle_buffer
        self._dataset = open_split(cfg, split, rank, world_size)
        self._exclude = {str(v) for v in cfg.exclude_values} if cfg.exclude_field else set()
        self.epoch = 0
        self.docs_in_epoch = 0  # documents handed out in the current epoch
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._hf_state: dict[str, Any] | None = None  # HF state after the last pulled example
        self._exhausted = False  # HF iterator ran out in this epoch (shuffle buffer still draining)
        self._buffer: list[str] = []
        self._rng = self._new_rng()

    def _new_rng(self) -> random.Random:
        return random.Random(f"pararnn-shuffle:{self.cfg.seed}:{self.rank}:{self.world_size}:{self.epoch}")

    def _pull(self) -> str | None:
        """Next kept text from the HF iterator, or None when this epoch's data is exhausted."""
        if self._iterator is None:
            self._dataset.set_epoch(self.epoch)
            # None clears a previously loaded state (HF would otherwise re-apply it)
            self._dataset.load_state_dict(self._hf_state)  # type: ignore[arg-type]
            self._iterator = iter(self._dataset)
        while True:
            try:
                example = next(self._iterator)
            except StopIteration:
                return None
            except Exception as err:  # the reader's own errors (encoding, parsing) do not name the file
                raise reading_error(self.cfg, self.split, err) from err
            self._hf_state = self._dataset.state_dict()
            if self.cfg.exclude_field:
                value = self._field(example, self.cfg.exclude_field, "exclude_field")
                if str(value) in self._exclude:
                    continue
            text = self._field(example, self.cfg.text_field, "text_field")
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise ConfigError(f"text_field: '{self.cfg.text_field}' is {type(text).__name__}, not a string")
            return text

    def _field(self, example: Mapping[str, Any], dotted: str, key: str) -> Any:
        value = _get_field(example, dotted)
        if value is _MISSING:
            raise reading_error(self.cfg, self.split, MissingField(key, dotted, list(example)))
        return value

    def next_text(self) -> str | None:
        while True:
            text: str | None = None
            if self.shuffle_buffer <= 0:
                text = self._pull()
            else:
                while not self._exhausted and len(self._buffer) < self.shuffle_buffer:
                    pulled = self._pull()
                    if pulled is None:
                        self._exhausted = True
                    else:
                        self._buffer.append(pulled)
                if self._buffer:
                    i = self._rng.randrange(len(self._buffer))
                    self._buffer[i], self._buffer[-1] = self._buffer[-1], self._buffer[i]
                    text = self._buffer.pop()
            if text is not None:
                self.docs_in_epoch += 1
                return text
            # end of epoch
            if self.docs_in_epoch == 0:
                files = "" if self.cfg.format == "hub" else f" ({', '.join(self.cfg.files(self.split))})"
                raise ConfigError(
                    f"{self.split}_files: the {self.split} split{files} has no documents for rank {self.rank} of "
                    f"{self.world_size} (no non-empty '{self.cfg.text_field}', everything filtered, or more ranks "
                    f"than documents)"
                )
            if not self.repeat:
                return None
            self.epoch += 1
            self.docs_in_epoch = 0
            self._iterator = None
            self._hf_state = None
            self._exhausted = False
            self._rng = self._new_rng()
            log.info("data '%s' rank %d: starting epoch %d", self.cfg.name, self.rank, self.epoch)

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {
            "epoch": self.epoch,
            "docs_in_epoch": self.docs_in_epoch,
            "hf_state": copy.deepcopy(self._hf_state),
            "exhausted": self._exhausted,
            "shuffle_buffer": list(self._buffer),
            "rng_state": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.docs_in_epoch = int(state["docs_in_epoch"])
        self._hf_state = copy.deepcopy(state["hf_state"])
        self._exhausted = bool(state["exhausted"])
        self._buffer = list(state["shuffle_buffer"])
        version, internal, gauss = state["rng_state"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._iterator = None  # reopened lazily at the loaded position


# ------------------------------------------------------------------------------------------------
# Training stream
# ------------------------------------------------------------------------------------------------
class PackedStream:
    """Endless iterator of training batches for one rank, resumable token-exactly.

    Each batch is a dict of LongTensors [batch_size, seq_len]: ``input_ids``, ``labels``
    (= inputs shifted by one), ``position_ids`` (restart at 0 on each document's EOS).

    ``state_dict()`` describes the position *after the last batch returned*; a fresh stream
    with ``load_state_dict(state)`` continues with the next unseen token.
    """

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None = None,
                 batch_size: int = 1, rank: int = 0, world_size: int = 1) -> None:
        cfg.check()
        if not _is_positive_int(batch_size):
            raise ConfigError(f"batch_size must be a positive integer; got batch_size={batch_size!r}")
        if not (_is_positive_int(world_size) and isinstance(rank, int) and 0 <= rank < world_size):
            raise ConfigError(f"rank/world_size: need 0 <= rank < world_size; "
                          f"got rank={rank!r}, world_size={world_size!r}")
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.eos_id = int(self.tokenizer.eos_token_id)
        self._source = DocumentSource(cfg, "train", rank, world_size, repeat=True, shuffle_buffer=cfg.shuffle_buffer)
        self._packer = TokenPacker(cfg.seq_len, self.eos_id)
        self.rows_emitted = 0
        self.docs_consumed = 0

    @property
    def epoch(self) -> int:
        """Epoch of the most recently read document (0-based)."""
        return self._source.epoch

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.cfg.seq_len

    def next_row(self) -> Row:
        while not self._packer.has_row():
            text = self._source.next_text()
            assert text is not None  # repeat=True never ends
            self._packer.add_document(encode_document(self.tokenizer, text))
            self.docs_consumed += 1
        self.rows_emitted += 1
        return self._packer.pop_row()

    def __iter__(self) -> PackedStream:
        return self

    def __next__(self) -> Batch:
        return collate_rows([self.next_row() for _ in range(self.batch_size)])

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "name": self.cfg.name,
            "rank": self.rank,
            "world_size": self.world_size,
            "rows_emitted": self.rows_emitted,
            "docs_consumed": self.docs_consumed,
            "source": self._source.state_dict(),
            "packer": self._packer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"data state: version {state.get('version')!r} != {STATE_VERSION}")
        for key, mine in (("name", self.cfg.name), ("rank", self.rank), ("world_size", self.world_size)):
            if state.get(key) != mine:
                raise ConfigError(
                    f"data state: saved {key}={state.get(key)!r} but this stream has {key}={mine!r} "
                    "(exact resume needs the same dataset, rank and world size)"
                )
        self._source.load_state_dict(state["source"])
        self._packer.load_state_dict(state["packer"])
        self.rows_emitted = int(state["rows_emitted"])
        self.docs_consumed = int(state["docs_consumed"])


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
def pack_validation_rows(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[Row]:
    """All packed rows of the validation split (same packing as training, single pass, file
    order, no sharding), capped at ``cfg.validation_rows``. The tail that does not fill a row
    is dropped."""
    cfg.check()
    source = DocumentSource(cfg, "validation", rank=0, world_size=1, repeat=False, shuffle_buffer=0)
    packer = TokenPacker(cfg.seq_len, int(tokenizer.eos_token_id))
    rows: list[Row] = []
    cap = cfg.validation_rows
    while cap is None or len(rows) < cap:
        if packer.has_row():
            rows.append(packer.pop_row())
            continue
        text = source.next_text()
        if text is None:
            break
        packer.add_document(encode_document(tokenizer, text))
    return rows


def validation_batches(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                       rank: int = 0, world_size: int = 1) -> list[Batch]:
    """Deterministic, finite list of validation batches for ``rank``.

    The rows of :func:`pack_validation_rows` are truncated to a multiple of ``world_size`` and dealt
    out round-robin (row i goes to rank i % world_size), so every rank gets the same number of
    rows. The last batch may be smaller than ``batch_size``."""
    if not _is_positive_int(batch_size):
        raise ConfigError(f"batch_size must be a positive integer; got batch_size={batch_size!r}")
    if not (_is_positive_int(world_size) and isinstance(rank, int) and 0 <= rank < world_size):
        raise ConfigError(f"rank/world_size: need 0 <= rank < world_size; "
                          f"got rank={rank!r}, world_size={world_size!r}")
    rows = pack_validation_rows(cfg, tokenizer)
    usable = len(rows) - len(rows) % world_size
    if usable == 0:
        raise ConfigError(
            f"data config '{cfg.name}': the validation split gives {len(rows)} rows of seq_len+1={cfg.seq_len + 1} "
            f"tokens, fewer than world_size={world_size}"
        )
    mine = rows[rank:usable:world_size]
    return [collate_rows(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]
