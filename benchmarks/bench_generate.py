"""Generation speed of the four architectures: tokens/s and latency per token vs context length and batch size.

    python benchmarks/bench_generate.py --out DIR              # the 1B presets on one GPU, ~4-5 min on an H200
    python benchmarks/bench_generate.py --reduced --out DIR    # the essential points only, ~2 min (3 at worst)
    python benchmarks/bench_generate.py --small --out DIR      # the tiny presets on the CPU, about a minute
    python benchmarks/bench_generate.py --plot DIR/bench_generate.json   # redraw the plot from a run's JSON

Random weights (bf16 on CUDA), random prompts, greedy, 128 new tokens with EOS off (every run makes that
many). Each point is one ``generate()`` call after a warm-up at the same batch size (graph capture,
compilation). The prefill time is the time to the first new token (a streamer notes when generate() hands
it to the host, which generate() does every step anyway); the latency per token is the rest over the
remaining tokens; tokens/s = batch / latency.

Variants (``VARIANTS``):

* ParaRNN (``paragru_1b``, ``paralstm_1b``): generate() with ``decode_graph="compiled"`` (the default),
  ``"graph"`` (the graph of the pure-torch step, bit-exact) and ``"off"`` (uncaptured), and a plain loop
  (forward + argmax on the compiled graph, no generate(): no per-token host work or synchronisation), which
  shows what generate() itself costs per token.
* Transformer (``transformer_1b``): generate() with its default dynamic cache, and with
  ``cache_implementation="static"``, with which generate() compiles the decode step (torch.compile,
  ``mode="reduce-overhead"``: HF's documented fast path). Warmed up by the same call, since each cache
  length is a new compiled shape.
* Mamba2 (``mamba2_1b``): generate() with HF's Mamba2 cache path; without mamba-ssm / causal-conv1d (as on
  our GPU machine) HF runs its torch fallback. The JSON records which packages were present.

The prompt tokens of one prefill are capped at ``MAX_PROMPT_TOKENS`` (batch × context). Points run in two
tiers (``--reduced``: the first only), the essential ones of every architecture first. A failing point (OOM,
a compile error) is recorded and the rest still runs: after an OOM the variant skips the points at least as
large, after another error the variant stops; points past ``--time-limit`` are skipped and recorded.
Prints a table last; writes ``bench_generate.json`` and ``bench_generate.png`` (tokens/s vs context length,
batch 1 and batch 64; needs matplotlib, else use ``--plot`` elsewhere) to ``--out``.
"""
import argparse
import gc
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models.registry import build_model  # noqa: E402

CONTEXTS = (128, 512, 2048, 8192, 32768)
BATCHES = (1, 8, 64, 256)
MAX_PROMPT_TOKENS = 2 ** 19
SMALL_CONTEXTS, SMALL_BATCHES = (16, 64), (1, 2)
WARMUP_PROMPT, WARMUP_NEW = 64, 4
VOCAB = 50257  # GPT-2's ids; the presets pad the embedding


@dataclass(frozen=True)
class Variant:
    preset: str       # configs/model/<preset>.yaml (``_1b`` becomes ``_tiny`` with --small)
    name: str
    kind: str         # "generate" or "loop"
    options: tuple    # (key, value) pairs: ParaRNN's decode_graph, or generate() kwargs
    tier1: tuple      # (batch, context) points of the first tier
    tier2: tuple      # the rest (None: every point of the grid not in tier 1)
    same_shape_warmup: bool = False  # warm up with the measured call itself (a compiled shape per cache length)


def _grid(contexts, batches) -> tuple:
    return tuple((b, c) for b in batches for c in contexts if b * c <= MAX_PROMPT_TOKENS)


