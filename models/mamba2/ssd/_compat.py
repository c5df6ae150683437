"""Device helpers for the vendored mamba-ssm SSD kernels (ours, not mamba-ssm's).

Upstream wraps every launch in ``torch.cuda.device(t.device.index)`` and reads the SM count from
``torch.cuda.get_device_properties``. Both fail for CPU tensors, which is what the kernels see under
Triton's CPU interpreter (``TRITON_INTERPRET=1``) in our tests. On CUDA tensors these helpers do
exactly what upstream did.
"""
import contextlib

import torch


def device_ctx(device: torch.device):
    """``torch.cuda.device(device)`` for CUDA tensors; a no-op context otherwise."""
    if device.type == "cuda":
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def device_sm_count(device: torch.device) -> int:
    """Number of SMs of a CUDA device (sizes the grid of two backward kernels); 2 on the CPU interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2
