"""Downstream (lm-eval-harness) evaluation, offline by default.

Scoring is lm-eval's own (``lm_eval.simple_evaluate`` with its ``HFLM``); nothing here scores a
document. What this module adds:

* **Offline task copies.** ``eval/tasks/local_*.yaml`` are copies of the upstream lm-eval task
  YAMLs (same ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` / preprocessing / metrics)
  that read local ``.jsonl.gz`` files instead of the HF hub. The YAMLs hold a ``@DATA_ROOT@``
  placeholder: :func:`write_task_dir` writes them, with the data root substituted, into a
  temporary directory that lm-eval indexes (``TaskManager(include_path=..., include_defaults=False)``).
  The default data root is the small slices shipped in ``eval/tasks/data``; pass
  ``data_root="../shared/data/eval"`` (or any directory with the same layout) for the full sets.
* **Hub tasks.** Any task name that is not ``local_*`` goes to lm-eval's default task index
  (needs the network). With ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set they are skipped
  with a message in ``result["skipped"]``. ``hub=True`` maps every ``local_*`` task to its
  upstream name (upstream splits: e.g. ARC/OBQA/MMLU test instead of validation).
* **Per-task shot counts.** A task spec is ``"name"``, ``"name:shots"`` or
  ``{"task": name, "num_fewshot": shots}``; the same task may appear with several shot counts
  (the paper's suite has ARC-C at 25 and 3). Specs are grouped by shot count, one
  ``simple_evaluate`` call per group, all on the same loaded model. Results are keyed
  ``"<task>|<shots>"``.
* **Presets** are the YAML files in ``configs/eval/`` (``smoke``, ``paper``, ``mamba_zeroshot``);
  ``run_downstream(tasks="paper")`` reads the preset's task list (and its default ``limit``).
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import functools
import importlib.metadata
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.common import REPO_ROOT, ConfigError

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SHIPPED_DATA = TASKS_DIR / "data"
PRESET_DIR = REPO_ROOT / "configs" / "eval"
PLACEHOLDER = "@DATA_ROOT@"
NON_PRESET_CONFIGS = {"default"}

# local task -> (upstream lm-eval task name, data files it reads, relative to the data root)
LOCAL_TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "local_arc_easy": ("arc_easy", ("arc_easy/validation.jsonl.gz",)),
    "local_arc_challenge": ("arc_challenge", ("arc_challenge/validation.jsonl.gz",)),
    "local_hellaswag": ("hellaswag", ("hellaswag/validation.jsonl.gz",)),
    "local_piqa": ("piqa", ("piqa/validation.jsonl.gz",)),
    "local_winogrande": ("winogrande", ("winogrande_xl/validation.jsonl.gz",)),
    "local_openbookqa": ("openbookqa", ("openbookqa/validation.jsonl.gz",)),
    "local_boolq": ("boolq", ("boolq/validation.jsonl.gz",)),
    "local_sciq": ("sciq", ("sciq/validation.jsonl.gz",)),
    "local_social_iqa": ("social_iqa", ("social_iqa/validation.jsonl.gz",)),
    "local_commonsense_qa": ("commonsense_qa", ("commonsense_qa/validation.jsonl.gz",)),
    "local_copa": ("copa", ("copa/validation.jsonl.gz",)),
    "local_mmlu": ("mmlu", ("mmlu/validation.jsonl.gz", "mmlu/dev.jsonl.gz")),
}
GROUP_TASKS = {"local_mmlu"}


# ------------------------------------------------------------------------------------------------
# Task directory
# ------------------------------------------------------------------------------------------------
def _mmlu_subjects() -> dict[str, str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_local_task_utils", TASKS_DIR / "local_task_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return dict(module.MMLU_SUBJECTS)


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """``None`` -> the shipped slices; a relative path resolves against the working directory,
    then (if that does not exist) against the repository root."""
    if data_root is None or str(data_root) == "":
        return SHIPPED_DATA
    p = Path(os.path.expanduser(str(data_root)))
    if not p.is_absolute():
        p = p if p.exists() else REPO_ROOT / p
    p = p.resolve()
    if not p.is_dir():
        raise ConfigError(f"data_root={data_root}: directory not found (resolved to {p})")
    return p


def check_data(data_root: Path, tasks: Iterable[str]) -> None:
    """Raise :class:`ConfigError` naming the first data file a local task needs and is missing."""
    for task in tasks:
        for rel in LOCAL_TASKS[local_base(task) or task][1]:
            if not (data_root / rel).is_file():
                raise ConfigError(f"data_root={data_root}: task {task} needs {rel}, which is missing")


def write_task_dir(data_root: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None) -> Path:
    """Write the local task YAMLs with ``data_root`` substituted (plus the per-subject MMLU tasks
    and the ``local_mmlu`` group) into ``out_dir`` (default: a new temporary directory).

    Returns the directory, for ``TaskManager(include_path=...)``."""
    root = resolve_data_root(data_root)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="lm_eval_local_tasks_"))
    out.mkdir(parents=True, exist_ok=True)
    quoted = root.as_posix().replace("\\", "\\\\").replace('"', '\\"')
    for src in sorted(TASKS_DIR.iterdir()):
        if src.suffix == ".yaml" or src.name.endswith("_yaml"):
            (out / src.name).write_text(src.read_text(encoding="utf-8").replace(PLACEHOLDER, quoted), encoding="utf-8")
    shutil.copy(TASKS_DIR / "local_task_utils.py", out / "local_task_utils.py")
    for subject in _mmlu_subjects():
        name = " ".join(subject.split("_"))
        description = f"The following are multiple choice questions (with answers) about {name}.\n\n"
        (out / f"local_mmlu_{subject}.yaml").write_text(
            "include: _local_mmlu_template_yaml\n"
            f"task: local_mmlu_{subject}\n"
            f"task_alias: {subject.replace('_', ' ')}\n"
            f"description: {json.dumps(description)}\n"
            f"process_docs: !function local_task_utils.mmlu_{subject}\n"
            "tag: local_mmlu_tasks\n",
            encoding="utf-8",
        )
    (out / "local_mmlu.yaml").write_text(
        "# Group over the 57 per-subject tasks; accuracy weighted by size, as upstream's mmlu group.\n"
        "group: local_mmlu\ntask:\n  - local_mmlu_tasks\naggregate_metric_list:\n"
        "  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 2\n",
        encoding="utf-8",
    )
    return out


# ------------------------------------------------------------------------------------------------
# Task specs and presets
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    task: str
    num_fewshot: int = 0

    @property
    def key(self) -> str:
        return f"{self.task}|{self.num_fewshot}"

    @property
    def is_local(self) -> bool:
        return local_base(self.task) is not None


def local_base(task: str) -> str | None:
    """The :data:`LOCAL_TASKS` entry a local task name belongs to (``local_mmlu_<subject>`` ->
    ``local_mmlu``), or None for a hub task."""
    if task in LOCAL_TASKS:
        return task
    if task.startswith("local_mmlu_"):
        return "local_mmlu"
    return None


def _upstream_name(task: str) -> str:
    base = local_base(task)
    if base is None:
        return task
    return LOCAL_TASKS[base][0] if base == task else task[len("local_"):]


def preset_names() -> list[str]:
    if not PRESET_DIR.is_dir():
        return []
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if p.stem not in NON_PRESET_CONFIGS)


def load_preset(name: str) -> dict[str, Any]:
    """The preset ``configs/eval/<name>.yaml`` as a plain dict (``tasks``, ``limit``, ...)."""
    path = PRESET_DIR / f"{name}.yaml"
    if name in NON_PRESET_CONFIGS or not path.is_file():
        raise ConfigError(f"tasks={name!r} is not a task preset (known presets: {', '.join(preset_names())}); "
                              f"pass a list such as tasks=[local_arc_easy,local_piqa:5] for individual tasks")
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    cfg.pop("defaults", None)
    if not isinstance(cfg.get("tasks"), list):
        raise ConfigError(f"{path}: key 'tasks' must be a list of task specs")
    return cfg


def parse_task_specs(tasks: Any, num_fewshot: int | None = None) -> list[TaskSpec]:
    """Task specs from a list of ``"name"``, ``"name:shots"`` or ``{"task": name, "num_fewshot": n}``.
    ``num_fewshot`` (if not None) overrides every spec's shot count. Duplicates are dropped."""
    if isinstance(tasks, str):
        tasks = [tasks]
    out: list[TaskSpec] = []
    for item in tasks:
        if isinstance(item, Mapping):
            if "task" not in item:
                raise ConfigError(f"tasks: entry {dict(item)!r} has no 'task' key")
            name, shots = str(item["task"]), item.get("num_fewshot", 0)
        else:
            text = str(item).strip()
            name, _, shots_text = text.partition(":")
            shots = shots_text.strip() if shots_text else 0
        try:
            shots = int(shots if shots is not None else 0)
        except (TypeError, ValueError):
            raise ConfigError(f"tasks: entry {item!r}: shot count must be an integer") from None
        if num_fewshot is not None:
            shots = int(num_fewshot)
        if shots < 0 or not name:
            raise ConfigError(f"tasks: bad entry {item!r}")
        spec = TaskSpec(name.strip(), shots)
        if spec not in out:
            out.append(spec)
    if not out:
        raise ConfigError("tasks: no task given")
    return out


