"""bf16 parameters (FSDP2's compute copies) give every architecture's gradient about as close to fp32 as bf16
autocast does (``benchmarks/check_precision.py``), at a small size on the CPU's torch paths.

The reference is the same model in fp32 (parameters and compute); the bf16 copy runs with every decoder
block's inputs cast to bf16 as FSDP2's ``cast_forward_inputs`` does. Observed at d=64, 2 layers, 2 x 128-256
tokens: global relative gradient error 0.006-0.013 under autocast and 0.008-0.016 with bf16 parameters for
all four presets; the tolerance (0.03 global, 0.05 for the median parameter) leaves 2x. Both must also be
above 1e-4: a bf16 run that silently computed in fp32 would pass the tolerance without testing anything.
Mutation: ``compare`` runs the "bf16" model without ``.to(torch.bfloat16)`` and without the input casts (so
in fp32) -> all four fail (error 0); only the casts dropped from the parameters -> two of the four
fail. The models themselves are robust here: running ParaRNN's Newton solve in bf16 (``compute_dtype``) or
Mamba2's A = -exp(A_log) in bf16 moved the bf16 error by < 0.001 and did not fail this test.
"""
import statistics

import pytest
import torch

from benchmarks.check_first_loss import TINY
from benchmarks.check_precision import compare, global_rel_err, random_batch, shrink
from models.count import load_preset
from models.registry import build_model

TOL_GLOBAL, TOL_MEDIAN = 0.03, 0.05


@pytest.mark.parametrize("preset", ["transformer_7b", "paragru_7b", "paralstm_7b", "mamba2_7b"])
def test_bf16_param_gradients_close_to_fp32(preset):
    spec = load_preset(preset)
    config = shrink(spec, TINY["hidden_size"], TINY["num_hidden_layers"], 512, "torch")
    torch.manual_seed(0)
    model = build_model(spec["arch"], config)
    model.gradient_checkpointing_enable()
    model.train()
    result = compare(model, random_batch(512, 2, 128, 0, torch.device("cpu")))
    for mode in ("autocast", "bf16"):
        glob = result["global_rel_err"][mode]
        median = statistics.median(result["grad_rel_err"][mode].values())
        assert 1e-4 < glob < TOL_GLOBAL, (mode, glob)
        assert median < TOL_MEDIAN, (mode, median)
        assert abs(result["loss"][mode] - result["loss"]["fp32"]) < 0.01, (mode, result["loss"])


def test_global_error_is_the_norm_over_all_parameters():
    """``global_rel_err`` sums per parameter (no concatenated copy of a 7B model's gradients): it must equal the
    relative norm error of the concatenated vectors. Mutation: the per-parameter errors averaged -> fails."""
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(300, generator=g), "b": 10 * torch.randn(7, 5, generator=g)}
    grads = {"a": base["a"] + 0.3 * torch.randn(300, generator=g), "b": base["b"].to(torch.bfloat16)}
    flat = torch.cat([base[n].flatten() for n in base]).double()
    want = ((torch.cat([grads[n].double().flatten() for n in base]) - flat).norm() / flat.norm()).item()
    assert global_rel_err(grads, base) == pytest.approx(want, rel=1e-9)