def _variants() -> list:
    """In run order within a tier: the targets, the baselines, then ParaRNN's other decode paths."""
    cells = ("paragru_1b", "paralstm_1b")
    compiled = (("decode_graph", "compiled"),)
    return [
        *(Variant(c, "generate, compiled graph", "generate", compiled, ((1, 128), (1, 32768), (64, 128)), None)
          for c in cells),
        Variant("transformer_1b", "generate, static cache + compile", "generate",
                (("cache_implementation", "static"),), ((1, 32768),),
                ((1, 128), (1, 512), (1, 2048), (1, 8192), (8, 128), (8, 2048), (8, 8192), (64, 128), (64, 2048)),
                same_shape_warmup=True),
        Variant("transformer_1b", "generate, dynamic cache", "generate", (), ((1, 128),), ((1, 32768), (64, 128))),
        Variant("mamba2_1b", "generate, HF cache path", "generate", (), ((1, 128),),
                ((1, 2048), (1, 32768), (64, 128))),
        *(Variant(c, "plain loop, compiled graph", "loop", compiled, ((1, 128),), ((1, 32768), (64, 128)))
          for c in cells),
        *(Variant(c, "generate, graph (exact)", "generate", (("decode_graph", "graph"),), ((1, 128),),
                  ((1, 32768), (64, 128))) for c in cells),
        *(Variant(c, "generate, uncaptured", "generate", (("decode_graph", "off"),), ((1, 128),), ())
          for c in cells),
    ]


VARIANTS = _variants()


def plan(variants, reduced: bool, small: bool) -> list:
    """(variant, batch, context) in run order: every variant's first tier, then the second tiers."""
    full = _grid(CONTEXTS, BATCHES)
    tiers = [[], []]
    for v in variants:
        first = v.tier1
        second = tuple(p for p in full if p not in first) if v.tier2 is None else v.tier2
        if small:  # the same variants on the tiny grid
            first, second = ((SMALL_BATCHES[0], SMALL_CONTEXTS[0]),), tuple(
                p for p in _grid(SMALL_CONTEXTS, SMALL_BATCHES) if p != (SMALL_BATCHES[0], SMALL_CONTEXTS[0]))
            if v.options == (("decode_graph", "off"),) or v.kind == "loop":
                second = ()
        tiers[0] += [(v, b, c) for b, c in first]
        tiers[1] += [(v, b, c) for b, c in second]
    return tiers[0] if reduced else tiers[0] + tiers[1]


# ------------------------------------------------------------------------------------------------
# Models and timing
# ------------------------------------------------------------------------------------------------
def build(preset: str, device: str):
    with open(os.path.join(ROOT, "configs", "model", f"{preset}.yaml")) as f:
        cfg = yaml.safe_load(f)  # plain YAML: the GPU machine has no omegaconf
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg["arch"], cfg["config"], VOCAB)
    if device == "cuda":
        model.to(torch.bfloat16)
    model.eval()
    model.generation_config.eos_token_id = None  # a fixed number of new tokens
    model.generation_config.pad_token_id = 0
    return model


def attach_eager_decoder(model) -> None:
    """On the CPU the graph flavours run their static-buffer step eagerly (what a GPU captures)."""
    from models.pararnn import decoding

    decoding.attach(model, decoding.GraphDecoder(capture=False))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class FirstTokenClock:
    """A generate() streamer that notes when the first new token reaches the host (its second put())."""

    def __init__(self):
        self.puts = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_generate(model, ids: torch.Tensor, new: int, device: str, **kwargs) -> tuple:
    """(prefill s, decode s per token) of one greedy generate() call."""
    clock = FirstTokenClock()
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             streamer=clock, **kwargs)
    sync(device)
    end = time.perf_counter()
    made = out.shape[1] - ids.shape[1]
    if made != new:
        raise RuntimeError(f"generate() made {made} tokens, not {new}")
    return clock.first - start, (end - clock.first) / (new - 1)


def run_loop(model, ids: torch.Tensor, new: int, device: str) -> tuple:
    """(prefill s, decode s per token) of a plain greedy loop over the model's forward (no host sync)."""
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token = out.cache_params, out.logits[:, -1:].argmax(-1)
        sync(device)
        first = time.perf_counter()
        for _ in range(new - 1):
            token = model(token, cache_params=cache, use_cache=True).logits[:, -1:].argmax(-1)
    sync(device)
    return first - start, (time.perf_counter() - first) / (new - 1)


