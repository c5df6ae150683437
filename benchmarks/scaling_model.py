#!/usr/bin/env python3
"""The 7B scaling plan (docs/scaling.md): FSDP2's traffic per step, expected step time and MFU on
4-32 nodes of 8 GPUs, where scaling stops, and what the knobs cost. Every number of the document is
computed here from the measured single-node numbers below and the stated interconnect assumptions.

    python benchmarks/scaling_model.py --out docs              # writes docs/scaling.md, prints its tables
    python benchmarks/scaling_model.py --nic-gbps 200 --out /tmp/s --json /tmp/s/scaling.json   # another cluster

The model (what ``trainer=fsdp2`` does, training/distributed.py): ``fully_shard`` of every decoder block
and of the root over one flat mesh of all GPUs; bf16 compute copies of the parameters, fp32 gradient
reduce-scatter, activation checkpointing (AC) inside each block. Per micro-batch every GPU

* all-gathers the bf16 parameters in the forward (2 bytes x P),
* all-gathers them again in the backward, except the root's (embeddings, head: never resharded after
  the forward) and the last block's (``reshard_after_forward=False``),
* reduce-scatters the fp32 gradients (4 bytes x P),

each collective moving (G-1)/G of its full size through every GPU's link (ring all-gather /
reduce-scatter). With ``trainer.grad_accum = k`` the code all-gathers and reduce-scatters after every
micro-batch (no ``no_sync``), so a step moves k times that. The traffic crosses the nodes' InfiniBand
(``--nic-gbps`` per GPU, ``--nic-efficiency`` of it reached by NCCL) when the mesh spans nodes, else
NVLink (``--nvlink-gbs``). FSDP2 overlaps block i's compute with block i+1's all-gather (forward) and
block i-1's all-gather plus block i+1's reduce-scatter (backward); the phase times are therefore
max(compute, traffic) per phase, plus the parts that nothing hides: the first all-gather (root and
first block) and the last reduce-scatter (first block and root). The sequence is never split across
GPUs, so the ParaRNN cell (its Newton iterations and parallel scans run inside one GPU) adds no traffic.

Compute per micro-batch is the measured 7B step on 2 H200s (FSDP2, AC, 8 x 2048 tokens per GPU), whose
NVLink traffic (about 0.1 s of 2-3.7 s) is counted as compute: slightly pessimistic. MFU counts 6 x P
FLOPs per token (RESULTS.md's convention; AC's recomputation and attention's FLOPs are not counted).
"""
import argparse
import functools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = 2**30
# benchmarks/RESULTS.md, "Two H200s: DDP and FSDP2" (raw: benchmarks/results/h200x2/): train.py under
# torchrun on 2 H200s, trainer=fsdp2 (AC on), bf16, 8 x 2048 tokens per GPU, median step.
MEASURED_7B = {
    "paragru_7b": {"step_s": 2.016, "tokens_per_s_per_gpu": 8126, "peak_alloc_gib": 57.7},
    "paralstm_7b": {"step_s": 2.028, "tokens_per_s_per_gpu": 8078, "peak_alloc_gib": 57.8},
    "transformer_7b": {"step_s": 2.174, "tokens_per_s_per_gpu": 7536, "peak_alloc_gib": 58.1},
    "mamba2_7b": {"step_s": 3.650, "tokens_per_s_per_gpu": 4489, "peak_alloc_gib": 68.7},
}
MEASURED_GPUS, MEASURED_MICRO = 2, 8
# benchmarks/RESULTS.md, "Training step of the 1B presets, one H200": no sharding, no AC, bf16; the
# peak minus the 16 bytes/parameter of weights, gradients and AdamW state is the activations' memory.
MEASURED_1B = {
    "paragru_1b": {"params": 1_415_219_224, "batch": 8, "peak_gib": 83.2, "step_ms": 432.0, "tokens_per_s": 37924},
    "paralstm_1b": {"params": 1_415_317_528, "batch": 8, "peak_gib": 86.2, "step_ms": 434.9, "tokens_per_s": 37673},
    "transformer_1b": {"params": 1_439_795_200, "batch": 8, "peak_gib": 74.8, "step_ms": 479.8, "tokens_per_s": 34147},
    "mamba2_1b": {"params": 1_425_263_104, "batch": 4, "peak_gib": 108.0, "step_ms": 506.5, "tokens_per_s": 16173},
}
# The paper's 7B recipe (docs: /work/shared/docs/pararnn-spec.md section 6): 32 nodes of 8 H100s,
# 8 sequences per GPU, global batch 2048 x 2048 tokens, 33,000 steps, 138.4B tokens; Table 3's 7B
# ms/step (Mamba2's is lost).
PAPER = {"nodes": 32, "micro": 8, "global_batch": 2048, "seq": 2048, "tokens": 138.4e9,
         "ms_per_step": {"paragru_7b": 613, "paralstm_7b": 715, "transformer_7b": 520}}