def resolve_tasks(tasks: Any, num_fewshot: int | None = None, limit: Any = None) -> tuple[str, list[TaskSpec], Any]:
    """``(preset_name_or_"custom", specs, limit)``; a string names a preset, a list holds task specs.
    An explicit ``limit`` wins over the preset's."""
    if isinstance(tasks, str):
        preset = load_preset(tasks)
        specs = parse_task_specs(preset["tasks"], num_fewshot)
        return tasks, specs, limit if limit is not None else preset.get("limit")
    if tasks is None:
        raise ConfigError("tasks: no task given")
    return "custom", parse_task_specs(list(tasks), num_fewshot), limit


# lm-eval warnings that runs of ours trigger by design (explicit shot counts, an in-memory model, upstream task
# YAMLs that leave a metric's aggregation to lm-eval's default)
_EXPECTED_WARNINGS = {
    "lm_eval.evaluator": ("Overwriting default num_fewshot",),
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type", "Passed an already-initialized model"),
    "lm_eval.api.task": ("is defined, but aggregation is not", "is defined, but higher_is_better is not"),
}


class _DropExpected(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):  # parts of the messages to drop
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p in str(record.msg) for p in self.prefixes)


def progress_bars_off() -> bool:
    return os.environ.get("TQDM_DISABLE", "") not in ("", "0")


