"""The training objective against independent references: the loss and z-loss (``F.cross_entropy``, hand
values), the optimizer's decay groups and decoupled weight decay (a hand-computed AdamW step), the learning
rate schedule (hand values), and a short ``train.py`` run that must learn (validation perplexity below the
unigram floors of its training split).
"""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.loss import lm_loss
from training.optim import build_optimizer, build_scheduler, lr_factor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- loss ------------------------------------------------------------------------------------------
def test_lm_loss_by_hand():
    """logits (0, ln 2, ln 3): logsumexp = ln 6, so the target 2 costs ln 6 - ln 3 = ln 2 and the z-loss is
    coef · (ln 6)². Mutation: z-loss of ``lse`` instead of ``lse²`` -> fails."""
    logits = torch.tensor([[[0.0, math.log(2), math.log(3)]]])
    ce, z = lm_loss(logits, torch.tensor([[2]]), 1e-2)
    assert ce.item() == pytest.approx(math.log(2), rel=1e-6)
    assert z.item() == pytest.approx(1e-2 * math.log(6) ** 2, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_loss_matches_cross_entropy_and_logsumexp(dtype):
    """Mean next-token cross-entropy == ``F.cross_entropy`` on the fp32 logits; z-loss == coef ·
    mean(logsumexp²) computed in float64. Both in fp32 whatever the logits' dtype. Mutation: ``.sum()``
    instead of ``.mean()`` for the cross-entropy -> fails."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 50, generator=g)).to(dtype)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    ce, z = lm_loss(logits, labels, 1e-4)
    assert ce.dtype == z.dtype == torch.float32
    expected_ce = F.cross_entropy(logits.float().reshape(-1, 50), labels.reshape(-1))
    expected_z = 1e-4 * torch.logsumexp(logits.double(), dim=-1).square().mean()
    assert ce.item() == pytest.approx(expected_ce.item(), rel=1e-6)
    assert z.item() == pytest.approx(expected_z.item(), rel=1e-6)


def test_lm_loss_skips_ignored_positions():
    """Labels of -100 are not scored: the cross-entropy equals ``F.cross_entropy(..., ignore_index=-100)``
    and the z-loss is the mean of logsumexp² over the scored positions only; nothing scored gives 0.
    Mutation: average the z-loss over every position -> fails."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 40, generator=g)
    labels = torch.randint(0, 40, (2, 9), generator=g)
    labels[0, :4] = -100
    labels[1, 7:] = -100
    ce, z = lm_loss(logits, labels, 1e-3)
    scored = labels != -100
    assert ce.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1),
                                                      ignore_index=-100).item(), rel=1e-6)
    lse = torch.logsumexp(logits.double(), dim=-1)
    assert z.item() == pytest.approx(1e-3 * lse[scored].square().mean().item(), rel=1e-6)
    ce, z = lm_loss(logits, torch.full_like(labels, -100), 1e-3)
    assert ce.item() == 0.0 and z.item() == 0.0


# ---- optimizer -------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.RMSNorm(4)
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, 3))   # another 1-D parameter
        self.scale = nn.Parameter(torch.tensor(2.0))            # a scalar
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)


def test_decay_groups_and_decoupled_weight_decay_by_hand():
    """≥2-D weights are decayed, 1-D and 0-D (norm gains, biases, gates, scalars) are not, frozen ones are
    left out. With zero gradients an AdamW step is pure decay: a decayed weight is multiplied by exactly
    1 − wd · lr_t / lr_max (decoupled from the size of lr), the others do not move. Two steps at different
    points of the warm-up check that the decay follows the schedule. Mutations: ``weight_decay`` instead of
    ``weight_decay / lr`` in the group -> shrink 1 − wd · lr_t -> fails; ``p.dim() >= 1`` -> biases decayed
    -> fails."""
    torch.manual_seed(0)
    model = Toy()
    lr, wd = 1e-3, 0.1
    optimizer = build_optimizer(model, lr, wd, (0.9, 0.95), 1e-8)
    scheduler = build_scheduler(optimizer, warmup_steps=4, max_steps=10, min_ratio=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups if g["params"]]
    decayed = ["embed.weight", "proj.weight"]
    assert sorted(map(tuple, groups)) == sorted([tuple(decayed),
                                                 ("gate", "norm.weight", "proj.bias", "scale")])
    for factor in (0.25, 0.5):  # lr_t / lr_max at optimizer steps 0 and 1 of a 4-step warm-up
        before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        scheduler.step()
        for n, p in model.named_parameters():
            if n in decayed:
                expected = before[n] * (1 - wd * factor)
                assert torch.allclose(p.double(), expected, rtol=1e-6, atol=0), n
                assert not torch.equal(p.double(), before[n]), n
            else:
                assert torch.equal(p.double(), before[n]), n


