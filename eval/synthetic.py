"""Accuracy on the synthetic tasks (``data/synthetic.py``): the data source's ``val_metrics`` in train.py.

Batches are the synthetic source's: ``input_ids``, ``labels`` (the target at each position, -100 where
nothing is scored) and ``position_ids``, all ``[B, L]``. The prediction at a position is the arg-max of the
model's logits there. The loss is the trainer's own validation loss (``eval.perplexity``), not repeated here.

* ``last_acc``: the fraction of sequences whose *last* scored position is right: the answer for the whole
  sequence (the parity of all its bits, x_n at the end, the final position on the cycle), the one output
  per sequence the ParaRNN paper scores for Keep-nth and Parity. Chance: 1/2 on Parity, 1/|V| on Keep-nth.
* ``exact_acc``: the fraction of sequences whose scored positions are *all* right (the running variant:
  every prefix's answer; a sequence with nothing scored counts as right). With ``score: last`` (one scored
  position per sequence) it equals ``last_acc``.
* ``token_acc``: the fraction of scored positions that are right.
* ``newton_residual``: for ParaRNN models, the largest final Newton residual over the evaluated batches
  (an unconverged solve at a long test length would otherwise pass unnoticed); ``newton_fallbacks``: the
  chains the cells solved again exactly during this evaluation, where the model counts them.

Under ``torch.distributed`` the sums are all-reduced (``all_reduce="auto"``), like ``eval.perplexity``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from eval.perplexity import IGNORE_INDEX, _EvalMode, _logits, _maybe_all_reduce, _place


@torch.no_grad()
def evaluate_accuracy(model, batches: Iterable[Mapping[str, torch.Tensor]], device=None,
                      all_reduce: bool | str = "auto") -> dict:
    """``{"last_acc", "exact_acc", "token_acc", "sequences", "newton_residual"[, "newton_fallbacks"]}`` over
    ``batches`` (the Newton keys only for models with Newton cells)."""
    device = _place(model, device)
    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrappers: the model's own methods
    tracks = hasattr(inner, "track_newton_residual")
    counts = hasattr(inner, "newton_fallbacks")
    fallbacks_before = int(inner.newton_fallbacks()) if counts else 0
    # scored tokens, right tokens, sequences, sequences all right, sequences with the last one right
    sums = torch.zeros(5, dtype=torch.float64)
    residual = torch.zeros(1, dtype=torch.float64)
    if tracks:
        inner.track_newton_residual(True)
    try:
        with _EvalMode(model):
            for batch in batches:
                logits = _logits(model, batch, device)
                labels = batch["labels"].to(logits.device)
                scored = labels != IGNORE_INDEX
                right = (logits.argmax(-1) == labels) & scored
                last = scored.long().cumsum(1).eq(scored.sum(1, keepdim=True)) & scored  # last scored position
                last_right = (right & last).any(1) | ~scored.any(1)
                sums += torch.stack([scored.sum(), right.sum(), torch.tensor(labels.shape[0], device=labels.device),
                                     (right == scored).all(1).sum(), last_right.sum()]).double().cpu()
                if tracks and inner.newton_residual() is not None:
                    residual = torch.maximum(residual, inner.newton_residual().double().cpu().reshape(1))
    finally:
        if tracks:
            inner.track_newton_residual(False)
    sums = _maybe_all_reduce(sums, all_reduce, device)
    residual = _maybe_all_reduce(residual, all_reduce, device, op="max")
    tokens, right, sequences, exact, last = sums.tolist()
    result = {"last_acc": last / sequences if sequences else float("nan"),
              "exact_acc": exact / sequences if sequences else float("nan"),
              "token_acc": right / tokens if tokens else float("nan"),
              "sequences": int(sequences)}
    if tracks:
        result["newton_residual"] = residual.item()
    if counts:
        fallbacks = torch.tensor([float(int(inner.newton_fallbacks()) - fallbacks_before)], dtype=torch.float64)
        result["newton_fallbacks"] = int(_maybe_all_reduce(fallbacks, all_reduce, device).item())
    return result
