"""The training objective: next-token cross-entropy plus the z-loss (PaLM, DCLM).

Labels are already shifted (``labels[:, t]`` is the target of ``input_ids[:, t]``, see data/packing.py);
a label of ``IGNORE_INDEX`` (-100) is not scored (prompts of synthetic tasks, padding), and both terms
are means over the scored tokens only.
"""
import torch

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce, z)``: the mean cross-entropy of the scored tokens, and ``z_coef · mean(logsumexp(logits)²)``
    over the same tokens (it keeps the softmax normaliser near 1). ``logits [..., V]``, ``labels [...]``.
    Computed in float32 whatever the logits' dtype. With no scored token both are 0 (and so are their
    gradients)."""
    scored = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = labels.masked_fill(~scored, 0).unsqueeze(-1)
    nll = -logp.gather(-1, target).squeeze(-1)
    # logsumexp recovered from any one column: one softmax pass serves both terms.
    lse = logits[..., 0].float() - logp[..., 0]
    count = scored.sum().clamp_min(1)
    ce = (nll * scored).sum() / count
    z = (lse.square() * scored).sum() / count
    return ce, z_coef * z