# ---- schedule --------------------------------------------------------------------------------------
@pytest.mark.parametrize("step, warmup, max_steps, min_ratio, expected", [
    (0, 10, 110, 0.0, 0.1),                  # warm-up start: (0 + 1) / 10
    (4, 10, 110, 0.0, 0.5),                  # mid warm-up
    (9, 10, 110, 0.0, 1.0),                  # last warm-up step: the peak
    (10, 10, 110, 0.0, 1.0),                 # cosine start
    (35, 10, 110, 0.0, 0.8535533905932737),  # a quarter of the cosine: (1 + cos(π/4)) / 2
    (60, 10, 110, 0.0, 0.5),                 # middle of the cosine
    (110, 10, 110, 0.0, 0.0),                # end
    (500, 10, 110, 0.0, 0.0),                # past the end: stays at the floor
    (60, 10, 110, 0.1, 0.55),                # middle with a floor: 0.1 + 0.9 · 0.5
    (110, 10, 110, 0.1, 0.1),                # end with a floor
    (0, 0, 100, 0.0, 1.0),                   # no warm-up: the peak at once
])
def test_lr_factor_hand_values(step, warmup, max_steps, min_ratio, expected):
    """Mutation: ``lr_factor`` returning 1.0 (no warm-up, no decay) -> fails."""
    assert lr_factor(step, warmup, max_steps, min_ratio) == pytest.approx(expected, abs=1e-12)


# ---- learning --------------------------------------------------------------------------------------
WORDS = ("the of and to in is was for on that with as by at from his it an were are which be this or had not but "
         "have their one all been has they more who its also when first after time other new years two into can "
         "some there than only most may over these many would such about her three where him year up").split()


def markov_documents(n: int, rng: random.Random) -> list[str]:
    """Documents of 40 one-token words, each word followed by one of two others: predictable from context."""
    docs = []
    for _ in range(n):
        i, words = rng.randrange(64), []
        for _ in range(40):
            words.append(WORDS[i])
            i = rng.choice(((3 * i + 1) % 64, (5 * i + 2) % 64))
        docs.append(" " + " ".join(words))
    return docs


@pytest.mark.slow
def test_short_run_learns_below_the_unigram_floors(tmp_path):
    """The default tiny ParaGRU, 24 steps of 8×32 tokens on a corpus whose next word depends on the current
    one: validation perplexity below the add-one unigram floor of the training split (data/stats.py) and
    below a maximum-likelihood unigram model counted here with the bare ``tokenizers`` library, so the
    model learned context. Mutations: the loss against ``batch["input_ids"]`` instead of the labels in
    train.py -> perplexity in the thousands -> fails; ``lr_factor`` returning 0 -> no learning -> fails
    (``lr_factor`` returning 1.0 is caught by test_lr_factor_hand_values)."""
    from collections import Counter

    from tokenizers import Tokenizer

    from data import DataConfig, load_tokenizer, unigram_baseline

    assert len(WORDS) >= 64
    rng = random.Random(0)
    files = {}
    for split, n in (("train", 300), ("validation", 20)):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"text": d}) + "\n" for d in markov_documents(n, rng)))
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "data.name=markov", f"data.train_files=[{files['train']}]",
                 f"data.validation_files=[{files['validation']}]", "data.seq_len=32", "data.validation_rows=16",
                 "trainer.batch_size=8", "trainer.max_steps=24", "trainer.warmup_steps=3", "trainer.val_every=24",
                 "trainer.val_batches=2", "trainer.ckpt_every=24", "trainer.log_every=8"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["val_tokens"] == 16 * 32  # every validation row the floors are computed on

    cfg = DataConfig(name="markov", format="json", train_files=[str(files["train"])],
                     validation_files=[str(files["validation"])], seq_len=32, validation_rows=16)
    floor = unigram_baseline(cfg, load_tokenizer(cfg.tokenizer)).perplexity

    tk = Tokenizer.from_file(os.path.join(ROOT, "data", "tokenizer", "gpt2", "tokenizer.json"))
    stream = lambda path: [t for line in open(path) for t in [50256] + tk.encode(json.loads(line)["text"]).ids]
    counts, train_tokens = Counter(stream(files["train"])), len(stream(files["train"]))
    targets = stream(files["validation"])[1: 1 + 16 * 32]
    ml_unigram = math.exp(-sum(math.log(counts[t] / train_tokens) for t in targets) / len(targets))
    assert summary["val_ppl"] < floor and summary["val_ppl"] < ml_unigram, (summary["val_ppl"], floor, ml_unigram)
