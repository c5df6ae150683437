"""Time one training step (forward, backward, AdamW) of model presets on one device.

    python benchmarks/bench_step.py --presets paragru_1b paralstm_1b mamba2_1b transformer_1b \
        --batch 8 --seq 2048 --out benchmarks/results/step_1b.json

Random tokens with document boundaries every ``--doc-len`` tokens (so every architecture pays for its
boundary handling), bf16 autocast over fp32 weights on CUDA, fused AdamW. Step time is the median of
``--steps`` timed steps after ``--warmup`` (CUDA events); peak memory is ``max_memory_allocated``.
Prints a table and writes JSON.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models.registry import build_model  # noqa: E402
from training.loss import lm_loss  # noqa: E402


def bench(preset: str, batch: int, seq: int, steps: int, warmup: int, doc_len: int, device: str) -> dict:
    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "model", f"{preset}.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg.arch, OmegaConf.to_container(cfg.config), 50257).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    vocab = model.config.vocab_size
    ids = torch.randint(0, 50257, (batch, seq + 1), device=device)
    pos = (torch.arange(seq, device=device) % doc_len).repeat(batch, 1)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            logits = model(input_ids=ids[:, :-1], position_ids=pos).logits
        ce, z = lm_loss(logits, ids[:, 1:], 1e-4)
        (ce + z).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return ce

    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            loss = step()
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    result = {"preset": preset, "arch": cfg.arch, "params": params, "vocab": vocab, "batch": batch, "seq": seq,
              "step_ms": step_s * 1e3, "tokens_per_s": batch * seq / step_s, "peak_gib": peak,
              "mfu_6N": 6 * params * batch * seq / step_s / 989e12 if device == "cuda" else None,
              "loss": float(loss), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--doc-len", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        try:
            rows.append(bench(preset, args.batch, args.seq, args.steps, args.warmup, args.doc_len, args.device))
        except torch.OutOfMemoryError as err:
            rows.append({"preset": preset, "error": f"OOM: {str(err).splitlines()[0]}"})
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    print("\n| preset | params | B×T | step ms | tokens/s | MFU (6N) | peak GiB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['preset']} | | | {r['error']} | | | |")
            continue
        mfu = f"{100 * r['mfu_6N']:.1f}%" if r["mfu_6N"] else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] else "-"
        print(f"| {r['preset']} | {r['params'] / 1e9:.3f}B | {r['batch']}×{r['seq']} | {r['step_ms']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {mfu} | {peak} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
