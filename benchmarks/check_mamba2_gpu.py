#!/usr/bin/env python3
"""Mamba2 baseline on a GPU: the Triton SSD path against the torch reference, with document resets.

Sections (flags; default: all but ``--bench``):

* ``--kernel``: ``models.mamba2.ssd.mamba_chunk_scan_combined`` (vendored mamba-ssm Triton SSD) against
  ``ssd_chunked`` in float64 on the same device, on packed rows (random document lengths, one boundary
  on a chunk edge, one-token documents, an odd length): output and the gradients of x, dt, A, B, C,
  D, dt_bias. Inputs in fp32 and in bf16. Also prints ``ssd_chunked`` in fp32 against float64, the
  error floor of the torch path itself.
* ``--model``: a small ``Mamba2DocForCausalLM`` on the GPU: logits and every parameter gradient with
  the Triton path against the torch path (fp32, and bf16 autocast), and a packed row against its
  documents run alone (Triton path).
* ``--bench``: forward+backward time of the ``mamba2_400m`` preset (bf16 autocast, B = 8, T = 2048)
  with the Triton path (and the torch path unless ``--no-torch-bench``); tokens/s and peak memory.

Prints one line per check (``max rel err`` = max|a - b| / max|b|, ``norm rel err`` = ||a - b|| / ||b||)
and ``PASS``/``FAIL`` last; exit status 1 on a failure. Pass/fail is on the norm rel err: fp32 5e-3
(Triton's tl.dot runs fp32 inputs in TF32), bf16 5e-2 (the bf16 reference is computed from the same
bf16-rounded inputs, so this measures the kernels, not the input rounding). ``--out DIR`` also writes
``results.json`` there.

Example: ``python benchmarks/check_mamba2_gpu.py --out $OUT``.
Smoke run on a CPU (tiny shapes, Triton interpreter, ~2-3 min on 2 cores): ``TRITON_INTERPRET=1 python
benchmarks/check_mamba2_gpu.py --device cpu --small`` (fp32 only: the interpreter's tl.dot is wrong on bf16).

In the model, x, B and C reach the scan in fp32 even under bf16 autocast (the mixer's input is the
fp32 output of the block's RMSNorm and the conv runs in the weights' dtype, as in HF); only dt and
the gate are bf16. So the fp32 kernel rows are the ones training uses.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if os.environ.get("TRITON_INTERPRET") == "1":
    import kernels.interpreter_shim  # noqa: E402,F401  (before any @triton.jit)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.mamba2.ssd_torch import seq_idx_from_position_ids, ssd_chunked  # noqa: E402

TOL = {torch.float32: 5e-3, torch.bfloat16: 5e-2}
RESULTS, FAILURES = [], []


def errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf"), float("inf")
    diff = (a - b)
    return (diff.abs().max() / b.abs().max().clamp_min(1e-30)).item(), (diff.norm() / b.norm().clamp_min(1e-30)).item()


def report(section: str, case: str, what: str, a, b, tol: float | None) -> None:
    max_rel, norm_rel = errors(a, b)
    ok = tol is None or norm_rel <= tol
    RESULTS.append(dict(section=section, case=case, what=what, max_rel_err=max_rel, norm_rel_err=norm_rel,
                        tol=tol, ok=ok))
    if not ok:
        FAILURES.append(f"{section} {case} {what}")
    flag = "" if tol is None else ("ok" if ok else f"FAIL (tol {tol:g})")
    print(f"{section:<7} {case:<50} {what:<8} max rel err {max_rel:.3e}  norm rel err {norm_rel:.3e}  {flag}",
          flush=True)


def packed_positions(batch: int, length: int, chunk: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of documents: row 0 has a boundary exactly on a chunk edge and one-token documents; others random."""
    rows = []
    for r in range(batch):
        if r == 0:
            lengths = [chunk, 1, 1, max(length // 3, 1)]
        else:
            lengths = []
        while sum(lengths) < length:
            lengths.append(int(torch.randint(1, max(length // 2, 2), (1,), generator=gen)))
        pos, used = [], 0
        for n in lengths:
            n = min(n, length - used)
            if n <= 0:
                break
            pos.append(torch.arange(n))
            used += n
        rows.append(torch.cat(pos))
    return torch.stack(rows)


def check_kernel(device: torch.device, small: bool) -> None:
    from models.mamba2.ssd import mamba_chunk_scan_combined

    if small:
        cases = [dict(b=2, l=45, h=2, p=16, g=1, n=16, chunk=16)]
    else:
        cases = [dict(b=2, l=2048, h=32, p=64, g=1, n=16, chunk=256),    # the 400m/1b presets' scan
                 dict(b=2, l=2048, h=40, p=64, g=1, n=128, chunk=256),   # the 3b/7b presets' state size
                 dict(b=3, l=1000, h=8, p=64, g=2, n=64, chunk=256)]     # odd length, two groups
    for c in cases:
        gen = torch.Generator().manual_seed(0)
        b, l, h, p, g, n = c["b"], c["l"], c["h"], c["p"], c["g"], c["n"]

        def r(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(device)

        x, dt_raw, B, C, D = r(b, l, h, p), r(b, l, h, scale=0.5) - 2.0, r(b, l, g, n), r(b, l, g, n), r(h)
        A = -torch.exp(r(h, scale=0.5))
        dt_bias = r(h, scale=0.1)
        seq_idx = seq_idx_from_position_ids(packed_positions(b, l, c["chunk"], gen).to(device))
        weight = r(b, l, h, p)
        name = f"b{b} l{l} h{h} p{p} g{g} n{n} chunk{c['chunk']}"
        names = ["y", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias"]

        def reference(dtype):
            """ssd_chunked in float64 from the inputs as the kernel sees them (activations rounded to dtype)."""
            acts = [t.to(dtype).double().requires_grad_() for t in (x, dt_raw, B, C)]
            params = [t.double().requires_grad_() for t in (A, D, dt_bias)]
            (xr, dtr, Br, Cr), (Ar, Dr, biasr) = acts, params
            y = ssd_chunked(xr, F.softplus(dtr + biasr), Ar, Br, Cr, c["chunk"], D=Dr, seq_idx=seq_idx)
            grads = torch.autograd.grad((y * weight.double()).sum(), [xr, dtr, Ar, Br, Cr, Dr, biasr])
            return [y, *grads]

        ref32 = reference(torch.float32)
        leaves = [t.float().requires_grad_() for t in (x, dt_raw, A, B, C, D, dt_bias)]
        x32, dt32, A32, B32, C32, D32, bias32 = leaves
        torch_y = ssd_chunked(x32, F.softplus(dt32 + bias32), A32, B32, C32, c["chunk"], D=D32, seq_idx=seq_idx)
        torch_grads = torch.autograd.grad((torch_y * weight).sum(), leaves)
        for what, a, bb in zip(names, [torch_y, *torch_grads], ref32):
            report("kernel", f"torch fp32 {name}", what, a, bb, None)

        # Triton 3.6's CPU interpreter computes tl.dot on bf16 operands wrongly (garbage of order 1e9),
        # so the bf16 kernel check only means something on a GPU.
        dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
        for dtype in dtypes:
            ref = ref32 if dtype == torch.float32 else reference(dtype)
            # Activations in dtype; A, D, dt_bias stay fp32 (parameters), as in the model.
            xs, dts, Bs, Cs = (t.to(dtype).requires_grad_() for t in (x, dt_raw, B, C))
            As, Ds, biases = (t.float().requires_grad_() for t in (A, D, dt_bias))
            y = mamba_chunk_scan_combined(xs, dts, As, Bs, Cs, c["chunk"], D=Ds, dt_bias=biases,
                                          dt_softplus=True, seq_idx=seq_idx)
            grads = torch.autograd.grad((y.float() * weight).sum(), [xs, dts, As, Bs, Cs, Ds, biases])
            label = f"triton {str(dtype).split('.')[-1]} {name}"
            for what, a, bb in zip(names, [y, *grads], ref):
                report("kernel", label, what, a, bb, TOL[dtype])


def small_model(use_triton: bool, device: torch.device, small: bool):
    from models.mamba2 import Mamba2DocConfig, Mamba2DocForCausalLM

    torch.manual_seed(0)
    if small:
        cfg = dict(hidden_size=32, num_hidden_layers=2, head_dim=16, state_size=16, chunk_size=16, vocab_size=512)
    else:
        cfg = dict(hidden_size=256, num_hidden_layers=4, head_dim=64, state_size=128, chunk_size=64, vocab_size=4096)
    return Mamba2DocForCausalLM(Mamba2DocConfig(use_triton=use_triton, **cfg)).to(device)


def check_model(device: torch.device, small: bool) -> None:
    length = 45 if small else 1000
    torch_model, triton_model = small_model(False, device, small), small_model(True, device, small)
    triton_model.load_state_dict(torch_model.state_dict())
    gen = torch.Generator().manual_seed(1)
    pos = packed_positions(2, length, torch_model.config.chunk_size, gen).to(device)
    ids = torch.randint(0, torch_model.config.vocab_size, pos.shape, generator=gen).to(device)

    for label, autocast in (("fp32", False), ("bf16 autocast", True)):
        outs = []
        for model in (torch_model, triton_model):
            model.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=ids, position_ids=pos).logits.float()
            logits.logsumexp(-1).mean().backward()
            outs.append((logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
        (ref_logits, ref_grads), (logits, grads) = outs
        tol = TOL[torch.bfloat16 if autocast else torch.float32]
        report("model", f"triton vs torch, {label}", "logits", logits, ref_logits, tol)
        worst = max(ref_grads, key=lambda k: errors(grads[k], ref_grads[k])[1])
        report("model", f"triton vs torch, {label}, worst of {len(grads)} grads", "grad", grads[worst],
               ref_grads[worst], tol)
        print(f"{'':<7} (worst gradient: {worst})", flush=True)

    with torch.no_grad():
        packed = triton_model(input_ids=ids, position_ids=pos).logits
        seq_idx = seq_idx_from_position_ids(pos)
        worst = 0.0
        for r in range(ids.shape[0]):
            for doc in seq_idx[r].unique():
                where = (seq_idx[r] == doc).nonzero().flatten()
                s, e = where[0].item(), where[-1].item() + 1
                alone = triton_model(input_ids=ids[r:r + 1, s:e]).logits[0]
                worst = max(worst, errors(packed[r, s:e], alone)[0])
    RESULTS.append(dict(section="model", case="packed vs separate (triton, fp32)", max_rel_err=worst, ok=worst <= 1e-3))
    print(f"model   {'packed row vs documents alone (triton, fp32)':<59} max rel err {worst:.3e}  "
          f"{'ok' if worst <= 1e-3 else 'FAIL (tol 1e-3)'}", flush=True)
    if worst > 1e-3:
        FAILURES.append("model packed vs separate")


def bench(device: torch.device, with_torch: bool) -> None:
    from models.count import load_preset
    from models.registry import build_model

    preset = load_preset("mamba2_400m")
    model = build_model("mamba2", preset["config"]).to(device)
    ids = torch.randint(0, 50257, (8, 2048), device=device)
    pos = packed_positions(8, 2048, 256, torch.Generator().manual_seed(2)).to(device)
    for use_triton in ([True, False] if with_torch else [True]):
        for layer in model.backbone.layers:
            layer.mixer.use_triton = use_triton
        torch.cuda.reset_peak_memory_stats(device)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, position_ids=pos).logits.float().logsumexp(-1).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)

        try:
            step()  # compile / warm up
            torch.cuda.synchronize(device)
            t0, steps = time.perf_counter(), 5
            for _ in range(steps):
                step()
            torch.cuda.synchronize(device)
            ms = (time.perf_counter() - t0) / steps * 1e3
            mem = torch.cuda.max_memory_allocated(device) / 2**30
            path = "triton" if use_triton else "torch"
            line = dict(section="bench", case=f"mamba2_400m fwd+bwd B8 T2048 bf16, {path}",
                        ms_per_step=ms, tokens_per_s=8 * 2048 / ms * 1e3, peak_gib=mem)
        except torch.OutOfMemoryError:
            line = dict(section="bench", case=f"mamba2_400m, {'triton' if use_triton else 'torch'}", oom=True)
            torch.cuda.empty_cache()
        RESULTS.append(line)
        print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", action="store_true")
    parser.add_argument("--model", action="store_true")
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--no-torch-bench", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (smoke run, e.g. on the CPU interpreter)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        assert torch.cuda.is_available(), "no CUDA device"
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    run_all = not (args.kernel or args.model or args.bench)
    if args.kernel or run_all:
        check_kernel(device, args.small)
    if args.model or run_all:
        check_model(device, args.small)
    if args.bench:
        bench(device, not args.no_torch_bench)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
    print("FAIL: " + "; ".join(FAILURES) if FAILURES else "PASS", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