ARCHS = ["paragru_7b", "paralstm_7b", "transformer_7b", "mamba2_7b"]
STATE_BYTES = 16  # per parameter, sharded: fp32 master (4) + fp32 gradient (4) + AdamW moments (8)


@functools.cache
def model_shapes(preset: str) -> dict:
    """Parameters of the whole model, of its root (outside the decoder blocks) and of its last block,
    from the preset built on the meta device (what fully_shard splits into units)."""
    from models.count import build_meta, load_preset
    from training.distributed import decoder_blocks

    model = build_meta(load_preset(preset))
    blocks = [sum(p.numel() for p in block.parameters()) for block in decoder_blocks(model)]
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    return {"params": total, "root": total - sum(blocks), "first_block": blocks[0], "last_block": blocks[-1],
            "layers": len(blocks), "hidden": cfg.hidden_size}


def collective_bytes(shape: dict) -> dict:
    """Full size in bytes of FSDP2's collectives per micro-batch (all-gather outputs, reduce-scatter
    inputs): bf16 parameters gathered in the forward, again in the backward but for the root and the
    last block, fp32 gradients reduce-scattered; ``exposed``: the first all-gather and the last
    reduce-scatter (root and first block), which nothing overlaps."""
    p, root, last, first = shape["params"], shape["root"], shape["last_block"], shape["first_block"]
    return {"ag_fwd": 2 * p, "ag_bwd": 2 * (p - root - last), "rs": 4 * p, "exposed": (2 + 4) * (root + first)}


def traffic(shape: dict, shards: int) -> dict:
    """Bytes each GPU sends (= receives) per micro-batch over ``shards`` ranks: (G-1)/G of each
    collective (ring all-gather / reduce-scatter)."""
    return {k: v * (shards - 1) / shards for k, v in collective_bytes(shape).items()}


def micro_time(compute: float, shape: dict, gpus: int, per_node: int, a, mode: str = "fsdp", ac: bool = True) -> dict:
    """Seconds of one micro-batch: compute ``compute`` (with AC) and the traffic of ``mode``:
    ``fsdp`` (one flat mesh over all GPUs, as trainer=fsdp2) or ``hsdp`` (shard inside each node over
    NVLink, replicate across nodes: an all-reduce of each GPU's gradient shard over InfiniBand)."""
    nodes = gpus // per_node
    ib, nvlink = a.nic_gbps / 8 * a.nic_efficiency * 1e9, a.nvlink_gbs * 1e9
    if not ac:
        compute *= 3 / 4  # no recomputation: forward 1 + backward 2 units instead of 1 + 1 + 2
    fwd_share = 1 / 4 if ac else 1 / 3
    if mode == "fsdp":
        v = traffic(shape, gpus)
        bw = ib if nodes > 1 else nvlink
        comm_fwd, comm_bwd, exposed = v["ag_fwd"] / bw, (v["ag_bwd"] + v["rs"]) / bw, v["exposed"] / bw
        inter_node = (v["ag_fwd"] + v["ag_bwd"] + v["rs"]) if nodes > 1 else 0.0
    else:
        v = traffic(shape, per_node)
        allreduce = 2 * (nodes - 1) / nodes * 4 * shape["params"] / per_node  # ring all-reduce of the shard
        comm_fwd = v["ag_fwd"] / nvlink
        comm_bwd = max((v["ag_bwd"] + v["rs"]) / nvlink, allreduce / ib)  # different links, concurrent
        exposed = v["exposed"] / nvlink + allreduce / ib / shape["layers"]
        inter_node = allreduce
    t = max(fwd_share * compute, comm_fwd) + max((1 - fwd_share) * compute, comm_bwd) + exposed
    return {"t": t, "compute": compute, "comm": comm_fwd + comm_bwd, "exposed": exposed, "inter_node_bytes": inter_node}


