"""Validation perplexity, bits-per-byte and loss by token position.

Batches are the data pipeline's: dicts of LongTensors ``[B, T]`` with ``input_ids``, ``labels`` and
``position_ids``. ``labels`` are already shifted (``labels[:, t]`` is the target of
``input_ids[:, t]``; see ``data/packing.py``); label ``-100`` is ignored. The model is called as
``model(input_ids=..., position_ids=...)`` and must return ``.logits`` ``[B, T, V]`` (or a tensor).

* loss = total NLL (nats) / number of target tokens; ppl = exp(loss)
* bpb  = total NLL / (ln 2 * total UTF-8 bytes of the target tokens), with
  ``byte_lengths[token_id]`` the byte length of each token (``data.pipeline.token_byte_lengths``).

Under ``torch.distributed`` the sums are all-reduced (``all_reduce="auto"``), so every rank gets the
global numbers for its share of the validation rows.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _logits(model, batch: Mapping[str, torch.Tensor], device) -> torch.Tensor:
    kwargs = {"input_ids": batch["input_ids"].to(device)}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"].to(device)
    out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def _token_nll(model, batch: Mapping[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL in float32 ``[B, T]`` (0 where ignored) and the label mask ``[B, T]``."""
    logits = _logits(model, batch, device)
    labels = batch["labels"].to(logits.device)
    mask = labels != IGNORE_INDEX
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none",
                          ignore_index=IGNORE_INDEX).view(labels.shape)
    return nll * mask, mask


def _default_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _place(model, device) -> torch.device:
    """The device to run on; the model is moved only if it is elsewhere (a prepared DDP / DeepSpeed
    model already on ``device`` is left alone)."""
    current = _default_device(model)
    if device is None:
        return current
    device = torch.device(device)
    same = current.type == device.type and (device.index is None or current.index == device.index)
    if not same and hasattr(model, "to"):
        model.to(device)
    return device


def _distributed(all_reduce: bool | str) -> bool:
    import torch.distributed as dist

    return (dist.is_available() and dist.is_initialized()) if all_reduce == "auto" else bool(all_reduce)


def _maybe_all_reduce(values: torch.Tensor, all_reduce: bool | str, device: torch.device,
                      op: str = "sum") -> torch.Tensor:
    """All-reduce a CPU tensor (through ``device``, so NCCL gets a CUDA tensor) when distributed."""
    if not _distributed(all_reduce):
        return values
    import torch.distributed as dist

    moved = values.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return moved.cpu()


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


class _EvalMode:
    def __init__(self, model):
        self.model, self.was_training = model, getattr(model, "training", False)

    def __enter__(self):
        if hasattr(self.model, "eval"):
            self.model.eval()
        return self

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()


@torch.no_grad()
def evaluate_perplexity(model, batches: Iterable[Mapping[str, torch.Tensor]],
                        byte_lengths: Sequence[int] | torch.Tensor | None = None,
                        device: str | torch.device | None = None, max_batches: int | None = None,
                        all_reduce: bool | str = "auto") -> dict[str, Any]:
    """Mean NLL over all label tokens, its perplexity and (with ``byte_lengths``) bits-per-byte.

    Returns ``{"loss", "ppl", "bpb" (None without byte_lengths), "tokens", "bytes", "nll_sum"}``."""
    device = _place(model, device)
    table = None
    if byte_lengths is not None:
        table = torch.as_tensor(byte_lengths, dtype=torch.float64)
    sums = torch.zeros(3, dtype=torch.float64)  # nll, tokens, bytes
    with _EvalMode(model):
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            nll, mask = _token_nll(model, batch, device)
            sums[0] += nll.double().sum().cpu()
            sums[1] += mask.sum().cpu()
            if table is not None:
                labels = batch["labels"].cpu()
                m = labels != IGNORE_INDEX
                sums[2] += table[labels[m]].sum()
    sums = _maybe_all_reduce(sums, all_reduce, device)
    nll_sum, tokens, n_bytes = float(sums[0]), int(sums[1]), float(sums[2])
    loss = nll_sum / tokens if tokens else float("nan")
    return {
        "loss": loss,
        "ppl": _exp(loss) if tokens else float("nan"),
        "bpb": (nll_sum / (math.log(2) * n_bytes)) if (table is not None and n_bytes > 0) else None,
        "tokens": tokens,
        "bytes": int(n_bytes) if table is not None else None,
        "nll_sum": nll_sum,
    }


