"""What one decoder block keeps for its backward pass, per token, eager and compiled, on the CPU.

    python benchmarks/profile_memory.py --presets paragru_1b mamba2_1b --width 256 --out /tmp/mem

Builds each preset at a reduced width (``--width``; every other size of the block scales with it), runs
one forward under bf16 autocast (as on the GPU) and counts, per block, the bytes of the tensors with a
token axis (autocast's bf16 copies of the weights are per layer, not per token; a storage counts once)
that the forward leaves for the backward. Eager: every per-token storage still alive after the forward
(a ``TorchDispatchMode`` sees each op's outputs; alive = referenced from elsewhere than here), which counts
what selective activation checkpointing keeps outside autograd's saved tensors too. Compiled: what the
compiled blocks save (``torch.autograd.graph.saved_tensors_hooks``; per-block ``torch.compile`` with the
min-cut partitioner Inductor uses, ``aot_eager_decomp_partition``, so no kernels are generated).
Mamba2 runs its Triton SSD (``TRITON_INTERPRET=1`` on the CPU), the GPU's path.
Bytes are per token and per unit of width (``bytes / (tokens · d)``), so they hold at any size: at 1B
(d = 2048, B8·T2048 = 16384 tokens) multiply by 16384 · 2048 · layers. Prints a table, writes JSON.
"""
import argparse
import gc
import json
import os
import sys

import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models.registry import build_model  # noqa: E402
from training.distributed import decoder_blocks  # noqa: E402


def _per_token(t: torch.Tensor, tokens: int) -> bool:
    """An activation: a tensor with a token axis (weights cast by autocast are per layer, not per token)."""
    return t.dim() >= 2 and tokens in (t.shape[0], t.shape[1], t.shape[0] * t.shape[1])


def saved_bytes(model, ids, pos) -> int:
    """Bytes the compiled blocks save for the backward over one forward (unique storages)."""
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen and _per_token(t, ids.numel()):
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, position_ids=pos)
    return total[0]


class _Storages(TorchDispatchMode):
    """Every per-token storage an op makes (held here, so that one still alive elsewhere can be told apart)."""

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens, self.storages = tokens, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _per_token(t, self.tokens):
                self.storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
        return out


def retained_bytes(model, ids, pos) -> int:
    """Bytes of the per-token storages still alive after one eager forward, its output kept: what the
    forward leaves for the backward, saved tensors and selective checkpointing's kept GEMM outputs alike."""
    mode = _Storages(ids.numel())
    with mode, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, position_ids=pos)
    gc.collect()
    # use count 1: only the reference held here is left
    alive = sum(st.nbytes() for st in mode.storages.values() if torch._C._storage_Use_Count(st._cdata) > 1)
    del out
    return alive


def build(preset: str, width: int, layers: int):
    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "configs", "model", f"{preset}.yaml")))
    arch, config = cfg["arch"], cfg["config"]
    config.update(hidden_size=width, num_hidden_layers=layers, vocab_size=256)
    if arch == "transformer":
        config["num_attention_heads"] = max(1, width // 128)
    if arch == "pararnn":
        config["mode"] = "parallel"
    if arch == "mamba2":  # the Triton SSD (what runs on the GPU; here through the interpreter)
        config.update(use_triton=True, chunk_size=min(config["chunk_size"], 64))
    torch.manual_seed(0)
    return arch, build_model(arch, config, 256)


def profile(preset: str, width: int, batch: int, seq: int) -> dict:
    """Per block: the difference between a 3-layer and a 1-layer model, halved (the embedding, final norm
    and head are in both)."""
    ids = torch.randint(0, 256, (batch, seq))
    pos = (torch.arange(seq) % 512).repeat(batch, 1)
    scale = batch * seq * width
    out = {"preset": preset, "width": width, "tokens": batch * seq}
    for mode in ("eager", "compiled"):
        sizes = []
        for layers in (1, 3):
            arch, model = build(preset, width, layers)
            if mode == "compiled":
                for block in decoder_blocks(model):
                    block.compile(fullgraph=True, backend="aot_eager_decomp_partition")
                sizes.append(saved_bytes(model, ids, pos))
            else:
                sizes.append(retained_bytes(model, ids, pos))
            torch._dynamo.reset()
        out[mode] = (sizes[1] - sizes[0]) / 2 / scale
    out["arch"] = arch
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["paragru_1b", "paralstm_1b", "transformer_1b", "mamba2_1b"])
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [profile(p, args.width, args.batch, args.seq) for p in args.presets]
    print("\nbytes saved for the backward per token and unit of width, per block (bf16 autocast; x 16384 · 2048 · "
          "layers for GiB at 1B, B8·T2048)\n")
    print("| preset | eager | compiled | GiB at 1B B8·T2048, eager / compiled |")
    print("|---|---|---|---|")
    for r in rows:
        layers = {"mamba2": 48}.get(r["arch"], 24)
        gib = lambda v: v * 16384 * 2048 * layers / 2**30  # noqa: E731
        print(f"| {r['preset']} | {r['eager']:.1f} | {r['compiled']:.1f} | {gib(r['eager']):.1f} / "
              f"{gib(r['compiled']):.1f} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_memory.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
