"""Cached generation of the ParaRNN LM: generate() with the recurrent cache (O(1) per new token) matches
recomputing the full prefix, token for token and logit for logit, also with left padding and after export."""
import textwrap

import pytest
import torch

from models.registry import build_model
from tests.helpers import rel_err, run_outside_repo

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


def padded(rows: list) -> tuple:
    """Left-padded ids and attention mask for rows of different lengths."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


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
    ids, mask = padded(rows)
    width = ids.shape[1]
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


# ------------------------------------------------------------------------------------------------
# Graph decoding (models/pararnn/decoding.py). On CPU: the static-buffer step and the bookkeeping,
# run eagerly (GraphDecoder(capture=False)); on a GPU (`pytest -m gpu`): the captured graphs.
# ------------------------------------------------------------------------------------------------
def test_logits_to_keep_limits_the_head_to_the_last_positions(model):
    """generate()'s prefill asks for the last position's logits only (it used to get all T of them).
    Mutation: forward ignores logits_to_keep -> fails (shape)."""
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, model.config.vocab_size)
    assert rel_err(last, full[:, -1:]) < 1e-6  # another GEMM shape: not bit for bit
    heads = []
    hook = model.lm_head.register_forward_pre_hook(lambda mod, args: heads.append(args[0].shape[1]))
    try:
        generate(model, ids)
    finally:
        hook.remove()
    assert heads == [1] * NEW, heads


def test_prefill_cache_holds_no_view_of_the_trajectory(model):
    """The prefill's cached states own their memory: a view of the cell's [B, T, K, N] trajectory would keep
    all of it alive while decoding (24 GB at 1B, batch 8, 32k tokens). Mutation: no clone() -> fails."""
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache_params
    for s in cache.conv_states + cache.cell_states:
        assert s.untyped_storage().nbytes() == s.numel() * s.element_size()


def test_static_step_equals_cached_decode_exactly(model):
    """decoding.decode_step (what the CUDA graph captures) run eagerly over static buffers gives the cached
    decode's logits bit for bit, step after step, and leaves the cache's states in the buffers.
    Mutation: layer_step without `state.copy_(new_state)` -> fails (step 2 differs)."""
    from models.pararnn.decoding import decode_step

    seq = torch.randint(1, VOCAB, (3, 14), generator=torch.Generator().manual_seed(6))
    prompt = 5
    with torch.no_grad():
        cache = model(seq[:, :prompt], use_cache=True).cache_params
        windows = [w.clone() for w in cache.conv_states]
        states = [s.clone() for s in cache.cell_states]
        for t in range(prompt, seq.shape[1]):
            expected = model(seq[:, t:t + 1], cache_params=cache, use_cache=True).logits
            got = decode_step(model, seq[:, t:t + 1], windows, states)
            assert torch.equal(got, expected), t
    for buffer, value in zip(windows + states, cache.conv_states + cache.cell_states):
        assert torch.equal(buffer, value)


def eager_decoder(model, flavour: str = "graph", max_graphs: int = 8):
    """Route model's decode steps through a GraphDecoder that runs its step eagerly (CPU)."""
    from models.pararnn import decoding

    decoder = decoding.GraphDecoder(capture=False, max_graphs=max_graphs)
    decoding.attach(model, decoder)
    model.config.decode_graph = flavour
    return decoder


def test_static_decoder_generate_equals_pure_torch(model):
    """Through generate(): greedy with left padding, twice in a row (the buffers are refilled by each prefill),
    at two batch sizes with room for one graph (the older is dropped), beam search (reorder_cache) and
    sampling: the same tokens and logits as the pure-torch path, bit for bit.
    Mutations: _Graph.bind without the copy into the buffers -> fails; step() without the bound() check
    (no rebinding after reorder_cache / a new prefill) -> fails."""
    from models.pararnn import decoding

    g = torch.Generator().manual_seed(7)
    calls = [padded([torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]) for lengths in
             ((8, 2, 5), (4, 6, 6), (7, 3))]

    def gen(ids, mask, **kwargs):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0,
                                  return_dict_in_generate=True, output_logits=True, **kwargs)

    def run_all():
        outs = [gen(ids, mask, do_sample=False) for ids, mask in calls]
        outs.append(gen(*calls[0], do_sample=False, num_beams=3))
        torch.manual_seed(8)
        outs.append(gen(*calls[1], do_sample=True, top_k=50))
        return outs

    model.config.decode_graph = "off"
    expected = run_all()
    decoder = eager_decoder(model, max_graphs=1)
    try:
        got = run_all()
    finally:
        decoding.attach(model, None)
    assert len(decoder.graphs) == 1
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a.sequences, b.sequences), i
        assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits)), i


