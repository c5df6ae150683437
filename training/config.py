"""Typed configs of every group of ``train.py`` (``model``, ``data``, ``trainer``, ``wandb``) and the one
mechanism that builds and checks them (reusable by any entry point: subclass :class:`Config`).

torchtitan's style: each group is a dataclass; every field has one default (or none, when a preset must
set it) and a docstring right under it; choices are ``Literal[...]``. :meth:`Config.from_dict` builds a
config from a plain mapping (a YAML file, Hydra's composed config) and rejects unknown keys;
:meth:`Config.check` checks every value against its annotation (a bool is not an int, a float must be
finite), then the ranges the subclass adds in its own ``check``. Every failure is a
:class:`~training.common.ConfigError` whose one-line message names the key:
``trainer.max_steps: expected an int, got 'abc'``.

Hydra only composes: :func:`compose` registers :meth:`Config.schema` (every key with its default) in
Hydra's ConfigStore as ``schema``, which the top-level YAML lists first in its defaults (see
configs/config.yaml), so every key exists before the presets and the command line are applied:
``trainer.lr=1e-3`` works without ``+``, and a misspelt key is still an error. The presets
(``configs/<group>/*.yaml``) state only what differs from the defaults here. ``python train.py --help``
prints every key with its default and docstring (:meth:`Config.help`).

A group can have several kinds, each its own dataclass told apart by its ``source`` field: ``data`` is
text corpora (:class:`DataConfig`, ``source: text``, the default) or a synthetic task
(:class:`SyntheticConfig`, ``source: synthetic``). The field is annotated with the union of the kinds
(``data: DataConfig | SyntheticConfig``); :func:`compose` reads the source the presets and the command line
pick, then composes on that kind's schema, so its keys are overridable and checked like any other.

Paths: a relative path (data files, tokenizer, run_dir) is relative to the current directory, as for
any command-line tool; ``${repo:path}`` in a YAML file or an override names a file of this repository
from anywhere. The defaults name the embedded corpus and tokenizer by absolute paths.
"""
import ast
import dataclasses
import inspect
import logging
import math
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf

from training.common import REPO_ROOT, ConfigError

log = logging.getLogger(__name__)

OmegaConf.register_new_resolver("repo", lambda path: str(REPO_ROOT / path), replace=True)


