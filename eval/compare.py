"""A whole architecture comparison in one command: train ParaGRU, ParaLSTM, Mamba2 and the Transformer on
the same token stream, evaluate them, and write the report.

    python -m eval.compare size=tiny trainer=gpu out=runs/compare steps=600 batch_size=16 seq_len=512
    python -m eval.compare size=125m trainer=gpu tokens=20000000 tasks=paper data_root=../shared/data/eval
    python -m eval.compare size=tiny steps=20 jobs=2                      # CPU: two trainings at a time
    python -m eval.compare size=tiny steps=50 mamba2.trainer.lr=1e-3      # an override for one architecture

Arguments are ``key=value``: the keys of :class:`CompareConfig` (below); ``<arch>.<key>=value``, a train.py
override for one architecture; and any other ``key=value`` (``data=...``, ``trainer=gpu``, ``trainer.lr=...``,
``seed=...``), a train.py override for all of them, as ``slurm/compare_archs.sh`` passes its arguments on.

Stages, with one progress line each (which architecture, which stage):

1. **check** everything before the first training: every preset ``<arch>_<size>`` exists, each
   architecture's train.py config composes and passes train.py's own checks (data files, trainer values,
   the model config), the downstream tasks and their data exist;
2. **train** each architecture as its own ``train.py`` subprocess (``<out>/<arch>_<size>``, output in
   ``<out>/logs/<arch>.train.log``): same data config, seed, batch, sequence length and steps, so the same
   token stream. A run that fails is recorded with its last error line and the others go on;
3. **evaluate** each trained run in this process (``eval.main``'s code): perplexity on its validation
   rows (packed, as train.py validates) and the downstream ``tasks``; a failure is recorded, the others go on;
4. **report** ``<out>/report/`` (``eval.report``): the table (status, parameters, tokens/s, MFU, peak
   memory, perplexity, downstream) and the loss curves vs tokens and vs training time.

Re-running the same command skips what is done (a trained run, an evaluation newer than its export) and
resumes an interrupted training from its last checkpoint (train.py's resume); ``<out>/compare.json``
records each run's train.py overrides, and a run dir made with other overrides is refused, not mixed.
The command exits 0 when every architecture trained and evaluated, 1 when one did not (the report says why).

Mamba2 on CUDA: its Triton SSD kernels autotune on their first launch (~100 s at 1B). This command and
its training subprocesses run with ``TRITON_CACHE_AUTOTUNING=1``, so Triton keeps the chosen configurations
in its cache directory (``~/.triton/cache``; ``TRITON_CACHE_DIR``) next to the compiled kernels: the
evaluation, a re-run or a second comparison on the same machine does not tune again.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from training.common import REPO_ROOT, ConfigError
from training.config import Config, JobConfig

ARCHS = ("paragru", "paralstm", "mamba2", "transformer")
TRAIN_ROOT_KEYS = ("model", "data", "trainer", "wandb", "run_dir", "seed", "hydra")


@dataclass
class CompareConfig(Config):
    """The comparison's own keys; every other ``key=value`` is a train.py override."""

    size: str = "tiny"
    """Preset size: every architecture trains ``configs/model/<arch>_<size>.yaml`` (tiny, 125m, 400m, 1b, ...)."""
    archs: list[Literal["paragru", "paralstm", "mamba2", "transformer"]] = field(default_factory=lambda: list(ARCHS))
    """The architectures to compare (a subset of paragru, paralstm, mamba2, transformer)."""
    out: str = "runs/compare"
    """Output directory: one run dir per architecture (``<arch>_<size>``), ``logs/``, ``report/``."""
    steps: int | None = None
    """Training steps of every run (warm-up and, unless given, the validation interval: a tenth of them);
    None: the trainer config's max_steps."""
    tokens: int | None = None
    """Or a token budget per run: steps = tokens / (batch_size x seq_len), as slurm/train_array.sbatch."""
    batch_size: int | None = None
    """Global batch in sequences (trainer.batch_size); None: the trainer config's."""
    seq_len: int | None = None
    """Tokens per sequence (data.seq_len); None: the data config's."""
    jobs: int = 1
    """Trainings at a time (1 on a GPU, so that timings and memory are each run's own)."""
    tasks: str | list[str] = "smoke"
    """Downstream tasks: a preset of configs/eval (smoke, paper, mamba_zeroshot) or a list ("task:shots")."""
    limit: int | None = None
    """Documents per downstream task; None: the preset's (smoke: 20; paper: all)."""
    data_root: str | None = None
    """Downstream data (eval.main's data_root); None: the slices shipped in eval/tasks/data."""
    perplexity: bool = True
    """Perplexity and loss by position on each run's validation rows (eval.main perplexity=true)."""
    eval_batch_size: int = 8
    """Batch size of the evaluations."""
    synthetic: list[str] = field(default_factory=list)
    """Synthetic-task suite to run on each model; empty: none (the suite is not in this checkout yet)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s for the MFU columns; None: the GPU's bf16 peak from its name (blank on a CPU)."""

    def check(self) -> None:
        super().check()
        if not self.archs:
            self.fail("archs", f"choose from {', '.join(ARCHS)}")
        for name in ("steps", "tokens", "batch_size", "seq_len"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                self.fail(name, "must be > 0")
        if self.steps is not None and self.tokens is not None:
            self.fail("tokens", "give steps or tokens, not both")
        if self.jobs < 1:
            self.fail("jobs", "must be >= 1")


@dataclass
class ArchRun:
    """One architecture of the comparison, checked."""

    arch: str
    index: int
    run_dir: Path
    overrides: list[str]  # train.py's, run_dir included
    max_steps: int
    tokens: int
    device: str  # where train.py runs ("cuda" | "cpu")

    @property
    def tag(self) -> str:
        return f"[{self.index}] {self.arch}"


# ------------------------------------------------------------------------------------------------
# Arguments and checks
# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[CompareConfig, list[str], dict[str, list[str]]]:
    """``(config, overrides for every arch, overrides per arch)`` from ``key=value`` arguments."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    own, common, per_arch = [], [], {a: [] for a in ARCHS}
    names = {f.name for f in dataclasses.fields(CompareConfig)}
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r}: expected key=value")
        head = key.split(".", 1)[0]
        if key in names:
            own.append(arg)
        elif head in ARCHS and "." in key:
            per_arch[head].append(arg.split(".", 1)[1])
        elif head in TRAIN_ROOT_KEYS:
            common.append(arg)
        else:
            raise ConfigError(f"{key}: not a key of the comparison ({', '.join(sorted(names))}), of train.py "
                              f"({', '.join(TRAIN_ROOT_KEYS)}) or <arch>.<key> for one of {', '.join(ARCHS)}")
    try:
        values = OmegaConf.to_container(OmegaConf.from_dotlist(own), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    cfg = CompareConfig.from_dict(values)
    idle = [a for a, o in per_arch.items() if o and a not in cfg.archs]
    if idle:
        raise ConfigError(f"{idle[0]}.*: overrides for an architecture that is not in archs={cfg.archs}")
    return cfg, common, per_arch


def check_train(overrides: list[str]) -> JobConfig:
    """train.py's config for ``overrides``, composed and checked as train.py does (typed groups, data files,
    the batch split, the model config on the meta device) before anything is created."""
    from train import build_model, load_job

    job = load_job(overrides)
    job.trainer.micro_batch(1)
    build_model(job, None, "meta")
    return job


def plan_runs(cfg: CompareConfig, common: list[str], per_arch: dict[str, list[str]]) -> list[ArchRun]:
    """Every architecture's train.py overrides, checked; raises :class:`ConfigError` naming the arch and key."""
    from models.count import PRESETS_DIR

    out = Path(cfg.out).expanduser().resolve()
    runs = []
    for i, arch in enumerate(cfg.archs, 1):
        preset = f"{arch}_{cfg.size}"
        if not (Path(PRESETS_DIR) / f"{preset}.yaml").is_file():
            sizes = sorted({p.stem.split("_", 1)[1] for p in Path(PRESETS_DIR).glob(f"{arch}_*.yaml")})
            raise ConfigError(f"size={cfg.size}: no preset {preset} (sizes: {', '.join(sizes)})")
        run_dir = out / preset
        base = [f"model={preset}", *common]
        if cfg.batch_size is not None:
            base.append(f"trainer.batch_size={cfg.batch_size}")
        if cfg.seq_len is not None:
            base.append(f"data.seq_len={cfg.seq_len}")
        try:
            composed = check_train([*base, *per_arch[arch], f"run_dir={run_dir}"])
            steps = cfg.steps
            if cfg.tokens is not None:
                steps = cfg.tokens // (composed.trainer.batch_size * composed.data.seq_len)
                if steps == 0:
                    raise ConfigError(f"tokens={cfg.tokens} is less than one step of {composed.trainer.batch_size} x "
                                      f"{composed.data.seq_len} tokens")
            if steps is not None:
                base += [f"trainer.max_steps={steps}", f"trainer.warmup_steps={steps // 10}"]
                given = [o.split("=", 1)[0] for o in [*common, *per_arch[arch]]]
                if "trainer.val_every" not in given:  # ten points on every validation curve
                    base.append(f"trainer.val_every={max(1, steps // 10)}")
                composed = check_train([*base, *per_arch[arch], f"run_dir={run_dir}"])
        except ConfigError as err:
            raise ConfigError(f"{arch}: {err}") from None
        t = composed.trainer
        device = "cuda" if t.device == "cuda" or (t.device == "auto" and _cuda()) else "cpu"
        runs.append(ArchRun(arch, i, run_dir, [*base, *per_arch[arch], f"run_dir={run_dir}"], int(t.max_steps),
                            int(t.max_steps) * int(t.batch_size) * int(composed.data.seq_len), device))
    return runs


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def eval_config(cfg: CompareConfig, runs: list[ArchRun]):
    """eval.main's config for the trained runs (configs/eval/default.yaml with the comparison's keys)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs" / "eval"), version_base="1.3"):
        ecfg = compose(config_name="default")
    OmegaConf.set_struct(ecfg, False)
    ecfg.checkpoints = [str(r.run_dir) for r in runs]
    ecfg.tasks, ecfg.limit, ecfg.data_root = cfg.tasks, cfg.limit, cfg.data_root
    ecfg.perplexity = cfg.perplexity
    ecfg.batch_size = ecfg.perplexity_batch_size = cfg.eval_batch_size
    ecfg.device = runs[0].device if runs else "cpu"
    return ecfg


def check_eval(cfg: CompareConfig) -> str:
    """The downstream tasks and their data files, checked before any training; returns the preset name."""
    from eval.downstream import check_data, resolve_data_root, resolve_tasks

    preset, specs, _ = resolve_tasks(cfg.tasks, None, cfg.limit)
    check_data(resolve_data_root(cfg.data_root), sorted({s.task for s in specs if s.is_local}))
    if cfg.synthetic:
        raise ConfigError(f"synthetic={cfg.synthetic}: the synthetic-task suite is not part of this checkout")
    return preset


# ------------------------------------------------------------------------------------------------
# The record of a comparison (<out>/compare.json)
# ------------------------------------------------------------------------------------------------
class Manifest:
    """``<out>/compare.json``: per architecture its train.py overrides and what each stage gave; written
    atomically after every stage."""

    def __init__(self, out: Path):
        self.path = out / "compare.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {"runs": {}}

    def check(self, runs: list[ArchRun]) -> None:
        """Refuse a run dir that holds a run made with other overrides and something to lose (a checkpoint or
        a finished run; nothing of it is touched). A run that failed before its first checkpoint starts anew."""
        for r in runs:
            before = self.data["runs"].get(r.arch, {}).get("overrides")
            kept = (r.run_dir / "summary.json").exists() or any((r.run_dir / "checkpoints").glob("step_*"))
            if before is not None and before != r.overrides and kept:
                changed = sorted(set(before) ^ set(r.overrides))
                raise ConfigError(f"{r.run_dir} was trained with other overrides ({', '.join(changed)}): "
                                  f"remove it to retrain, or choose another out=")

    def run(self, arch: str) -> dict:
        return self.data["runs"].setdefault(arch, {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------
def say(message: str) -> None:
    print(f"{_dt.datetime.now():%H:%M:%S} {message}", flush=True)


def last_error_line(log: Path) -> str:
    """The line that says why a run failed: train.py's ``error: ...``, else a traceback's last line, else the
    last line of the log."""
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()] if log.is_file() else []
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) or head == "Killed":
            return line
    return lines[-1] if lines else "no output"


def trained(r: ArchRun) -> bool:
    summary = r.run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("step") == r.max_steps


def _last_record(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row and "split" not in row:
            last = row
    return last


class Training:
    """One train.py subprocess, its log and its progress."""

    def __init__(self, r: ArchRun, logs: Path):
        self.r, self.log = r, logs / f"{r.arch}.train.log"
        env = {**os.environ, "TQDM_DISABLE": "1", "TRITON_CACHE_AUTOTUNING": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, str(REPO_ROOT / "train.py"), *r.overrides]
        r.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            f.write(f"== {_dt.datetime.now().isoformat(timespec='seconds')} {' '.join(cmd)}\n")
        self._log_file = open(self.log, "a")  # noqa: SIM115 - open for the subprocess's lifetime
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.start, self.shown, self.rc, self.rss_gib = time.time(), (None, 0.0), None, None

    def poll(self) -> bool:
        """True once the process has ended (its peak RSS recorded)."""
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.proc.returncode = self.rc = os.waitstatus_to_exitcode(status)
        self.rss_gib = round(usage.ru_maxrss / 2**20, 3)  # ru_maxrss: KiB on Linux
        self._log_file.close()
        return True

    def progress(self, every: float) -> None:
        rec = _last_record(self.r.run_dir)
        step = rec["step"] if rec else None
        if step is None or (step == self.shown[0]) or time.time() - self.shown[1] < every:
            return
        rate = rec.get("tokens_per_s")
        say(f"{self.r.tag} train: step {step}/{self.r.max_steps}, loss {rec['loss']:.3f}"
            + (f", {rate:,.0f} tokens/s" if rate else ""))
        self.shown = (step, time.time())


def train_all(runs: list[ArchRun], manifest: Manifest, logs: Path, jobs: int, every: float = 15.0) -> None:
    """Train the runs that are not trained yet, ``jobs`` at a time, and record each outcome."""
    logs.mkdir(parents=True, exist_ok=True)
    todo = []
    for r in runs:
        entry = manifest.run(r.arch)
        entry.update(overrides=r.overrides, run_dir=str(r.run_dir))
        if trained(r):
            say(f"{r.tag} train: done before ({r.run_dir})")
            entry["train"] = {**entry.get("train", {}), "state": "trained"}
        else:
            todo.append(r)
    manifest.save()
    active: list[Training] = []
    while todo or active:
        while todo and len(active) < jobs:
            r = todo.pop(0)
            resume = (r.run_dir / "checkpoints").is_dir()
            say(f"{r.tag} train: {'resuming' if resume else 'starting'} {r.max_steps} steps, {r.tokens:,} tokens "
                f"-> {r.run_dir} (log {logs / f'{r.arch}.train.log'})")
            active.append(Training(r, logs))
        time.sleep(0.5)
        for t in list(active):
            if not t.poll():
                t.progress(every)
                continue
            active.remove(t)
            seconds = round(time.time() - t.start, 1)
            entry = manifest.run(t.r.arch)
            if t.rc == 0 and trained(t.r):
                summary = json.loads((t.r.run_dir / "summary.json").read_text())
                entry["train"] = {"state": "trained", "seconds": seconds, "peak_rss_gib": t.rss_gib}
                say(f"{t.r.tag} train: finished in {seconds:.0f} s, validation perplexity {summary['val_ppl']:.2f}")
            else:
                reason = last_error_line(t.log) if t.rc else "train.py ended without a summary.json"
                entry["train"] = {"state": "failed", "reason": reason, "exit_code": t.rc, "seconds": seconds,
                                  "peak_rss_gib": t.rss_gib}
                say(f"{t.r.tag} train: FAILED (exit {t.rc}): {reason} (log {t.log})")
            manifest.save()


def _newer(path: Path, than: Path) -> bool:
    return path.is_file() and than.is_file() and path.stat().st_mtime >= than.stat().st_mtime


def evaluate_all(cfg: CompareConfig, runs: list[ArchRun], manifest: Manifest, preset: str) -> None:
    """Perplexity and downstream tasks of every trained run (one model load each); a failure is recorded."""
    from eval.main import evaluate, plan

    ready = [r for r in runs if trained(r)]
    todo = []
    for r in ready:
        done = _newer(r.run_dir / "eval" / f"downstream_{preset}.json", r.run_dir / "hf" / "config.json")
        if cfg.perplexity:
            done = done and _newer(r.run_dir / "eval" / "perplexity.json", r.run_dir / "hf" / "config.json")
        if done and manifest.run(r.arch).get("eval", {}).get("state") == "evaluated":
            say(f"{r.tag} evaluate: done before")
        else:
            todo.append(r)
    if not todo:
        return
    ecfg = eval_config(cfg, todo)
    p = plan(ecfg)
    for r, ckpt in zip(todo, p.checkpoints):
        say(f"{r.tag} evaluate: " + ("perplexity, " if cfg.perplexity else "") + f"downstream {p.preset} "
            f"({len(p.specs)} tasks, limit {p.limit}) on {ecfg.device}")
        start = time.time()
        entry = manifest.run(r.arch)
        try:
            evaluate(ckpt, ecfg, p)
            entry["eval"] = {"state": "evaluated", "seconds": round(time.time() - start, 1)}
        except Exception as exc:  # one model's failure must not stop the others' evaluation
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            entry["eval"] = {"state": "failed", "reason": reason}
            say(f"{r.tag} evaluate: FAILED: {reason}")
        manifest.save()


def report(cfg: CompareConfig, runs: list[ArchRun], manifest: Manifest, argv: list[str]) -> dict:
    from eval.report import make_report, peak_tflops

    notes = {}
    for r in runs:
        entry = manifest.run(r.arch)
        train, ev = entry.get("train", {}), entry.get("eval", {})
        note = {"peak_rss_gib": train.get("peak_rss_gib")}
        if train.get("state") == "failed":
            note.update(state="failed", reason=train.get("reason"))
        elif ev.get("state") == "failed":
            note.update(state="failed", reason=f"evaluation: {ev.get('reason')}")
        notes[r.run_dir.name] = note
    device = manifest.data.get("device")
    peak = cfg.peak_tflops or peak_tflops(device)
    r0 = runs[0]
    title = f"Architecture comparison at size {cfg.size}"
    preamble = (f"`python -m eval.compare {' '.join(argv)}` on {device or 'an unknown device'}: "
                f"{r0.max_steps} steps, {r0.tokens:,} tokens per run, the same data, seed and batches for every "
                f"architecture.")
    return make_report([r.run_dir for r in runs], Path(cfg.out).expanduser().resolve() / "report", title,
                       notes=notes, peak=peak, preamble=preamble)


def run(argv: list[str]) -> int:
    cfg, common, per_arch = parse_args(argv)
    out = Path(cfg.out).expanduser().resolve()
    say(f"compare: checking {len(cfg.archs)} architectures at size {cfg.size}")
    preset = check_eval(cfg)
    runs = plan_runs(cfg, common, per_arch)
    manifest = Manifest(out)
    manifest.check(runs)
    if runs[0].device == "cuda":
        import torch

        manifest.data["device"] = torch.cuda.get_device_name(0)
    else:
        manifest.data["device"] = "CPU"
    r0 = runs[0]
    say(f"compare: {', '.join(r.arch for r in runs)}: {r0.max_steps} steps, {r0.tokens:,} tokens each, on "
        f"{manifest.data['device']} -> {out}")
    train_all(runs, manifest, out / "logs", cfg.jobs)
    evaluate_all(cfg, runs, manifest, preset)
    res = report(cfg, runs, manifest, argv)
    say(f"report: {res['files']['markdown']}")
    failed = 0
    for r in runs:
        entry = manifest.run(r.arch)
        state = res["states"][r.run_dir.name]
        evaluated = entry.get("eval", {}).get("state") == "evaluated"
        failed += not (state == "finished" and evaluated)
        print(f"  {r.arch:12s} {state}{'' if evaluated or state != 'finished' else ' (not evaluated)'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from eval.downstream import quiet_libraries

    quiet_libraries()
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # the evaluations here reuse the trainings' tuning
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(f"usage: python -m eval.compare [KEY=VALUE ...] [<arch>.KEY=VALUE ...] [TRAIN.PY KEY=VALUE ...]\n\n"
              f"{CompareConfig.help()}")
        return 0
    try:
        return run(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
