"""train.py with test-only patches, so production code needs no test hooks. Used as the script of
``python`` / ``torchrun`` in tests/test_distributed.py and tests/test_fault_tolerance.py:

* ``TEST_SKIP_DS_SHM=1``: skip DeepSpeed's CPU shared-memory allreduce op, whose JIT build costs
  45-60 s (DeepSpeed falls back to torch.distributed; environment-notes.md section 3).
* ``TEST_NAN_STEPS=3,5``: the training loss of these optimizer steps (1-based) is NaN.
"""
import importlib
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if os.environ.get("TEST_SKIP_DS_SHM") == "1":
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

if os.environ.get("TEST_NAN_STEPS"):
    import torch

    import train
    from training.loss import LMObjective

    nan_steps = {int(s) for s in os.environ["TEST_NAN_STEPS"].split(",")}
    calls = {"n": 0}
    objective = LMObjective.__call__

    def objective_with_nans(self, model, batch):
        calls["n"] += 1  # one call per micro-step; grad_accum is 1 in these tests
        loss, ce, z = objective(self, model, batch)
        return (loss * torch.nan, ce * torch.nan, z) if calls["n"] in nan_steps else (loss, ce, z)

    LMObjective.__call__ = objective_with_nans
    sys.argv[0] = os.path.join(ROOT, "train.py")
    sys.exit(train.main())
else:
    sys.argv[0] = os.path.join(ROOT, "train.py")
    runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