@torch.no_grad()
def loss_by_position(model, batches: Iterable[Mapping[str, torch.Tensor]], device: str | torch.device | None = None,
                     by: str = "row", max_positions: int | None = None, max_batches: int | None = None,
                     return_counts: bool = False, all_reduce: bool | str = "auto"):
    """Mean NLL per token position: ``tensor[T]``.

    ``by="row"``: position ``t`` within the packed row (index of the input token, 0..T-1).
    ``by="document"``: position within the document (``position_ids`` of the input token); the
    length is ``max_positions`` (default: the largest position seen + 1, under DDP pass it), positions
    never seen are NaN. With ``return_counts`` also the number of tokens per position."""
    if by not in ("row", "document"):
        raise ValueError(f"by must be 'row' or 'document', got {by!r}")
    device = _place(model, device)
    sums = torch.zeros(0, dtype=torch.float64)
    counts = torch.zeros(0, dtype=torch.float64)

    def grow(n):
        nonlocal sums, counts
        if n > sums.numel():
            sums = torch.cat([sums, sums.new_zeros(n - sums.numel())])
            counts = torch.cat([counts, counts.new_zeros(n - counts.numel())])

    with _EvalMode(model):
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            nll, mask = _token_nll(model, batch, device)
            nll, mask = nll.double().cpu(), mask.cpu()
            if by == "row":
                grow(nll.shape[1])
                sums[: nll.shape[1]] += nll.sum(0)
                counts[: nll.shape[1]] += mask.sum(0)
            else:
                pos = batch["position_ids"].cpu()
                keep = mask if max_positions is None else mask & (pos < max_positions)
                p = pos[keep]
                if p.numel():
                    grow(int(p.max()) + 1)
                    sums.index_add_(0, p, nll[keep])
                    counts.index_add_(0, p, torch.ones_like(nll[keep]))
    if max_positions is not None:
        grow(max_positions)
        sums, counts = sums[:max_positions], counts[:max_positions]
    elif _distributed(all_reduce):  # ranks may have seen different lengths: agree on the longest
        grow(int(_maybe_all_reduce(torch.tensor([sums.numel()], dtype=torch.float64), all_reduce, device, "max")[0]))
    both = _maybe_all_reduce(torch.stack([sums, counts]), all_reduce, device)
    sums, counts = both[0], both[1]
    mean = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
    return (mean, counts) if return_counts else mean


def write_loss_by_position(run_dir: str | os.PathLike, model, batches: Iterable[Mapping[str, torch.Tensor]],
                           device: str | torch.device | None = None, by: str = "row",
                           max_batches: int | None = None, extra: Mapping[str, Any] | None = None,
                           filename: str = "loss_by_position.json") -> Path:
    """Compute :func:`loss_by_position` and write ``<run_dir>/loss_by_position.json``:
    ``{"by", "position": [...], "loss": [...], "ppl": [...], "tokens": [...], "mean_loss", ...extra}``
    (NaN entries become null; ``ppl`` of a position is exp of its mean loss). ``eval.report`` plots it."""
    batches = list(batches) if not isinstance(batches, (list, tuple)) else batches
    mean, counts = loss_by_position(model, batches, device=device, by=by, max_batches=max_batches, return_counts=True)
    total = counts.sum().item()
    finite = lambda x: None if (x is None or not math.isfinite(x)) else float(x)  # noqa: E731
    payload: dict[str, Any] = {
        "by": by,
        "position": list(range(mean.numel())),
        "loss": [finite(v) for v in mean.tolist()],
        "ppl": [finite(_exp(v)) if math.isfinite(v) else None for v in mean.tolist()],
        "tokens": [int(c) for c in counts.tolist()],
        "mean_loss": finite((torch.nan_to_num(mean) * counts).sum().item() / total) if total else None,
    }
    if extra:
        payload.update(dict(extra))
    path = Path(run_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


__all__ = ["evaluate_perplexity", "loss_by_position", "write_loss_by_position", "IGNORE_INDEX"]