def plan(arch: str, shape: dict, nodes: int, a, micro: int, mode: str = "fsdp", ac: bool = True,
         sync_once: bool = False) -> dict:
    """Step time, throughput and MFU of the paper's global batch on ``nodes`` x ``a.gpus_per_node``."""
    gpus = nodes * a.gpus_per_node
    per_gpu = a.global_batch // gpus
    if per_gpu * gpus != a.global_batch:
        raise ValueError(f"global batch {a.global_batch} does not divide over {gpus} GPUs")
    # train.py needs batch_size = micro-batch x grad_accum x GPUs: the fewest micro-batches of at most `micro`
    accum = next(k for k in range(1, per_gpu + 1) if per_gpu % k == 0 and per_gpu // k <= micro)
    micro = per_gpu // accum
    seq_s = MEASURED_7B[arch]["step_s"] / MEASURED_MICRO
    m = micro_time(seq_s * micro, shape, gpus, a.gpus_per_node, a, mode, ac)
    if sync_once and accum > 1:  # traffic once per step: the other micro-batches are pure compute
        step = m["t"] + (accum - 1) * m["compute"]
    else:
        step = accum * m["t"]
    tokens_per_gpu = per_gpu * a.seq / step
    return {"arch": arch, "nodes": nodes, "gpus": gpus, "mode": mode, "ac": ac, "sync_once": sync_once,
            "micro": micro, "grad_accum": accum, "step_s": step, "micro_s": m["t"], "compute_s": m["compute"],
            "comm_s": m["comm"], "exposed_s": m["exposed"], "tokens_per_s_per_gpu": tokens_per_gpu,
            "tokens_per_s": tokens_per_gpu * gpus, "mfu": 6 * shape["params"] * tokens_per_gpu / (a.peak_tflops * 1e12),
            "days": a.tokens / (tokens_per_gpu * gpus) / 86400,
            "inter_node_gb_per_step": (1 if sync_once else accum) * m["inter_node_bytes"] / 1e9}


def memory(arch: str, shape: dict, shards: int) -> dict:
    """GiB per GPU: sharded state, AC activations at the measured micro-batch (peak minus state at the
    measurement), and one sequence's activations without AC (the 1B measurement scaled by layers x width)."""
    state = STATE_BYTES * shape["params"] / shards / GIB
    measured = MEASURED_7B[arch]["peak_alloc_gib"] - STATE_BYTES * shape["params"] / MEASURED_GPUS / GIB
    small = MEASURED_1B[arch.replace("_7b", "_1b")]
    small_shape = model_shapes(arch.replace("_7b", "_1b"))
    per_seq_1b = (small["peak_gib"] - STATE_BYTES * small["params"] / GIB) / small["batch"]
    scale = shape["layers"] * shape["hidden"] / (small_shape["layers"] * small_shape["hidden"])
    return {"state_gib": state, "ac_activations_gib": measured, "noac_per_seq_gib": per_seq_1b * scale,
            "per_seq_1b_gib": per_seq_1b, "scale_1b_to_7b": scale}


# ---- the document -----------------------------------------------------------------------------------
def fmt_gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def table(head: list, rows: list) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def build(a) -> tuple:
    shapes = {arch: model_shapes(arch) for arch in ARCHS}
    nodes_list = a.nodes
    results = {"assumptions": vars(a), "shapes": shapes, "plans": [], "memory": {}, "knobs": []}
    ib = a.nic_gbps / 8 * a.nic_efficiency

    # 1. traffic per micro-batch
    g_max = max(nodes_list) * a.gpus_per_node
    rows = []
    for arch in ARCHS:
        s = shapes[arch]
        v = traffic(s, g_max)
        total = v["ag_fwd"] + v["ag_bwd"] + v["rs"]
        rows.append([arch, f"{s['params'] / 1e9:.2f}B", s["layers"], f"{s['last_block'] / 1e6:.0f}M",
                     f"{s['root'] / 1e6:.0f}M", fmt_gb(v["ag_fwd"]), fmt_gb(v["ag_bwd"]), fmt_gb(v["rs"]),
                     fmt_gb(total), f"{total / (ib * 1e9):.2f}", "0"])
    t_traffic = table(["preset", "params P", "blocks", "params per block", "root (embeddings, head)",
                       "all-gather fwd GB", "all-gather bwd GB", "reduce-scatter GB", "total GB",
                       f"s at {ib:.0f} GB/s", "added by the cell"], rows)

    # 2. step time and MFU, flat FSDP2, AC, the paper's global batch
    rows = []
    for arch in ARCHS:
        for nodes in [1, *nodes_list]:
            p = plan(arch, shapes[arch], nodes, a, a.micro)
            results["plans"].append(p)
            rows.append([arch, nodes, p["gpus"], f"{p['micro']:g} x {p['grad_accum']}", f"{p['compute_s']:.2f}",
                         f"{p['comm_s']:.2f}", f"{p['micro_s']:.2f}", f"{p['step_s']:.1f}",
                         f"{p['tokens_per_s_per_gpu']:,.0f}", f"{p['mfu'] * 100:.1f}%", f"{p['days']:.1f}"])
    t_plan = table(["preset", "nodes", "GPUs", "micro-batch x accum", "compute s / micro", "traffic s / micro",
                    "micro-batch s", "step s", "tokens/s per GPU", "MFU (6P)",
                    f"days for {a.tokens / 1e9:.1f}B tokens"], rows)

    # 3a. the micro-batch below which traffic is exposed, and the node count where the paper's batch gets there
    rows = []
    for arch in ARCHS:
        s = shapes[arch]
        seq_s = MEASURED_7B[arch]["step_s"] / MEASURED_MICRO
        v = traffic(s, 10**6)
        b_min = max(v["ag_fwd"] / (ib * 1e9) / (seq_s / 4), (v["ag_bwd"] + v["rs"]) / (ib * 1e9) / (seq_s * 3 / 4))
        max_nodes = a.global_batch / b_min / a.gpus_per_node
        big = plan(arch, s, 2 * max(nodes_list), a, a.micro)
        # HSDP: NVLink inside the node, the shard's all-reduce across nodes (many nodes: factor 2)
        h = traffic(s, a.gpus_per_node)
        allreduce = 2 * 4 * s["params"] / a.gpus_per_node / (ib * 1e9)
        nv = a.nvlink_gbs * 1e9
        b_hsdp = max(h["ag_fwd"] / nv / (seq_s / 4), max((h["ag_bwd"] + h["rs"]) / nv, allreduce) / (seq_s * 3 / 4))
        hsdp_nodes = a.global_batch / max(1.0, b_hsdp) / a.gpus_per_node
        results.setdefault("limits", {})[arch] = {"micro_min": b_min, "max_nodes": max_nodes,
                                                  "mfu_at_double": big["mfu"], "hsdp_micro_min": b_hsdp,
                                                  "hsdp_max_nodes": hsdp_nodes}
        rows.append([arch, f"{seq_s:.3f}", f"{b_min:.1f}", f"{max_nodes:.0f}", 2 * max(nodes_list),
                     f"{big['micro']:g}", f"{big['mfu'] * 100:.1f}%", f"{b_hsdp:.1f}", f"{hsdp_nodes:.0f}"])
    t_limit = table(["preset", "compute s per sequence (AC)", "smallest micro-batch that hides the traffic",
                     f"nodes where the {a.global_batch}-sequence batch reaches it",
                     "nodes (twice the plan)", "micro-batch there", "MFU there",
                     "HSDP: smallest micro-batch", "HSDP: nodes (micro-batch >= 1)"], rows)

    # 3b. memory per GPU
    rows = []
    for arch in ARCHS:
        s = shapes[arch]
        for nodes in [1, *nodes_list]:
            m = memory(arch, s, nodes * a.gpus_per_node)
            results["memory"].setdefault(arch, []).append({"nodes": nodes, **m})
            free = a.gpu_mem_gib - m["state_gib"] - 2  # 2 GiB: gathered blocks, buffers, workspaces
            rows.append([arch, nodes, f"{m['state_gib']:.1f}", f"{m['state_gib'] + m['ac_activations_gib']:.1f}",
                         f"{m['noac_per_seq_gib']:.1f}", max(0, int(free // m["noac_per_seq_gib"]))])
    t_memory = table(["preset", "nodes", "sharded state GiB (16 B/param / GPUs)",
                      f"with AC, micro-batch {a.micro}: GiB (measured activations)",
                      "no AC: GiB per sequence (1B measured, scaled)",
                      f"no AC: sequences that fit in {a.gpu_mem_gib:.0f} GiB"], rows)

    # 4. knobs on paragru_7b and mamba2_7b
    rows = []
    knobs = [("flat FSDP2, AC (today)", "fsdp", True, False, a.micro),
             ("no AC (micro-batch as memory allows)", "fsdp", False, False, None),
             ("HSDP: shard in the node, replicate across nodes, AC", "hsdp", True, False, a.micro),
             ("HSDP, no AC", "hsdp", False, False, None),
             ("flat FSDP2, AC, unsharded between micro-batches (one all-gather and reduce-scatter per step)",
              "fsdp", True, True, a.micro)]
    for arch in ("paragru_7b", "mamba2_7b"):
        s = shapes[arch]
        for nodes in (min(nodes_list), max(nodes_list)):
            for label, mode, ac, once, micro in knobs:
                shards = a.gpus_per_node if mode == "hsdp" else nodes * a.gpus_per_node
                m = memory(arch, s, shards)
                if micro is None:  # no AC: the largest micro-batch that fits, at most the AC one
                    fit = int((a.gpu_mem_gib - m["state_gib"] - 2) // m["noac_per_seq_gib"])
                    micro = max(1, min(a.micro, fit))
                p = plan(arch, s, nodes, a, micro, mode, ac, once)
                # bf16 parameters and fp32 gradients kept whole between micro-batches
                extra = (2 + 4) * s["params"] * (shards - 1) / shards / GIB if once else 0.0
                state = m["state_gib"] + extra
                results["knobs"].append({"knob": label, **p, "state_gib": state})
                rows.append([arch, nodes, label, f"{p['micro']:g} x {p['grad_accum']}", f"{p['step_s']:.1f}",
                             f"{p['mfu'] * 100:.1f}%", f"{p['inter_node_gb_per_step']:.0f}", f"{state:.1f}"])
    t_knobs = table(["preset", "nodes", "setting", "micro-batch x accum", "step s", "MFU (6P)",
                     "InfiniBand GB per GPU per step", "state GiB per GPU"], rows)

    # the paper's 7B ms/step against an H100's peak
    paper_rows, paper_mfu = [], []
    for arch, ms in PAPER["ms_per_step"].items():
        flops = 6 * shapes[arch]["params"] * PAPER["micro"] * PAPER["seq"] / (ms / 1e3)
        paper_rows.append(f"{arch} {ms} ms -> {flops / 1e12:.0f} TFLOP/s")
        paper_mfu.append(flops / (a.peak_tflops * 1e12))
    results["paper_check"], results["paper_mfu"] = paper_rows, paper_mfu
    return results, {"traffic": t_traffic, "plan": t_plan, "limit": t_limit, "memory": t_memory, "knobs": t_knobs}


def document(a, r: dict, t: dict) -> str:
    plans = {(p["arch"], p["nodes"]): p for p in r["plans"]}
    gru32, gru4 = plans[("paragru_7b", max(a.nodes))], plans[("paragru_7b", min(a.nodes))]
    m32 = plans[("mamba2_7b", max(a.nodes))]
    lim = r["limits"]
    knob = {(k["arch"], k["nodes"], k["knob"]): k for k in r["knobs"]}
    hsdp32 = knob[("paragru_7b", max(a.nodes), "HSDP: shard in the node, replicate across nodes, AC")]
    noac32 = knob[("paragru_7b", max(a.nodes), "no AC (micro-batch as memory allows)")]
    hsdp_noac32 = knob[("paragru_7b", max(a.nodes), "HSDP, no AC")]
    ib = a.nic_gbps / 8 * a.nic_efficiency
    mem = {arch: {e["nodes"]: e for e in entries} for arch, entries in r["memory"].items()}
    gru_mem4 = mem["paragru_7b"][min(a.nodes)]
    noac_gru, noac_mamba = (mem[arch][max(a.nodes)]["noac_per_seq_gib"] for arch in ("paragru_7b", "mamba2_7b"))
    cmd = f"python benchmarks/scaling_model.py {a.flags}--out docs"
    shapes = r["shapes"]
    rnn_saving = 1 - shapes["paragru_7b"]["params"] / shapes["transformer_7b"]["params"]
    tf = shapes["transformer_7b"]
    attention_share = 12 * tf["layers"] * tf["hidden"] * a.seq / (6 * tf["params"])
    nvlink = traffic(shapes["paragru_7b"], MEASURED_GPUS)
    measured_nvlink_s = (nvlink["ag_fwd"] + nvlink["ag_bwd"] + nvlink["rs"]) / (a.nvlink_gbs * 1e9)
    step_tokens_m = a.global_batch * a.seq / 1e6
    paper_mfu = r["paper_mfu"]
    return f"""# Scaling plan: 7B on {min(a.nodes)}–{max(a.nodes)} nodes of {a.gpus_per_node} GPUs

Generated by `{cmd}`: every number below comes from that script (the model in its docstring, the
measured inputs at its top), from the single-node measurements of `benchmarks/RESULTS.md` and the
assumptions listed here. Change an assumption with a flag and re-run; do not edit this file by hand
(`tests/test_scaling_model.py` checks it is what the script writes).

## Assumptions

* **Measured compute** (`benchmarks/RESULTS.md`, two H200s, `trainer=fsdp2` with activation
  checkpointing, bf16, 8 × 2048 tokens per GPU): step {MEASURED_7B['paragru_7b']['step_s']} s (ParaGRU),
  {MEASURED_7B['paralstm_7b']['step_s']} s (ParaLSTM), {MEASURED_7B['transformer_7b']['step_s']} s
  (Transformer), {MEASURED_7B['mamba2_7b']['step_s']} s (Mamba2). That time is taken as the compute of
  8 sequences on one GPU at any scale (its NVLink traffic, ~{measured_nvlink_s:.2f} s at the bandwidth below, is
  counted as compute).
* **Interconnect:** {a.nic_gbps:g} Gb/s InfiniBand per GPU (one NIC per GPU, as in DGX/HGX H100/H200
  nodes), of which NCCL reaches {a.nic_efficiency:.0%}: **{ib:.0f} GB/s** of bus bandwidth per GPU
  between nodes; NVLink inside a node: **{a.nvlink_gbs:g} GB/s** of bus bandwidth per GPU.
* **Peak** {a.peak_tflops:g} TFLOP/s per GPU (dense bf16, H100/H200 SXM); **memory** {a.gpu_mem_gib:g} GiB per GPU
  (H200). MFU counts 6 × P FLOPs per token (AC's recomputation not counted; the Transformer's attention,
  12 × layers × width × sequence FLOPs per token, would add {attention_share:.1%} at {a.seq} tokens).
* **The paper's 7B recipe:** global batch {a.global_batch} sequences × {a.seq} tokens ({step_tokens_m:.1f}M tokens per
  step), {a.tokens / 1e9:.1f}B tokens, {PAPER['nodes']} nodes × 8 GPUs with {PAPER['micro']} sequences
  per GPU. With fewer nodes the same batch takes `trainer.grad_accum` micro-batches of {a.micro}.
* **Overlap:** FSDP2 prefetches the next block's all-gather during the current block's compute and
  reduce-scatters behind the backward; per phase (forward, backward) the time is max(compute, traffic);
  the first all-gather and the last reduce-scatter are exposed.

## 1. What FSDP2 moves per micro-batch

Per GPU and micro-batch, on {max(a.nodes) * a.gpus_per_node} GPUs (the volume hardly depends on the
GPU count: (G − 1)/G of each collective passes every GPU's link): an all-gather of the bf16 parameters
in the forward, another in the backward (not for the root, which stays gathered, nor for the last
block), a reduce-scatter of the fp32 gradients. About 8 bytes per parameter:

{t['traffic']}

**The ParaRNN cell adds no traffic.** Its Newton iterations and parallel scans run over the sequence
inside one GPU: the sequence is not split across GPUs (no context parallelism), so the only collectives
are FSDP2's, whose volume is set by the parameter count alone, the same ~8 bytes per parameter for
every architecture (Mamba2's 64 thinner blocks mean twice the collectives, each half the size: still
large enough, ~{fmt_gb(2 * r['shapes']['mamba2_7b']['last_block'])} GB per all-gather, to run at full
bandwidth). ParaGRU and ParaLSTM move {rnn_saving:.1%} less than the Transformer (fewer parameters).

## 2. Expected step time and MFU (flat FSDP2 as `trainer=fsdp2` does it today)

The paper's batch of {a.global_batch} × {a.seq} tokens; `micro-batch × accum` = sequences per GPU per
micro-batch × `trainer.grad_accum`. 1 node is the NVLink-only reference.

{t['plan']}

At {max(a.nodes)} nodes ParaGRU is expected at **{gru32['step_s']:.1f} s per step,
{gru32['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, {gru32['mfu'] * 100:.1f} % MFU**:
{gru32['days']:.1f} days for {a.tokens / 1e9:.1f}B tokens; at {min(a.nodes)} nodes {gru4['days']:.1f} days.
Mamba2 is the slowest by its measured compute ({m32['mfu'] * 100:.1f} % MFU at {max(a.nodes)} nodes), not by its
traffic. The traffic of a micro-batch of {a.micro} (about {plans[('paragru_7b', max(a.nodes))]['comm_s']:.1f} s at
{ib:.0f} GB/s) hides behind its compute ({gru32['compute_s']:.1f} s) for every architecture, so the
step time is the compute plus ~{gru32['exposed_s'] * 1e3:.0f} ms of exposed first all-gather and last
reduce-scatter: FSDP2 scales nearly linearly from 4 to 32 nodes at this batch.

The paper's Table 3 gives ms per 7B step. A full training step of {PAPER['micro']} × {PAPER['seq']} tokens per
GPU (6 × P FLOPs per token) in that time would run at {'; '.join(r['paper_check'])}: {min(paper_mfu):.0%}
to {max(paper_mfu):.0%} of an H100's {a.peak_tflops:g} TFLOP/s peak, against {gru32['mfu']:.0%} expected here.
Those figures are therefore not full training steps of this recipe (a forward pass, or another batch)
and are not compared here.

## 3. Where it stops scaling

**Global batch.** The traffic of a micro-batch is fixed (~8 bytes per parameter), its compute shrinks
with the micro-batch; below some micro-batch the links, not the GPUs, set the step time. With the
paper's global batch, the micro-batch is {a.global_batch} / GPUs, so that happens at:

{t['limit']}

ParaGRU on flat FSDP2 keeps its compute-bound step down to a micro-batch of
{lim['paragru_7b']['micro_min']:.1f} sequences, i.e. up to **~{lim['paragru_7b']['max_nodes']:.0f} nodes**
at {a.global_batch} sequences per step; beyond it the step time stops falling (MFU
{lim['paragru_7b']['mfu_at_double'] * 100:.1f} % at {2 * max(a.nodes)} nodes). Larger batches move the
limit (the paper's batch is already {step_tokens_m:.1f}M tokens; much larger ones cost optimisation efficiency);
HSDP (section 4) moves it to ~{lim['paragru_7b']['hsdp_max_nodes']:.0f} nodes for ParaGRU, where the micro-batch
reaches one sequence.

**Memory per GPU.** FSDP2 shards 16 bytes per parameter (fp32 master, fp32 gradient, two AdamW
moments) over all GPUs; with AC the measured activations of {a.micro} sequences come on top:

{t['memory']}

With AC memory never binds at 7B on H200s ({gru_mem4['state_gib'] + gru_mem4['ac_activations_gib']:.0f} GiB
for ParaGRU at {min(a.nodes)} nodes). Without AC a 2048-token sequence needs ~{noac_gru:.0f} GiB
(ParaGRU) to ~{noac_mamba:.0f} GiB (Mamba2) of activations
(the 1B measurement without AC, scaled by layers × width): the micro-batch of {a.micro} does not fit.

## 4. The knobs and what they cost

{t['knobs']}

* **Activation checkpointing** (`trainer.gradient_checkpointing`, on in `trainer=fsdp2`): costs one
  extra forward (compute × 4/3), saves all but one block's activations. Turning it off needs a smaller
  micro-batch (memory, above), and then the fixed traffic per micro-batch no longer hides: at
  {max(a.nodes)} nodes ParaGRU without AC gets {noac32['mfu'] * 100:.1f} % MFU against
  {gru32['mfu'] * 100:.1f} % with it. Keep AC on with flat FSDP2.
* **HSDP** (shard inside each node over NVLink, replicate across nodes): the all-gathers and
  reduce-scatters stay on NVLink; only an all-reduce of each GPU's gradient shard (4P/8 bytes, once per
  micro-batch) crosses InfiniBand: {hsdp32['inter_node_gb_per_step']:.0f} GB per GPU per step instead of
  {gru32['inter_node_gb_per_step']:.0f} GB at {max(a.nodes)} nodes. Cost: the state is sharded 8 ways only
  ({hsdp32['state_gib']:.1f} GiB per GPU instead of {mem['paragru_7b'][max(a.nodes)]['state_gib']:.1f}),
  which an H200 holds easily; and it is not implemented yet: `training/distributed.py` builds a 1-D mesh;
  HSDP is a 2-D `init_device_mesh(("replicate", "shard"), (nodes, 8))` passed to `fully_shard` (DCP
  checkpoints keep resharding). It matters beyond the limit of section 3, and makes AC-off viable:
  HSDP without AC reaches {hsdp_noac32['mfu'] * 100:.1f} % MFU at {max(a.nodes)} nodes (micro-batch
  {hsdp_noac32['micro']:g}).
* **Gradient accumulation** (`trainer.grad_accum`): how fewer nodes reach the paper's batch. As
  implemented, every micro-batch all-gathers and reduce-scatters (parameters and gradients stay
  sharded), so the traffic per step grows with the accumulation steps; it still hides behind compute at
  a micro-batch of {a.micro}. Keeping parameters and gradients whole between micro-batches (FSDP2's
  `set_reshard_after_backward(False)` and `set_requires_gradient_sync(False)` on all but the last
  micro-batch; not implemented) moves them once per step, but costs 6 bytes per parameter on every GPU
  (bf16 parameters, fp32 gradients; the "state" column) and gains nothing where the traffic is already
  hidden.
* **Checkpoints and preemption:** a 7B checkpoint is 16 bytes per parameter
  ({16 * r['shapes']['paragru_7b']['params'] / 1e9:.0f} GB, one DCP shard per rank, written in parallel);
  `--signal=B:USR1@300` leaves 5 minutes for the last step ({gru4['step_s']:.0f} s at {min(a.nodes)} nodes)
  and that checkpoint.

## 5. Launch

```bash
# 32 nodes: micro-batch 8, no accumulation (the paper's layout)
sbatch --nodes=32 slurm/train_multinode.sbatch model=paragru_7b trainer=fsdp2 data=slimpajama \\
  trainer.batch_size={a.global_batch} data.seq_len={a.seq} trainer.max_steps=33000 trainer.warmup_steps=3300 \\
  trainer.z_loss=5e-6
# 4 nodes: the same global batch in {plans[('paragru_7b', min(a.nodes))]['grad_accum']} micro-batches of {a.micro}
sbatch --nodes=4 slurm/train_multinode.sbatch model=paragru_7b trainer=fsdp2 data=slimpajama \\
  trainer.batch_size={a.global_batch} trainer.grad_accum={plans[('paragru_7b', min(a.nodes))]['grad_accum']} \\
  data.seq_len={a.seq} trainer.max_steps=33000 trainer.warmup_steps=3300 trainer.z_loss=5e-6
```

The multi-node launch itself (ranks from srun's variables, rendezvous, USR1 → checkpoint → requeue) is
tested without a cluster by the emulated SLURM of `tests/fake_slurm.py` (`slurm/README.md`).
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nic-gbps", type=float, default=400, help="InfiniBand per GPU, Gb/s")
    parser.add_argument("--nic-efficiency", type=float, default=0.8, help="share of it NCCL reaches")
    parser.add_argument("--nvlink-gbs", type=float, default=360, help="NVLink bus bandwidth per GPU, GB/s")
    parser.add_argument("--peak-tflops", type=float, default=989)
    parser.add_argument("--gpu-mem-gib", type=float, default=139.8)
    parser.add_argument("--global-batch", type=int, default=PAPER["global_batch"])
    parser.add_argument("--seq", type=int, default=PAPER["seq"])
    parser.add_argument("--micro", type=int, default=PAPER["micro"], help="sequences per GPU per micro-batch")
    parser.add_argument("--tokens", type=float, default=PAPER["tokens"])
    parser.add_argument("--out", default=None, help="directory for scaling.md (the document)")
    parser.add_argument("--json", default=None, help="file for every computed number, as JSON")
    a = parser.parse_args(argv)
    if a.seq != 2048:
        parser.error("the measured compute is for 2048-token sequences; --seq must be 2048")
    defaults = parser.parse_args([])
    a.flags = "".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v} "
                      for k, v in vars(a).items() if k not in ("out", "json") and v != getattr(defaults, k))
    results, tables = build(a)
    text = document(a, results, tables)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "scaling.md"), "w") as f:
            f.write(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    for name in ("traffic", "plan", "limit", "memory", "knobs"):
        print(tables[name] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