def test_two_live_caches_never_share_buffers(model):
    """Two caches of the same batch size decoded in turn: binding the second gives the first copies of its
    states, so both continue as they would alone. Mutation: _Graph.bind without unbind() -> fails."""
    from models.pararnn import decoding

    seqs = torch.randint(1, VOCAB, (2, 2, 10), generator=torch.Generator().manual_seed(9))
    prompt = 4

    def interleaved():
        caches = [model(s[:, :prompt], use_cache=True).cache_params for s in seqs]
        logits = [[], []]
        for t in range(prompt, seqs.shape[2]):
            for i in (0, 1):
                logits[i].append(model(seqs[i, :, t:t + 1], cache_params=caches[i], use_cache=True).logits)
        return [torch.cat(x, dim=1) for x in logits]

    with torch.no_grad():
        model.config.decode_graph = "off"
        expected = interleaved()
        eager_decoder(model)
        try:
            got = interleaved()
        finally:
            decoding.attach(model, None)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


GPU_NEW = 128


def gpu_model(cell: str, dtype: torch.dtype):
    torch.manual_seed(0)
    config = dict(cell=cell, hidden_size=256, num_hidden_layers=4, num_heads=2)
    model = build_model("pararnn", config, VOCAB).eval().to("cuda", dtype)
    model.generation_config.eos_token_id = None  # every call makes GPU_NEW tokens
    return model


def gpu_prompts(batch: int) -> tuple:
    """One prompt of 40 tokens, or four left-padded ones of 40, 7, 2 and 23 tokens."""
    g = torch.Generator().manual_seed(10 + batch)
    rows = [torch.randint(1, VOCAB, (n,), generator=g) for n in (40, 7, 2, 23)[:batch]]
    return tuple(t.cuda() for t in padded(rows))


def gpu_generate(model, ids, mask, flavour: str, **kwargs):
    model.config.decode_graph = flavour
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=GPU_NEW, pad_token_id=0,
                              return_dict_in_generate=True, output_logits=True, **kwargs)


def captured(model) -> list:
    """Keys (batch, flavour, ...) of the graphs the model's decoder has captured."""
    from models.pararnn import decoding

    decoder = decoding._DECODERS.get(model)
    return [key[:2] for key, g in decoder.graphs.items() if g.graph is not None] if decoder else []


def assert_same_generation(got, expected) -> None:
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.logits) == len(expected.logits) == GPU_NEW
    for t, (a, b) in enumerate(zip(got.logits, expected.logits)):
        assert torch.equal(a, b), t


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_graph_decode_equals_uncaptured_on_gpu(cell, dtype, batch):
    """decode_graph="graph" (one CUDA graph of the pure-torch step per batch size) gives the uncaptured
    path's tokens and logits bit for bit: greedy, 128 new tokens, batch 1 and batch 4 left-padded (the
    prefill is the parallel forward, Triton cells, on both sides). Mutations (run through the CPU twin
    tests above, which share the assertions; not re-run on a GPU): no copy of the prefill's states into
    the buffers, no rebinding -> fail."""
    model = gpu_model(cell, dtype)
    ids, mask = gpu_prompts(batch)
    expected = gpu_generate(model, ids, mask, "off")
    got = gpu_generate(model, ids, mask, "graph")
    assert captured(model) == [(batch, "graph")]
    assert_same_generation(got, expected)


