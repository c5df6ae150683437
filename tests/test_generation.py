"""Cached generation of the ParaRNN LM: generate() with the recurrent cache (O(1) per new token) matches
recomputing the full prefix, token for token and logit for logit, also with left padding and after export."""
import textwrap

import pytest
import torch

from models.registry import build_model
from tests.helpers import run_outside_repo

VOCAB = 50257
NEW = 12


def tiny(cell: str):
    torch.manual_seed(0)
    config = dict(cell=cell, hidden_size=32, num_hidden_layers=2, num_heads=2)
    return build_model("pararnn", config, VOCAB).eval()


def reference_greedy(model, ids: torch.Tensor, new: int = NEW) -> torch.Tensor:
    """Greedy decoding by re-running the whole prefix each step (independent of generate())."""
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs)


@pytest.fixture(params=["gru", "lstm"])
def model(request):
    return tiny(request.param)


def test_cached_generate_equals_full_prefix_greedy(model):
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    lengths = []
    hook = model.model.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    try:
        out = generate(model, ids)
    finally:
        hook.remove()
    # The cache was used: one prefill over the prompt, then one token per forward.
    assert lengths == [ids.shape[1]] + [1] * (NEW - 1), lengths
    assert torch.equal(out, reference_greedy(model, ids))


def test_cached_decode_logits_equal_full_prefix_logits(model):
    seq = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    prompt = 6
    with torch.no_grad():
        full = model(seq).logits
        out = model(seq[:, :prompt], use_cache=True)
        cache = out.cache_params
        steps = [out.logits]
        for t in range(prompt, seq.shape[1]):
            out = model(seq[:, t:t + 1], cache_params=cache, use_cache=True)
            assert out.cache_params is cache
            steps.append(out.logits)
    cached = torch.cat(steps, dim=1)
    assert cache.get_seq_length() == seq.shape[1]
    for t in range(seq.shape[1]):
        rel = (cached[:, t] - full[:, t]).abs().max() / full[:, t].abs().max()
        assert rel < 1e-5, (t, rel.item())


def test_left_padded_batch_equals_unpadded_rows(model):
    g = torch.Generator().manual_seed(3)
    # Row 1 is shorter than the conv window (kernel - 1 = 3): its cached window must hold zeros, not pads.
    rows = [torch.randint(1, VOCAB, (n,), generator=g) for n in (8, 2, 5)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    batched = generate(model, ids, attention_mask=mask, return_dict_in_generate=True, output_logits=True)
    for i, r in enumerate(rows):
        alone = generate(model, r[None], return_dict_in_generate=True, output_logits=True)
        assert torch.equal(batched.sequences[i, width - len(r):], alone.sequences[0]), i
        for t, (lb, la) in enumerate(zip(batched.logits, alone.logits)):
            rel = (lb[i] - la[0]).abs().max() / la[0].abs().max()
            assert rel < 1e-5, (i, t, rel.item())


def test_exported_model_generates_the_same_in_a_clean_process(tmp_path):
    import models.pararnn  # noqa: F401  (registers the Auto classes, so auto_map is written)

    model = tiny("lstm")
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    expected = generate(model, ids, attention_mask=mask)
    export = tmp_path / "export"
    model.save_pretrained(export)
    torch.save({"ids": ids, "mask": mask, "expected": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import importlib.util, torch
        assert importlib.util.find_spec("models") is None, "the repo must not be importable here"
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(export)!r}, trust_remote_code=True).eval()
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            out = model.generate(ref["ids"], attention_mask=ref["mask"], max_new_tokens={NEW}, do_sample=False,
                                 pad_token_id=0)
        assert torch.equal(out, ref["expected"]), (out, ref["expected"])
        print("OK", type(model).__name__, type(model).__module__)
    """)
    proc = run_outside_repo(script, tmp_path, HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK ParaRNNForCausalLM" in proc.stdout
    assert "transformers_modules" in proc.stdout  # the shipped code, not the repo's
