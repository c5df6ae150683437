"""Small helpers shared by the tests."""
import os
import subprocess
import sys

import torch


def run_outside_repo(script: str, cwd, **env) -> subprocess.CompletedProcess:
    """Run ``python -c script`` in ``cwd`` with the repository off the path (as a user loading an export), stdin
    closed (an interactive prompt cannot wait for an answer)."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def rel_err(a, b, floor: float = 1e-12) -> float:
    """``||a - b|| / max(||b||, floor)`` in float64. Fails (AssertionError) on NaN/inf or a shape mismatch."""
    a = torch.as_tensor(a).detach().to(torch.float64)
    b = torch.as_tensor(b).detach().to(torch.float64)
    assert a.shape == b.shape, f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.isfinite(a).all(), "non-finite value in the tested tensor"
    assert torch.isfinite(b).all(), "non-finite value in the reference tensor"
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()
