"""AdamW with decoupled weight decay and the warm-up + cosine schedule of the paper (App. C.1).

"Decoupled" is meant as in DCLM/Composer: each step shrinks weights by ``wd · lr_t / lr_max``, so the
decay follows the schedule but not the size of the learning rate. torch's AdamW multiplies its decay by
``lr_t``; passing ``wd / lr_max`` to it gives exactly that. Norm gains, biases and scalars (1-D and 0-D
parameters) are not decayed.
"""
import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas, eps: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay / lr}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay) or None
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warm-up, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_ratio: float) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, max_steps, min_ratio))