def measure(model, variant: Variant, batch: int, context: int, new: int, device: str, warm: set) -> dict:
    options = dict(variant.options)
    if "decode_graph" in options:
        model.config.decode_graph = options.pop("decode_graph")
    run = run_loop if variant.kind == "loop" else run_generate
    g = torch.Generator(device=device).manual_seed(batch * 100003 + context)
    ids = torch.randint(0, VOCAB, (batch, context), device=device, generator=g)
    if variant.same_shape_warmup:
        run(model, ids, new, device, **options)
    elif (variant, batch) not in warm:
        run(model, ids[:, :WARMUP_PROMPT], WARMUP_NEW, device, **options)
    warm.add((variant, batch))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefill, per_token = run(model, ids, new, device, **options)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    return {"prefill_s": prefill, "ms_per_token": 1e3 * per_token, "tokens_per_s": batch / per_token,
            "peak_gib": peak}


def environment(device: str) -> dict:
    import transformers

    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__,
            "present": {p: importlib.util.find_spec(p) is not None for p in ("mamba_ssm", "causal_conv1d", "kernels")}}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def table(rows: list) -> str:
    lines = ["| model | variant | batch | context | prefill s | ms/token | tokens/s | peak GiB | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" in r:
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
            lines.append(f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['context']} | {r['prefill_s']:.3f} "
                         f"| {r['ms_per_token']:.2f} | {r['tokens_per_s']:,.0f} | {peak} | |")
        else:
            lines.append(f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['context']} | | | | | {r['note']} |")
    return "\n".join(lines)


GEN, LOOP = "generate, compiled graph", "plain loop, compiled graph"


def summary(rows: list) -> list:
    """ParaRNN's batch-1 spread over context, and generate()'s own per-token time (vs the plain loop)."""
    out = []
    ok = [r for r in rows if "tokens_per_s" in r]
    for preset in sorted({r["preset"] for r in ok if r["arch"] == "pararnn"}):
        b1 = [r for r in ok if r["preset"] == preset and r["variant"] == GEN and r["batch"] == 1]
        if len(b1) > 1:
            speeds = [r["tokens_per_s"] for r in b1]
            mean = sum(speeds) / len(speeds)
            worst = max(abs(x - mean) for x in speeds) / mean
            out.append(f"{preset} batch 1, compiled graph: {min(speeds):,.0f}-{max(speeds):,.0f} tokens/s over "
                       f"contexts {min(r['context'] for r in b1)}-{max(r['context'] for r in b1)}, at most "
                       f"{100 * worst:.1f}% from their mean {mean:,.0f} (target: >= 500 and within 10%)")
        for batch in sorted({r["batch"] for r in ok if r["preset"] == preset}):
            pairs = {}
            for r in ok:
                if r["preset"] == preset and r["batch"] == batch and r["variant"] in (GEN, LOOP):
                    pairs.setdefault(r["context"], {})[r["variant"]] = r["ms_per_token"]
            both = sorted(c for c, p in pairs.items() if len(p) == 2)
            if both:
                gen, loop = pairs[both[0]][GEN], pairs[both[0]][LOOP]
                out.append(f"{preset} batch {batch}, context {both[0]}: generate() {gen:.2f} ms/token, plain loop "
                           f"{loop:.2f}: generate()'s own work {gen - loop:.2f} ms/token "
                           f"({100 * (gen - loop) / gen:.0f}%)")
    return out


