"""Pretrain a language model (ParaGRU, ParaLSTM, Mamba2 or Transformer) on streamed, packed text.

    python train.py                                   # the default: a tiny ParaGRU on the embedded corpus
    python train.py model=paralstm_tiny trainer.max_steps=50 run_dir=runs/lstm
    python train.py --help                            # every key, its default and what it does
    python train.py model=paragru_synth_bare data=synthetic_parity trainer=synthetic   # a synthetic task
    accelerate launch --multi_gpu --num_processes 8 train.py model=paragru_1b data=slimpajama trainer=fsdp2

Read top to bottom: the config (checked before anything is created) -> the data source -> the model ->
``train_step`` (one optimizer step) -> the run's health checks -> ``train`` (set-up, the loop: log,
validate, checkpoint, stop on a signal; then the final validation and the export) -> ``main``.

Everything a run writes goes under ``run_dir``: the resolved ``config.yaml``, ``train.log``,
``metrics.jsonl``, ``checkpoints/``, the HF export ``hf/`` (when the data has a tokenizer) and
``summary.json``. Re-running with the same ``run_dir`` resumes from the newest complete checkpoint, exactly
(same data, same RNG, same optimizer).
"""
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm import tqdm

from data import PackedStream, load_tokenizer, token_byte_lengths, validation_batches
from eval.export import export_hf
from eval.perplexity import evaluate_perplexity
from training.checkpoint import Checkpointer
from training.common import REPO_ROOT, ConfigError
from training.compile import compile_blocks
from training.config import DataConfig, JobConfig, SyntheticConfig, TrainerConfig, compose
from training.distributed import make_accelerator, prepare, shard, sharded_state
from training.flops import flops_per_token, mean_context, peak_flops
from training.loss import LMObjective
from training.memory import GiB, available_bytes, estimate_bytes, peak_memory
from training.metrics import MetricsLogger, close_logging, log_to_file, setup_logging
from training.optim import build_optimizer, build_scheduler
from training.preemption import EXIT_REQUEUE, Preemption
from training.run_dir import check_resume, save_config
from training.sequence_parallel import setup as setup_sequence_parallel

log = logging.getLogger("train")
LONG_RUN_S = 600  # an ETA above this gets a hint on how to shorten the run


# ------------------------------------------------------------------------------------------------
# Config: composed by Hydra, typed and checked (training/config.py) before anything is created
# ------------------------------------------------------------------------------------------------
def load_job(overrides: list[str]) -> JobConfig:
    """The run's config: configs/config.yaml with the command-line overrides, checked. Relative paths are
    taken from the current directory and made absolute; run_dir defaults to runs/<model.name>."""
    job = JobConfig.from_dict(compose(JobConfig, str(REPO_ROOT / "configs"), "config", overrides))
    job.data = job.data.absolute()
    job.run_dir = os.path.abspath(os.path.expanduser(job.run_dir or os.path.join("runs", job.model.name)))
    return job


def check_memory(job: JobConfig, model: torch.nn.Module, device: torch.device, micro_batch: int, world_size: int,
                 bf16: bool) -> None:
    """Refuse a run whose memory floor (training/memory.py) exceeds the free memory, in one line."""
    t = job.trainer
    if not t.memory_check:
        return
    free, where = available_bytes(device)
    parts = estimate_bytes(params=sum(p.numel() for p in model.parameters()), vocab=model.config.vocab_size,
                           hidden=model.config.hidden_size, layers=model.config.num_hidden_layers,
                           micro_batch=micro_batch, seq_len=job.data.seq_len, arch=job.model.arch, bf16=bf16,
                           strategy=t.strategy, zero_stage=t.zero_stage, world_size=world_size,
                           gradient_checkpointing=t.gradient_checkpointing)
    need = sum(parts.values())
    if need > free:
        detail = " + ".join(f"{name} {size / GiB:.1f}" for name, size in parts.items())
        raise ConfigError(f"memory: this run needs at least {need / GiB:.1f} GiB per process ({detail}; micro-batch "
                          f"{micro_batch} x data.seq_len={job.data.seq_len}) but {free / GiB:.1f} GiB is {where}: "
                          f"lower data.seq_len or trainer.batch_size (or raise trainer.grad_accum); "
                          f"trainer.memory_check=false skips this check")


