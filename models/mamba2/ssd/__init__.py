"""Triton SSD (state-space duality) kernels of Mamba-2, vendored from mamba-ssm 2.3.2.post1 (Apache-2.0).

Only ``mamba_chunk_scan_combined`` (chunked SSD scan, forward and backward, with ``seq_idx`` document
resets) is kept: no CUDA extension (selective_scan_cuda, causal_conv1d) is needed, so there is no
build step. Each file says at its top what was changed; ``LICENSE`` is mamba-ssm's licence.
``chunk_scan`` (``ops.py``, ours) is the mixer's entry: the same call, through ``torch.library`` custom ops
while ``torch.compile`` traces, and always with ``seq_idx``.
Importing this package imports ``triton`` but compiles nothing until a kernel is launched.
"""
from .ops import chunk_scan
from .ssd_combined import mamba_chunk_scan_combined

__all__ = ["chunk_scan", "mamba_chunk_scan_combined"]
