"""The ParaRNN LM on packed rows, and its Newton telemetry.

A packed row ([doc1][doc2]..., ``position_ids`` restarting at 0 at each document) must give each document the
logits it gets alone, and the gradients of a loss over the packed row must be the sum of the documents'
gradients: nothing crosses a document boundary (the cell's state and the conv window are reset there).
The baselines have the same test in ``test_baselines.py``.
"""
import pytest
import torch

from models.registry import build_model
from tests.helpers import rel_err

VOCAB = 96
DOCS = [[5, 1, 9], [11, 4]]  # document lengths per row (row 0: a one-token document in the middle)


def tiny(cell: str, **config):
    torch.manual_seed(0)
    config = {**dict(cell=cell, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=2, mode="parallel",
                     newton_iters=12, bos_token_id=0, eos_token_id=0), **config}
    return build_model("pararnn", config).double()


def packed_rows(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = sum(DOCS[0])
    assert all(sum(row) == T for row in DOCS)
    ids = torch.randint(1, VOCAB, (len(DOCS), T), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCS])
    weights = torch.randn(len(DOCS), T, VOCAB, generator=g, dtype=torch.float64)
    return ids, pos, weights


@pytest.mark.parametrize("mask", ["none", "ones"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_packed_row_equals_documents_run_separately(cell, mask):
    """Logits and every parameter gradient of a packed batch equal those of its documents run alone, with no
    attention mask (the training path) and with an all-ones mask.

    Mutation: ParaRNNForCausalLM.forward dropping ``position_ids`` when ``attention_mask`` is None -> the
    "none" cases fail (the one-token document in row 0 sees the state of the document before it)."""
    model = tiny(cell)
    ids, pos, weights = packed_rows()
    attention_mask = torch.ones_like(ids) if mask == "ones" else None
    params = list(model.parameters())
    packed = model(input_ids=ids, position_ids=pos, attention_mask=attention_mask).logits
    grads = torch.autograd.grad((packed * weights).sum(), params)

    alone_grads = [torch.zeros_like(p) for p in params]
    for r, row in enumerate(DOCS):
        start = 0
        for n in row:
            alone = model(input_ids=ids[r:r + 1, start:start + n]).logits
            err = rel_err(packed[r, start:start + n], alone[0])
            assert err < 1e-9, f"row {r}, document at {start}: packed vs alone rel err {err:.1e}"
            doc_grads = torch.autograd.grad((alone[0] * weights[r, start:start + n]).sum(), params)
            alone_grads = [a + d for a, d in zip(alone_grads, doc_grads)]
            start += n
    for (name, _), got, ref in zip(model.named_parameters(), grads, alone_grads):
        assert rel_err(got, ref) < 1e-9, name
    # the check can fail: without position_ids the row is one long document
    whole = model(input_ids=ids).logits
    assert rel_err(whole[0, 5:], packed[0, 5:]) > 1e-3


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_lm_counts_newton_fallbacks(cell):
    """``newton_fallbacks()`` sums the cells' counters; the config's ``fallback_tol`` reaches every cell.

    Mutation: RNNBlock not passing ``config.fallback_tol`` to the cell -> fails."""
    model = tiny(cell, newton_iters=3, clip=None, fallback_tol=1e-6)
    assert all(c.fallback_tol == 1e-6 for c in model.cells())
    ids, pos, _ = packed_rows()
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos)
        assert int(model.newton_fallbacks()) == 0
        for c in model.cells():
            for w in c.recurrent_weights():
                w.uniform_(-4.0, 4.0)
        model(input_ids=ids, position_ids=pos)
    assert int(model.newton_fallbacks()) > 0
    assert tiny(cell, fallback_tol=None).cells()[0].fallback_tol is None
