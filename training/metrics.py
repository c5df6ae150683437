"""What a run reports: log lines for people, metrics for programs.

* **Logs** (:func:`setup_logging`): our loggers (``train``, ``training``, ``data``, ``eval``, ``models``)
  at INFO on the main process (errors only on the others), libraries at WARNING. INFO lines go to stdout,
  warnings and errors to stderr as ``warning: ...`` / ``error: ...``, written around tqdm's progress bar.
  Once the run directory exists, :func:`log_to_file` adds ``run_dir/train.log`` (timestamped, appended on
  resume) and writes into it what was logged before (e.g. a warning of the config checks).
* **Metrics** (:class:`MetricsLogger`): one JSON object per line in ``run_dir/metrics.jsonl`` (and wandb
  when enabled), rank 0 only. On resume the file is cut back to the resumed step, so a restarted run
  leaves one clean curve.
"""
import json
import logging
import logging.handlers
import os
import sys
import time
import warnings

from tqdm import tqdm

OUR_LOGGERS = ("train", "training", "data", "eval", "models")
_state: dict = {}


class _Console(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                tqdm.write(f"{record.levelname.lower()}: {message}", file=sys.stderr)
            else:
                tqdm.write(message, file=sys.stdout)
        except Exception:
            self.handleError(record)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger("py.warnings").warning(f"{message} ({category.__name__}, {os.path.basename(filename)}:{lineno})")


def setup_logging(main_process: bool) -> None:
    """Console logging, and a buffer that :func:`log_to_file` empties into train.log. Call it once per
    process before anything logs; :func:`close_logging` undoes it."""
    close_logging()
    root = logging.getLogger()
    buffer = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    _state.update(handlers=[_Console(), buffer], buffer=buffer, root_level=root.level,
                  showwarning=warnings.showwarning)
    for handler in _state["handlers"]:
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if main_process else logging.ERROR)
    warnings.showwarning = _show_warning


def log_to_file(path: str) -> None:
    """Append every later log line to ``path``, after the ones logged so far."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    buffer = _state.pop("buffer")
    buffer.setTarget(handler)
    buffer.flush()
    root = logging.getLogger()
    root.removeHandler(buffer)
    root.addHandler(handler)
    _state["handlers"] = [h for h in _state["handlers"] if h is not buffer] + [handler]


def close_logging() -> None:
    """Remove the handlers of :func:`setup_logging` (closing train.log) and restore what it changed."""
    root = logging.getLogger()
    for handler in _state.pop("handlers", []):
        root.removeHandler(handler)
        handler.close()
    if "root_level" in _state:
        root.setLevel(_state.pop("root_level"))
        warnings.showwarning = _state.pop("showwarning")
    _state.clear()


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, wandb_cfg=None, config: dict | None = None,
                 resume_step: int = 0):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        self._truncate(resume_step)
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name or os.path.basename(run_dir),
                                    entity=wandb_cfg.entity, mode=wandb_cfg.mode, dir=run_dir, config=config,
                                    resume="allow", id=_wandb_id(run_dir))

    def _truncate(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def mean_tokens_per_s(self) -> float | None:
        """The mean of the logged training throughputs."""
        if not os.path.exists(self.path):
            return None
        with open(self.path) as f:
            rates = [r["tokens_per_s"] for r in map(json.loads, f) if "tokens_per_s" in r]
        return sum(rates) / len(rates) if rates else None

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: str) -> str:
    """A stable wandb run id per run_dir, so a resumed job continues the same wandb run."""
    path = os.path.join(run_dir, "wandb_id.txt")
    if not os.path.exists(path):
        import uuid

        with open(path, "w") as f:
            f.write(uuid.uuid4().hex[:12])
    with open(path) as f:
        return f.read().strip()
