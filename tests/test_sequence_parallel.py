"""Sequence parallelism (``models/pararnn/pararnn_seqpar.py``, ``training/sequence_parallel.py``): the time
axis split over 2 or 4 CPU processes (gloo) gives one process's results.

Each multi-process test spawns its ranks once (``torch.multiprocessing``) and checks several cases in them:
rank r runs its chunk ``[r·T/P, (r+1)·T/P)``, the chunks' outputs are gathered and the parameter gradients
summed over the ranks (what DDP / FSDP do), and rank 0 compares them with the same op or model run on
the whole sequence in one process without any of the sequence-parallel code (fp32, relative error
≤ 1e-5). The inputs straddle the chunk boundaries on purpose: a document starting exactly at a chunk's
first step, a document spanning three or more chunks, an initial state, both cells, the torch and the
Triton (interpreted) paths.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests import pararnn_oracle as oracle
from tests.helpers import rel_err

TOL = 1e-5
B_, T_, D_, N_, H_ = 2, 32, 8, 16, 2  # T divisible by 2 and 4; chunks of 16 / 8 steps (the interpreter's tile: 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, size: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        fn(rank, size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, size: int, *args) -> None:
    """Run ``fn(rank, size, *args)`` in ``size`` fresh processes of one gloo group; a failure in any fails."""
    mp.spawn(_entry, args=(size, _free_port(), fn, args), nprocs=size, join=True)


def chunk(t: torch.Tensor, rank: int, size: int, dim: int = 1) -> torch.Tensor:
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n)


def gather_time(t: torch.Tensor, size: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=1)


def summed(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def resets(size: int) -> torch.Tensor:
    """Row 0: a document starts exactly at the first step of chunk 1 (and one inside chunk 0); row 1: one
    document from step 3 to step T-6, through every chunk; nothing starts at step 0 (h0 enters)."""
    reset = torch.zeros(B_, T_, dtype=torch.bool)
    reset[0, T_ // size] = True
    reset[0, 2] = True
    reset[1, 3] = True
    reset[1, T_ - 5] = True
    return reset


# ------------------------------------------------------------------------------------------------- op
def _op_inputs(cell: str, seed: int = 0) -> dict:
    K = oracle.STATE_BLOCKS[cell]
    g = torch.Generator().manual_seed(seed)
    leaves = dict(x=torch.randn(B_, T_, D_, generator=g), B=torch.randn(H_, D_ // H_, 3, N_ // H_, generator=g) * 0.8,
                  b=0.3 * torch.randn(3, N_, generator=g), A=(torch.rand(3, N_, generator=g) * 2 - 1) * 0.5,
                  h0=torch.rand(B_, K, N_, generator=g) * 1.8 - 0.9)
    if cell == "lstm":
        leaves["C"] = (torch.rand(2, N_, generator=g) * 2 - 1) * 0.5
    weights = (torch.randn(B_, T_, N_, generator=g), torch.randn(B_, K, N_, generator=g))
    return dict(leaves=leaves, weights=weights)


def _op_run(cell, inputs, reset, group, rank, size, **kwargs):
    """The op forward and backward on this rank's chunk (everything when ``group`` is None): output, final
    state, residual, every gradient, the fallback count."""
    from models.pararnn import para_gru, para_lstm

    leaves = {k: v.clone().requires_grad_() for k, v in inputs["leaves"].items()}
    wy, ws = inputs["weights"]
    x, rst = leaves["x"], reset
    if group is not None:
        x, rst, wy = chunk(x, rank, size), chunk(reset, rank, size), chunk(wy, rank, size)
    rw = (leaves["A"],) if cell == "gru" else (leaves["A"], leaves["C"])
    count = torch.zeros((), dtype=torch.int64)
    op = para_gru if cell == "gru" else para_lstm
    y, final, res = op(x, leaves["B"], leaves["b"], *rw, h0=leaves["h0"], reset=rst, return_residual=True,
                       fallback_count=count, seq_group=group, **kwargs)
    loss = (y * wy).sum()
    if group is None or rank == size - 1:  # the sequence's final state is the last rank's
        loss = loss + (final * ws).sum()
    loss.backward()
    grads = {"d" + k: v.grad for k, v in leaves.items()}
    out = {"y": y.detach(), "residual": res, "count": count, **grads}
    if group is None:
        out["final"] = final.detach()
        return out
    out["y"] = gather_time(out["y"], size)
    out.update({k: summed(v) for k, v in grads.items()})  # dx: each rank's is zero outside its chunk
    final = final.detach().clone()
    dist.broadcast(final, src=size - 1)
    out["final"] = final
    return out


def _worker(rank, size, cases, window, layout=False):
    from models.pararnn import pararnn_seqpar

    pararnn_seqpar.WINDOW = window
    group = dist.new_group(list(range(size)))
    failures = []
    for cell, mode, kwargs in cases:
        inputs, reset = _op_inputs(cell), resets(size)
        got = _op_run(cell, inputs, reset, group, rank, size, mode=mode, **kwargs)
        if rank:
            continue
        ref = _op_run(cell, inputs, reset, None, 0, 1, mode=mode, **kwargs)
        errs = {k: rel_err(got[k], ref[k]) for k in ref if k not in ("residual", "count")}
        errs["residual"] = abs(got["residual"].item() - ref["residual"].item()) / max(ref["residual"].item(), 1e-6)
        bad = {k: f"{e:.1e}" for k, e in errs.items() if e > TOL}
        if got["count"].item() != ref["count"].item():
            bad["count"] = (got["count"].item(), ref["count"].item())
        if bad:
            failures.append(f"{cell} {mode} {kwargs}: {bad}")
    _lm_check(rank, size, group, failures)
    if layout:
        _data_parallel_check(rank, size, failures)
    assert not failures, "sequence parallel != one process:\n" + "\n".join(failures)


# ------------------------------------------------------------------------------------------------- LM
def _lm_batch(size: int) -> dict:
    """Token ids, shifted labels and position ids (from :func:`resets`): row 0 starts in the middle of a
    document (position 5), row 1 at one (position 0)."""
    g = torch.Generator().manual_seed(1)
    reset = resets(size)
    reset[1, 0] = True
    positions = torch.zeros(B_, T_, dtype=torch.long)
    for row, start in ((0, 5), (1, 0)):
        p = start
        for t in range(T_):
            p = 0 if reset[row, t] else p
            positions[row, t] = p
            p += 1
    ids = torch.randint(0, 64, (B_, T_ + 1), generator=g)
    return dict(input_ids=ids[:, :-1], labels=ids[:, 1:], position_ids=positions)


def _lm_run(model, batch: dict, group, rank: int, size: int) -> dict:
    """Logits of the whole sequence and the gradients of the summed cross-entropy, on this rank's chunk
    (everything when ``group`` is None); gradients summed over the ranks."""
    import torch.nn.functional as F

    model.zero_grad()
    model.set_sequence_parallel(group)
    if group is not None:
        batch = {k: chunk(v, rank, size) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum").backward()
    out = {"logits": logits.detach(), **{n: p.grad for n, p in model.named_parameters()}}
    if group is not None:
        out = {k: gather_time(v, size) if k == "logits" else summed(v) for k, v in out.items()}
    model.set_sequence_parallel(None)
    return out


def _lm_check(rank, size, group, failures):
    from models.pararnn import ParaRNNConfig, ParaRNNForCausalLM

    batch = _lm_batch(size)
    for cell, mode in LM_CASES:
        torch.manual_seed(0)
        model = ParaRNNForCausalLM(ParaRNNConfig(cell=cell, vocab_size=64, hidden_size=D_, num_hidden_layers=2,
                                                 num_heads=H_, intermediate_size=32, mode=mode))
        got = _lm_run(model, batch, group, rank, size)
        if rank == 0:
            ref = _lm_run(model, batch, None, 0, 1)
            bad = {k: f"{e:.1e}" for k in ref if (e := rel_err(got[k], ref[k])) > TOL}
            if bad:
                failures.append(f"LM {cell} {mode}: {bad}")


def _data_parallel_check(rank, size, failures):
    """train.py's layout on 4 ranks: 2 sequence-parallel groups of 2 (training.sequence_parallel.setup), each
    reading its own row; each rank's loss is the mean over its tokens and the gradients are averaged over
    all 4 ranks (DDP's reduction): the gradient of one process's mean loss over both rows."""
    import torch.nn.functional as F

    from models.pararnn import ParaRNNConfig, ParaRNNForCausalLM
    from training.sequence_parallel import setup

    sp = setup(2, rank, size)
    batch = _lm_batch(2)
    torch.manual_seed(0)
    model = ParaRNNForCausalLM(ParaRNNConfig(vocab_size=64, hidden_size=D_, num_hidden_layers=2, num_heads=H_,
                                             intermediate_size=32, mode="parallel"))

    def grads(part):
        model.zero_grad()
        logits = model(input_ids=part["input_ids"], position_ids=part["position_ids"]).logits
        F.cross_entropy(logits.flatten(0, 1), part["labels"].flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model.set_sequence_parallel(sp.group)
    got = grads(sp.shard({k: v[sp.dp_rank:sp.dp_rank + 1] for k, v in batch.items()}))
    got = {k: summed(v) / size for k, v in got.items()}
    model.set_sequence_parallel(None)
    if rank == 0:
        ref = grads(batch)
        bad = {k: f"{e:.1e}" for k in ref if (e := rel_err(got[k], ref[k])) > TOL}
        if bad:
            failures.append(f"2 x 2 layout: {bad}")


LM_CASES = [("gru", "parallel"), ("lstm", "parallel"), ("gru", "triton")]
OP_CASES = [(cell, mode, {}) for cell in ("gru", "lstm") for mode in ("parallel", "triton")]
SAME_ITERATES = [  # unconverged Newton, no fallback: the torch path must give one process's iterate itself
    (cell, "parallel", dict(newton_iters=1, fallback_tol=None)) for cell in ("gru", "lstm")]
FALLBACK = [("gru", "parallel", dict(newton_iters=1, fallback_tol=1e-9))]  # every row re-solved, rank by rank


@pytest.mark.slow
def test_two_ranks_match_one_process():
    """The op (both cells, torch and Triton paths, plus one unconverged Newton iteration: the same iterate
    and residual as one process; and the exact fallback pipeline; the Triton guess window shorter than a
    chunk) and the LM (logits and every parameter gradient).

    Mutation: the carry-in dropped in ``pararnn_seqpar.newton`` (``d_in`` zero) -> fails (parallel);
    ``carry_back`` returning zeros -> fails (gradients); ``_settle`` never re-solving -> fails (triton)."""
    spawn(_worker, 2, OP_CASES + SAME_ITERATES + FALLBACK, 4)


@pytest.mark.slow
def test_four_ranks_match_one_process():
    """Four chunks of 8 steps: row 1's document runs through all four, so the carries compose over three
    boundaries (and the Triton path needs settling rounds: each guess sees one chunk only); op and LM; and
    the trainer's layout of 4 ranks as 2 sequence-parallel groups x 2 data-parallel replicas.

    Mutation: ``carry_in`` composing only the previous rank's map -> fails; ``SequenceParallel.shard``
    giving every rank chunk 0 -> fails (layout)."""
    spawn(_worker, 4, OP_CASES + SAME_ITERATES, 2048, True)


# --------------------------------------------------------------------------------------------- train.py
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_train_two_ranks_sequence_parallel_matches_one_process(tmp_path_factory, strategy):
    """``train.py trainer.sequence_parallel=2`` under torchrun (2 CPU processes, each holding 16 of the 32
    steps of every row, both reading the whole global batch) logs the losses of the one-process run of
    tests/distributed_helpers.py, step by step over its 10 steps (≤ 1e-4: fp32, gloo's reduction order),
    and learns; under DDP and under FSDP2 (which also checkpoints activations: the recomputed forward
    exchanges again).

    Mutation: the conv's tail from the previous rank dropped in ``RNNBlock.forward`` (``prefix = None``) ->
    fails (ddp); each rank reading its own rows (``PackedStream(..., process_index, num_processes)``) -> fails
    (ddp)."""
    import distributed_helpers as h

    ref_dir, data = h.reference(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp(f"seqpar_{strategy}")
    h.run(run_dir, [*data, f"trainer={strategy}", "trainer.device=cpu", "trainer.precision=fp32",
                    "trainer.sequence_parallel=2"], nproc=2)
    s = h.summary(run_dir)
    assert s["world_size"] == 2 and s["sequence_parallel"] == 2 and s["step"] == h.STEPS
    got, ref = h.losses(run_dir), h.losses(ref_dir)
    h.assert_close(got, ref, tol=1e-4)
    assert got[h.STEPS] < got[1] - 0.3, got  # it learns (10.83 -> 10.45 in these 10 steps)
    assert abs(s["val_loss"] - h.summary(ref_dir)["val_loss"]) < 1e-4


# ------------------------------------------------------------------------------------------ configuration
def test_sequence_parallel_config_checks():
    """``TrainerConfig.micro_batch`` rejects a group size that does not divide the world and a batch that
    does not divide over the data-parallel ranks (world / N); the layout of 4 ranks in groups of 2; the op
    refuses the sequential mode with a group.

    Mutation: the data-parallel size taken as the world size in ``micro_batch`` -> fails."""
    from models.pararnn import para_gru
    from training.config import ConfigError, TrainerConfig
    from training.sequence_parallel import SequenceParallel

    with pytest.raises(ConfigError, match="sequence_parallel=3"):
        TrainerConfig(sequence_parallel=3).micro_batch(4)
    with pytest.raises(ConfigError, match="data-parallel size 2"):
        TrainerConfig(sequence_parallel=2, batch_size=3).micro_batch(4)
    assert TrainerConfig(sequence_parallel=2, batch_size=2).micro_batch(4) == 1  # one row per data-parallel pair
    batch = {"input_ids": torch.arange(16).view(2, 8)}
    assert SequenceParallel(2, 1, 0, 1, None).shard(batch)["input_ids"].tolist() == [[4, 5, 6, 7], [12, 13, 14, 15]]
    inputs = _op_inputs("gru")["leaves"]
    with pytest.raises(ValueError, match="needs mode 'parallel' or 'triton'"):
        para_gru(inputs["x"], inputs["B"], inputs["b"], inputs["A"], mode="sequential", seq_group=object())


@pytest.mark.slow
@pytest.mark.parametrize("override, needle", [
    ("model=transformer_tiny", "needs model.arch=pararnn"),
    ("data.seq_len=33", "trainer.sequence_parallel=2: must divide data.seq_len=33"),
])
def test_train_rejects_impossible_sequence_parallel_in_one_line(tmp_path, override, needle):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "train.py"), f"run_dir={tmp_path}",
                           "trainer.sequence_parallel=2", override], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {needle}" in proc.stderr or needle in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