def open_run_dir(run_dir: str) -> None:
    """Create run_dir and make sure it can be written; one line naming it if not."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"run_dir={run_dir}: cannot write there ({err.strerror})") from None


# ------------------------------------------------------------------------------------------------
# Data: the one seam between the data config and the loop
# ------------------------------------------------------------------------------------------------
@dataclass
class DataSource:
    """What the loop needs from the data, whatever produces it."""

    train: Iterator[dict[str, torch.Tensor]]
    """Endless micro-batches of this rank ({input_ids, labels, position_ids} [b, T]; label -100 is not
    scored), with state_dict() / load_state_dict(), so a resumed run continues with the next unseen row."""
    validation: list[dict[str, torch.Tensor]]
    """This rank's validation batches, the same at every validation."""
    vocab_size: int
    """Token ids the model must cover (the model pads it to a multiple of 64 unless pad_vocab is False)."""
    pad_vocab: bool = True
    """False: the model's vocabulary is exactly vocab_size (a synthetic task's classes: padding would add
    outputs that are never targets, and parameters the paper's counts do not have)."""
    byte_lengths: torch.Tensor | None = None
    """UTF-8 bytes of each token id, for bits per byte; None: no bits per byte."""
    tokenizer: Any = None
    """Saved with the HF export; None when the data has no tokenizer."""
    val_metrics: Callable[..., dict] | None = None
    """Extra validation metrics, ``(model, batches, device) -> dict`` (e.g. a synthetic task's accuracy)."""
    test: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    """Named test sets evaluated once after training like the validation rows (metrics ``test_<name>_*``)."""


def build_data(cfg: DataConfig | SyntheticConfig, micro_batch: int, val_batches: int, rank: int,
               world_size: int) -> DataSource:
    """Text corpora: the tokenizer, the packed training stream and the packed validation rows. A synthetic
    task (data/synthetic.py): its vocabulary unpadded, no tokenizer and no bytes, exact-match and per-token
    accuracy in validation, and test sets at longer lengths."""
    if cfg.source == "synthetic":
        from data.synthetic import SyntheticStream, evaluation_batches, make_task
        from eval.synthetic import evaluate_accuracy

        return DataSource(
            train=SyntheticStream(cfg, micro_batch, rank, world_size),
            validation=evaluation_batches(cfg, None, rank, world_size)[:val_batches],
            vocab_size=make_task(cfg.task, cfg.task_args).vocab_size, pad_vocab=False,
            val_metrics=evaluate_accuracy,
            test={f"L{n}": evaluation_batches(cfg, n, rank, world_size) for n in cfg.test_lengths})
    tokenizer = load_tokenizer(cfg.tokenizer)
    return DataSource(
        train=PackedStream(cfg, tokenizer, micro_batch, rank, world_size),
        validation=validation_batches(cfg, tokenizer, micro_batch, rank, world_size)[:val_batches],
        vocab_size=len(tokenizer), byte_lengths=token_byte_lengths(tokenizer), tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
def build_model(job: JobConfig, data: DataSource | None, device: torch.device | str) -> torch.nn.Module:
    """The model of ``model.arch`` / ``model.config`` for ``data``'s vocabulary on ``device`` ("meta": shapes
    only); ``data`` None: the config's own vocabulary (to check a model config before any data is read)."""
    # transformers, the slowest import of a run, comes with models/: after the config checks.
    from models.registry import build_model as build

    config, vocab_size = job.model.config, (data.vocab_size if data is not None else None)
    if data is not None and not data.pad_vocab:
        config = {"vocab_size": data.vocab_size, **config}
    try:  # a bad config key, a vocab smaller than the data's: one line naming the key
        with torch.device(device):
            return build(job.model.arch, config, vocab_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, all but the input and output embeddings)."""
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if id(p) not in embeddings)


def validate(model, data: DataSource, device, batches: list | None = None, prefix: str = "val_") -> dict:
    """Loss, perplexity and bits per byte over all ranks' shares of the validation rows (or of ``batches``),
    and the data source's own metrics; every key starts with ``prefix``."""
    batches = data.validation if batches is None else batches
    result = evaluate_perplexity(model, batches, data.byte_lengths, device=device)
    metrics = {"loss": result["loss"], "ppl": result["ppl"], "bpb": result["bpb"], "tokens": result["tokens"]}
    if data.val_metrics is not None:
        metrics.update(data.val_metrics(model, batches, device))
    return {prefix + key: value for key, value in metrics.items()}


def extra_metrics(metrics: dict, prefix: str = "val_") -> str:
    """The data source's own metrics of a validation (``val_metrics``) for its log line, e.g. ``  exact_acc 1.0000``."""
    own = {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}
    return "".join(f"  {name} {value:.4f}" if isinstance(value, float) and (value == 0 or abs(value) >= 1e-3)
                   else f"  {name} {value:.1e}" if isinstance(value, float) else f"  {name} {value}"
                   for name, value in own.items() if name not in ("loss", "ppl", "bpb", "tokens", "sequences"))


# ------------------------------------------------------------------------------------------------
# One optimizer step
# ------------------------------------------------------------------------------------------------
def train_step(model, optimizer, accelerator, batches: list[dict], t: TrainerConfig, objective: LMObjective) -> dict:
    """Forward, loss and backward over the micro-batches of one optimizer step, then clip and update. A
    step whose loss or gradient norm is not finite makes no update (``finite`` False). Returns the loss
    and z-loss (means over micro-batches and ranks) and the gradient norm before clipping."""
    sums = torch.zeros(2, device=accelerator.device)  # cross-entropy, z-loss
    for batch in batches:
        with accelerator.accumulate(model):
            loss, ce, z = objective(model, batch)  # the fused head + loss (training/loss.py)
            accelerator.backward(loss)
            sums += torch.stack([ce, z])
            if accelerator.sync_gradients:  # the last micro-batch: the gradients are complete
                loss, z_loss = accelerator.reduce(sums / len(batches), reduction="mean").tolist()
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), t.grad_clip))
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "z_loss": z_loss, "grad_norm": grad_norm, "finite": finite}


