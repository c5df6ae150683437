"""Train the same ParaRNN LM with two cell modes (default: triton vs parallel) and compare the loss curves.

    python benchmarks/compare_cell_modes.py --cells gru lstm --steps 100 --out runs/modes [trainer.precision=fp32]

Each run is a real ``train.py`` job on the embedded corpus (same seed, data and init); the table gives,
per cell, the largest per-step loss difference between the modes, the final validation losses and the
throughput of each mode. Writes ``modes.json`` under ``--out``.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cell: str, mode: str, args) -> dict:
    run_dir = os.path.join(args.out, f"{cell}_{mode}")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"run_dir={run_dir}", f"model=para{cell}_tiny",
           f"model.config.mode={mode}", f"model.config.hidden_size={args.hidden}",
           f"model.config.num_hidden_layers={args.layers}", f"data.seq_len={args.seq}", f"trainer={args.trainer}",
           f"trainer.batch_size={args.batch}", f"trainer.max_steps={args.steps}",
           f"trainer.warmup_steps={args.steps // 10}", f"trainer.val_every={args.steps}",
           f"trainer.ckpt_every={args.steps}", "trainer.log_every=5", "trainer.val_batches=8", *args.overrides]
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = {r["step"]: r for r in records if "loss" in r}
    val = [r for r in records if r.get("split") == "validation"]
    rates = [r["tokens_per_s"] for r in train.values()][1:]  # the first window includes compilation
    return {"losses": {s: r["loss"] for s, r in train.items()}, "val_loss": val[-1]["val_loss"],
            "tokens_per_s": sum(rates) / max(1, len(rates)),
            "residual": max((r.get("newton_residual") or 0.0) for r in train.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", nargs="+", default=["gru", "lstm"])
    parser.add_argument("--modes", nargs=2, default=["triton", "parallel"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--trainer", default="gpu")
    parser.add_argument("--out", default="runs/modes")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. trainer.precision=fp32")
    args = parser.parse_args()
    results = {}
    for cell in args.cells:
        results[cell] = {mode: run(cell, mode, args) for mode in args.modes}
    a, b = args.modes
    print(f"\n| cell | steps | max abs Δloss | loss at end ({a} / {b}) | val loss ({a} / {b}) | tokens/s ({a} / {b}) "
          f"| max Newton residual ({a} / {b}) |\n|---|---|---|---|---|---|---|")
    for cell, r in results.items():
        steps = sorted(set(r[a]["losses"]) & set(r[b]["losses"]))
        diff = max(abs(r[a]["losses"][s] - r[b]["losses"][s]) for s in steps)
        last = steps[-1]
        print(f"| {cell} | {last} | {diff:.2e} | {r[a]['losses'][last]:.4f} / {r[b]['losses'][last]:.4f} | "
              f"{r[a]['val_loss']:.4f} / {r[b]['val_loss']:.4f} | {r[a]['tokens_per_s']:,.0f} / "
              f"{r[b]['tokens_per_s']:,.0f} | {r[a]['residual']:.1e} / {r[b]['residual']:.1e} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "modes.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
