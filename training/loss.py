"""The training objective: next-token cross-entropy plus the z-loss (PaLM, DCLM).

Labels are already shifted (``labels[:, t]`` is the target of ``input_ids[:, t]``, see data/packing.py);
a label of ``IGNORE_INDEX`` (-100) is not scored (prompts of synthetic tasks, padding), and both terms
are means over the scored tokens only.

Two computations of the same objective:

* :func:`lm_loss` on materialised logits ``[..., V]`` (the reference; validation and the fallback);
* :func:`linear_cross_entropy` from the final hidden states and the LM head's weight, chunked over tokens,
  which never holds more than one chunk of logits: at B8·T2048 with a 50k vocabulary the full logits are
  1.6 GB in bf16, and the log-softmax, its gradient and the logits' gradient in fp32 another 3.3 GB
  each; the chunked loss holds one chunk (4096 tokens: 0.4 GB of bf16 logits) plus the gradients of the
  hidden states and of the head weight, which it computes in the forward (the backward only scales
  them), so nothing is recomputed. The head GEMMs run under the caller's autocast (bf16 on GPU), the
  softmax statistics in fp32, exactly as the unfused path. Written in torch (no new dependency; runs
  and compiles on CPU and GPU). Liger-kernel's fused linear cross-entropy (``lse_square_scale`` is the
  z-loss) does the same chunking with a Triton softmax kernel; under ``trainer.compile`` the per-chunk
  softmax here is one Inductor kernel too, so what liger would save is one read of a 0.4 GB chunk per
  chunk: not worth a dependency the GPU image lacks (README, "Training speed").

:class:`LMObjective` is what ``train.py`` calls: it runs the model (the LM head on the last position
only, ``logits_to_keep=1``), takes the final hidden states from a forward hook on the module the head
reads (the final norm: the same hook for all four architectures) and applies the fused loss with the
head's weight as it is at that moment (FSDP2's root keeps its parameters gathered after the forward).
"""
from collections.abc import Callable

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100
CHUNK_TOKENS = 4096
"""Tokens per chunk of the fused loss: 4096 × 50k logits are 0.4 GB in bf16 (0.8 in fp32, eager); the
head GEMM per chunk [4096, d] × [d, V] is still large enough to run at full speed."""


def lm_loss(logits: Tensor, labels: Tensor, z_coef: float) -> tuple[Tensor, Tensor]:
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


def _chunk(logits: Tensor, labels: Tensor, z_coef: float, inv_count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk ``[c, V]``: the sums of the cross-entropy and of lse² over its scored rows, and the gradient
    of ``inv_count · (Σ ce + z_coef Σ lse²)`` w.r.t. the logits, in the logits' dtype:
    ``inv_count · scored · ((1 + 2 z_coef lse) softmax − onehot)``."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    scored = labels != IGNORE_INDEX
    target = labels.masked_fill(~scored, 0).unsqueeze(-1)
    weight = scored.float() * inv_count
    ce = ((lse - x.gather(-1, target).squeeze(-1)) * scored).sum()
    z = (lse.square() * scored).sum()
    grad = torch.exp(x - lse.unsqueeze(-1)) * ((1 + 2 * z_coef * lse) * weight).unsqueeze(-1)
    grad = grad.scatter_add(-1, target, -weight.unsqueeze(-1))
    return ce, z, grad.to(logits.dtype)


_COMPILED_CHUNK: list = []


def _compiled_chunk() -> Callable:
    if not _COMPILED_CHUNK:  # compiled on first use (importing Dynamo is not free)
        _COMPILED_CHUNK.append(torch.compile(_chunk, dynamic=False))
    return _COMPILED_CHUNK[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """Losses and both gradients in the forward, chunk by chunk; the backward scales the saved gradients."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, z_coef: float, chunk_tokens: int,
                compiled: bool):
        ctx.hidden_shape = hidden.shape
        h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        device = h.device.type
        # The GEMMs in the autocast dtype (bf16 on GPU), as the head and the unfused loss would run them.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        hc, wc = h.to(dtype), weight.to(dtype)
        inv_count = 1.0 / (y != IGNORE_INDEX).sum().clamp_min(1).float()
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        sums = torch.zeros(2, dtype=torch.float32, device=h.device)
        chunk_fn = _compiled_chunk() if compiled else _chunk
        with torch.autocast(device, enabled=False):  # every dtype is explicit from here on
            for start in range(0, h.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                ce, z, grad = chunk_fn(hc[rows] @ wc.t(), y[rows], z_coef, inv_count)
                sums += torch.stack([ce, z])
                if want_h:
                    grad_h[rows] = grad @ wc
                if want_w:
                    grad_w += (grad.t() @ hc[rows]).float()
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        ce, z = sums[0] * inv_count, z_coef * sums[1] * inv_count
        ctx.mark_non_differentiable(ce, z)
        return ce + z, ce, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h * grad_loss.to(grad_h.dtype)).view(ctx.hidden_shape)
        if grad_w is not None:
            grad_w = grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, z_coef: float,
                         chunk_tokens: int = CHUNK_TOKENS, compiled: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, ce, z)`` of the logits ``hidden @ weight.T`` without materialising them: ``loss = ce + z`` is
    differentiable w.r.t. ``hidden [..., d]`` and ``weight [V, d]``; ``ce`` and ``z`` (as :func:`lm_loss`
    returns them) are detached, for logging. ``labels [...]`` (-100: not scored). ``chunk_tokens`` tokens
    at a time; ``compiled``: the per-chunk softmax through ``torch.compile``."""
    return _LinearCrossEntropy.apply(hidden, weight, labels, z_coef, chunk_tokens, compiled)


class LMObjective:
    """The training loss of a causal LM from a batch: ``(loss to backpropagate, ce, z)``, the last two
    detached.

    ``fused=True``: the fused chunked loss on the final hidden states (see the module docstring); the LM
    head computes one position only. ``fused=False``: the full logits and :func:`lm_loss` (DeepSpeed
    ZeRO-3, whose partitioned head weight exists only inside the forward).
    """

    def __init__(self, model: nn.Module, z_coef: float, fused: bool = True, compiled: bool = False):
        self.z_coef, self.fused, self.compiled = z_coef, fused, compiled
        self.head = model.get_output_embeddings()
        self._hidden: list = []  # the final hidden states of the forward being run here (not validation's)
        if fused:
            final_norm(model).register_forward_hook(self._keep)

    def _keep(self, _module, _args, output: Tensor) -> None:
        if self._hidden == [None]:
            self._hidden[0] = output

    def __call__(self, model: nn.Module, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        if not self.fused:
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            ce, z = lm_loss(logits, batch["labels"], self.z_coef)
            return ce + z, ce.detach(), z.detach()
        self._hidden[:] = [None]
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], logits_to_keep=1)
        hidden = self._hidden.pop()
        with torch.profiler.record_function("lm_loss"):  # benchmarks/bench_step.py --profile counts it as loss
            return linear_cross_entropy(hidden, self.head.weight, batch["labels"], self.z_coef,
                                        compiled=self.compiled)


def final_norm(model: nn.Module) -> nn.Module:
    """The module whose output the LM head reads: the final norm of every architecture here
    (``model.norm`` of the ParaRNN and Llama backbones, ``backbone.norm_f`` of Mamba2)."""
    base = model.base_model
    norm = getattr(base, "norm", None) or getattr(base, "norm_f", None)
    if norm is None:
        raise ValueError(f"{type(model).__name__}: no final norm (base_model.norm or .norm_f) to read the hidden "
                         f"states from")
    return norm