# ------------------------------------------------------------------------------------------------
# Run health: progress counters, and stopping a run that cannot go on
# ------------------------------------------------------------------------------------------------
class TrainState:
    """Progress counters saved with every checkpoint (registered with accelerate as a custom object)."""

    def __init__(self):
        self.step, self.tokens = 0, 0
        self.nonfinite_in_row, self.nonfinite_total, self.stalled_in_row = 0, 0, 0
        self.solved_in_row = 0  # steps in a row at or below trainer.stop_at_loss

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def solved(state: TrainState, t: TrainerConfig) -> bool:
    """``log_every`` steps in a row at or below ``trainer.stop_at_loss`` (one lucky batch does not end a run)."""
    return t.stop_at_loss is not None and state.solved_in_row >= t.log_every


def converged(state: TrainState, step: dict, t: TrainerConfig) -> bool:
    """Count the steps in a row whose (finite) loss is at or below ``trainer.stop_at_loss``; then :func:`solved`."""
    if t.stop_at_loss is not None:
        state.solved_in_row = state.solved_in_row + 1 if step["finite"] and step["loss"] <= t.stop_at_loss else 0
    return solved(state, t)


class TrainingFailed(RuntimeError):
    """The run cannot go on: non-finite losses, or no progress, for too many steps in a row."""


def check_health(state: TrainState, step: dict, t: TrainerConfig, chance_loss: float, lr: float) -> None:
    """Count non-finite and stalled steps in a row; raise :class:`TrainingFailed` at the limits. A step
    stalls when its gradient norm is exactly 0, or, after warm-up, when its loss is within 1e-3 of
    ``chance_loss`` = ln(vocabulary), what uniform predictions score (a healthy run is there only at
    initialisation)."""
    if not step["finite"]:
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        if state.nonfinite_in_row >= t.max_nonfinite_steps:
            raise TrainingFailed(f"stopping at step {state.step}: {state.nonfinite_in_row} non-finite losses or "
                                 f"gradient norms in a row (lower the learning rate, now {lr:g}, or check the data)")
        return
    state.nonfinite_in_row = 0
    at_chance = state.step > t.warmup_steps and abs(step["loss"] - chance_loss) < 1e-3
    state.stalled_in_row = state.stalled_in_row + 1 if step["grad_norm"] == 0.0 or at_chance else 0
    if t.max_stalled_steps and state.stalled_in_row >= t.max_stalled_steps:
        why = ("the gradient norm is exactly 0" if step["grad_norm"] == 0.0 else
               f"the loss stays at {step['loss']:.4f} = ln(vocabulary), what uniform predictions score")
        raise TrainingFailed(f"stopping at step {state.step}: no progress in {state.stalled_in_row} steps in a row "
                             f"({why}); the learning rate ({lr:g}) is probably too high, or the data broken "
                             f"(trainer.max_stalled_steps={t.max_stalled_steps} sets the limit, 0 disables it)")


