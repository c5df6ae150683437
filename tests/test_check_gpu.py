"""``benchmarks/check_gpu.py`` (the one command for the GPU-only paths) runs end to end at its CPU size.

On this CPU it runs the kernels through Triton's interpreter (no GPU launch configs, no PTX fast math: those
only on a GPU) and the training section on the torch paths; the Mamba2 section is left out here (minutes
through the interpreter; ``test_baselines`` covers its Triton SSD on CPU).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_check_gpu_small_passes_and_prints_the_table_last(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "benchmarks/check_gpu.py", "--small", "--only", "kernels,training",
                             "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "PASS" and any(line.startswith("kernels ") and line.endswith("PASS") for line in lines[-5:])
    rows = json.load(open(tmp_path / "results.json"))["rows"]
    assert len(rows) > 30 and all(r["ok"] for r in rows)
    assert {r["section"] for r in rows} == {"kernels", "training"}


@pytest.mark.slow
def test_check_gpu_fails_on_a_wrong_kernel_result(monkeypatch, capsys):
    """The same check with the Triton forward's trajectory off by 0.1%: FAIL rows, FAIL last, exit status 1."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(sys, "argv", ["check_gpu.py", "--small", "--only", "kernels"])
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import check_gpu
    finally:
        sys.path.pop(0)
    import kernels.pararnn

    solve_forward = kernels.pararnn.solve_forward

    def off_by_a_little(*args, **kwargs):
        h, residual = solve_forward(*args, **kwargs)
        return h * 1.001, residual

    monkeypatch.setattr(kernels.pararnn, "solve_forward", off_by_a_little)
    monkeypatch.setattr(check_gpu, "ROWS", [])
    assert check_gpu.main() == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "FAIL" and any(line.startswith("FAIL  kernels:") for line in out)
