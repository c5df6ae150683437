#!/usr/bin/env python3
"""Can each architecture fit one batch? The repeated-batch probe, and Mamba2's Triton-vs-torch gradients.

    python benchmarks/probe_fit.py --presets mamba2_1b transformer_1b paragru_1b --mamba2-init hf mamba_ssm --out $OUT
    python benchmarks/probe_fit.py --presets mamba2_1b --grad-check --no-fit --layers 8 --dot-precision ieee --out $OUT
    TRITON_INTERPRET=1 python benchmarks/probe_fit.py --tiny --out /tmp/probe                  # CPU, ~1 min

**Fit** (every preset): the same batch of random tokens (B x T, one document per row, seeded) for
``--steps`` AdamW steps at a constant ``--lr`` (the project's optimizer: decoupled weight decay of the
preset, no decay on 1-D parameters; no warm-up, no clipping), bf16 autocast on CUDA (``--precision``).
Prints the cross-entropy after each step. A model that can learn fits a repeated batch quickly; one that
does not, at the same LR, is handicapped somewhere (init, optimizer groups, kernels). Also per parameter
at step 1: gradient RMS, weight RMS and the relative size of the first Adam update (``lr / weight RMS``:
for a weight followed by a normalisation, how fast the function moves).

**Gradient check** (``--grad-check``, Mamba2 presets): one forward and backward of the same model and
``--grad-batch`` rows in fp32 through the Triton SSD kernels (``use_triton=True``) and through the torch
chunked scan (``use_triton=False``): the logits' and every parameter gradient's relative error ``||a - b|| / ||b||``,
worst first. Triton's ``tl.dot`` rounds fp32 inputs to TF32 (unit roundoff 2^-11) as the kernels run in
training: tolerance 1e-2, which the 1B width exceeds for the small parameters whose gradient is a sum over
every position (A_log, D, dt_bias, conv bias: 4e-2 on an H200). ``--dot-precision ieee`` compiles the
kernels with full-fp32 dots (``TRITON_F32_DEFAULT=ieee``, cuDNN's TF32 off): then the kernels' arithmetic
itself is checked, tolerance 1e-4.

``--mamba2-init hf mamba_ssm`` fits Mamba2 with transformers' initialisation (what the paper trained) and
with mamba-ssm's (``Mamba2DocConfig.init_scheme``: ``in_proj`` U(±1/√d) instead of N(0, 0.1), embeddings
N(0, 0.02) instead of N(0, 0.1), A in U(1, 16) instead of 1..num_heads); default: the preset's.
``--layers N`` / ``--vocab V`` shrink a preset (depth, vocabulary) to fit a smaller machine. ``--tiny``: the
tiny presets, B2 x T64, on the CPU through Triton's interpreter (a smoke run).

Writes ``probe_fit.json`` to ``--out`` and prints a table last.
"""
import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if os.environ.get("TRITON_INTERPRET") == "1":
    import kernels.interpreter_shim  # noqa: E402,F401  (before any @triton.jit)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.check_gpu import norm_rel  # noqa: E402
from models.count import load_preset  # noqa: E402
from models.registry import build_model  # noqa: E402
from training.optim import build_optimizer  # noqa: E402

GRAD_TOL = {"tf32": 1e-2, "ieee": 1e-4}


def build(name: str, args, device, init: str | None = None) -> torch.nn.Module:
    preset = load_preset(name)
    config = dict(preset["config"])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    if args.vocab:
        config.update(vocab_size=args.vocab, bos_token_id=0, eos_token_id=0)
    if preset["arch"] == "mamba2" and init:
        config["init_scheme"] = init
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = build_model(preset["arch"], config, None if args.vocab else 50257)
    return model, preset


def batch(vocab: int, args, device):
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g).to(device)
    return tokens[:, :-1], tokens[:, 1:], torch.arange(args.seq, device=device).expand(args.batch, -1)


