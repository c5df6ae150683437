"""Memory: a pre-flight estimate of what a run needs (checked against what is free before training) and
the peak use measured during it.

The estimate is a floor, not a forecast: it counts only tensors that must exist at the same time, so a
run it refuses cannot fit, while a run it lets through may still need more (allocator slack, temporary
buffers, the libraries themselves; measured on the CPU, the default run peaks at 3.1 GB RSS for an
estimate of 1.9 GB, and at seq_len 1024 at 9.3 GB for 6.9 GB). ``trainer.memory_check=false`` skips the
check.
"""
import os

import torch

GiB = 2**30
# Bytes per token and hidden unit that one decoder block keeps for its backward pass, at 1 byte per
# element: a floor for every architecture here (a Llama block keeps ~34 H per token in 16-bit activations,
# Korthikanti et al. 2022; a ParaRNN block keeps its input, the 3N-wide projection, the states and the MLP).
BLOCK_ACTIVATIONS = 16


def estimate_bytes(*, params: int, vocab: int, hidden: int, layers: int, micro_batch: int, seq_len: int,
                   arch: str, bf16: bool, strategy: str, zero_stage: int, world_size: int,
                   gradient_checkpointing: bool) -> dict[str, int]:
    """Bytes one rank needs, by part. With ``P`` parameters, ``b`` rows of ``T`` tokens per micro-step,
    a vocabulary of ``V`` (padded), ``L`` blocks of width ``H``, ``a`` bytes per activation (2 under bf16,
    else 4) and ``W`` ranks:

    * ``state``: fp32 weights ``4P`` + gradients ``4P`` + AdamW moments ``8P``; FSDP2 and ZeRO-3 shard
      all of it over ``W``, ZeRO-2 the gradients and moments, ZeRO-1 the moments;
    * ``logits``: ``b·T·V·(2a + 8)``: the logits and their gradient, the float32 log-softmax (kept for
      the backward) and its gradient;
    * ``blocks``: ``b·T·H·L·16·a`` saved for the backward (with gradient checkpointing only each block's
      input, ``b·T·H·L·a``, plus one block's ``b·T·H·16·a``);
    * ``attention_mask`` (transformer only): the dense boolean document mask ``b·T²``.
    """
    state = {"weights": 4 * params, "grads": 4 * params, "moments": 8 * params}
    sharded = {"fsdp2": ("weights", "grads", "moments")}.get(strategy, ())
    if strategy == "deepspeed":
        sharded = (("moments",), ("grads", "moments"), ("weights", "grads", "moments"))[zero_stage - 1]
    for part in sharded:
        state[part] //= world_size
    a = 2 if bf16 else 4
    tokens = micro_batch * seq_len
    if gradient_checkpointing:
        blocks = tokens * hidden * a * (layers + BLOCK_ACTIVATIONS)
    else:
        blocks = tokens * hidden * a * layers * BLOCK_ACTIVATIONS
    parts = {"state": sum(state.values()), "logits": tokens * vocab * (2 * a + 8), "blocks": blocks}
    if arch == "transformer":
        parts["attention_mask"] = micro_batch * seq_len * seq_len
    return parts


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Free memory for this process and where the number comes from: the GPU's free memory, or on the
    CPU the system's available memory (capped by a cgroup v2 limit) shared by the processes of this node."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    import psutil

    free = psutil.virtual_memory().available
    where = "available RAM"
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max" and int(limit) - used < free:
            free, where = int(limit) - used, "left under the cgroup's memory.max"
    except (OSError, ValueError):
        pass
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_ranks > 1:
        free, where = free // local_ranks, f"{where} / {local_ranks} processes on this node"
    return free, where


def peak_memory(device: torch.device) -> dict:
    """This rank's peak CUDA memory in GiB (allocated by tensors, reserved by the allocator) since the
    previous call (the peak is reset after reading), so that each loss line and each validation line has
    its own; nothing on the CPU."""
    if device.type != "cuda":
        return {}
    peak = {"peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 3),
            "peak_mem_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GiB, 3)}
    torch.cuda.reset_peak_memory_stats(device)
    return peak