class Progress:
    """The progress bar, the throughput, and the ETA: measured from the end of the first step (start-up
    and the first step's one-time costs do not count), printed once after three more steps with a hint
    when the run is long, and shown in every loss line."""

    def __init__(self, start: int, max_steps: int, tokens_per_step: int, enabled: bool):
        self.bar = tqdm(total=max_steps, initial=start, disable=not enabled, desc="train", dynamic_ncols=True)
        self.first, self.max_steps, self.tokens_per_step = start + 1, max_steps, tokens_per_step
        self.first_done, self.step = None, start
        self.window_start, self.window_steps = time.perf_counter(), 0

    def update(self, step: int) -> None:
        self.bar.update(1)
        self.step, self.window_steps = step, self.window_steps + 1
        if step == self.first:
            self.first_done = time.perf_counter()
        if step - self.first == 3 and step < self.max_steps:
            eta = self.eta()
            hint = f"; to make it shorter, lower trainer.max_steps (now {self.max_steps})" if eta > LONG_RUN_S else ""
            log.info(f"ETA {duration(eta)} for the remaining {self.max_steps - step} steps "
                     f"({(time.perf_counter() - self.first_done) / 3:.2f} s/step){hint}")

    def eta(self) -> float | None:
        timed = self.step - self.first
        if not timed:
            return None
        return (time.perf_counter() - self.first_done) / timed * (self.max_steps - self.step)

    def tokens_per_s(self) -> float:
        """Since the previous call."""
        now = time.perf_counter()
        rate = self.window_steps * self.tokens_per_step / (now - self.window_start)
        self.window_start, self.window_steps = now, 0
        return rate


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def train(job: JobConfig, command: str) -> int:
    """Set up, train, validate and export; returns the exit code (``EXIT_REQUEUE`` after a signal)."""
    t = job.trainer
    t.micro_batch(int(os.environ.get("WORLD_SIZE", "1")))  # a batch that does not divide: before any work

    # ---- Set-up that writes nothing, so that a refused run leaves run_dir as it was: the check that the
    # request can resume the run already in run_dir, accelerator, data, model shapes, memory pre-flight ----
    requested = job.to_dict()
    changes = check_resume(job.run_dir, requested)  # a change the checkpoints cannot follow: ConfigError
    accelerator = make_accelerator(t)
    main_process, world_size = accelerator.is_main_process, accelerator.num_processes
    micro_batch = t.micro_batch(world_size)
    # Sequence parallelism: the ranks of a group read the same rows and each keeps its slice of time steps.
    sp = setup_sequence_parallel(t.sequence_parallel, accelerator.process_index, world_size)
    data = build_data(job.data, micro_batch, t.val_batches, sp.dp_rank, sp.dp_size)
    data.validation = [sp.shard(b) for b in data.validation]
    shapes = build_model(job, data, "meta")
    check_memory(job, shapes, accelerator.device, micro_batch, world_size, accelerator.mixed_precision == "bf16")

    # ---- From here on the run exists: run_dir, train.log, config.yaml ----
    open_run_dir(job.run_dir)
    if main_process:
        log_to_file(os.path.join(job.run_dir, "train.log"))
        save_config(job.run_dir, requested, changes)

    # ---- Model, optimizer, schedule, checkpoints; resume ----
    set_seed(job.seed)
    model = build_model(job, data, accelerator.device)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if sp.size > 1:
        model.set_sequence_parallel(sp.group)
    if t.compile:  # speed (issue 18): each block compiled in place, inside checkpointing, before FSDP2
        log.info(f"compile  {compile_blocks(model)} decoder blocks with torch.compile (compiled at the first step)")
    n_params, n_non_embedding = param_counts(model)
    chance_loss = math.log(model.config.vocab_size)
    tracks_residual = hasattr(model, "track_newton_residual")
    raw_model = model
    # ZeRO-3's partitioned head weight exists only inside the forward: full logits there
    objective = LMObjective(model, t.z_loss, fused=not (t.strategy == "deepspeed" and t.zero_stage == 3),
                            compiled=t.compile)
    peak = peak_flops(accelerator.device, t.peak_tflops)  # MFU in the loss lines (training/flops.py)
    model = shard(accelerator, model, t)  # FSDP2: fully_shard per block + root; other strategies: as is
    optimizer = build_optimizer(model, job.lr, job.weight_decay, t.betas, t.eps)
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.max_steps, t.min_lr_ratio)
    model, optimizer = prepare(accelerator, model, optimizer, t, micro_batch)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    checkpointer = Checkpointer(accelerator, os.path.join(job.run_dir, "checkpoints"), t.keep_last,
                                sharded=sharded_state(model, optimizer, t))
    latest = checkpointer.latest()
    if latest:
        checkpointer.load(latest, data.train)
        scheduler.last_epoch -= 1  # the loaded optimizer holds the old schedule's lr; take this step's from the
        scheduler.step()           # current one (trainer.max_steps may have changed: training/run_dir.py)
        log.info(f"resumed from {latest} (step {state.step}, {state.tokens:,} tokens)")
    metrics = MetricsLogger(job.run_dir, main_process, job.wandb, job.to_dict(), state.step)

    tokens_per_step = t.batch_size * job.data.seq_len
    log.info(f"model    {job.model.name} ({job.model.arch}): {n_params / 1e6:.1f}M parameters, "
             f"{n_non_embedding / 1e6:.2f}M without the embeddings")
    log.info(f"data     {job.data.name}: {tokens_per_step:,} tokens per step ({t.batch_size} x {job.data.seq_len}), "
             f"{tokens_per_step * t.max_steps:,} in {t.max_steps} steps")
    precision = "bf16" if accelerator.mixed_precision == "bf16" else "fp32"
    log.info(f"trainer  {accelerator.device.type}, {precision}, strategy "
             f"{t.strategy}, world size {world_size}, lr {job.lr:g} (warm-up {t.warmup_steps} steps, cosine)")
    if job.lr_scale != 1.0:
        log.info(f"lr       model.lr {job.model.lr:g} x {job.lr_scale:.3g}: sqrt of this batch's {tokens_per_step:,} "
                 f"tokens over the {job.model.batch_tokens:,} it belongs to (trainer.lr_scaling=none: unscaled)")
    log.info(f"run_dir  {job.run_dir}" + (f" (resuming at step {state.step})" if latest else ""))

    # ---- The loop ----
    preemption = Preemption()  # SIGTERM / SIGUSR1: checkpoint at the end of the current step, then stop
    progress = Progress(state.step, t.max_steps, tokens_per_step, main_process)
    model.train()
    stopped, done = False, solved(state, t)  # done already: resumed after a solved stop
    try:
        while state.step < t.max_steps and not stopped and not done:
            log_now = (state.step + 1) % t.log_every == 0 or state.step + 1 == t.max_steps
            if tracks_residual:
                raw_model.track_newton_residual(log_now)
            batches = [{k: v.to(accelerator.device) for k, v in sp.shard(next(data.train)).items()}
                       for _ in range(t.grad_accum)]
            step = train_step(model, optimizer, accelerator, batches, t, objective)
            scheduler.step()
            state.step += 1
            state.tokens += tokens_per_step
            progress.update(state.step)
            check_health(state, step, t, chance_loss, job.lr)
            done = converged(state, step, t)  # the loss is reduced over ranks: every rank decides alike
            if done:
                log.info(f"step {state.step}: the training loss has been <= trainer.stop_at_loss={t.stop_at_loss:g} "
                         f"for {state.solved_in_row} steps in a row; stopping early ({t.max_steps - state.step} of "
                         f"{t.max_steps} steps left)")
            last = state.step == t.max_steps or done

            if log_now:
                record = {"step": state.step, "tokens": state.tokens, "loss": step["loss"], "z_loss": step["z_loss"],
                          "lr": scheduler.get_last_lr()[0], "grad_norm": step["grad_norm"],
                          "tokens_per_s": progress.tokens_per_s(), "nonfinite_steps": state.nonfinite_total,
                          **peak_memory(accelerator.device)}  # the peak since the previous loss line
                if peak is not None:  # MFU per device, FLOPs per token as training/flops.py counts them
                    flops = flops_per_token(job.model.arch, raw_model.config, n_params,
                                            mean_context(batches[0]["position_ids"]))
                    record.update({f"mfu_{k}": round(v * record["tokens_per_s"] / world_size / peak, 4)
                                   for k, v in flops.items()})
                residual = raw_model.newton_residual() if tracks_residual else None
                if residual is not None:
                    record["newton_residual"] = accelerator.reduce(residual.float(), reduction="max").item()
                if tracks_residual:  # chains Newton left unconverged and the cells re-solved exactly, since the start
                    fallbacks = torch.as_tensor(raw_model.newton_fallbacks(), device=accelerator.device)
                    record["newton_fallbacks"] = int(accelerator.reduce(fallbacks, reduction="sum").item())
                metrics.log(record)
                eta = progress.eta()
                log.info(f"step {state.step}/{t.max_steps}  loss {step['loss']:.4f}  lr {record['lr']:.2e}  grad_norm "
                         f"{step['grad_norm']:.3f}  {record['tokens_per_s']:,.0f} tok/s"
                         + (f"  eta {duration(eta)}" if eta is not None else ""))
                progress.bar.set_postfix(loss=f"{step['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if state.step % t.val_every == 0 or last:
                result = validate(model, data, accelerator.device)
                metrics.log({"split": "validation", "step": state.step, "tokens": state.tokens, **result,
                             **peak_memory(accelerator.device)})
                log.info(f"step {state.step}/{t.max_steps}  validation loss {result['val_loss']:.4f}  ppl "
                         f"{result['val_ppl']:.2f}" + (f"  bpb {result['val_bpb']:.4f}" if result["val_bpb"] else "")
                         + extra_metrics(result))
            stopped = preemption.requested(accelerator.device)  # collective: every rank stops after the same step
            if stopped or state.step % t.ckpt_every == 0 or last:
                log.info(f"checkpoint {checkpointer.save(state.step, data.train.state_dict())}")
    finally:
        progress.bar.close()
        preemption.close()
        metrics.close()
        if tracks_residual:
            raw_model.track_newton_residual(False)
    if stopped:
        log.info(f"stopped after step {state.step}; checkpoint written; re-run the same command ({command}) to "
                 f"resume from step {state.step}")
        return EXIT_REQUEUE

    # ---- Final validation and test sets, export, summary ----
    final = validate(model, data, accelerator.device)
    for name, batches in data.test.items():
        final |= validate(model, data, accelerator.device, batches, prefix=f"test_{name}_")
    summary = {"model": job.model.name, "arch": job.model.arch, "params": n_params, "step": state.step,
               "tokens": state.tokens, **final, "run_dir": job.run_dir, "strategy": t.strategy,
               "world_size": world_size, "sequence_parallel": sp.size}
    # An export ships the tokenizer that reads its inputs; without one (a synthetic task's ids) the
    # checkpoints are the run's model.
    hf_dir = os.path.join(job.run_dir, "hf") if data.tokenizer is not None else None
    if hf_dir:
        export_hf(accelerator, model, data.tokenizer, hf_dir)
    if main_process:
        summary.update(hf=hf_dir, tokens_per_s=metrics.mean_tokens_per_s())
        with open(os.path.join(job.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        log.info(f"validation loss {final['val_loss']:.4f}  perplexity {final['val_ppl']:.2f}"
                 + (f"  bits/byte {final['val_bpb']:.4f}" if final["val_bpb"] else "") + extra_metrics(final)
                 + f"  ({state.tokens:,} tokens, {n_params:,} params)")
        for name in data.test:
            prefix = f"test_{name}_"
            log.info(f"test {name}  loss {final[prefix + 'loss']:.4f}" + extra_metrics(final, prefix))
        log.info(f"outputs: {job.run_dir}  (train.log, metrics.jsonl, checkpoints/, {'hf/, ' if hf_dir else ''}"
                 f"summary.json)")
    accelerator.wait_for_everyone()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python train.py [KEY=VALUE ...]``: exit 0 when done, 2 on a bad config (nothing created), 1 when
    training fails, 75 when stopped by a signal after a checkpoint."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        print("usage: python train.py [GROUP=PRESET ...] [KEY=VALUE ...]\n\npresets: "
              "configs/{model,data,trainer}/*.yaml (the default pick: configs/config.yaml); every key below can be "
              f"overridden\n\n{JobConfig.help()}")
        return 0
    setup_logging(main_process=int(os.environ.get("RANK", "0")) == 0)
    command = os.environ.get("TRAIN_COMMAND") or shlex.join(["python", "train.py", *argv])
    try:
        job = load_job(argv)
        return train(job, command)
    except ConfigError as err:
        log.error(str(err))
        return 2
    except TrainingFailed as err:
        log.error(str(err))
        return 1
    finally:
        close_logging()


if __name__ == "__main__":
    sys.exit(main())