def quiet_libraries() -> None:
    """Library chatter at WARNING for an evaluation command: lm-eval's and datasets' INFO lines and the
    warnings our own calls always cause are dropped, and progress bars are off (``TQDM_DISABLE=1``:
    transformers' weight loading, datasets' maps, lm-eval's per-task and, through ``make_lm``, per-request
    bars; ``TQDM_DISABLE=0`` keeps them). tqdm reads the variable when first imported: call this first."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("lm_eval", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, prefixes in _EXPECTED_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) for f in logger.filters):
            logger.addFilter(_DropExpected(prefixes))


def is_offline() -> bool:
    flag = lambda k: os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")  # noqa: E731
    return flag("HF_HUB_OFFLINE") or flag("HF_DATASETS_OFFLINE")


# ------------------------------------------------------------------------------------------------
# Model wrapping
# ------------------------------------------------------------------------------------------------
@functools.cache
def _hflm_class(quiet: bool):
    """lm-eval's ``HFLM``; ``quiet``: without its per-request progress bars (they pass ``disable=`` explicitly,
    which ``TQDM_DISABLE`` cannot override)."""
    from lm_eval.models.huggingface import HFLM

    if not quiet:
        return HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def make_lm(model_or_path: Any, tokenizer: Any = None, batch_size: int | str = 8, device: str | None = "cpu",
            dtype: str | None = None, max_length: int | None = None, trust_remote_code: bool = True):
    """An lm-eval ``HFLM`` around an in-memory ``PreTrainedModel`` or an exported HF directory.

    An in-memory model is moved to ``device`` and put in eval mode; its ``tokenizer`` (object or
    path) is required and is copied (lm-eval sets a pad token on it). An ``lm_eval`` ``LM`` object
    passes through unchanged."""
    from lm_eval.api.model import LM

    HFLM = _hflm_class(progress_bars_off())
    if isinstance(model_or_path, LM):
        return model_or_path
    extra: dict[str, Any] = {}
    if max_length is not None:
        extra["max_length"] = int(max_length)
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"checkpoint {path}: no config.json (not an exported HF model directory)")
        if isinstance(tokenizer, os.PathLike):
            tokenizer = str(tokenizer)
        return HFLM(pretrained=str(path), tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                    device=device or "cpu", dtype=dtype or "auto", trust_remote_code=trust_remote_code, **extra)
    if tokenizer is None:
        raise ConfigError("tokenizer: required when evaluating an in-memory model")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=trust_remote_code)
    else:
        tokenizer = copy.deepcopy(tokenizer)
    model = model_or_path
    if device is not None:
        model = model.to(device)
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, **extra)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        with contextlib.suppress(Exception):
            return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return repr(obj) if callable(obj) else str(obj)


def to_jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default, allow_nan=True))


def _metrics(row: Mapping[str, Any]) -> dict[str, Any]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s, "alias": ...}`` -> ``{"acc": x, "acc_stderr": s}``
    (a filter other than ``none`` stays as a suffix: ``exact_match,strict-match`` -> ``exact_match/strict-match``)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in ("alias", "name", "sample_len", "sample_count") or "," not in k:
            continue
        metric, filt = k.split(",", 1)
        name = metric if filt == "none" else f"{metric}/{filt}"
        if isinstance(v, str):  # "N/A" stderr
            v = None
        elif isinstance(v, float) and math.isnan(v):
            v = None
        out[name] = v
    return out


def _n_samples(res: Mapping[str, Any], name: str) -> int | None:
    n = res.get("n-samples", {})
    if name in n:
        return int(n[name].get("effective", n[name].get("original", 0)))
    subtasks = res.get("group_subtasks", {}).get(name)
    if subtasks:
        counts = [_n_samples(res, s) for s in subtasks]
        return int(sum(c for c in counts if c is not None))
    return None


def _configs_for(res: Mapping[str, Any], name: str) -> dict[str, Any]:
    configs = res.get("configs", {})
    if name in configs:
        return {name: configs[name]}
    out: dict[str, Any] = {}
    for sub in res.get("group_subtasks", {}).get(name, []):
        out.update(_configs_for(res, sub))
    return out


def _evaluate(out: dict, runnable: list[TaskSpec], model_or_path: Any, tokenizer: Any, root: Path, *, limit, batch_size,
              device, dtype, max_length, trust_remote_code, seed, bootstrap_iters, log_samples) -> None:
    """Run lm-eval once per shot count on one loaded model; fill ``out["results"]`` etc."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = make_lm(model_or_path, tokenizer, batch_size=batch_size, device=device, dtype=dtype,
                 max_length=max_length, trust_remote_code=trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="lm_eval_local_tasks_") as tmp:
        task_dir = write_task_dir(root, tmp)
        need_hub = any(not s.is_local for s in runnable)
        manager = TaskManager(include_path=str(task_dir), include_defaults=need_hub)
        unknown = [s.task for s in runnable if s.task not in manager.all_tasks]
        if unknown:
            raise ConfigError(f"tasks: unknown task(s) {', '.join(unknown)} "
                                  f"(local tasks: {', '.join(LOCAL_TASKS)})")
        by_shots: dict[int, list[TaskSpec]] = {}
        for spec in runnable:
            by_shots.setdefault(spec.num_fewshot, []).append(spec)
        for shots, group in sorted(by_shots.items()):
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=[s.task for s in group],
                num_fewshot=shots,
                limit=limit,
                task_manager=manager,
                log_samples=log_samples,
                bootstrap_iters=bootstrap_iters,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
            if res is None:  # non-zero rank under a distributed launch
                continue
            for spec in group:
                row = res["results"].get(spec.task, {})
                entry = {
                    "task": spec.task,
                    "upstream_task": _upstream_name(spec.task),
                    "num_fewshot": shots,
                    **_metrics(row),
                    "n_samples": _n_samples(res, spec.task),
                }
                if spec.task in GROUP_TASKS:  # per-subject numbers, as lm-eval reports them
                    entry["subtasks"] = {
                        sub: _metrics(res["results"][sub]) for sub in res.get("group_subtasks", {}).get(spec.task, [])
                        if sub in res["results"]
                    }
                out["results"][spec.key] = entry
                out["task_configs"][spec.key] = to_jsonable(_configs_for(res, spec.task))
                out["versions"].update(to_jsonable({k: v for k, v in res.get("versions", {}).items()
                                                    if k == spec.task or k in out["task_configs"][spec.key]}))
                if log_samples and "samples" in res:
                    out.setdefault("samples", {})[spec.key] = to_jsonable(
                        {k: v for k, v in res["samples"].items() if k in out["task_configs"][spec.key]})
            if "config" in res:
                out["lm_eval_config"] = to_jsonable(res["config"])
    # the generated directory is gone after the run: point config_source at the templates
    gone = json.dumps(str(task_dir))[1:-1]
    out["task_configs"] = json.loads(json.dumps(out["task_configs"]).replace(gone, "<generated from eval/tasks>"))


