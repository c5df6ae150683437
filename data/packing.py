"""Packing of tokenized documents into fixed-length training rows (pure Python, no I/O).

What is special here:

* Each document enters the stream as ``[EOS] + tokens(text)``: the tokenizer's EOS id is the
  separator *and* the beginning-of-document marker. Position ids restart at 0 on that EOS and
  count up through the document, so a document is delimited both by its EOS and by its
  position ids (position 0 occurs exactly at EOS tokens).
* Rows hold ``seq_len + 1`` tokens and consecutive rows overlap by exactly one token: the last
  token of row k is the first token of row k+1. With ``input_ids = row[:-1]`` and
  ``labels = row[1:]`` every token of the stream (except the very first) is a prediction
  target exactly once, and no token is dropped at row boundaries.
* A document that is continued from the previous row keeps counting its positions, so
  ``position_ids`` may exceed ``seq_len`` (they are the position inside the document).
* The packer's state is the leftover token buffer, stored compactly as its tokens, the
  position of its first token and the buffer offsets where a document starts. It is plain
  Python (JSON-serialisable).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Row:
    """One packed row: ``tokens`` has ``seq_len + 1`` ids; ``positions`` has ``seq_len`` entries
    (the position ids of ``tokens[:-1]``, i.e. of the model inputs)."""

    tokens: list[int]
    positions: list[int]


class TokenPacker:
    """Accumulates documents and cuts them into overlapping rows of ``seq_len + 1`` tokens."""

    def __init__(self, seq_len: int, eos_id: int) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.seq_len = seq_len
        self.eos_id = eos_id
        self._tokens: list[int] = []
        self._positions: list[int] = []

    def __len__(self) -> int:
        """Number of buffered tokens (including the one carried over from the previous row)."""
        return len(self._tokens)

    def add_document(self, tokens: Sequence[int]) -> None:
        """Append one document as ``[EOS] + tokens`` with positions ``0 .. len(tokens)``."""
        self._tokens.append(self.eos_id)
        self._tokens.extend(tokens)
        self._positions.extend(range(len(tokens) + 1))

    def has_row(self) -> bool:
        return len(self._tokens) >= self.seq_len + 1

    def pop_row(self) -> Row:
        """Cut the next row. The row's last token stays in the buffer as the next row's first."""
        if not self.has_row():
            raise RuntimeError(f"need {self.seq_len + 1} buffered tokens, have {len(self._tokens)}")
        n = self.seq_len
        row = Row(tokens=self._tokens[: n + 1], positions=self._positions[:n])
        del self._tokens[:n]
        del self._positions[:n]
        return row

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        starts = [i for i, p in enumerate(self._positions) if p == 0]
        return {
            "tokens": list(self._tokens),
            "first_position": self._positions[0] if self._positions else 0,
            "doc_starts": starts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tokens = [int(t) for t in state["tokens"]]
        first = int(state["first_position"])
        starts = set(int(s) for s in state["doc_starts"])
        positions: list[int] = []
        pos = first
        for i in range(len(tokens)):
            pos = 0 if i in starts else (first if i == 0 else pos + 1)
            positions.append(pos)
        self._tokens = tokens
        self._positions = positions


def collate_rows(rows: Sequence[Row]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch: ``input_ids``, ``labels``, ``position_ids``, LongTensor [B, seq_len]."""
    tokens = torch.tensor([r.tokens for r in rows], dtype=torch.long)
    return {
        "input_ids": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.tensor([r.positions for r in rows], dtype=torch.long),
    }
