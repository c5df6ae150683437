#!/usr/bin/env python3
"""Gradients of one batch in three precisions against fp32, per architecture and parameter.

    python benchmarks/check_precision.py --width 256 --layers 2 --seq 256 --out /tmp/prec   # CPU, ~1 min
    python benchmarks/check_precision.py --tiny --out /tmp/prec                             # CPU, seconds
    python benchmarks/check_precision.py --layers 2 --out $OUT                              # CUDA, 7B width

Each preset (default the four ``*_7b``; ``--layers`` / ``--width`` shrink them) is built once from a seed,
with gradient checkpointing on as ``trainer=fsdp2`` enables it, and one batch (random tokens in two
documents per row, or ``--data``: the first batch of the data stream) goes through it in three ways:

* ``fp32``: fp32 parameters and compute (the reference);
* ``autocast``: fp32 parameters under bf16 autocast (a single-GPU ``train.py`` step);
* ``bf16``: a copy of the model with bf16 parameters and no autocast, every decoder block's floating
  inputs cast to bf16 as FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16)`` (``cast_forward_inputs``)
  does, which is what ``training.distributed.shard`` computes under bf16; the gradients are bf16 as
  FSDP2's are before its fp32 reduce-scatter.

For ``autocast`` and ``bf16`` it reports the loss and, per parameter, ||g - g_fp32|| / ||g_fp32||: the
worst parameters, then the median / max per parameter kind (the name without its layer number), then a
table with one row per preset (last) that also gives ||g_bf16 - g_autocast|| / ||g_autocast||, what
``check_first_loss.py`` compares on the GPU (FSDP2 against one process). ``--out DIR`` gets
``check_precision.json``. The CPU runs the torch paths (Mamba2's chunked torch SSD, ParaRNN's torch
solver); CUDA the Triton kernels (``--kernels`` chooses; Triton on a CPU through ``TRITON_INTERPRET=1``,
whose ``tl.dot`` of bf16 operands is wrong in triton 3.6: it multiplies their raw 16-bit patterns, so the
Mamba2 SSD's bf16 path cannot be checked there).
"""
import copy
import json
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.check_first_loss import TINY, preset_parser  # noqa: E402
from benchmarks.check_gpu import norm_rel as rel_err  # noqa: E402

MODES = ("autocast", "bf16")


KERNELS = {"torch": {"pararnn": {"mode": "parallel"}, "mamba2": {"use_triton": False}},
           "triton": {"pararnn": {"mode": "triton"}, "mamba2": {"use_triton": True}}}


