"""Typed views of the Hydra config, checked before any heavy work.

Hydra composes ``configs/``; these dataclasses give each group a schema, so a misspelt key, a wrong
type or an impossible value stops the run at once with one line naming the key (``ConfigError``).
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from training.common import REPO_ROOT, ConfigError  # noqa: F401  (one error type for every config group)


@dataclass
class ModelConfig:
    name: str
    arch: str
    lr: float
    weight_decay: float
    config: dict = field(default_factory=dict)


@dataclass
class TrainerConfig:
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    strategy: str = "single"          # single | ddp | fsdp2 | deepspeed (see training/distributed.py)
    zero_stage: int = 2               # DeepSpeed ZeRO stage (strategy=deepspeed)
    batch_size: int = 8               # sequences per optimizer step, over all ranks
    grad_accum: int = 1
    max_steps: int = 300
    warmup_steps: int = 30
    lr: float | None = None        # None: the model preset's
    min_lr_ratio: float = 0.0         # cosine floor, as a fraction of lr
    weight_decay: float | None = None
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    z_loss: float = 1e-4
    log_every: int = 10
    val_every: int = 100
    val_batches: int = 16
    ckpt_every: int = 100
    keep_last: int = 2
    max_nonfinite_steps: int = 5      # stop after this many non-finite losses in a row
    gradient_checkpointing: bool = False
    compile: bool = False
    seed_data: bool = True
    sequence_parallel: int = 1        # ranks per sequence: each holds 1/N of its time steps (ParaRNN only; see
                                      # training/sequence_parallel.py); the other factor of the world is DP


@dataclass
class WandbConfig:
    mode: str = "disabled"            # disabled | offline | online
    project: str = "pararnn-lm"
    name: str | None = None
    entity: str | None = None


_CHOICES = {
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.precision": ("auto", "bf16", "fp32"),
    "trainer.strategy": ("single", "ddp", "fsdp2", "deepspeed"),
    "trainer.zero_stage": (1, 2, 3),
    "wandb.mode": ("disabled", "offline", "online"),
}


def to_dataclass(cls, node: Any, prefix: str):
    """Build dataclass ``cls`` from a config node; unknown keys and wrong types name ``prefix.key``."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{prefix}.{key}: unknown key (known: {', '.join(names)})")
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value) if names[key].type is tuple else value
    try:
        obj = cls(**values)
    except TypeError as err:
        raise ConfigError(f"{prefix}: {err}") from None
    for f in dataclasses.fields(cls):
        choices = _CHOICES.get(f"{prefix}.{f.name}")
        if choices and getattr(obj, f.name) not in choices:
            raise ConfigError(f"{prefix}.{f.name}={getattr(obj, f.name)!r} is not one of {', '.join(choices)}")
    return obj


def check_trainer(t: TrainerConfig, world_size: int) -> None:
    """Values that cannot work, before any heavy work."""
    for key in ("batch_size", "grad_accum", "max_steps", "log_every", "val_every", "ckpt_every", "keep_last"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"trainer.{key} must be > 0, got {getattr(t, key)}")
    if t.warmup_steps < 0 or t.warmup_steps > t.max_steps:
        raise ConfigError(f"trainer.warmup_steps must be in [0, max_steps={t.max_steps}], got {t.warmup_steps}")
    if t.sequence_parallel < 1 or world_size % t.sequence_parallel:
        raise ConfigError(f"trainer.sequence_parallel={t.sequence_parallel} must be >= 1 and divide the world size "
                          f"{world_size}")
    data_parallel = world_size // t.sequence_parallel
    if t.batch_size % (t.grad_accum * data_parallel):
        raise ConfigError(f"trainer.batch_size={t.batch_size} is not divisible by trainer.grad_accum={t.grad_accum} "
                          f"x data-parallel size {data_parallel} (world size {world_size} / trainer.sequence_parallel)")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"trainer.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
