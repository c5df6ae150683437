"""Accuracy on the synthetic tasks (``data/synthetic.py``): exact match and per-token, with the loss.

Batches are the synthetic source's: ``input_ids``, ``labels`` (the target at each position, -100 where
nothing is scored) and ``position_ids``, all ``[B, L]``. The prediction at a position is the arg-max of the
model's logits there.

* ``exact_acc``: the fraction of sequences whose scored positions are all right (a sequence with nothing
  scored counts as right). The ParaRNN paper reports one accuracy per task without saying which; with one
  scored position per sequence (``score: last``) the two coincide.
* ``token_acc``: the fraction of scored positions that are right.
* ``loss``: mean cross-entropy over the scored positions.
* ``newton_residual``: for ParaRNN models, the largest final Newton residual over the evaluated batches
  (an unconverged solve at a long test length would otherwise pass unnoticed).

Under ``torch.distributed`` the sums are all-reduced (``all_reduce="auto"``), like ``eval.perplexity``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from eval.perplexity import IGNORE_INDEX, _maybe_all_reduce, _place


@torch.no_grad()
def evaluate_accuracy(model, batches: Iterable[Mapping[str, torch.Tensor]], device=None,
                      all_reduce: bool | str = "auto") -> dict:
    """``{"loss", "exact_acc", "token_acc", "sequences", "tokens", "newton_residual"}`` over ``batches``."""
    device = _place(model, device)
    tracks = hasattr(model, "track_newton_residual")
    sums = torch.zeros(5, dtype=torch.float64)  # nll, scored tokens, right tokens, sequences, right sequences
    residual = torch.zeros(1, dtype=torch.float64)
    was_training = model.training
    model.eval()
    if tracks:
        model.track_newton_residual(True)
    try:
        for batch in batches:
            ids, positions = batch["input_ids"].to(device), batch["position_ids"].to(device)
            logits = model(input_ids=ids, position_ids=positions).logits
            labels = batch["labels"].to(logits.device)
            scored = labels != IGNORE_INDEX
            nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                  reduction="sum")
            right = (logits.argmax(-1) == labels) & scored
            sums += torch.stack([nll.double(), scored.sum().double(), right.sum().double(),
                                 torch.tensor(labels.shape[0], dtype=torch.float64, device=labels.device),
                                 (right == scored).all(-1).sum().double()]).cpu()
            if tracks and model.newton_residual() is not None:
                residual = torch.maximum(residual, model.newton_residual().double().cpu().reshape(1))
    finally:
        if tracks:
            model.track_newton_residual(False)
        model.train(was_training)
    sums = _maybe_all_reduce(sums, all_reduce, device)
    residual = _maybe_all_reduce(residual, all_reduce, device, op="max")
    nll, tokens, right, sequences, exact = sums.tolist()
    return {"loss": nll / tokens if tokens else float("nan"),
            "exact_acc": exact / sequences if sequences else float("nan"),
            "token_acc": right / tokens if tokens else float("nan"),
            "sequences": int(sequences), "tokens": int(tokens),
            "newton_residual": residual.item() if tracks else None}
