"""Every paper-size preset has the paper's parameter count (Table 3 of arXiv 2510.21450 v2) within 2%; the
presets of one size agree within 5% (total and non-embedding); the FLOP counts match torch's own counter.

The numbers below are the paper's, typed in here as the independent reference; the counts come from
building each preset through the arch registry on the meta device (``models.count``). Also checks
that every preset key is a real field of its arch's config class (a typo would otherwise be kept
as a stray attribute by transformers' configs and silently ignored).
"""
import dataclasses
import inspect

import pytest
import torch

from models.count import SIZES, build_meta, count_params, embedding_params, flops_per_token, load_preset, preset_names

ARCHS = ("paragru", "paralstm", "mamba2", "transformer")
TOKENIZER_VOCAB = 50257  # what train.py passes (GPT-2); presets without a vocab_size get it padded to 50304

PAPER = {
    "paragru_400m": 406e6, "paragru_1b": 1.42e9, "paragru_3b": 2.90e9, "paragru_7b": 6.76e9,
    "paralstm_400m": 406e6, "paralstm_1b": 1.42e9, "paralstm_3b": 2.90e9, "paralstm_7b": 6.76e9,
    "mamba2_400m": 409e6, "mamba2_1b": 1.43e9, "mamba2_3b": 2.83e9, "mamba2_7b": 6.96e9,
    "transformer_400m": 412e6, "transformer_1b": 1.44e9, "transformer_3b": 2.80e9, "transformer_7b": 6.89e9,
}


def _build(name):
    preset = load_preset(name)
    try:
        return preset, build_meta(preset)
    except (ImportError, AttributeError) as err:
        pytest.skip(f"{name}: arch {preset['arch']!r} not importable yet ({err})")


def test_every_paper_preset_exists():
    assert set(PAPER) <= set(preset_names()), sorted(set(PAPER) - set(preset_names()))


@pytest.mark.parametrize("name", sorted(PAPER))
def test_count_matches_paper(name):
    _, model = _build(name)
    n = count_params(model)
    assert abs(n / PAPER[name] - 1) < 0.02, f"{name}: {n:,} parameters, paper {PAPER[name]:,.0f}"


@pytest.mark.parametrize("name", preset_names())
def test_preset_keys_are_config_fields(name):
    preset, model = _build(name)
    assert {"name", "arch", "lr", "weight_decay", "config"} <= set(preset)
    assert preset["name"] == name
    config_cls = type(model.config)
    known = {f.name for f in dataclasses.fields(config_cls)} | set(inspect.signature(config_cls.__init__).parameters)
    known |= {"attn_implementation"}  # consumed by PreTrainedConfig (e.g. flex_attention for the Transformer)
    unknown = set(preset["config"]) - known
    assert not unknown, f"{name}: {sorted(unknown)} are not fields of {config_cls.__name__}"
    for key, value in preset["config"].items():
        if key != "attn_implementation":
            assert getattr(model.config, key) == value, key


@pytest.mark.parametrize("size", SIZES)
def test_presets_of_one_size_match(size):
    """All four architectures exist at every size, and their total and non-embedding counts (as train.py
    builds them with the GPT-2 tokenizer) are within 5% of each other. Independent reference for the
    non-embedding count: the parameters whose names are not the two vocabulary tables'.
    Mutation: mamba2_tiny with 2 blocks -> non-embedding 0.21M against 0.54M, fails."""
    totals, non_embedding = {}, {}
    for arch in ARCHS:
        model = build_meta(load_preset(f"{arch}_{size}"), TOKENIZER_VOCAB)
        vocab_tables = sum(p.numel() for name, p in model.named_parameters()
                           if name.endswith(("embed_tokens.weight", "embeddings.weight", "lm_head.weight")))
        totals[arch] = count_params(model)
        non_embedding[arch] = totals[arch] - embedding_params(model)
        assert non_embedding[arch] == totals[arch] - vocab_tables
    for what, counts in (("total", totals), ("non-embedding", non_embedding)):
        spread = max(counts.values()) / min(counts.values()) - 1
        assert spread <= 0.05, f"{size} {what}: {counts} differ by {spread:.1%}"


@pytest.mark.parametrize("arch,config", [
    # eager attention: the counter sees its two matrix products (it has no formula for CPU SDPA kernels)
    ("transformer", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "attn_implementation": "eager"}),
    ("pararnn", {"cell": "gru", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "mode": "parallel"}),
])
def test_flops_per_token_match_torch_flop_counter(arch, config):
    """``flops_per_token`` against torch's FlopCounterMode over a real forward + backward (it counts the
    products with weights, and attention's products): the Transformer's ``model`` count (6N + attention)
    within 1%, ParaRNN's ``6N`` within 3% (the counter sees its GEMMs; the Newton term is elementwise work
    it does not count). Mutation: 6N over all parameters (input embedding included) -> 16-20% over, fails."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.registry import build_model

    torch.manual_seed(0)
    model = build_model(arch, {**config, "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 0})
    batch, seq = 2, 32
    ids = torch.randint(0, 512, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    measured = counter.get_total_flops() / (batch * seq)
    ours = flops_per_token(model, seq)
    expected, tol = (ours["model"], 0.01) if arch == "transformer" else (ours["6N"], 0.03)
    assert abs(measured / expected - 1) < tol, (measured, ours)
    assert ours["model"] > ours["6N"]