def shrink(preset: dict, width: int | None, layers: int | None, vocab: int | None, kernels: str) -> dict:
    """The preset's config at ``width`` / ``layers`` / ``vocab`` (None: the preset's) with ``kernels``'
    scan back-end (``auto``: the preset's); the Transformer keeps its head width of 128 (at least one head)."""
    config = dict(preset["config"], **KERNELS.get(kernels, {}).get(preset["arch"], {}))
    if width:
        config["hidden_size"] = width
        if preset["arch"] == "transformer":
            config["num_attention_heads"] = max(1, width // 128)
    if layers:
        config["num_hidden_layers"] = layers
    if vocab:
        config["vocab_size"] = vocab
    return config


def random_batch(vocab: int, rows: int, seq: int, seed: int, device) -> dict:
    """Random tokens, each row two documents (position_ids restart at a random point)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq + 1), generator=g)
    pos = torch.arange(seq).repeat(rows, 1)
    for r in range(rows):
        cut = int(torch.randint(seq // 4, 3 * seq // 4, (1,), generator=g))
        pos[r, cut:] -= cut
    return {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device), "position_ids": pos.to(device)}


def cast_block_inputs(model: torch.nn.Module, dtype: torch.dtype) -> list:
    """Forward pre-hooks casting every decoder block's floating inputs to ``dtype``, as FSDP2's
    ``cast_forward_inputs`` does for each ``fully_shard``-ed block. Returns the hook handles."""
    from training.distributed import decoder_blocks

    def cast(x):
        return x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x

    def hook(module, args, kwargs):
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    return [b.register_forward_pre_hook(hook, with_kwargs=True) for b in decoder_blocks(model)]


def loss_and_grads(model, batch, autocast: bool) -> tuple[float, dict]:
    """The training loss of ``batch`` (``training.loss.lm_loss``) and every parameter's gradient (fp32 copies)."""
    from training.loss import lm_loss

    model.zero_grad(set_to_none=True)
    device = batch["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss = lm_loss(logits, batch["labels"], 0.0)[0]
    loss.backward()
    # on the host, in the parameters' dtype: three full sets of a 7B model's gradients do not fit beside it
    grads = {n: p.grad.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def kind(name: str) -> str:
    """A parameter's name without its layer number (``model.layers.N.rnn.cell.A``)."""
    return re.sub(r"\.\d+\.", ".N.", name)


def compare(model, batch) -> dict:
    """Loss and gradients in fp32, under autocast and with bf16 parameters; errors against fp32."""
    device = batch["input_ids"].device
    loss32, ref = loss_and_grads(model, batch, autocast=False)
    out = {"loss": {"fp32": loss32}, "grad_rel_err": {}, "global_rel_err": {}}
    loss_ac, g_ac = loss_and_grads(model, batch, autocast=True)
    low = copy.deepcopy(model).to(torch.bfloat16)
    hooks = cast_block_inputs(low, torch.bfloat16)
    loss_bf, g_bf = loss_and_grads(low, batch, autocast=False)
    for h in hooks:
        h.remove()
    del low
    # bf16_vs_autocast: what benchmarks/check_first_loss.py measures on the GPU (FSDP2 against one process)
    for mode, loss, grads, base in (("autocast", loss_ac, g_ac, ref), ("bf16", loss_bf, g_bf, ref),
                                    ("bf16_vs_autocast", None, g_bf, g_ac)):
        if loss is not None:
            out["loss"][mode] = loss
        out["grad_rel_err"][mode] = {n: rel_err(grads[n].to(device), base[n].to(device)) for n in ref}
        out["global_rel_err"][mode] = global_rel_err(grads, base, device)
    return out


def global_rel_err(grads: dict, base: dict, device=None) -> float:
    """||g - base|| / ||base|| over all parameters together, summed per parameter (no concatenated copy), each
    pair moved to ``device`` for it (the host's float64 arithmetic over 7B values took minutes)."""
    diff = norm = 0.0
    for n, b in base.items():
        b = b.to(device).double()
        diff += (grads[n].to(device).double() - b).square().sum().item()
        norm += b.square().sum().item()
    return (diff / max(norm, 1e-60)) ** 0.5


def by_kind(errors: dict[str, float]) -> dict[str, dict]:
    groups: dict[str, list[float]] = {}
    for n, e in errors.items():
        groups.setdefault(kind(n), []).append(e)
    return {k: {"median": statistics.median(v), "max": max(v), "count": len(v)} for k, v in groups.items()}


def main(argv=None) -> int:
    ap = preset_parser(__doc__, "vocab 512: seconds on a CPU")
    ap.add_argument("--width", type=int, default=None, help="hidden size (default: the preset's)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the preset's)")
    ap.add_argument("--batch", type=int, default=2, help="rows")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default: 2048 on CUDA, 256 on CPU)")
    ap.add_argument("--data", action="store_true", help="the data stream's first batch instead of random tokens")
    ap.add_argument("--kernels", choices=("auto", *KERNELS), default="auto",
                    help="scan back-end: auto = Triton on CUDA, else torch (triton on a CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--worst", type=int, default=8, help="worst parameters printed per preset and mode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from accelerate.utils import set_seed

    from models.count import load_preset
    from models.registry import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seq = args.seq or (2048 if device.type == "cuda" else 256)
    width = TINY["hidden_size"] if args.tiny else args.width
    layers = args.layers or (TINY["num_hidden_layers"] if args.tiny else None)
    vocab = args.vocab or (512 if args.tiny else None)
    results = []
    for name in args.presets:
        start = time.time()
        preset = load_preset(name)
        config = shrink(preset, width, layers, vocab, args.kernels)
        set_seed(args.seed)
        with torch.device(device):
            model = build_model(preset["arch"], config)
        if not args.no_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        if args.data:
            from data import PackedStream, load_tokenizer
            from training.config import DataConfig

            data = DataConfig(seq_len=seq)
            batch = {k: v.to(device) for k, v in next(PackedStream(data, load_tokenizer(data.tokenizer),
                                                                   args.batch, 0, 1)).items()}
        else:
            batch = random_batch(model.config.vocab_size, args.batch, seq, args.seed, device)
        row = {"preset": name, "arch": preset["arch"], "config": config, **compare(model, batch)}
        row["by_kind"] = {m: by_kind(row["grad_rel_err"][m]) for m in MODES}
        row["seconds"] = round(time.time() - start, 1)
        results.append(row)
        del model
        print(f"\n{name} ({preset['arch']}, d={config['hidden_size']}, {config['num_hidden_layers']} layers, "
              f"{row['seconds']} s): loss fp32 {row['loss']['fp32']:.5f}, " +
              ", ".join(f"{m} {row['loss'][m]:.5f}" for m in MODES), flush=True)
        for m in MODES:
            worst = sorted(row["grad_rel_err"][m].items(), key=lambda kv: -kv[1])[:args.worst]
            print(f"  {m}: global {row['global_rel_err'][m]:.3e}; worst " +
                  ", ".join(f"{n} {e:.3f}" for n, e in worst))
        print("  | kind | autocast median / max | bf16 median / max |\n  |---|---|---|")
        for k in sorted(row["by_kind"]["bf16"], key=lambda k: -row["by_kind"]["bf16"][k]["median"]):
            a, b = row["by_kind"]["autocast"][k], row["by_kind"]["bf16"][k]
            print(f"  | {k} | {a['median']:.3f} / {a['max']:.3f} | {b['median']:.3f} / {b['max']:.3f} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "check_precision.json"), "w") as f:
            json.dump({"device": device.type, "seq_len": seq, "rows": args.batch, "data": args.data,
                       "checkpointing": not args.no_checkpointing, "results": results}, f, indent=1)
    print(f"\n{device.type}, {args.batch} rows x {seq} tokens, gradient checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}; gradient error = ||g - g_fp32|| / ||g_fp32||\n"
          "| preset | d x layers | loss fp32 | autocast - fp32 | bf16 - fp32 | grad err autocast (global / median "
          "param) | grad err bf16 (global / median param) | bf16 vs autocast (global) | bf16 worst param |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in results:
        med = {m: statistics.median(r["grad_rel_err"][m].values()) for m in MODES}
        worst = max(r["grad_rel_err"]["bf16"].items(), key=lambda kv: kv[1])
        print(f"| {r['preset']} | {r['config']['hidden_size']} x {r['config']['num_hidden_layers']} | "
              f"{r['loss']['fp32']:.4f} | {r['loss']['autocast'] - r['loss']['fp32']:+.1e} | "
              f"{r['loss']['bf16'] - r['loss']['fp32']:+.1e} | {r['global_rel_err']['autocast']:.3f} / "
              f"{med['autocast']:.3f} | {r['global_rel_err']['bf16']:.3f} / {med['bf16']:.3f} | "
              f"{r['global_rel_err']['bf16_vs_autocast']:.3f} | "
              f"{worst[0]} {worst[1]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
