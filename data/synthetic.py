"""Synthetic expressivity tasks, generated on the fly from a seed, and their data source for ``train.py``.

Select one with ``python train.py data=synthetic_<task>``: the data config (``SyntheticConfig`` in
training/config.py) has ``source: synthetic``, the task's name and arguments, and no tokenizer (the
vocabulary is the task's); train.py's ``build_data`` turns it into the run's data source. Every example is a pair of
``[L]`` rows: the input tokens and a target per position, ``IGNORE_INDEX`` (-100) where nothing is scored.
Unlike the text pipeline, ``labels[t]`` is the target *at* position t (read after ``input_ids[: t + 1]``),
not the next input token.

Tasks (the docstring of each class gives its exact definition and source):

=============== ==========================================================================================
``keep_nth``    recall the n-th token (ParaRNN paper, App. C.2)
``parity``      parity of the bits read so far (ParaRNN App. C.2)
``mqar``        multi-query associative recall (Zoology, Arora et al. 2023; ParaRNN App. C.2)
``khop``        k-hop induction heads (Sanford et al. 2024; ParaRNN App. C.2)
``cycle_nav``   position on a 5-cycle after moves (Delétang et al. 2023; ParaRNN camera-ready)
``mod_arith``   value of an arithmetic expression mod 5 (Delétang et al. 2023; ParaRNN camera-ready)
``word_problem`` running product in A5 or S5 (Merrill, Petty & Sabharwal 2024; ParaRNN camera-ready)
=============== ==========================================================================================

The paper scores one output per sequence for Keep-nth, Parity, Cycle-Nav and Mod-Arith: the answer for
the whole sequence, at its last position. By default every position where the answer is defined carries a
target (``score: all``): a dense training signal (with the last position's target alone, a bare ParaGRU
does not learn Parity at L = 32 in 1,000 steps). Evaluation reports both readings (``eval/synthetic.py``):
the last position's accuracy (``last_acc``, the paper's) and exact match over every scored position
(``exact_acc``, the running variant: a strictly harder test). ``score: last`` keeps only the last scored
position of each row, in training too.

Seeds: training batch ``i`` of rank ``r`` is drawn from a generator seeded by ``(seed, "train", r, chunk)``;
the validation and test sets from ``(eval_seed, "validation")`` and ``(eval_seed, "test", L)``. So the
stream is infinite and resumes exactly from a batch counter, and the evaluation sets are fixed and
independent of the training seed.
"""
from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from training.common import ConfigError
from training.config import Config, SyntheticConfig

IGNORE_INDEX = -100
STATE_VERSION = 1
CHUNK_BATCHES = 64  # training batches drawn per generator call (amortises the per-position Python loops)

Batch = dict[str, Tensor]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def _randint(gen: torch.Generator, high: int, shape: tuple) -> Tensor:
    return torch.randint(0, high, shape, generator=gen)