def plot(rows: list, path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "tokens_per_s" in r]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    batches = sorted({r["batch"] for r in ok})
    for ax, batch in zip(axes, (batches[0], 64 if 64 in batches else batches[-1])):
        for i, key in enumerate(sorted({(r["preset"], r["variant"]) for r in ok})):
            pts = sorted((r["context"], r["tokens_per_s"]) for r in ok
                         if (r["preset"], r["variant"]) == key and r["batch"] == batch)
            if pts:  # tab20: more lines than the default cycle's 10 colours
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=plt.cm.tab20(i % 20),
                        label=f"{key[0]}: {key[1]}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (prompt tokens)")
        ax.set_ylabel("tokens/s (batch × tokens per second)")
        ax.set_title(f"greedy decoding, batch {batch}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="directory for bench_generate.json and .png")
    parser.add_argument("--reduced", action="store_true", help="the first tier of points only (~2 min on an H200)")
    parser.add_argument("--small", action="store_true", help="the tiny presets on a tiny grid (CPU smoke run)")
    parser.add_argument("--presets", nargs="+", default=None, help="only these 1B presets")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per call (default 128; --small 8)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="skip the points left after this many seconds (default 270; --reduced 110)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot", default=None, metavar="JSON", help="only redraw the plot of a run's JSON")
    args = parser.parse_args()
    if args.plot:
        with open(args.plot) as f:
            rows = json.load(f)["rows"]
        path = os.path.splitext(args.plot)[0] + ".png"
        print(f"wrote {path}" if plot(rows, path) else "error: matplotlib is not installed", file=sys.stderr)
        return
    new = args.new_tokens or (8 if args.small else 128)
    limit = args.time_limit or (110.0 if args.reduced else 270.0)
    variants = [v for v in VARIANTS if args.presets is None or v.preset in args.presets]
    if args.presets and not variants:
        print(f"error: --presets: none of {args.presets} is one of {sorted({v.preset for v in VARIANTS})}",
              file=sys.stderr)
        sys.exit(2)
    points = plan(variants, args.reduced, args.small)
    env = environment(args.device)
    print(json.dumps(env), flush=True)

    models: dict = {}
    warm: set = set()
    broken: dict = {}  # variant -> why it stopped
    too_big: dict = {}  # variant -> (batch, context) points that ran out of memory
    rows = []
    start = time.perf_counter()
    for variant, batch, context in points:
        preset = variant.preset.replace("_1b", "_tiny") if args.small else variant.preset
        row = {"preset": preset, "arch": "pararnn" if preset.startswith("para") else preset.split("_")[0],
               "variant": variant.name, "batch": batch, "context": context, "new_tokens": new}
        oom = [p for p in too_big.get(variant, ()) if batch >= p[0] and context >= p[1]]
        if variant in broken:
            row["note"] = f"skipped: {broken[variant]}"
        elif oom:
            row["note"] = f"skipped: out of memory at batch {oom[0][0]}, context {oom[0][1]}"
        elif time.perf_counter() - start > limit:
            row["note"] = f"skipped: past the {limit:.0f} s time limit"
        elif args.small and args.device != "cuda" and dict(variant.options).get("decode_graph") == "compiled":
            row["note"] = "skipped: compiled graphs need CUDA (inductor on the CPU takes minutes)"
        else:
            try:
                if preset not in models:
                    models[preset] = build(preset, args.device)
                    if args.device != "cuda" and models[preset].config.model_type == "pararnn":
                        attach_eager_decoder(models[preset])
                row.update(measure(models[preset], variant, batch, context, new, args.device, warm))
            except torch.OutOfMemoryError:
                row["note"] = "out of memory"
                too_big.setdefault(variant, []).append((batch, context))
            except Exception as err:  # one variant failing must not stop the others: recorded, and it stops
                row["note"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                broken[variant] = "the variant failed earlier"
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    elapsed = time.perf_counter() - start
    notes = summary(rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_generate.json"), "w") as f:
            json.dump({"environment": env, "elapsed_s": elapsed, "summary": notes, "rows": rows}, f, indent=1)
        png = os.path.join(args.out, "bench_generate.png")
        if not plot(rows, png):
            notes.append(f"no plot (matplotlib missing): python benchmarks/bench_generate.py --plot "
                         f"{os.path.join(args.out, 'bench_generate.json')}")
    print(f"\n{len(rows)} points in {elapsed:.0f} s on {env['device']}; HF Mamba2 kernels present: {env['present']}")
    for line in notes:
        print(line)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
