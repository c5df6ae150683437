"""Pretrain a language model (ParaGRU, ParaLSTM, Mamba2 or Transformer) on streamed, packed text.

    python train.py                                   # the default: a tiny ParaGRU on the embedded corpus
    python train.py model=paralstm_tiny trainer.max_steps=50 run_dir=runs/lstm
    python train.py model=paragru_synth_bare data=synthetic_parity trainer=synthetic   # a synthetic task
    accelerate launch --multi_gpu --num_processes 8 train.py model=paragru_1b data=slimpajama trainer=fsdp2

Everything a run writes goes under ``run_dir``: the resolved config, ``metrics.jsonl``, checkpoints,
the HF export (``hf/``) and ``summary.json``. Re-running with the same ``run_dir`` resumes from the
newest complete checkpoint, exactly (same data, same RNG, same optimizer state).
"""
import os
import sys
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from training.config import REPO_ROOT, ConfigError, ModelConfig, TrainerConfig, WandbConfig, check_trainer, to_dataclass
from training.preemption import EXIT_REQUEUE, Preempted, Preemption

CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_coef: float):
    """Mean cross-entropy over the labels that are not -100, and the z-loss ``z_coef · mean(logsumexp(logits)²)``
    (PaLM/DCLM) over the same positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    scored = labels != -100
    count = scored.sum().clamp_min(1)
    ce = -(logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * scored).sum() / count
    # logsumexp recovered from any one column: one softmax pass serves both terms.
    lse = logits[..., 0].float() - logp[..., 0]
    return ce, z_coef * (lse.square() * scored).sum() / count


def make_accelerator(t: TrainerConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    use_cuda = torch.cuda.is_available() and t.device != "cpu"
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available")
    precision = ("bf16" if use_cuda else "fp32") if t.precision == "auto" else t.precision
    kwargs = {}
    if not use_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # accelerate leaves the backend unset without CUDA; several CPU processes need gloo.
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    from training.distributed import strategy_plugins

    # cpu=True would make accelerate ignore the DeepSpeed plugin; without CUDA the device is the CPU anyway.
    cpu = not use_cuda and t.strategy != "deepspeed"
    return Accelerator(cpu=cpu, mixed_precision="bf16" if precision == "bf16" else "no",
                       gradient_accumulation_steps=t.grad_accum, **strategy_plugins(t), **kwargs)


class Run:
    """The resolved pieces of one training run (built and checked before any heavy work)."""

    def __init__(self, cfg: DictConfig):
        from data.pipeline import DataConfig

        self.cfg = cfg
        if not cfg.get("run_dir"):
            raise ConfigError("run_dir must be set")
        self.run_dir = os.path.abspath(str(cfg.run_dir))
        self.model = to_dataclass(ModelConfig, cfg.model, "model")
        self.trainer = to_dataclass(TrainerConfig, cfg.trainer, "trainer")
        self.wandb = to_dataclass(WandbConfig, cfg.get("wandb"), "wandb")
        data = OmegaConf.to_container(cfg.data, resolve=True)
        self.synthetic = data.get("source") == "synthetic"  # a generated task (data/synthetic.py), not text
        if self.synthetic:
            from data.synthetic import SyntheticConfig

            self.data = SyntheticConfig.from_dict(data).validate()
        else:
            self.data = DataConfig.from_dict(data).validate()
        self.lr = self.trainer.lr if self.trainer.lr is not None else self.model.lr
        wd = self.trainer.weight_decay
        self.weight_decay = wd if wd is not None else self.model.weight_decay


def build_model(run: Run, vocab_size: int):
    from models.registry import build_model as build

    try:  # unknown arch, a bad config key, a vocab smaller than the tokenizer's: one line naming the key
        return build(run.model.arch, run.model.config, vocab_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_data(run: Run, micro_batch: int, rank: int, world_size: int):
    """``(train stream, validation batches, vocab size, tokenizer, byte lengths)``; a synthetic task has no
    tokenizer (its vocabulary is the task's, used unpadded) and no byte lengths."""
    if run.synthetic:
        from data.synthetic import SyntheticStream, evaluation_batches

        return (SyntheticStream(run.data, micro_batch, rank, world_size),
                evaluation_batches(run.data, None, rank, world_size), run.data.make_task().vocab_size, None, None)
    from data import PackedStream, load_tokenizer, token_byte_lengths, validation_batches

    tokenizer = load_tokenizer(run.data.tokenizer)
    stream = PackedStream(run.data, tokenizer, micro_batch, rank, world_size)
    val_batches = validation_batches(run.data, tokenizer, micro_batch, rank, world_size)
    return stream, val_batches, len(tokenizer), tokenizer, token_byte_lengths(tokenizer)


def validate(accelerator, model, batches, byte_lengths, prefix: str = "val_", synthetic: bool = False) -> dict:
    """Validation loss, perplexity and bits per byte over all ranks' shares of the validation rows; for a
    synthetic task the loss and the exact-match / per-token accuracies (``eval/synthetic.py``)."""
    if synthetic:
        from eval.synthetic import evaluate_accuracy

        result = evaluate_accuracy(accelerator.unwrap_model(model), batches, device=accelerator.device)
        return {f"{prefix}{k}": v for k, v in result.items() if v is not None}
    from eval.perplexity import evaluate_perplexity

    result = evaluate_perplexity(model, batches, byte_lengths, device=accelerator.device)
    return {"val_loss": result["loss"], "val_ppl": result["ppl"], "val_bpb": result["bpb"],
            "val_tokens": result["tokens"]}


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses in a row (``trainer.max_nonfinite_steps``)."""


class TrainState:
    """Progress counters saved with every checkpoint (registered with accelerate as a custom object)."""

    def __init__(self):
        self.step, self.tokens, self.nonfinite_in_row, self.nonfinite_total = 0, 0, 0, 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def train(cfg: DictConfig) -> dict:
    from accelerate.utils import set_seed
    from tqdm import tqdm

    from eval.export import export_hf
    from training.checkpoint import Checkpointer
    from training.distributed import peak_memory, prepare, shard, sharded_state
    from training.metrics import MetricsLogger
    from training.optim import build_optimizer, build_scheduler

    run = Run(cfg)
    t = run.trainer
    accelerator = make_accelerator(t)
    check_trainer(t, accelerator.num_processes)
    main = accelerator.is_main_process
    micro_batch = t.batch_size // (t.grad_accum * accelerator.num_processes)
    os.makedirs(run.run_dir, exist_ok=True)
    if main:
        OmegaConf.save(cfg, os.path.join(run.run_dir, "config.yaml"), resolve=True)
    set_seed(cfg.seed)

    stream, val_batches, vocab_size, tokenizer, byte_lengths = build_data(
        run, micro_batch, accelerator.process_index, accelerator.num_processes)
    val_batches = val_batches[: t.val_batches]
    if run.synthetic:  # the task's vocabulary as it is: padding would add classes that are never targets
        run.model.config = {**run.model.config, "vocab_size": vocab_size}
    with torch.device(accelerator.device):
        model = build_model(run, vocab_size)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    model = shard(accelerator, model, t)  # FSDP2: fully_shard per block + root; other strategies: as is
    optimizer = build_optimizer(model, run.lr, run.weight_decay, t.betas, t.eps)
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.max_steps, t.min_lr_ratio)

    model, optimizer = prepare(accelerator, model, optimizer, t, micro_batch)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    checkpointer = Checkpointer(accelerator, os.path.join(run.run_dir, "checkpoints"), t.keep_last,
                                sharded=sharded_state(model, optimizer, t))
    latest = checkpointer.latest()
    if latest:
        checkpointer.load(latest, stream)
        accelerator.print(f"resumed from {latest} (step {state.step}, {state.tokens:,} tokens)")
    logger = MetricsLogger(run.run_dir, main, run.wandb, OmegaConf.to_container(cfg, resolve=True), state.step)
    raw_model = accelerator.unwrap_model(model)
    tracks_residual = hasattr(raw_model, "track_newton_residual")
    tokens_per_step = t.batch_size * run.data.seq_len

    preemption = Preemption()  # SIGTERM / SIGUSR1: checkpoint at the end of the current step, then stop
    progress = tqdm(total=t.max_steps, initial=state.step, disable=not main, desc="train", dynamic_ncols=True)
    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    while state.step < t.max_steps:
        log_now = (state.step + 1) % t.log_every == 0 or state.step + 1 == t.max_steps
        if tracks_residual:
            raw_model.track_newton_residual(log_now)
        ce_sum = torch.zeros((), device=accelerator.device)
        z_sum = torch.zeros((), device=accelerator.device)
        grad_norm = None
        for _ in range(t.grad_accum):
            batch = {k: v.to(accelerator.device) for k, v in next(stream).items()}
            with accelerator.accumulate(model):
                logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
                ce, z = lm_loss(logits, batch["labels"], t.z_loss)
                accelerator.backward(ce + z)
                ce_sum += ce.detach()
                z_sum += z.detach()
                if accelerator.sync_gradients:
                    loss = accelerator.reduce(ce_sum / t.grad_accum, reduction="mean")
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
                    if torch.isfinite(loss) and torch.isfinite(torch.as_tensor(grad_norm)):
                        optimizer.step()
                        state.nonfinite_in_row = 0
                    else:
                        state.nonfinite_in_row += 1
                        state.nonfinite_total += 1
                    optimizer.zero_grad(set_to_none=True)
        if state.nonfinite_in_row >= t.max_nonfinite_steps:
            raise NonFiniteLoss(f"stopping: {state.nonfinite_in_row} non-finite losses in a row at step {state.step} "
                                f"(lower the learning rate or check the data)")
        scheduler.step()
        state.step += 1
        state.tokens += tokens_per_step
        window_tokens += tokens_per_step
        progress.update(1)

        if log_now:
            elapsed = time.perf_counter() - window_start
            record = {"step": state.step, "tokens": state.tokens, "loss": loss.item(),
                      "z_loss": accelerator.reduce(z_sum / t.grad_accum, reduction="mean").item(),
                      "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "tokens_per_s": window_tokens / elapsed, "nonfinite_steps": state.nonfinite_total,
                      **peak_memory(accelerator.device)}
            residual = raw_model.newton_residual() if tracks_residual else None
            if residual is not None:
                record["newton_residual"] = accelerator.reduce(residual.float(), reduction="max").item()
            logger.log(record)
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window_start, window_tokens = time.perf_counter(), 0
        if state.step % t.val_every == 0 or state.step == t.max_steps:
            metrics = validate(accelerator, model, val_batches, byte_lengths, synthetic=run.synthetic)
            logger.log({"split": "validation", "step": state.step, "tokens": state.tokens, **metrics})
            shown = f"exact_acc {metrics['val_exact_acc']:.4f}" if run.synthetic else f"ppl {metrics['val_ppl']:.2f}"
            progress.write(f"step {state.step}: val_loss {metrics['val_loss']:.4f} {shown}")
        stop = preemption.requested(accelerator.device)  # collective: every rank stops after the same step
        if stop or state.step % t.ckpt_every == 0 or state.step == t.max_steps:
            checkpointer.save(state.step, stream.state_dict())
        if stop:
            logger.close()
            raise Preempted(f"stopped by a signal after step {state.step}; checkpoint written, re-run to resume")
    progress.close()
    preemption.close()
    if tracks_residual:
        raw_model.track_newton_residual(False)

    final = validate(accelerator, model, val_batches, byte_lengths, synthetic=run.synthetic)
    if run.synthetic:  # length generalisation: the fixed test sets at data.test_lengths
        from data.synthetic import evaluation_batches

        for length in run.data.test_lengths:
            batches = evaluation_batches(run.data, length, accelerator.process_index, accelerator.num_processes)
            final |= validate(accelerator, model, batches, None, prefix=f"test_L{length}_", synthetic=True)
    summary = {"model": run.model.name, "arch": run.model.arch, "params": n_params, "step": state.step,
               "tokens": state.tokens, **final, "run_dir": run.run_dir, "strategy": t.strategy,
               "world_size": accelerator.num_processes}
    hf_dir = os.path.join(run.run_dir, "hf")
    if tokenizer is not None:  # a synthetic task's model has no tokenizer to ship: no HF export
        export_hf(accelerator, model, tokenizer, hf_dir)
    if main:
        summary["hf"] = hf_dir if tokenizer is not None else None
        summary["tokens_per_s"] = _mean_tokens_per_s(logger.path)
        import json

        with open(os.path.join(run.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    logger.close()
    accelerator.wait_for_everyone()
    return summary


def _mean_tokens_per_s(metrics_path: str):
    import json

    if not os.path.exists(metrics_path):
        return None
    with open(metrics_path) as f:
        rates = [r["tokens_per_s"] for r in map(json.loads, f) if "tokens_per_s" in r]
    return sum(rates) / len(rates) if rates else None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        summary = train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Preempted as err:
        print(err, file=sys.stderr)
        sys.exit(EXIT_REQUEUE)
    if "val_exact_acc" in summary:
        print(f"\nvalidation exact-match accuracy {summary['val_exact_acc']:.4f}  per-token "
              f"{summary['val_token_acc']:.4f}  ({summary['step']} steps, {summary['params']:,} params)\n"
              f"outputs: {summary['run_dir']}")
    elif summary.get("hf"):
        print(f"\nvalidation loss {summary['val_loss']:.4f}  perplexity {summary['val_ppl']:.2f}  "
              f"bits/byte {summary['val_bpb']:.4f}  ({summary['tokens']:,} tokens, {summary['params']:,} params)")
        print(f"outputs: {summary['run_dir']}  (metrics.jsonl, checkpoints/, hf/, summary.json)")


if __name__ == "__main__":
    main()
