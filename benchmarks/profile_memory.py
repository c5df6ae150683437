"""What one decoder block keeps for its backward pass, per token, eager and compiled, on the CPU.

    python benchmarks/profile_memory.py --presets paragru_1b mamba2_1b --width 256 --out /tmp/mem

Builds each preset at a reduced width (``--width``; every other size of the block scales with it), runs
one forward under bf16 autocast (as on the GPU) and counts the bytes of every tensor autograd saves for
the backward (``torch.autograd.graph.saved_tensors_hooks``; a storage saved twice counts once; tensors
with a token axis only: autocast's bf16 copies of the weights are per layer, not per token), by the
module that saved it (eager) and in total per block (eager, and compiled: per-block ``torch.compile``
with the min-cut partitioner Inductor uses, ``aot_eager_decomp_partition``, so no kernels are generated).
Mamba2 runs its Triton SSD (``TRITON_INTERPRET=1`` on the CPU), the GPU's path.
Bytes are per token and per unit of width (``bytes / (tokens · d)``), so they hold at any size: at 1B
(d = 2048, B8·T2048 = 16384 tokens) multiply by 16384 · 2048 · layers. Prints a table, writes JSON.
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models.registry import build_model  # noqa: E402
from training.distributed import decoder_blocks  # noqa: E402


def saved_bytes(model, ids, pos, by_module: bool) -> tuple[int, dict]:
    """Bytes saved for the backward over one forward (unique storages), and by module (eager only)."""
    seen, total, where = set(), [0], defaultdict(int)
    stack = ["(model)"]
    names = {m: n for n, m in model.named_modules()}

    tokens = ids.numel()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        # activations only: a tensor with a token axis (weights cast by autocast are per layer, not per token)
        per_token = t.dim() >= 2 and tokens in (t.shape[0], t.shape[1], t.shape[0] * t.shape[1])
        if key not in seen and per_token:
            seen.add(key)
            size = t.untyped_storage().nbytes()
            total[0] += size
            where[stack[-1]] += size
        return t

    def enter(module, _args) -> None:
        stack.append(names[module])

    def leave(_module, _args, _out) -> None:
        stack.pop()

    handles = []
    if by_module:
        for module in model.modules():
            if not list(module.children()):  # leaves: the op's owner
                handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, position_ids=pos)
    for h in handles:
        h.remove()
    return total[0], dict(where)


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
            size, where = saved_bytes(model, ids, pos, by_module=mode == "eager" and layers == 3)
            sizes.append(size)
            torch._dynamo.reset()
            if where:
                per_module = defaultdict(float)
                for name, nbytes in where.items():  # the same module of every layer together
                    per_module[".".join(p for p in name.split(".") if not p.isdigit())] += nbytes / scale / 3
                out["eager_by_module"] = dict(sorted(per_module.items(), key=lambda kv: -kv[1]))
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
    print("| preset | eager | compiled | GiB at 1B B8·T2048, eager / compiled | largest eager savers |")
    print("|---|---|---|---|---|")
    for r in rows:
        layers = {"mamba2": 48}.get(r["arch"], 24)
        gib = lambda v: v * 16384 * 2048 * layers / 2**30  # noqa: E731
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["eager_by_module"].items())[:4])
        print(f"| {r['preset']} | {r['eager']:.1f} | {r['compiled']:.1f} | {gib(r['eager']):.1f} / "
              f"{gib(r['compiled']):.1f} | {top} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_memory.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