def assert_compiled_follows(model, ids, mask, new: int, tol: float) -> None:
    """decode_graph="compiled" fed the uncaptured path's greedy tokens (teacher forcing): every step's logits
    within ``tol`` of the uncaptured ones (max|diff| / max|ref|), and the same argmax wherever the reference's
    top-2 margin exceeds ``2 tol``."""
    model.config.decode_graph = "off"
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=new, pad_token_id=0, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        model.config.decode_graph = "compiled"
        prompt = ids.shape[1]
        cache = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1).cache_params
        for t in range(new - 1):
            logits = model(ref.sequences[:, prompt + t:prompt + t + 1], cache_params=cache,
                           use_cache=True).logits[:, -1].float()
            expected = ref.logits[t + 1]
            scale = expected.abs().max()
            assert (logits - expected).abs().max() <= tol * scale, t
            top2 = expected.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 2 * tol * scale
            assert torch.equal(logits.argmax(-1)[clear], expected.argmax(-1)[clear]), t


@pytest.mark.slow
def test_compiled_step_follows_pure_torch_on_cpu():
    """The compiled flavour's step (torch.compile'd layer step; inductor's C++ backend here) stays within
    1e-4 of the pure-torch step over 11 teacher-forced fp32 steps, batch 3 left-padded (run eagerly over
    the static buffers). Mutation: layer_step without `state.copy_(new_state)` -> fails."""
    from models.pararnn import decoding

    model = tiny("lstm")
    ids, mask = padded([torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(12)) for n in (6, 2, 4)])
    eager_decoder(model, "compiled")
    try:
        assert_compiled_follows(model, ids, mask, NEW, 1e-4)
    finally:
        decoding.attach(model, None)


@pytest.mark.gpu
@pytest.mark.parametrize("cell,dtype,batch", [("gru", torch.bfloat16, 4), ("lstm", torch.bfloat16, 4),
                                              ("lstm", torch.float32, 1)])
def test_compiled_graph_follows_uncaptured_on_gpu(cell, dtype, batch):
    """decode_graph="compiled" (layers fused by torch.compile, then captured), teacher-forced on the
    uncaptured path's 128 greedy tokens: logits within 1e-4 (fp32) / 5e-2 (bf16) of the uncaptured ones,
    relative to their max (inductor on CPU gives 5e-7 / 1.3e-2 on a similar model), the same argmax
    where the margin is clear (assert_compiled_follows). Mutation: as the CPU twin above."""
    model = gpu_model(cell, dtype)
    ids, mask = gpu_prompts(batch)
    assert_compiled_follows(model, ids, mask, GPU_NEW, 1e-4 if dtype == torch.float32 else 5e-2)
    assert captured(model) == [(batch, "compiled")]


@pytest.mark.gpu
def test_graph_decode_bookkeeping_on_gpu():
    """Captured graphs through beam search (reorder_cache), seeded sampling, generate() calls at three batch
    sizes, and the model cast fp32 -> bf16 -> fp32 (new parameter storages: the graphs are dropped and
    recaptured; back in fp32 the old graphs' keys would match but their weights are gone): the same as
    the uncaptured path, bit for bit. Mutations (CPU twins): no rebinding after reorder_cache -> fails;
    not checked on a GPU: GraphDecoder._bind without the clear() on new weights (the last cast)."""
    model = gpu_model("gru", torch.float32)
    ids, mask = gpu_prompts(4)
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        model.to(dtype)
        runs = {}
        for flavour in ("off", "graph"):
            torch.manual_seed(11)
            runs[flavour] = [gpu_generate(model, ids, mask, flavour, num_beams=2),
                             gpu_generate(model, ids, mask, flavour, do_sample=True, top_k=20),
                             gpu_generate(model, ids[2:], mask[2:], flavour),
                             gpu_generate(model, ids[:2], mask[:2], flavour)]
        assert sorted(captured(model)) == [(2, "graph"), (4, "graph"), (8, "graph")]
        for got, expected in zip(runs["graph"], runs["off"]):
            assert_same_generation(got, expected)