# ------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task(Config):
    """A family of sequences with a target per position. Subclasses are dataclasses of the task's arguments,
    built and checked by the config mechanism (``data.task_args``: unknown keys, types, then ``check``)."""

    KEY: ClassVar[str] = "data.task_args"
    name: ClassVar[str]
    MINIMUM: ClassVar[dict[str, int]] = {}
    """The smallest value of each integer argument that has one (checked by :meth:`check`)."""

    def check(self) -> None:
        super().check()
        for key, least in self.MINIMUM.items():
            if getattr(self, key) < least:
                self.fail(key, f"must be >= {least}")

    @property
    def vocab_size(self) -> int:
        """Number of token ids, inputs and targets together (the model's embedding and output width)."""
        raise NotImplementedError

    def min_length(self) -> int:
        """The shortest sequence that holds one example."""
        return 1

    def sample(self, gen: torch.Generator, batch: int, length: int) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)``, both int64 ``[batch, length]``; targets are ``IGNORE_INDEX`` where unscored."""
        x = self.inputs(gen, batch, length)
        return x, self.targets(x)

    def inputs(self, gen: torch.Generator, batch: int, length: int) -> Tensor:
        """Random input rows ``[batch, length]``."""
        raise NotImplementedError

    def targets(self, x: Tensor) -> Tensor:
        """The targets of input rows ``x`` (every task but MQAR is a function of its inputs)."""
        raise NotImplementedError


@dataclass(frozen=True)
class KeepNth(Task):
    """Keep-nth (ParaRNN, arXiv 2510.21450 v2, App. C.2): "given an input sequence of values from a
    dictionary V, output its n-th element x_n"; the paper uses n = 5, |V| = 128.

    Inputs: L tokens uniform over ``[0, vocab)``. Target: ``x_n`` (1-based n) at every position t ≥ n;
    positions before n are unscored (the answer is not yet defined). Vocabulary: ``vocab``.
    """

    name: ClassVar[str] = "keep_nth"
    vocab: int = 128   # |V|, the dictionary size
    n: int = 5         # which element to keep (1-based)
    MINIMUM: ClassVar[dict[str, int]] = {"vocab": 2, "n": 1}

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def min_length(self) -> int:
        return self.n

    def inputs(self, gen, batch, length):
        return _randint(gen, self.vocab, (batch, length))

    def targets(self, x):
        y = torch.full_like(x, IGNORE_INDEX)
        y[:, self.n - 1:] = x[:, self.n - 1:self.n]
        return y


@dataclass(frozen=True)
class Parity(Task):
    """Parity (ParaRNN App. C.2): "given an input sequence of values in {0, 1}, output mod(Σ x_l, 2)".

    Inputs: L uniform bits. Target at every position t: the parity of ``x_1 .. x_t`` (running parity;
    ``score: last`` keeps only the parity of the whole sequence, the paper's single output).
    """

    name: ClassVar[str] = "parity"

    @property
    def vocab_size(self) -> int:
        return 2

    def inputs(self, gen, batch, length):
        return _randint(gen, 2, (batch, length))

    def targets(self, x):
        return x.cumsum(1) % 2


@dataclass(frozen=True)
class MQAR(Task):
    """Multi-query associative recall as Zoology's ``multiquery_ar`` (Arora et al. 2023, arXiv 2312.04927;
    HazyResearch/zoology), the definition ParaRNN App. C.2 paraphrases: "an input sequence of key-value
    pairs, followed by noise interwoven with the keys; output for each key its associated value".

    Layout of a row of length L: ``k_1 v_1 k_2 v_2 .. k_κ v_κ``, then ``L - 2κ`` tokens of noise (uniform
    over the whole vocabulary) in which each key appears once more, at an even offset of the query
    region chosen without replacement with probability ∝ (slot+1)^(a-1) (Zoology's power law, a = 0.01:
    most queries come soon after the context). Keys are distinct, from ``[1, vocab/2)``; values distinct,
    from ``[vocab/2, vocab)``. Target: the key's value at each query position; nothing else is scored.
    ParaRNN's table gives "κ = 2, |V| = 128"; we read κ as the number of pairs (Zoology's ``num_kv_pairs``).
    """

    name: ClassVar[str] = "mqar"
    vocab: int = 128        # |V|: keys from the lower half, values from the upper half
    num_kv_pairs: int = 2   # κ
    power_a: float = 0.01   # Zoology's power-law exponent for the query positions

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def min_length(self) -> int:
        return 4 * self.num_kv_pairs  # Zoology's constraint: the query region holds every key

    def check(self) -> None:
        super().check()
        if not 1 <= self.num_kv_pairs <= self.vocab // 2 - 1:
            self.fail("num_kv_pairs", f"must be in [1, vocab/2 - 1] = [1, {self.vocab // 2 - 1}]")
        if not 0 < self.power_a <= 1:
            self.fail("power_a", "must be in (0, 1]")

    def sample(self, gen, batch, length):
        kappa, half = self.num_kv_pairs, self.vocab // 2
        keys = torch.rand(batch, half - 1, generator=gen).argsort(1)[:, :kappa] + 1
        values = torch.rand(batch, self.vocab - half, generator=gen).argsort(1)[:, :kappa] + half
        x = _randint(gen, self.vocab, (batch, length))  # noise everywhere, then the structure on top
        x[:, 0:2 * kappa:2], x[:, 1:2 * kappa:2] = keys, values
        slots = (length - 2 * kappa) // 2
        weights = (torch.arange(slots, dtype=torch.float64) + 1) ** (self.power_a - 1)
        gaps = torch.multinomial(weights.expand(batch, slots), kappa, replacement=False, generator=gen)
        where = 2 * kappa + 2 * gaps
        x.scatter_(1, where, keys)
        y = torch.full_like(x, IGNORE_INDEX).scatter_(1, where, values)
        return x, y


@dataclass(frozen=True)
class KHop(Task):
    """k-hop induction heads (Sanford, Hsu & Telgarsky 2024, "Transformers, parallel computation, and
    logarithmic depth", the hop_k task; ParaRNN App. C.2: "for each element in the sequence hop back and
    report the value following its previous occurrence; keep on hopping back k times; 1-hop is also known
    as induction heads"). ParaRNN uses |V| = 10 for k = 1 and |V| = 5 for k = 2.

    Inputs: L tokens uniform over ``[0, vocab)``. One hop from position i goes to ``j + 1``, where j < i is
    the last earlier position holding the same token as i; undefined if there is none. Target at i: the
    token at the position reached after ``hops`` hops, or the extra token ``vocab`` ("none") if a hop is
    undefined. Every position is scored. Vocabulary: ``vocab + 1``.
    """

    name: ClassVar[str] = "khop"
    vocab: int = 10  # |V|
    hops: int = 1    # k
    MINIMUM: ClassVar[dict[str, int]] = {"vocab": 2, "hops": 1}

    @property
    def vocab_size(self) -> int:
        return self.vocab + 1

    def inputs(self, gen, batch, length):
        return _randint(gen, self.vocab, (batch, length))

    def targets(self, x):
        batch, length = x.shape
        rows = torch.arange(batch)
        last = torch.full((batch, self.vocab), -1, dtype=torch.long)  # last position of each token so far
        after = torch.empty_like(x)                                    # one hop from each position (-1: none)
        for i in range(length):
            prev = last[rows, x[:, i]]
            after[:, i] = torch.where(prev >= 0, prev + 1, -1)
            last[rows, x[:, i]] = i
        at = torch.arange(length).expand(batch, length)
        for _ in range(self.hops):
            at = torch.where(at >= 0, after.gather(1, at.clamp_min(0)), -1)
        return torch.where(at >= 0, x.gather(1, at.clamp_min(0)), self.vocab)


@dataclass(frozen=True)
class CycleNav(Task):
    """Cycle navigation (Delétang et al. 2023, "Neural networks and the Chomsky hierarchy", regular task;
    cited for state tracking by Liu et al. 2023 and Grazzi et al. 2025): an agent starts at 0 on a cycle of
    ``cycle`` positions; input tokens 0, 1, 2 move it by -1, 0, +1.

    Target at every position t: the agent's position after the first t moves (Delétang scores the final
    position only: ``score: last``). Vocabulary: ``max(3, cycle)`` (inputs 0-2, targets 0..cycle-1).
    """

    name: ClassVar[str] = "cycle_nav"
    cycle: int = 5
    MINIMUM: ClassVar[dict[str, int]] = {"cycle": 2}

    @property
    def vocab_size(self) -> int:
        return max(3, self.cycle)

    def inputs(self, gen, batch, length):
        return _randint(gen, 3, (batch, length))

    def targets(self, x):
        return (x - 1).cumsum(1) % self.cycle


@dataclass(frozen=True)
class ModArith(Task):
    """Modular arithmetic without brackets (Delétang et al. 2023, "Modular Arithmetic (Simple)"): the
    expression ``n_0 o_1 n_1 o_2 n_2 ..`` with numbers in ``[0, modulus)`` and operators ``+ - *`` (usual
    precedence: products first), evaluated mod ``modulus``.

    Tokens: numbers are ids ``0..modulus-1``; ``+ - *`` are ``modulus``, ``modulus+1``, ``modulus+2``.
    Even positions hold numbers, odd positions operators. Target at each number: the value of the
    expression that ends there; operators are unscored (Delétang scores the whole expression only:
    ``score: last``). Vocabulary: ``modulus + 3``.
    """

    name: ClassVar[str] = "mod_arith"
    modulus: int = 5
    MINIMUM: ClassVar[dict[str, int]] = {"modulus": 2}

    @property
    def vocab_size(self) -> int:
        return self.modulus + 3

    def inputs(self, gen, batch, length):
        x = torch.empty(batch, length, dtype=torch.long)
        x[:, 0::2] = _randint(gen, self.modulus, (batch, (length + 1) // 2))
        x[:, 1::2] = _randint(gen, 3, (batch, length // 2)) + self.modulus
        return x

    def targets(self, x):
        m, batch = self.modulus, x.shape[0]
        numbers, ops = x[:, 0::2], x[:, 1::2] - m  # ops 0: +, 1: -, 2: *
        y = torch.full_like(x, IGNORE_INDEX)
        total, term = torch.zeros(batch, dtype=torch.long), numbers[:, 0]  # closed terms, the open product
        y[:, 0] = term
        for j in range(1, numbers.shape[1]):
            op, n = ops[:, j - 1], numbers[:, j]
            times = op == 2
            total = torch.where(times, total, total + term) % m
            term = torch.where(times, term * n, torch.where(op == 0, n, -n)) % m
            y[:, 2 * j] = (total + term) % m
        return y


def _permutations(group: str) -> list[tuple[int, ...]]:
    """Elements of S5 in lexicographic order, or the even ones (A5) in the same order; identity first."""
    def even(p):
        return sum(p[i] > p[j] for i in range(5) for j in range(i + 1, 5)) % 2 == 0
    perms = list(itertools.permutations(range(5)))
    return perms if group == "s5" else [p for p in perms if even(p)]


@dataclass(frozen=True)
class WordProblem(Task):
    """Group word problems (Merrill, Petty & Sabharwal 2024, "The illusion of state in state-space
    models"): inputs are elements of A5 (60, the smallest non-solvable group, NC¹-complete) or S5 (120).

    Token i is the i-th permutation of ``(0..4)`` in lexicographic order (A5: the even ones, same order;
    id 0 is the identity). Target at every position t: the product ``g_1 · g_2 · .. · g_t``, where
    ``p · g`` applies p first, then g: ``(p · g)(i) = g(p(i))``. Vocabulary: the group's order.
    """

    name: ClassVar[str] = "word_problem"
    group: Literal["a5", "s5"] = "a5"

    @property
    def vocab_size(self) -> int:
        return 60 if self.group == "a5" else 120

    def table(self) -> Tensor:
        """``table[a, b]`` = id of (element a, then element b), flattened to ``[order²]``."""
        perms = _permutations(self.group)
        index = {p: i for i, p in enumerate(perms)}
        return torch.tensor([index[tuple(g[p[i]] for i in range(5))] for p in perms for g in perms])

    def inputs(self, gen, batch, length):
        return _randint(gen, self.vocab_size, (batch, length))

    def targets(self, x):
        n, table = self.vocab_size, self.table()
        y = torch.empty_like(x)
        y[:, 0] = x[:, 0]
        for t in range(1, x.shape[1]):
            y[:, t] = table[y[:, t - 1] * n + x[:, t]]
        return y


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (KeepNth, Parity, MQAR, KHop, CycleNav, ModArith,
                                                            WordProblem)}


def make_task(name: str, args: Mapping[str, Any] | None = None) -> Task:
    """The task ``name`` with its arguments; unknown names, keys or values raise ``ConfigError`` naming them."""
    if name not in TASKS:
        raise ConfigError(f"data.task={name!r} is not one of {', '.join(TASKS)}")
    return TASKS[name].from_dict(args)


def only_last(targets: Tensor) -> Tensor:
    """Keep only the last scored position of each row (``score: last``)."""
    scored = targets != IGNORE_INDEX
    from_end = scored.flip(1).cumsum(1).flip(1)  # scored positions at or after each position
    return torch.where(scored & (from_end == 1), targets, IGNORE_INDEX)


# ------------------------------------------------------------------------------------------------
# Stream and evaluation sets
# ------------------------------------------------------------------------------------------------
def make_batch(task: Task, gen: torch.Generator, batch: int, length: int, score: str) -> Batch:
    """One batch in the trainer's format: ``input_ids``, ``labels`` (targets) and ``position_ids``."""
    x, y = task.sample(gen, batch, length)
    if score == "last":
        y = only_last(y)
    return {"input_ids": x, "labels": y, "position_ids": torch.arange(length).expand(batch, length).contiguous()}


class SyntheticStream:
    """Endless training batches ``[batch_size, seq_len]`` for one rank; ``state_dict()`` is a batch counter."""

    def __init__(self, cfg: SyntheticConfig, batch_size: int, rank: int = 0, world_size: int = 1):
        self.cfg, self.task = cfg, make_task(cfg.task, cfg.task_args)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.batches = 0  # batches handed out
        self._chunk: tuple[int, Batch] | None = None

    def __iter__(self) -> SyntheticStream:
        return self

    def __next__(self) -> Batch:
        index, offset = divmod(self.batches, CHUNK_BATCHES)
        if self._chunk is None or self._chunk[0] != index:
            gen = _generator(self.cfg.seed, "train", self.rank, index)
            self._chunk = (index, make_batch(self.task, gen, CHUNK_BATCHES * self.batch_size, self.cfg.seq_len,
                                             self.cfg.score))
        rows = slice(offset * self.batch_size, (offset + 1) * self.batch_size)
        self.batches += 1
        return {k: v[rows] for k, v in self._chunk[1].items()}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "name": self.cfg.name, "rank": self.rank, "world_size": self.world_size,
                "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, mine in (("version", STATE_VERSION), ("name", self.cfg.name), ("rank", self.rank),
                          ("world_size", self.world_size)):
            if state.get(key) != mine:
                raise ConfigError(f"data state: saved {key}={state.get(key)!r} but this stream has {key}={mine!r}")
        self.batches = int(state["batches"])


def evaluation_batches(cfg: SyntheticConfig, length: int | None = None, rank: int = 0,
                       world_size: int = 1) -> list[Batch]:
    """The fixed validation set (``length=None``: ``val_samples`` rows of ``seq_len``) or the test set of
    ``length`` (``test_samples`` rows), in batches of ``eval_batch_size``; rows dealt round-robin to ranks."""
    task = make_task(cfg.task, cfg.task_args)
    if length is None:
        gen, samples, length = _generator(cfg.eval_seed, "validation"), cfg.val_samples, cfg.seq_len
    else:
        gen, samples = _generator(cfg.eval_seed, "test", length), cfg.test_samples
    batch = make_batch(task, gen, samples - samples % world_size, length, cfg.score)
    mine = {k: v[rank::world_size] for k, v in batch.items()}
    n, size = mine["input_ids"].shape[0], cfg.eval_batch_size
    return [{k: v[i:i + size] for k, v in mine.items()} for i in range(0, n, size)]
