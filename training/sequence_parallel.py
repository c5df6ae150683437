"""Sequence parallelism in the trainer (``trainer.sequence_parallel=N``): the process groups and the data slice.

The world is N × DP ranks: rank ``g·N + i`` is chunk i of sequence-parallel group g (consecutive ranks, so
a group sits on one node when N divides the GPUs per node and its exchanges go over NVLink). Every rank
of group g reads data-parallel shard g of the rows (so the group's ranks read the same rows) and keeps
steps ``[i·T/N, (i+1)·T/N)`` of ``input_ids``, ``labels`` and ``position_ids``. Labels come shifted from
the data pipeline (the target of a chunk's last step is the next chunk's first input, already in this
chunk's labels) and positions are the tokens' positions in their documents, so the slices need nothing
else. Inside the model the ParaRNN cells and convs exchange what crosses a chunk boundary
(``models/pararnn/pararnn_seqpar.py``).

Each rank's loss is the mean over its own tokens; DDP and FSDP2 average gradients over all N·DP ranks,
which is the gradient of the mean over every token of the global batch (the chunks are equal), and
``accelerator.reduce(loss, "mean")`` is that mean. Validation uses the same slices (its sums are
all-reduced over every rank).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in the layout (``size == 1``: no sequence parallelism)."""

    size: int = 1        # N, ranks per sequence
    rank: int = 0        # this rank's chunk
    dp_rank: int = 0     # which rows (data-parallel shard) this rank reads
    dp_size: int = 1
    group: object = None  # the torch.distributed group of this rank's N ranks

    def shard(self, batch: dict) -> dict:
        """This rank's chunk of every ``[rows, T]`` tensor of a batch."""
        if self.size == 1:
            return batch
        out = {}
        for key, value in batch.items():
            n = value.shape[1] // self.size
            out[key] = value[:, self.rank * n:(self.rank + 1) * n].contiguous()
        return out


def setup(size: int, rank: int, world_size: int) -> SequenceParallel:
    """The layout of ``world_size`` ranks into groups of ``size`` consecutive ranks (collective: every rank
    calls it, and creates every group, as ``torch.distributed.new_group`` requires)."""
    if size == 1:
        return SequenceParallel(dp_rank=rank, dp_size=world_size)
    import torch.distributed as dist

    mine = None
    for first in range(0, world_size, size):
        ranks = list(range(first, first + size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return SequenceParallel(size, rank % size, rank // size, world_size // size, mine)