def run_downstream(
    model_or_path: Any,
    tokenizer: Any = None,
    tasks: Any = "smoke",
    limit: int | float | None = None,
    batch_size: int | str = 8,
    device: str | None = "cpu",
    num_fewshot: int | None = None,
    output_path: str | os.PathLike | None = None,
    *,
    data_root: str | os.PathLike | None = None,
    hub: bool = False,
    dtype: str | None = None,
    max_length: int | None = None,
    trust_remote_code: bool = True,
    seed: int = 1234,
    bootstrap_iters: int = 100000,
    log_samples: bool = False,
    extra_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a model on lm-eval tasks; return (and optionally write as JSON) a results dict.

    Args:
        model_or_path: an in-memory ``transformers.PreTrainedModel`` (needs ``tokenizer``), an
            exported HF directory (``run_dir/hf``; custom code loads with ``trust_remote_code``), or
            an ``lm_eval`` ``LM``.
        tasks: a preset name (``smoke`` | ``paper`` | ``mamba_zeroshot``, from ``configs/eval/``) or a
            list of task specs (``"local_arc_challenge:25"``, ``{"task": ..., "num_fewshot": ...}``,
            or hub task names).
        limit: docs per task (lm-eval semantics: an int, or a float < 1 for a fraction); ``None``
            takes the preset's limit (smoke: 20), else all.
        num_fewshot: overrides every spec's shot count.
        data_root: directory laid out like ``shared/data/eval``; default the slices in ``eval/tasks/data``.
        hub: evaluate the upstream hub versions of the ``local_*`` tasks (needs the network).

    Returns ``{"results": {"<task>|<shots>": {"task", "upstream_task", "num_fewshot", "acc", "acc_stderr",
    "acc_norm", ..., "n_samples"}}, "skipped": {key: reason}, "task_configs": {key: {lm-eval task
    configs}}, "versions", "lm_eval_version", "preset", "limit", "data_root", ...}``.
    An in-memory model is left in the train/eval mode it came in.
    """
    preset, specs, limit = resolve_tasks(tasks, num_fewshot, limit)
    if hub:
        specs = [TaskSpec(_upstream_name(s.task), s.num_fewshot) if s.is_local else s for s in specs]
    bad = [s.task for s in specs if s.task.startswith("local_") and not s.is_local]
    if bad:
        raise ConfigError(f"tasks: unknown local task(s) {', '.join(bad)} (local tasks: {', '.join(LOCAL_TASKS)})")
    root = resolve_data_root(data_root)
    check_data(root, sorted({s.task for s in specs if s.is_local}))

    skipped: dict[str, str] = {}
    runnable: list[TaskSpec] = []
    for spec in specs:
        if not spec.is_local and is_offline():
            local = {v[0]: k for k, v in LOCAL_TASKS.items()}.get(spec.task)
            skipped[spec.key] = (f"{spec.task}: hub task skipped: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; "
                                 + (f"run {local} (hub=false) for the local copy" if local else "no local copy exists"))
            log.warning(skipped[spec.key])
        else:
            runnable.append(spec)

    started = time.time()
    out: dict[str, Any] = {
        "preset": preset,
        "tasks": [s.key for s in specs],
        "limit": limit,
        "batch_size": batch_size,
        "device": device,
        "data_root": (str(root) if any(s.is_local for s in specs) else None),
        "data_source": ("shipped slices (eval/tasks/data)" if root == SHIPPED_DATA else "data_root")
        if any(s.is_local for s in specs) else "hub",
        "hub": bool(hub),
        "seed": seed,
        "lm_eval_version": importlib.metadata.version("lm_eval"),
        "transformers_version": importlib.metadata.version("transformers"),
        "torch_version": importlib.metadata.version("torch"),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "model": str(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else type(model_or_path).__name__,
        "results": {},
        "skipped": skipped,
        "task_configs": {},
        "versions": {},
    }
    if extra_info:
        out.update(to_jsonable(dict(extra_info)))

    was_training = getattr(model_or_path, "training", None)  # an in-memory model is put back as it was
    try:
        if runnable:
            _evaluate(out, runnable, model_or_path, tokenizer, root, limit=limit, batch_size=batch_size, device=device,
                      dtype=dtype, max_length=max_length, trust_remote_code=trust_remote_code, seed=seed,
                      bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    finally:
        if was_training:
            model_or_path.train()
    order = [s.key for s in specs]  # results in the order the tasks were asked for
    for name in ("results", "task_configs"):
        out[name] = {k: out[name][k] for k in order if k in out[name]}
    out["elapsed_s"] = round(time.time() - started, 3)
    if output_path is not None:
        write_json(output_path, out)
    return out


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def summary_table(result: Mapping[str, Any]) -> str:
    """A few human-readable lines: one per task (acc / acc_norm / n)."""
    lines = []
    for key, r in result.get("results", {}).items():
        parts = [f"{key:32s}"]
        for m in ("acc", "acc_norm", "perplexity"):
            if r.get(m) is not None:
                parts.append(f"{m}={r[m]:.4f}")
        parts.append(f"n={r.get('n_samples')}")
        lines.append("  ".join(parts))
    for key, why in result.get("skipped", {}).items():
        lines.append(f"{key:32s}  skipped: {why}")
    return "\n".join(lines)


__all__ = [
    "ConfigError", "LOCAL_TASKS", "TaskSpec", "check_data", "load_preset", "make_lm", "parse_task_specs",
    "preset_names", "quiet_libraries", "resolve_data_root", "resolve_tasks", "run_downstream", "summary_table",
    "write_json", "write_task_dir",
]