def fit(name: str, args, device, init: str | None = None) -> dict:
    model, preset = build(name, args, device, init)
    if init:
        name = f"{name} (init {init})"
    model.train()
    ids, labels, pos = batch(model.config.vocab_size, args, device)
    optimizer = build_optimizer(model, args.lr, preset["weight_decay"], (0.9, 0.95), 1e-8)
    forward = torch.compile(model) if args.compile else model
    bf16 = args.precision == "bf16"
    losses, first = [], {}
    start = time.time()
    for step in range(args.steps + 1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(input_ids=ids, position_ids=pos).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        losses.append(loss.item())
        if step == args.steps:
            break
        loss.backward()
        if step == 0:
            for pname, p in model.named_parameters():
                if p.grad is not None and (".0." in pname or "layers." not in pname):  # block 0 stands for all
                    w = p.detach().float().pow(2).mean().sqrt().item()
                    first[pname] = {"grad_rms": p.grad.float().pow(2).mean().sqrt().item(), "weight_rms": w,
                                    "lr_over_weight": args.lr / w if w > 0 else None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"{name}: " + " ".join(f"{x:.3f}" for x in losses) + f"  ({time.time() - start:.0f} s)", flush=True)
    ratios = {k: v["lr_over_weight"] for k, v in first.items() if v["lr_over_weight"] and "weight" in k
              and "norm" not in k}
    print("  lr / weight RMS of the matrices of block 0, the embeddings and the head: "
          + ", ".join(f"{k.split('.')[-2]} {v:.1e}" for k, v in ratios.items()), flush=True)
    n = sum(p.numel() for p in model.parameters())
    del model, optimizer
    return {"preset": name, "params": n, "losses": losses, "ln_vocab": math.log(logits.shape[-1]),
            "first_step": first}


def grad_check(name: str, args, device, init: str | None = None) -> dict:
    """fp32 forward + backward, Triton SSD vs torch chunked scan, same weights and batch."""
    model, _ = build(name, args, device, init)
    model = model.float().train()
    ids, labels, pos = batch(model.config.vocab_size, args, device)
    ids, labels, pos = ids[:args.grad_batch], labels[:args.grad_batch], pos[:args.grad_batch]
    out = {}
    for path in (True, False):
        for layer in model.backbone.layers:
            layer.mixer.use_triton = path
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, position_ids=pos).logits.float()
        F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        out[path] = {"logits": logits.detach(), **{n: p.grad.detach().clone() for n, p in model.named_parameters()}}
    errors = {}
    for key, ref in out[False].items():
        got = out[True][key]
        errors[key] = norm_rel(got, ref)
    worst = sorted(errors.items(), key=lambda kv: -kv[1] if math.isfinite(kv[1]) else -math.inf)
    print(f"{name} gradient check (fp32, {args.dot_precision} dots, Triton vs torch), worst 8 of {len(errors)}:",
          flush=True)
    for key, err in worst[:8]:
        print(f"  {key:55s} {err:.2e}", flush=True)
    del model
    tol = GRAD_TOL[args.dot_precision]
    return {"preset": name, "rel_err": errors, "max_rel_err": max(errors.values()), "tol": tol,
            "dot_precision": args.dot_precision, "pass": all(math.isfinite(e) and e < tol for e in errors.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["mamba2_1b", "transformer_1b", "paragru_1b"])
    ap.add_argument("--tiny", action="store_true", help="tiny presets, B2 x T64, on the CPU (smoke run)")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, else fp32")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary (default: the preset's)")
    ap.add_argument("--mamba2-init", nargs="+", choices=("hf", "mamba_ssm"), default=None,
                    help="one fit per scheme (default: the preset's)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--grad-check", action="store_true", help="also Mamba2's Triton-vs-torch gradients in fp32")
    ap.add_argument("--grad-batch", type=int, default=1, help="rows of the gradient check (the torch scan's "
                    "fp32 intermediates grow with it)")
    ap.add_argument("--no-fit", action="store_true", help="only the gradient check")
    ap.add_argument("--dot-precision", choices=tuple(GRAD_TOL), default="tf32",
                    help="the Triton kernels' fp32 dots in the gradient check (tf32: as in training)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.dot_precision == "ieee":  # read when a kernel compiles: set before the first one
        os.environ["TRITON_F32_DEFAULT"] = "ieee"
        torch.backends.cudnn.allow_tf32 = False
    if args.tiny:
        args.presets = [p.replace("_1b", "_tiny") for p in args.presets]
        args.batch, args.seq, args.device = 2, 64, args.device or "cpu"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    print(f"device {device}, {args.precision}, B{args.batch} x T{args.seq}, {args.steps} steps at lr {args.lr}, "
          f"mamba2 init {args.mamba2_init or 'of the preset'}" + (f", {args.layers} layers" if args.layers else ""),
          flush=True)
    results = {"args": vars(args), "fit": [], "grad_check": []}
    for name in args.presets:
        inits = (args.mamba2_init or [None]) if load_preset(name)["arch"] == "mamba2" else [None]
        for init in inits if not args.no_fit else []:
            results["fit"].append(fit(name, args, device, init))
        if args.grad_check and load_preset(name)["arch"] == "mamba2":
            results["grad_check"].append(grad_check(name, args, device, inits[0]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "probe_fit.json"), "w") as f:
            json.dump(results, f, indent=1)
    print("\n| preset | params | loss at step 0 | after 1 | after 3 | final | ln V |\n|---|---|---|---|---|---|---|")
    for r in results["fit"]:
        ls = r["losses"]
        print(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {ls[0]:.3f} | {ls[1]:.3f} | {ls[min(3, len(ls) - 1)]:.3f} "
              f"| {ls[-1]:.3f} | {r['ln_vocab']:.2f} |")
    for g in results["grad_check"]:
        print(f"| {g['preset']} grad check | max rel err {g['max_rel_err']:.2e} | tol {g['tol']:.0e} | "
              f"{'PASS' if g['pass'] else 'FAIL'} | | | |")
    return 0 if all(g["pass"] for g in results["grad_check"]) else 1


if __name__ == "__main__":
    sys.exit(main())
