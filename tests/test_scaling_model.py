"""benchmarks/scaling_model.py and docs/scaling.md: the document is what the script writes, its measured
inputs are those of benchmarks/RESULTS.md, its traffic model is the collectives FSDP2 really issues
(counted in a 2-process gloo run of training/distributed.py's sharding), and its step-time model
behaves at its two limits."""
import json
import math
import os
import socket
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import scaling_model as sm  # noqa: E402


def test_docs_scaling_is_what_the_script_writes(tmp_path):
    """Mutation: change one number in docs/scaling.md (or a default of the script) -> fails."""
    assert sm.main(["--out", str(tmp_path)]) == 0
    with open(os.path.join(ROOT, "docs", "scaling.md")) as f:
        committed = f.read()
    assert (tmp_path / "scaling.md").read_text() == committed, "re-run: python benchmarks/scaling_model.py --out docs"
    assert "docs/scaling.md" in open(os.path.join(ROOT, "README.md")).read()


def _row(text: str, name: str, *numbers: str) -> bool:
    return any(line.startswith(f"| {name}") and all(n in line for n in numbers) for line in text.splitlines())


def test_measured_inputs_are_those_of_results_md():
    """Mutation: MEASURED_7B paragru_7b step_s 2.016 -> 2.0 -> fails."""
    with open(os.path.join(ROOT, "benchmarks", "RESULTS.md")) as f:
        results = f.read()
    for preset, m in sm.MEASURED_7B.items():
        assert _row(results, f"{preset}, FSDP2, 2 GPUs", f"{m['tokens_per_s_per_gpu']:,}", f"{m['step_s']:.3f}",
                    f"{m['peak_alloc_gib']}"), preset
    for preset, m in sm.MEASURED_1B.items():
        assert _row(results, preset, f"{m['step_ms']:.1f}", f"{m['tokens_per_s']:,}", f"{m['peak_gib']}",
                    f"{m['batch']}×2048"), preset
        assert sm.model_shapes(preset)["params"] == m["params"]


WORKER = r"""
import collections, json, sys, types
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
from accelerate.utils import DistributedType
from models.registry import build_model
from training.distributed import shard

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
seen = collections.Counter()
all_gather, reduce_scatter = dist.all_gather_single, dist.reduce_scatter_single
def counting_all_gather(output, input, *args, **kwargs):
    seen["all_gather_" + str(output.dtype)] += output.numel() * output.element_size()
    return all_gather(output, input, *args, **kwargs)
def counting_reduce_scatter(output=None, input=None, *args, **kwargs):
    seen["reduce_scatter_" + str(input.dtype)] += input.numel() * input.element_size()
    return reduce_scatter(output=output, input=input, *args, **kwargs)
dist.all_gather_single, dist.reduce_scatter_single = counting_all_gather, counting_reduce_scatter
torch.manual_seed(0)
model = build_model("pararnn", {{"hidden_size": 32, "num_hidden_layers": 3, "num_heads": 2}}, 1000)
accelerator = types.SimpleNamespace(distributed_type=DistributedType.NO, device=torch.device("cpu"),
                                    mixed_precision="bf16")
model = shard(accelerator, model, types.SimpleNamespace(strategy="fsdp2"))
steps = []
for _ in range(2):
    seen.clear()
    model(input_ids=torch.randint(0, 1000, (2, 16))).logits.float().sum().backward()
    steps.append(dict(seen))
if rank == 0:
    print(json.dumps(steps))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_traffic_model_is_the_collectives_fsdp2_issues():
    """Bytes all-gathered (bf16) and reduce-scattered (fp32) per micro-batch by the sharding of
    training/distributed.py, counted on the real collectives of a 2-rank gloo run (a 3-block ParaGRU),
    against sm.collective_bytes: 2 x P forward, 2 x (P - root - last block) backward, 4 x P gradients
    (P with FSDP's padding of each parameter's first dimension to the world size). Mutations:
    collective_bytes re-gathering the root in the backward (`- root` dropped) -> fails;
    training/distributed.py resharding the last block too -> fails."""
    from models.registry import build_model
    from training.distributed import decoder_blocks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = WORKER.format(root=ROOT, port=port)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", code, str(r)], env=env, stdout=subprocess.PIPE, text=True)
             for r in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0]
    steps = json.loads(outputs[0].strip().splitlines()[-1])

    model = build_model("pararnn", {"hidden_size": 32, "num_hidden_layers": 3, "num_heads": 2}, 1000)
    padded = lambda params: sum(math.ceil(p.shape[0] / 2) * 2 * (p.numel() // p.shape[0]) for p in params)
    blocks = decoder_blocks(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    shape = {"params": padded(model.parameters()), "root": padded(root),
             "first_block": padded(blocks[0].parameters()), "last_block": padded(blocks[-1].parameters())}
    expected = sm.collective_bytes(shape)
    for step in steps:  # the first micro-batch and a later one move the same
        assert step == {"all_gather_torch.bfloat16": expected["ag_fwd"] + expected["ag_bwd"],
                        "reduce_scatter_torch.float32": expected["rs"]}, (step, expected)


def _args(**kw):
    a = types.SimpleNamespace(gpus_per_node=8, nic_gbps=400, nic_efficiency=0.8, nvlink_gbs=360, peak_tflops=989,
                              global_batch=256, seq=2048, tokens=1e9)
    vars(a).update(kw)
    return a


SHAPE = {"params": 7e9, "root": 4e8, "first_block": 2e8, "last_block": 2e8, "layers": 32, "hidden": 4096}


def test_step_time_is_the_compute_when_traffic_hides_and_the_traffic_when_it_does_not():
    """Independent arithmetic: with unlimited bandwidth a step is accum x compute; with a thin link it is
    accum x (traffic + exposed part); MFU is 6 P tokens/s / peak. Mutation: `max` -> `min` in
    micro_time -> fails."""
    compute = sm.MEASURED_7B["paragru_7b"]["step_s"]  # 8 sequences of 2048 tokens
    fast = sm.plan("paragru_7b", SHAPE, 4, _args(nic_gbps=1e9), micro=8)
    assert fast["grad_accum"] == 1 and fast["micro"] == 8
    assert fast["step_s"] == pytest.approx(compute, rel=1e-6)
    assert fast["mfu"] == pytest.approx(6 * 7e9 * 8 * 2048 / compute / 989e12, rel=1e-6)
    slow_args = _args(nic_gbps=8, nic_efficiency=1.0)  # 1 GB/s
    slow = sm.plan("paragru_7b", SHAPE, 4, slow_args, micro=4)  # 256 / 32 GPUs = 8 per GPU: 2 x 4
    f = 31 / 32
    traffic = (2 * 7e9 + 2 * (7e9 - 4e8 - 2e8) + 4 * 7e9) * f / 1e9
    exposed = 6 * (4e8 + 2e8) * f / 1e9
    assert slow["grad_accum"] == 2 and slow["step_s"] == pytest.approx(2 * (traffic + exposed), rel=1e-6)


def test_fewest_micro_batches_that_divide_the_batch():
    """train.py needs batch = micro-batch x grad_accum x GPUs."""
    p = sm.plan("paragru_7b", SHAPE, 4, _args(global_batch=2048), micro=6)  # 64 per GPU: 4 x 16, not 6 x 11
    assert (p["micro"], p["grad_accum"]) == (4, 16)
