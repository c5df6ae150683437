"""A resume never damages a run: the requested config is checked against the run's before anything is written.

Re-running ``train.py`` with the ``run_dir`` of an earlier run resumes it. :func:`check_resume` compares the
requested, resolved config with the run's ``config.yaml`` *before anything is written to run_dir*; a change
that the run's checkpoints cannot follow raises :class:`ConfigError` naming every such key with both values,
and leaves the run_dir byte-identical. :func:`save_config` then writes ``config.yaml`` (the config in force,
atomically) and appends what changed to ``config_history.jsonl`` (one JSON object per line, never rewritten:
the first line holds the run's first full config, later lines the time, the command line and each changed
key's old and new values), so nothing is overwritten silently.

Breaking changes (refused while the run_dir holds a checkpoint):

* ``model.arch`` and every ``model.config`` key except ``model.config.mode`` (which only picks how the same
  cell is computed): sizes and shapes change the parameters; other keys (``clip``, ``newton_iters``,
  ``cell_init``...) would silently change the function the checkpointed weights were trained for.
* ``data.tokenizer`` (ids and the vocabulary behind the embeddings) and the keys that identify the training
  stream whose position the checkpoint holds: ``data.name``, ``data.format``, ``data.train_files``,
  ``data.hub_path``, ``data.hub_name``, ``data.train_split``, ``data.text_field``, ``data.exclude_field``,
  ``data.exclude_values``, ``data.load_kwargs``. Paths compare after resolution (relative = absolute).
* the optimizer's hyperparameters ``model.lr``, ``trainer.lr``, ``model.weight_decay``, ``trainer.weight_decay``,
  ``trainer.betas``, ``trainer.eps``: the checkpoint's optimizer and schedule state carry them and win on
  load, so a new value would be silently ignored.
* ``trainer.strategy`` across checkpoint layouts: ``single`` and ``ddp`` share one (model.safetensors +
  optimizer.bin); ``fsdp2`` (a DCP directory) and ``deepspeed`` (ZeRO files) each have their own; and
  ``trainer.zero_stage`` between two DeepSpeed runs.

Everything else is allowed, takes effect and is recorded: the schedule's length and shape
(``trainer.max_steps``, ``trainer.warmup_steps``, ``trainer.min_lr_ratio``; train.py re-derives the lr of
the resumed step from it), batch size and accumulation, ``data.seq_len`` (the packer's state holds
tokens, not rows, and no architecture has a position table), shuffling, validation, logging, validation
and checkpoint intervals, ``keep_last``, precision, z-loss, clipping, ``seed`` (the RNG state comes from
the checkpoint), wandb.
A run_dir without a checkpoint (an attempt that stopped before its first one) accepts any change; the
change is still recorded.
"""
import datetime
import json
import os
import sys
from typing import Any

from training.common import ConfigError

CONFIG = "config.yaml"
HISTORY = "config_history.jsonl"
CHECKPOINTS = "checkpoints"

MODEL_RUNTIME_KEYS = {"model.config.mode"}
STREAM_KEYS = {f"data.{k}" for k in ("name", "format", "train_files", "hub_path", "hub_name", "train_split",
                                     "text_field", "exclude_field", "exclude_values", "load_kwargs", "tokenizer")}
OPTIMIZER_KEYS = {"model.lr", "trainer.lr", "model.weight_decay", "trainer.weight_decay", "trainer.betas",
                  "trainer.eps"}
PATH_KEYS = {"data.tokenizer", "data.train_files"}
CHECKPOINT_LAYOUT = {"single": "whole", "ddp": "whole", "fsdp2": "dcp", "deepspeed": "zero"}
UNSET = "<unset>"


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _normalised(key: str, value: Any) -> Any:
    """Paths compare after resolution against the repo root, so ``data/x`` equals its absolute spelling."""
    if key not in PATH_KEYS or value is None:
        return value
    from data.pipeline import resolve_path

    return [resolve_path(str(v)) for v in value] if isinstance(value, list) else resolve_path(str(value))


def changed_keys(saved: dict, requested: dict) -> dict[str, tuple]:
    """``{key: (saved value, requested value)}`` for every dotted key whose value differs (``run_dir`` aside)."""
    old, new = flatten(saved), flatten(requested)
    changes = {}
    for key in sorted(set(old) | set(new)):
        if key == "run_dir":
            continue
        a, b = old.get(key, UNSET), new.get(key, UNSET)
        if _normalised(key, a) != _normalised(key, b):
            changes[key] = (a, b)
    return changes