# ------------------------------------------------------------------------------------------------
# The mechanism
# ------------------------------------------------------------------------------------------------
class Config:
    """Base of the config dataclasses: build from a mapping, check, export, document."""

    KEY: ClassVar[str] = ""
    """Where this group lives in the composed config (``"trainer"``); ``""`` for a top-level config."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None):
        """Build from a plain mapping, then :meth:`check` it. Unknown keys, missing required values
        (absent or ``???``) and wrong types raise :class:`ConfigError` naming the key. Only lossless
        conversions are made: an int for a float, an integral float for an int (``1e4`` from the command
        line), a list for a tuple, one string for a list of strings, a mapping for a nested config."""
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in values:
            if name not in fields:
                raise ConfigError(f"{_key(cls.KEY, name)}: unknown key (known: {', '.join(fields)})")
        hints = get_type_hints(cls)
        kwargs = {}
        for name, f in fields.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if values.get(name) == "???" or (required and name not in values):
                raise ConfigError(f"{_key(cls.KEY, name)}: missing value (set it in the preset or on the command "
                                  f"line: {_key(cls.KEY, name)}=...)")
            if name not in values:
                continue
            kwargs[name] = _convert(hints[name], values[name])
        config = cls(**kwargs)
        config.check()
        return config

    def check(self) -> None:
        """Every value against its annotation; subclasses add their ranges after ``super().check()``."""
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value.check()
                continue
            problem = _type_problem(hints[f.name], value)
            if problem:
                raise ConfigError(f"{_key(self.KEY, f.name)}: {problem}")

    def fail(self, name: str, message: str) -> None:
        """Raise the one-line error of field ``name``."""
        raise ConfigError(f"{_key(self.KEY, name)}={_show(getattr(self, name))}: {message}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), e.g. to save as YAML."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def schema(cls, sources: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Every key with its default (``???`` where a preset must set it): the base Hydra composes on. A
        field with several kinds takes the schema of the kind ``sources[field]`` names (default: its default's)."""
        out, hints = {}, get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = _kinds(hints[f.name])
            if kinds and (sources or {}).get(f.name) in kinds:
                out[f.name] = kinds[sources[f.name]].schema()
            elif isinstance(f.type, type) and issubclass(f.type, Config):
                out[f.name] = f.type.schema()
            elif f.default is not dataclasses.MISSING:
                out[f.name] = _plain(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
                out[f.name] = default.to_dict() if isinstance(default, Config) else _plain(default)
            else:
                out[f.name] = "???"
        return out

    @classmethod
    def help(cls) -> str:
        """Every key as it is written on the command line, with its default, its choices and its docstring."""
        docs, schema, hints, lines = _field_docs(cls), cls.schema(), get_type_hints(cls), []
        for f in dataclasses.fields(cls):
            if isinstance(f.type, type) and issubclass(f.type, Config):
                lines += ["", f"{f.name}: {docs.get(f.name, '')}", f.type.help()]
                continue
            kinds = _kinds(hints[f.name])
            if kinds:
                lines += ["", f"{f.name}: {docs.get(f.name, '')}"]
                for source, kind in kinds.items():
                    lines += ["", *_wrap(f"{f.name} with {f.name}.source={source}: {kind.__doc__}"), kind.help()]
                continue
            tp, _ = _optional(hints[f.name])
            default = "  (required: set by the preset)" if schema[f.name] == "???" else f"={_cli(schema[f.name])}"
            choices = f"  [{' | '.join(map(_cli, get_args(tp)))}]" if get_origin(tp) is Literal else ""
            lines.append(f"  {_key(cls.KEY, f.name)}{default}{choices}")
            lines += [f"      {line}" for line in _wrap(docs.get(f.name, ""))]
        return "\n".join(lines).strip("\n")


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _cli(value: Any) -> str:
    """A value as written in an override."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, list):
        return "[" + ",".join(map(_cli, value)) + "]"
    return str(value)


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _wrap(text: str, width: int = 100) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + ([line] if line else [])


def _field_docs(cls) -> dict[str, str]:
    """The attribute docstrings (a string literal right under a field), read from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _kinds(tp) -> dict[str, type[Config]] | None:
    """``{source: class}`` for a union of Config classes told apart by their ``source`` field (the first
    is the default kind); None for any other annotation."""
    if get_origin(tp) not in (Union, types.UnionType):
        return None
    classes = get_args(tp)
    if not all(isinstance(c, type) and issubclass(c, Config) for c in classes):
        return None
    return {c.__dataclass_fields__["source"].default: c for c in classes}


def _optional(tp) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(tp)):
            return args[0], True
    return tp, False


def _convert(tp, value: Any) -> Any:
    """The lossless conversions of :meth:`Config.from_dict` (and a mapping to the kind its ``source`` names);
    anything else is left for the type check."""
    kinds = _kinds(tp)
    if kinds and isinstance(value, Mapping):
        source, key = value.get("source", next(iter(kinds))), next(iter(kinds.values())).KEY
        if source not in kinds:
            raise ConfigError(f"{key}.source: expected one of {', '.join(map(_show, kinds))}; got {_show(source)}")
        return kinds[source].from_dict(value)
    tp, nullable = _optional(tp)
    if value is None and nullable:
        return None
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Config) and isinstance(value, Mapping):
        return tp.from_dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if origin is tuple and isinstance(value, list):
        args = get_args(tp)
        same_length = Ellipsis not in args and len(args) == len(value)
        return tuple(_convert(a, v) for a, v in zip(args, value)) if same_length else tuple(value)
    if origin is list and isinstance(value, str) and get_args(tp) == (str,):
        return [value]
    if origin is list and isinstance(value, list):
        return [_convert(get_args(tp)[0], v) for v in value]
    return value


