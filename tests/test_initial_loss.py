"""Initial loss: a freshly built model of every architecture predicts about uniformly over its vocabulary, and
under FSDP2 its first-step loss is the one-process loss of the same weights and rows (the last test).

Before any update the mean next-token cross-entropy should be close to ln V (V: the number of logits,
computed here from the model's output). An untied LM head whose logits have std σ starts at about
ln V + σ²/2, so the band [ln V - 0.5, ln V + 1.5] admits heads of up to σ ≈ 1.7 (the presets: 0.58
Mamba2, 1 Transformer, 1 ParaRNN: both DCLM heads). A head drawn without regard to the width (HF's Mamba2
``_init_weights``: N(0, 0.1), so σ = 0.1·√d) starts near 20 at the 1B width and 28 at the 7B width,
while at the tiny presets' d = 64 it is within the band: hence the two tests.

* The tiny presets, whole, built as train.py builds them (seeded, then ``models.registry.build_model``
  with the tokenizer's vocabulary), on packed rows of the embedded corpus.
* The 1B and 7B presets at their width, without blocks and with a 4096-token vocabulary, on random
  tokens. Behind the final RMSNorm (weight 1) the head sees unit-RMS features whatever the blocks did,
  so the initial loss depends on the head's scale against the width, not on depth (Mamba2 at the 7B
  width before the fix, on the corpus: 28.1, 28.0, 27.6 with 2, 4, 8 blocks; the 1B preset 20.1 with
  2 blocks, 20.7 with all 48). Dropping the blocks and most of the vocabulary keeps this fast: one
  7B-width Transformer block alone takes ~15 s to initialise on a CPU core.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from models.count import load_preset
from models.registry import build_model

ARCHS = ("mamba2", "paragru", "paralstm", "transformer")
BAND = (-0.5, 1.5)  # allowed initial loss minus ln V
SEED = 1234  # configs/config.yaml's


def initial_loss(model, input_ids, labels, position_ids) -> tuple[float, int, float]:
    """(mean cross-entropy, number of logits V, logits' std) of ``model`` in eval mode, without gradients."""
    with torch.no_grad():
        logits = model.eval()(input_ids=input_ids, position_ids=position_ids).logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    return loss, logits.shape[-1], logits.std().item()


def assert_near_ln_vocab(name, loss, vocab, logit_std):
    ln_v = math.log(vocab)
    assert BAND[0] < loss - ln_v < BAND[1], (f"{name}: initial loss {loss:.2f}, ln V = {ln_v:.2f} (V = {vocab}), "
                                             f"logits' std {logit_std:.2f}")


@pytest.fixture(scope="module")
def corpus():
    """The tokenizer's size and a batch of 4 packed rows of 128 tokens from the embedded corpus."""
    from data.pipeline import DataConfig, PackedStream, load_tokenizer

    cfg = DataConfig(seq_len=128)
    tokenizer = load_tokenizer(cfg.tokenizer)
    return len(tokenizer), next(PackedStream(cfg, tokenizer, batch_size=4))


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_preset_starts_near_ln_vocab(arch, corpus):
    n_tokens, batch = corpus
    preset = load_preset(f"{arch}_tiny")
    torch.manual_seed(SEED)
    model = build_model(preset["arch"], preset["config"], n_tokens)
    loss, vocab, std = initial_loss(model, batch["input_ids"], batch["labels"], batch["position_ids"])
    assert vocab == model.config.vocab_size >= n_tokens
    assert_near_ln_vocab(f"{arch}_tiny", loss, vocab, std)


@pytest.mark.parametrize("size", ("1b", "7b"))
@pytest.mark.parametrize("arch", ARCHS)
def test_paper_width_starts_near_ln_vocab(arch, size):
    preset = load_preset(f"{arch}_{size}")
    vocab = 4096
    config = dict(preset["config"], num_hidden_layers=0, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(SEED)
    model = build_model(preset["arch"], config)
    assert model.config.hidden_size == preset["config"]["hidden_size"]
    tokens = torch.randint(0, vocab, (4, 257), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(256).expand(4, -1)
    loss, logits, std = initial_loss(model, tokens[:, :-1], tokens[:, 1:], positions)
    assert logits == vocab
    assert_near_ln_vocab(f"{arch}_{size} without blocks", loss, vocab, std)


@pytest.mark.slow
def test_fsdp2_first_step_loss_equals_one_process(tmp_path):
    """Every architecture under FSDP2 (2 gloo processes, fp32, d=64, 2 blocks; built as train.py builds them, on
    the first batch of the embedded corpus): each rank's first-step loss equals the loss rank 0 computes for
    the same rows with its unsharded model (relative 1e-5), so does every gradient (relative norm error 1e-4;
    a loss scaled by 1.01 on one rank reads 7e-3), the weights and the non-persistent buffers (RoPE)
    agree across ranks before sharding, and the loss is near ln V. The same script checks the 7B presets on
    two GPUs (benchmarks/check_first_loss.py). Mutation: rank 1 scales its non-persistent buffers by 1.01 in
    ``training.distributed.shard`` (a RoPE table that differs on one rank) -> the Transformer's rank-1 loss
    reads 11.3123 against 11.3091, fails."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(root / "benchmarks" / "check_first_loss.py"), "--tiny", "--out",
                           str(tmp_path)], cwd=root, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "check_first_loss.json").read_text())
    assert res["world_size"] == 2 and res["precision"] == "fp32"
    assert [r["arch"] for r in res["results"]] == ["transformer", "pararnn", "pararnn", "mamba2"]
    for r in res["results"]:
        assert len(r["fsdp2"]) == len(r["single"]) == 2
        for got, ref in zip(r["fsdp2"], r["single"]):
            assert abs(got - ref) <= 1e-5 * ref, r
        assert r["differ_across_ranks"] == [] and r["pass"], r
        assert max(r["grad_rel_err"].values()) <= 1e-4 and len(r["grad_rel_err"]) > 10, r["worst_grad"]
        assert -0.5 < r["single"][0] - r["ln_vocab"] < 1.5, r
    assert res["results"][0]["rope_rel_err"] < 1e-6


def test_pararnn_lm_is_initialised_as_dclm():
    """Outside the cells the ParaRNN LM is initialised as DCLM's (the paper's App. C.1; our Transformer's): each
    embedding, projection and head weight a normal truncated at ±3σ with σ = 1/√fan-in, the projections into
    the residual stream (the RNN block's out_proj, the MLP's down) divided by √(2·(layer + 1)). Checked against
    those formulas at the 1B width (2 layers): the empirical std within 2% of σ times the truncated normal's
    own factor (0.9733) and no value beyond 3σ. Mutation: the old N(0, 0.02) with / √(2·layers) -> the head's
    std 0.02 against 0.0214, and out_proj's depth factor wrong in layer 1: fails."""
    preset = load_preset("paragru_1b")
    torch.manual_seed(SEED)
    model = build_model("pararnn", dict(preset["config"], num_hidden_layers=2, vocab_size=4096, bos_token_id=0,
                                        eos_token_id=0))
    d, hidden = model.config.hidden_size, model.config.intermediate_size
    truncation = 0.9733  # std of a unit normal truncated at ±3
    expected = {"model.embed_tokens.weight": d ** -0.5, "lm_head.weight": d ** -0.5}
    for i in range(2):
        depth = math.sqrt(2 * (i + 1))
        expected |= {f"model.layers.{i}.rnn.in_proj.weight": d ** -0.5,
                     f"model.layers.{i}.rnn.out_proj.weight": d ** -0.5 / depth,
                     f"model.layers.{i}.mlp.gate_up.weight": d ** -0.5,
                     f"model.layers.{i}.mlp.down.weight": hidden ** -0.5 / depth}
    weights = dict(model.named_parameters())
    for name, sigma in expected.items():
        w = weights[name].detach()
        assert w.std().item() == pytest.approx(sigma * truncation, rel=0.02), name
        assert w.abs().max().item() <= 3 * sigma * (1 + 1e-6), name


@pytest.mark.parametrize("size", ("1b", "7b"))
def test_pararnn_starts_at_the_transformers_loss(size):
    """Both LMs end in an RMSNorm and a DCLM head, so at the same width they start at the same loss (ln V + ~0.47,
    the logits' std being ~0.97, a normal truncated at ±3σ; the 7B run on two H200s had ParaRNN at + 0.8 with
    its former N(0, 0.02) head). The Transformer is the reference: its own code (Llama's modules,
    ``_trunc_normal``). Same random tokens, no blocks, 4096-token vocabulary; within 0.05 (~4 standard
    deviations of the difference). Mutation: ParaRNN's head N(0, 0.02) -> + 0.82 at the 7B width (0.33 apart),
    fails."""
    losses = {}
    # 16 x 256 labels: the label's logit (std 1, mean 0) averages to within ~0.008 of 0 per model
    tokens = torch.randint(0, 4096, (16, 257), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(256).expand(16, -1)
    for arch in ("paragru", "transformer"):
        preset = load_preset(f"{arch}_{size}")
        torch.manual_seed(SEED)
        model = build_model(preset["arch"], dict(preset["config"], num_hidden_layers=0, vocab_size=4096,
                                                 bos_token_id=0, eos_token_id=0))
        losses[arch] = initial_loss(model, tokens[:, :-1], tokens[:, 1:], positions)[0] - math.log(4096)
    assert losses["paragru"] == pytest.approx(losses["transformer"], abs=0.05), losses
    assert 0.35 < losses["paragru"] < 0.6, losses
