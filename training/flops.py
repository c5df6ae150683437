"""FLOPs per trained token of each architecture, and model FLOPs utilisation (MFU), in one place.

Two counts per token (forward + backward, one FLOP = one multiply or one add, so a multiply-add is 2):

* ``6N``: ``6 · parameters`` (all of them, the embeddings included): the usual headline number, the one
  the issue's table and ``benchmarks/RESULTS.md`` used before; comparable across architectures only as
  far as their parameter counts are.
* ``model``: what the architecture computes. ``6 · (parameters − input embedding)`` for the matrix
  products (the input embedding is a lookup), plus per layer the sequence mixing that no parameter count
  sees:

  - Transformer, attention: ``QKᵀ`` and ``AV`` are ``2·2·d·c`` FLOPs per token forward, backward twice
    that: ``12·d·c``, with ``c`` the mean number of keys a query attends to. Under the packed-document
    mask a query at position ``p`` of its document attends to ``p + 1`` keys, so ``c = mean(p) + 1``
    over the batch's tokens (256.5 for documents of 512 tokens; ``(T + 1)/2`` for one document per row).
  - ParaRNN, the cell: per channel and step, one evaluation of the transition costs ``E`` (GRU 16, LSTM
    30: each +, ×, σ, tanh counted once, read off ``pararnn_math``) and its Jacobian about as much; the
    Newton forward is the guess ``f(0, P)`` then per iteration a residual, a Jacobian and a linear scan
    (``4·K²``: up- and down-sweep of 2×2 blocks for the LSTM, scalars for the GRU); the backward a
    Jacobian, the reverse scan and the local VJP (``2E``): ``E·(1 + 2·iters) + 4K²·iters + 3E + 4K²``
    per channel, times ``d`` channels; plus the depthwise conv, ``6·k`` per channel (``k`` taps, fwd +
    bwd). Below 0.1% of the total at every size: it is listed so that the count is complete, not because
    it matters.
  - Mamba2, the chunked SSD (chunk ``Q``, inner width ``d_i``, state ``n``, ``g`` groups): forward per
    token ``C·Bᵀ`` within the chunk ``2·g·n·Q/2`` (causal half), the scores times x ``2·d_i·Q/2``, the
    chunk states ``2·d_i·n`` and their readout ``2·d_i·n``; backward twice: ``3·(Q·(g·n + d_i) +
    4·d_i·n)``; plus the conv ``6·k`` per channel of ``x, B, C``.

MFU = FLOPs per token × tokens per second / the device's peak dense bf16 FLOP/s (:func:`peak_flops`).
"""
import torch

# Dense bf16 tensor-core peak by device name (vendor data sheets, no sparsity). H200 = H100 SXM compute.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "B200": 2250e12, "MI300X": 1307e12}
CELL_EVAL = {"gru": 14, "lstm": 19}  # FLOPs of one transition evaluation per channel (see the docstring)


def flops_per_token(arch: str, config, params: int, mean_context: float) -> dict[str, float]:
    """``{"6N": ..., "model": ...}`` FLOPs per trained token (forward + backward) of a model with ``params``
    parameters and HF ``config`` (the module docstring has the formulas). ``mean_context``: the mean number
    of keys a query attends to (Transformer only; ``mean(position_ids) + 1`` of the batch)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    extra = 0.0
    if arch == "transformer":
        extra = 12 * d * mean_context
    elif arch == "pararnn":
        K, E, iters = (2 if config.cell == "lstm" else 1), CELL_EVAL[config.cell], config.newton_iters
        cell = E * (1 + 2 * iters) + 4 * K * K * iters + 3 * E + 4 * K * K
        extra = d * (cell + 6 * config.conv_kernel)
    elif arch == "mamba2":
        inner, n, g, Q = config.expand * d, config.state_size, config.n_groups, config.chunk_size
        extra = 3 * (Q * (g * n + inner) + 4 * inner * n) + 6 * config.conv_kernel * (inner + 2 * g * n)
    matmul = params - config.vocab_size * d  # less the input embedding
    return {"6N": 6.0 * params, "model": 6.0 * matmul + layers * extra}


def mean_context(position_ids: torch.Tensor) -> float:
    """Mean number of keys a query attends to under the packed-document causal mask: mean(position) + 1."""
    return float(position_ids.float().mean()) + 1.0


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of ``device``: ``override_tflops`` if given, else from the GPU's name
    (:data:`PEAK_BF16`); None on the CPU or an unknown GPU (no MFU then)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)