_NAMES = {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a string"}


def _type_problem(tp, value: Any) -> str | None:
    """What is wrong with ``value`` as a ``tp`` (None: nothing)."""
    tp, nullable = _optional(tp)
    if value is None:
        return None if nullable or tp is Any else f"expected {_describe(tp)}, got null"
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return None
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return None
        return f"expected one of {', '.join(map(_show, args))}; got {_show(value)}"
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {_show(value)}"
        return None if math.isfinite(value) else f"expected a finite number, got {value}"
    if tp in (bool, int, str):
        ok = isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
        return None if ok else f"expected {_NAMES[tp]}, got {_show(value)}"
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return f"expected a list, got {_show(value)}"
        if origin is tuple and Ellipsis not in args and len(value) != len(args):
            return f"expected {len(args)} values, got {len(value)}: {_show(list(value))}"
        element_types = [args[0]] * len(value) if origin is list or Ellipsis in args else args
        for i, (element_type, element) in enumerate(zip(element_types, value)):
            problem = _type_problem(element_type, element)
            if problem:
                return f"item {i}: {problem}"
        return None
    if origin is dict or tp is dict:
        return None if isinstance(value, Mapping) else f"expected a mapping, got {_show(value)}"
    if isinstance(tp, type):
        return None if isinstance(value, tp) else f"expected {_describe(tp)}, got {_show(value)}"
    return None


def _describe(tp) -> str:
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def compose(schema: type[Config], config_dir: str, config_name: str, overrides: list[str]) -> dict[str, Any]:
    """Hydra's composition of ``config_dir/config_name.yaml`` (whose defaults list starts with ``schema``:
    ``schema``'s defaults) with the command-line ``overrides``, resolved to plain values; build the config
    with ``schema.from_dict`` of it. Creates nothing on disk (no output directory, no ``.hydra``, no log
    file, unlike ``@hydra.main``) and turns Hydra's and OmegaConf's errors into one-line ConfigErrors.

    A field with several kinds (``data``) is composed twice: first with the preset picks, the top-level
    keys and ``<field>.source`` overrides only, to read which kind the presets and the command line pick;
    then with every override on the schema of that kind."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    hints = get_type_hints(schema)
    with_kinds = [f.name for f in dataclasses.fields(schema) if _kinds(hints[f.name])]
    store, sources = ConfigStore.instance(), {}
    try:
        store.store(name="schema", node=schema.schema())
        if with_kinds:
            picks = [o.input_line for o in OverridesParser.create().parse_overrides(list(overrides))
                     if "." not in o.key_or_group or o.key_or_group in {f"{name}.source" for name in with_kinds}]
            first = _hydra_compose(config_dir, config_name, picks)
            sources = {name: (first.get(name) or {}).get("source") for name in with_kinds}
            store.store(name="schema", node=schema.schema(sources))
        return _hydra_compose(config_dir, config_name, overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_hydra_message(err, schema, sources)) from None


def _hydra_compose(config_dir: str, config_name: str, overrides: list[str]) -> dict[str, Any]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="train"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def _hydra_message(err: Exception, schema: type[Config], sources: Mapping[str, str]) -> str:
    """One line out of Hydra's and OmegaConf's multi-line messages, naming the key."""
    cause = err.__cause__ if err.__cause__ is not None else err
    full_key = getattr(cause, "full_key", None)
    text = str(err)
    if getattr(err, "override", None):  # OverrideParseException: the grammar's complaint
        reason = [line for line in text.splitlines() if line.strip() and not line.startswith(("See ", "Error parsing"))]
        return f"cannot parse override '{err.override}': {' '.join(reason)}"
    if full_key and "not in struct" in str(cause):
        group: Any = schema
        for part in full_key.split(".")[:-1]:
            sub = get_type_hints(group).get(part)
            kinds = _kinds(sub)
            if kinds:  # the kind this composition was made for
                sub = kinds.get(sources.get(part), next(iter(kinds.values())))
            group = sub if isinstance(sub, type) and issubclass(sub, Config) else None
            if group is None:
                break
        if group is not None:
            return f"{full_key}: unknown key (known: {', '.join(f.name for f in dataclasses.fields(group))})"
        added = re.search(r"use (\+\S+)", text)
        return f"{full_key}: not in the config" + (f" (to add a key, write {added.group(1)})" if added else "")
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        options = re.search(r"Available options in '[^']+':(.*?)(Config search path|$)", text, re.DOTALL)
        group, _, name = missing.group(1).rpartition("/")
        listed = ", ".join(options.group(1).split()) if options else "none"
        return f"{group}={name}: no such preset in configs/{group}/ (available: {listed})"
    lines = [line for line in str(cause).splitlines() if line.strip() and not line.startswith("See https://")]
    if full_key and not any(full_key in line for line in lines):
        lines.insert(0, f"{full_key}:")
    return " ".join(lines) or type(cause).__name__


# ------------------------------------------------------------------------------------------------
# The groups of train.py
# ------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig(Config):
    """The architecture and its recipe: one preset per model in configs/model/ sets every field."""

    KEY: ClassVar[str] = "model"

    name: str
    """The preset's name, shown in logs, summaries and reports (default run_dir: runs/<name>)."""
    arch: Literal["pararnn", "transformer", "mamba2"]
    """Architecture family (models/registry.py)."""
    lr: float
    """Peak learning rate of this model (the paper's sweep value for the paper's sizes); trainer.lr overrides it."""
    weight_decay: float
    """Decoupled AdamW weight decay of this model; trainer.weight_decay overrides it."""
    batch_tokens: int | None = None
    """Tokens per optimizer step that ``lr`` belongs to (the paper's batch for the paper's sizes); a smaller
    batch scales lr down (trainer.lr_scaling). null: lr is used at any batch."""
    config: dict[str, Any] = field(default_factory=dict)
    """Hyperparameters of the architecture's HF config class (hidden_size, num_hidden_layers, ...),
    checked by models/registry.py. A key the preset does not set is added with +model.config.KEY=VALUE."""

    def check(self) -> None:
        super().check()
        if self.lr <= 0:
            self.fail("lr", "the learning rate must be > 0")
        if self.weight_decay < 0:
            self.fail("weight_decay", "must be >= 0")
        if self.batch_tokens is not None and self.batch_tokens <= 0:
            self.fail("batch_tokens", "must be > 0 or null")


@dataclass
class DataConfig(Config):
    """What to read and how to cut it. The defaults: the State of the Union corpus embedded in data/sotu
    with the GPT-2 tokenizer embedded in data/tokenizer/gpt2, rows of 256 tokens."""

    KEY: ClassVar[str] = "data"

    source: Literal["text"] = "text"
    """The kind of data: text corpora (this), or data.source=synthetic for a generated task (data=synthetic_*)."""
    name: str = "sotu"
    """Name of the data set, recorded with the run and its checkpoints' data state."""
    format: Literal["json", "parquet", "text", "hub"] = "json"
    """Local json/jsonl(.gz), parquet or text files, or a dataset on the Hugging Face hub."""
    train_files: list[str] = field(default_factory=lambda: [str(REPO_ROOT / "data/sotu/train.jsonl.gz")])
    """Local training files: paths or globs (relative to the current directory)."""
    validation_files: list[str] = field(default_factory=lambda: [str(REPO_ROOT / "data/sotu/validation.jsonl.gz")])
    """Local validation files: paths or globs (relative to the current directory)."""
    hub_path: str | None = None
    """format=hub: the dataset's hub path, as load_dataset(hub_path, hub_name, streaming=True)."""
    hub_name: str | None = None
    """format=hub: the dataset's configuration name."""
    train_split: str = "train"
    """format=hub: the training split."""
    validation_split: str | None = "validation"
    """format=hub: the validation split; null: none."""
    exclude_field: str | None = None
    """Drop documents whose field (dotted path, e.g. meta.redpajama_set_name) has a value in exclude_values."""
    exclude_values: list[str] = field(default_factory=list)
    """Values of exclude_field to drop (compared as strings)."""
    text_field: str = "text"
    """The field holding each document's text (dotted path allowed)."""
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of datasets.load_dataset."""
    tokenizer: str = str(REPO_ROOT / "data/tokenizer/gpt2")
    """A tokenizer directory (relative to the current directory) or a hub tokenizer name."""
    seq_len: int = 256
    """Tokens per training row (each row carries seq_len + 1 tokens: inputs and shifted labels)."""
    shuffle_buffer: int = 0
    """Documents in the shuffle buffer (resumable, part of the checkpoint); 0: file order."""
    seed: int = 0
    """Seed of the document shuffle."""
    validation_rows: int | None = 64
    """Cap on the validation rows over all ranks; null: the whole validation split."""

    def check(self) -> None:
        """Values, then (local formats) that every path or glob matches a file."""
        super().check()
        if self.seq_len <= 0:
            self.fail("seq_len", "must be > 0")
        if self.shuffle_buffer < 0:
            self.fail("shuffle_buffer", "must be >= 0")
        if self.validation_rows is not None and self.validation_rows <= 0:
            self.fail("validation_rows", "must be > 0 or null")
        if not self.text_field:
            self.fail("text_field", "must name a field")
        if not self.tokenizer:
            self.fail("tokenizer", "must name a directory or a hub tokenizer")
        if self.exclude_values and not self.exclude_field:
            self.fail("exclude_values", "set, but data.exclude_field is not")
        if self.format == "hub":
            if not self.hub_path:
                self.fail("hub_path", "format=hub needs a hub path (e.g. 'DKYoon/SlimPajama-6B')")
            if not self.train_split:
                self.fail("train_split", "format=hub needs the training split")
            if self.validation_split and self.validation_rows is None:
                self.fail("validation_rows", "format=hub needs a cap (the validation split streams in full on "
                                             "every rank)")
            return
        for name in ("train_files", "validation_files"):
            if not getattr(self, name):
                self.fail(name, f"no files (set data.{name}=[PATH, ...])")
        # Imported here: data.pipeline imports this module (the path rules live with the readers).
        from data.pipeline import resolve_data_files

        resolve_data_files(self.train_files, key="data.train_files")
        resolve_data_files(self.validation_files, key="data.validation_files")

    def files(self, split: str) -> list[str]:
        if split not in ("train", "validation"):
            raise ConfigError(f"data: unknown split '{split}' (expected train or validation)")
        return list(self.train_files if split == "train" else self.validation_files)

    def has_split(self, split: str) -> bool:
        if self.format == "hub":
            return bool(self.train_split if split == "train" else self.validation_split)
        return bool(self.files(split))

    def absolute(self) -> "DataConfig":
        """A copy whose local paths are absolute (relative ones are taken from the current directory), so
        the run's saved config means the same from any directory. A tokenizer that is not a local
        directory is a hub name and stays as it is."""
        def absolute(path: str) -> str:
            return path if "://" in path else os.path.abspath(os.path.expanduser(path))

        tokenizer = os.path.expanduser(self.tokenizer)
        return dataclasses.replace(
            self, train_files=[absolute(p) for p in self.train_files],
            validation_files=[absolute(p) for p in self.validation_files],
            tokenizer=os.path.abspath(tokenizer) if os.path.isdir(tokenizer) else self.tokenizer)


@dataclass
class SyntheticConfig(Config):
    """A synthetic task generated on the fly from a seed (data/synthetic.py): the model's vocabulary is the
    task's, there is no tokenizer and no file; validation adds exact-match and per-token accuracy."""

    KEY: ClassVar[str] = "data"

    task: Literal["keep_nth", "parity", "mqar", "khop", "cycle_nav", "mod_arith", "word_problem"]
    """The task; data/synthetic.py defines each (its docstring says where the definition comes from)."""
    source: Literal["synthetic"] = "synthetic"
    """The kind of data: a synthetic task (this), or data.source=text (the default) for text corpora."""
    name: str = "synthetic"
    """The preset's name, recorded with the run and its checkpoints' data state."""
    task_args: dict[str, Any] = field(default_factory=dict)
    """The task's arguments, the fields of its class in data/synthetic.py (e.g. {vocab: 128, n: 5} for
    keep_nth); those not given keep the class's defaults."""
    seq_len: int = 100
    """L, the length of the training and validation sequences."""
    score: Literal["all", "last"] = "all"
    """Which positions carry a target, in training and evaluation: all (every position where the answer is
    defined: running parity, x_n from position n on) or last (only the last of each sequence, the paper's
    single output per sequence; a much sparser training signal). Evaluation reports the last position's
    accuracy either way (last_acc)."""
    seed: int = 0
    """Seed of the training stream (the evaluation sets use eval_seed)."""
    eval_seed: int = 1234
    """Seed of the validation and test sets: the same sets for every run of a task."""
    val_samples: int = 1024
    """Validation sequences (of length seq_len)."""
    test_lengths: list[int] = field(default_factory=lambda: [200, 400, 1000])
    """Lengths of the test sets evaluated once after training (length generalisation); [] for none."""
    test_samples: int = 1024
    """Sequences per test length."""
    eval_batch_size: int = 128
    """Sequences per forward pass of validation and testing."""

    def check(self) -> None:
        """Values, then the task's arguments and the lengths it needs (data/synthetic.py's own checks)."""
        super().check()
        for name in ("seq_len", "val_samples", "test_samples", "eval_batch_size"):
            if getattr(self, name) <= 0:
                self.fail(name, "must be > 0")
        # Imported here: the generators need torch, which the config checks do not.
        from data.synthetic import make_task

        shortest = make_task(self.task, self.task_args).min_length()
        if self.seq_len < shortest:
            self.fail("seq_len", f"task {self.task!r} needs sequences of at least {shortest}")
        short = [n for n in self.test_lengths if n < shortest]
        if short:
            self.fail("test_lengths", f"task {self.task!r} needs sequences of at least {shortest}, got {short}")

    def absolute(self) -> "SyntheticConfig":
        """Itself: a synthetic task names no path (the text kind's absolute() makes its paths absolute)."""
        return self


@dataclass
class TrainerConfig(Config):
    """How to train. The defaults: one CPU process, a few minutes of training (configs/trainer/cpu.yaml)."""

    KEY: ClassVar[str] = "trainer"

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else the CPU."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on the CPU."""
    strategy: Literal["single", "ddp", "fsdp2", "deepspeed"] = "single"
    """How the model is spread over the processes (training/distributed.py)."""
    zero_stage: Literal[1, 2, 3] = 2
    """DeepSpeed ZeRO stage (strategy=deepspeed)."""
    batch_size: int = 8
    """Sequences per optimizer step, over all ranks (batch_size / (grad_accum x world size) per rank and micro-step)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    max_steps: int = 200
    """Optimizer steps of the run (the length of the cosine schedule)."""
    warmup_steps: int = 20
    """Steps of linear warm-up; clamped to max_steps (with a warning) when longer."""
    lr: float | None = None
    """Peak learning rate, used as given; null: the model preset's model.lr, scaled by lr_scaling."""
    lr_scaling: Literal["sqrt", "none"] = "sqrt"
    """How model.lr follows a batch smaller than the preset's model.batch_tokens. sqrt: x sqrt(tokens per step
    / batch_tokens), Adam's square-root rule (Malladi et al. 2022): transformer_7b at 1/128 of the paper's
    batch rose from 11.4 to 13.2 over its first 5 steps with the paper's LR and fell steadily with the scaled
    one (benchmarks/RESULTS.md). none: model.lr as is. Never scales up."""
    min_lr_ratio: float = 0.0
    """End of the cosine decay, as a fraction of the peak learning rate."""
    weight_decay: float | None = None
    """Decoupled weight decay; null: the model preset's model.weight_decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's betas."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value."""
    z_loss: float = 1e-4
    """Coefficient of the z-loss, z_loss * mean(logsumexp(logits)^2); 0 disables it."""
    log_every: int = 10
    """Steps between loss lines (metrics.jsonl, train.log, the console)."""
    val_every: int = 50
    """Steps between validations (and one at the end)."""
    val_batches: int = 8
    """Validation batches per rank (at most)."""
    ckpt_every: int = 50
    """Steps between checkpoints (and one at the end)."""
    keep_last: int = 2
    """Checkpoints kept (the oldest are deleted)."""
    max_nonfinite_steps: int = 5
    """Stop after this many non-finite losses or gradient norms in a row (each one's update is skipped)."""
    max_stalled_steps: int = 20
    """Stop when the run makes no progress for this many steps in a row: a gradient norm of exactly 0, or,
    after warm-up, a training loss within 1e-3 of ln(vocab size) (uniform predictions); 0 disables."""
    stop_at_loss: float | None = None
    """Stop early, as if at max_steps (final validation, test sets, export), once the training loss has been at
    or below this for log_every steps in a row: a solved task (the synthetic suite's) needs no more steps; null:
    always train max_steps."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
    memory_check: bool = True
    """Before training, refuse a run whose estimated memory exceeds what is free (training/memory.py)."""
    compile: bool = False
    """torch.compile every decoder block (fused kernels, less activation memory; the first step compiles,
    ~1 min at 1B on a GPU). Not with strategy=deepspeed or sequence_parallel > 1 (training/compile.py)."""
    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s of one device, for the MFU in the logs; null: from the GPU's name (H100/H200
    989, A100 312, ...; training/flops.py), no MFU on the CPU or an unknown GPU."""
    sequence_parallel: int = 1
    """Ranks per sequence: each holds 1/N of every row's time steps (ParaRNN only; the world is N x the
    data-parallel size; training/sequence_parallel.py)."""

    def check(self) -> None:
        super().check()
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "val_every", "val_batches", "ckpt_every",
                     "keep_last", "max_nonfinite_steps", "sequence_parallel"):
            if getattr(self, name) <= 0:
                self.fail(name, "must be > 0")
        for name in ("warmup_steps", "max_stalled_steps", "z_loss"):
            if getattr(self, name) < 0:
                self.fail(name, "must be >= 0")
        if self.warmup_steps > self.max_steps:
            log.warning(f"trainer.warmup_steps={self.warmup_steps} is longer than trainer.max_steps="
                        f"{self.max_steps}: warm-up clamped to {self.max_steps} steps (set trainer.warmup_steps "
                        f"to choose another)")
            self.warmup_steps = self.max_steps
        if self.lr is not None and self.lr <= 0:
            self.fail("lr", "the learning rate must be > 0")
        if self.weight_decay is not None and self.weight_decay < 0:
            self.fail("weight_decay", "must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            self.fail("min_lr_ratio", "must be in [0, 1]")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            self.fail("betas", "each must be in [0, 1)")
        for name in ("eps", "grad_clip"):
            if getattr(self, name) <= 0:
                self.fail(name, "must be > 0")
        if self.stop_at_loss is not None and self.stop_at_loss <= 0:
            self.fail("stop_at_loss", "must be > 0 or null")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            self.fail("peak_tflops", "must be > 0 or null")
        if self.compile and self.strategy == "deepspeed":
            self.fail("compile", "not supported with trainer.strategy=deepspeed (use fsdp2, ddp or single)")
        if self.compile and self.sequence_parallel > 1:
            self.fail("compile", "not supported with trainer.sequence_parallel > 1 (the cell's custom op runs on one "
                      "rank's sequence)")

    def micro_batch(self, world_size: int) -> int:
        """Sequences per rank and micro-step (the ranks of a sequence-parallel group share their rows)."""
        if world_size % self.sequence_parallel:
            self.fail("sequence_parallel", f"must divide the world size {world_size}")
        data_parallel = world_size // self.sequence_parallel
        if self.batch_size % (self.grad_accum * data_parallel):
            self.fail("batch_size", f"not divisible by trainer.grad_accum={self.grad_accum} x data-parallel size "
                                    f"{data_parallel} (world size {world_size} / trainer.sequence_parallel)")
        return self.batch_size // (self.grad_accum * data_parallel)


@dataclass
class WandbConfig(Config):
    """Weights & Biases logging (metrics.jsonl is always written)."""

    KEY: ClassVar[str] = "wandb"

    mode: Literal["disabled", "offline", "online"] = "disabled"
    """disabled: no wandb; offline: a local wandb run under run_dir/wandb; online: synced."""
    project: str = "pararnn-lm"
    """The wandb project."""
    name: str | None = None
    """The wandb run's name; null: the run_dir's name."""
    entity: str | None = None
    """The wandb entity (team); null: your default."""


@dataclass
class JobConfig(Config):
    """Everything train.py reads (configs/config.yaml picks one preset per group)."""

    model: ModelConfig
    """The architecture and its recipe (configs/model/)."""
    data: DataConfig | SyntheticConfig = field(default_factory=DataConfig)
    """The data (configs/data/): text corpora (data.source=text) or a synthetic task (data.source=synthetic)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The training recipe (configs/trainer/)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases."""
    run_dir: str | None = None
    """Where every output goes (relative to the current directory); re-running with it resumes.
    null: runs/<model.name>."""
    seed: int = 1234
    """Seed of the model's initialisation and of every random number generator."""

    def check(self) -> None:
        super().check()
        sp = self.trainer.sequence_parallel
        if sp > 1 and self.model.arch != "pararnn":
            self.trainer.fail("sequence_parallel", f"needs model.arch=pararnn, got {self.model.arch}")
        if self.data.seq_len % sp:
            self.trainer.fail("sequence_parallel", f"must divide data.seq_len={self.data.seq_len}")
        if sp > 1 and self.data.source == "synthetic":
            # A task's accuracy reads whole sequences; each rank would score only its time slice.
            self.trainer.fail("sequence_parallel", "does not run with a synthetic task (data.source=synthetic)")

    @property
    def lr(self) -> float:
        return self.trainer.lr if self.trainer.lr is not None else self.model.lr * self.lr_scale

    @property
    def lr_scale(self) -> float:
        """The factor trainer.lr_scaling applies to model.lr at this run's batch (1.0: none)."""
        if self.trainer.lr is not None or self.trainer.lr_scaling == "none" or self.model.batch_tokens is None:
            return 1.0
        return min(1.0, math.sqrt(self.trainer.batch_size * self.data.seq_len / self.model.batch_tokens))

    @property
    def weight_decay(self) -> float:
        return self.trainer.weight_decay if self.trainer.weight_decay is not None else self.model.weight_decay