def is_breaking(key: str, saved: dict, requested: dict) -> bool:
    """Whether the run's checkpoints cannot follow a change of ``key`` (the list in the module docstring)."""
    if key == "model.arch" or (key.startswith("model.config.") and key not in MODEL_RUNTIME_KEYS):
        return True
    if key in STREAM_KEYS or key in OPTIMIZER_KEYS:
        return True
    old_strategy = saved.get("trainer", {}).get("strategy", "single")
    new_strategy = requested.get("trainer", {}).get("strategy", "single")
    if key == "trainer.strategy":
        return CHECKPOINT_LAYOUT.get(old_strategy, old_strategy) != CHECKPOINT_LAYOUT.get(new_strategy, new_strategy)
    if key == "trainer.zero_stage":
        return old_strategy == new_strategy == "deepspeed"
    return False


def has_checkpoint(run_dir: str) -> bool:
    root = os.path.join(run_dir, CHECKPOINTS)
    return os.path.isdir(root) and any(n.startswith("step_") for n in os.listdir(root))


def load_saved_config(run_dir: str) -> dict | None:
    """The run's ``config.yaml`` as a plain dict, or None for a new run_dir."""
    path = os.path.join(run_dir, CONFIG)
    if not os.path.exists(path):
        return None
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # a YAML or OmegaConf error: say which file, do not overwrite it
        raise ConfigError(f"run_dir {run_dir}: {path} cannot be read ({type(err).__name__}: {err}); "
                          f"repair or remove it, or use a new run_dir") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"run_dir {run_dir}: {path} does not hold a config mapping")
    return saved


def _show(value: Any) -> str:
    return value if value == UNSET else json.dumps(value) if not isinstance(value, str) else value


def check_resume(run_dir: str, requested: dict) -> dict[str, tuple]:
    """Compare ``requested`` (the resolved config of this command, nested dicts) with the run's saved config.

    Returns the allowed changes ``{key: (old, new)}`` (empty for a new run_dir). Raises :class:`ConfigError`,
    one line naming every breaking key with both values, when the run_dir holds a checkpoint that the
    request cannot resume. Reads only; call it before anything is written to ``run_dir``."""
    saved = load_saved_config(run_dir)
    if saved is None:
        return {}
    changes = changed_keys(saved, requested)
    breaking = {k: v for k, v in changes.items() if is_breaking(k, saved, requested)}
    if breaking and has_checkpoint(run_dir):
        if len(breaking) == 1:
            (key, (old, new)), = breaking.items()
            was, asks, what = f"{key}={_show(old)}", _show(new), "the key"
        else:
            was = ", ".join(f"{k}={_show(old)}" for k, (old, _) in breaking.items())
            asks = ", ".join(f"{k}={_show(new)}" for k, (_, new) in breaking.items())
            what = "these keys"
        raise ConfigError(f"run_dir {run_dir} was trained with {was}; this command asks for {asks} "
                          f"(start a new run_dir, or restore {what})")
    return changes


def save_config(run_dir: str, requested: dict, changes: dict[str, tuple]) -> None:
    """Write ``config.yaml`` (atomically) and append to ``config_history.jsonl``: the first config of the run
    in full, then each later start that changed keys. Call on the main process after :func:`check_resume`."""
    from omegaconf import OmegaConf

    os.makedirs(run_dir, exist_ok=True)
    config_path, history_path = os.path.join(run_dir, CONFIG), os.path.join(run_dir, HISTORY)
    entries = []
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if not os.path.exists(history_path):  # a new run, or one from before the history existed: keep its config
        first = load_saved_config(run_dir) if os.path.exists(config_path) else requested
        entries.append({"time": now, "event": "first config", "config": first})
    if changes:
        entries.append({"time": now, "event": "resumed with changes", "argv": sys.argv[1:],
                        "changed": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}})
        shown = ", ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in changes.items())
        print(f"run_dir {run_dir}: changed since the last start: {shown} (recorded in {HISTORY})", file=sys.stderr)
    with open(history_path, "a") as f:
        for entry in entries:
            f.write(json.dumps(entry, default=str) + "\n")
    tmp = config_path + ".tmp"
    OmegaConf.save(OmegaConf.create(requested), tmp)
    os.replace(tmp, config_path)
