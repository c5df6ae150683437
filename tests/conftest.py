"""Test-session environment: offline hubs, wandb off, Triton through its CPU interpreter.

The environment must be set before any kernel module is imported, so it is done at the top of this
file, which pytest imports first.
"""
import os
import sys

for key, value in {
    "TRITON_INTERPRET": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import kernels.interpreter_shim  # noqa: E402,F401  (must precede any @triton.jit)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: without it they are reported as skipped, never silently passed."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
