"""Parameter counts and training FLOPs of every model preset (``configs/model/*.yaml``), built through the
arch registry.

    python -m models.count                      # every preset
    python -m models.count transformer_1b ...   # some presets

One line per preset: ``NAME TOTAL NON-EMBEDDING HUMAN``; non-embedding leaves out the input embedding and
the (untied) LM head, the two ``vocab × d`` tables. Models are built on the meta device (no memory, no
initialisation), so even the 7B presets take well under a second each. A preset whose arch cannot be
imported (e.g. an arch still being written) is reported as skipped, with the reason, and the exit status is 1.

Presets of one size (``*_tiny``, ``*_125m``, ``*_400m``, ...) agree within 5% in both counts
(``tests/test_count.py``), so a comparison at one size compares architectures, not budgets.
"""
import argparse
import os
import sys

import torch

PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "model")
SIZES = ("tiny", "125m", "400m", "1b", "3b", "7b")
# Per state element and Newton iteration, a rough count of the cell's elementwise work in the forward (gates
# of the transition and of its Jacobian, the scan's combine); the backward is taken as twice the forward.
NEWTON_FLOPS_PER_ELEMENT = 40


def preset_names(presets_dir: str = PRESETS_DIR) -> list[str]:
    """Preset names (file stems) in ``presets_dir``, sorted by arch then by size."""
    order = {size: i for i, size in enumerate(SIZES)}
    names = [f[:-5] for f in os.listdir(presets_dir) if f.endswith(".yaml")]
    return sorted(names, key=lambda n: (n.rsplit("_", 1)[0], order.get(n.rsplit("_", 1)[-1], 9), n))


def load_preset(name: str, presets_dir: str = PRESETS_DIR) -> dict:
    """A preset as a plain dict (``name``, ``arch``, ``lr``, ``weight_decay``, ``config``), read as Hydra would."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(os.path.join(presets_dir, f"{name}.yaml")), resolve=True)


def build_meta(preset: dict, vocab_size: int | None = None) -> torch.nn.Module:
    """The preset's model on the meta device (shapes only). ``vocab_size`` (a tokenizer's, padded as train.py
    does) applies unless the preset sets one; otherwise the config default."""
    from models.registry import build_model

    with torch.device("meta"):
        return build_model(preset["arch"], preset.get("config") or {}, vocab_size)


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied tensors once)."""
    return sum(p.numel() for p in model.parameters())


def embedding_params(model: torch.nn.Module) -> int:
    """Parameters of the input embedding and of the LM head (once if tied)."""
    tables = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    return sum(tables.values())


def flops_per_token(model: torch.nn.Module, seq_len: int) -> dict[str, int]:
    """Training FLOPs (forward + backward) per token of ``model`` on rows of ``seq_len`` tokens.

    * ``6N``: 6 · (parameters less the input embedding: a lookup, not a matrix product; the LM head is one).
    * ``model``: ``6N`` plus the work that is not a product with a weight: attention 12·L·d·T (PaLM's
      count, the whole row: the document mask does not make SDPA skip work); Mamba2's SSD 6·L·(2Q(g·n + h·p)
      + 4·h·p·n) (within-chunk scores and outputs over a chunk of Q, chunk states and their outputs);
      ParaRNN's Newton solve 3·L·iters·K·d·40 (:data:`NEWTON_FLOPS_PER_ELEMENT`, an estimate; < 1% at every
      preset).
    """
    cfg = model.config
    n = count_params(model) - model.get_input_embeddings().weight.numel()
    layers, d = cfg.num_hidden_layers, cfg.hidden_size
    arch = cfg.model_type
    if arch == "llama":
        extra = 12 * layers * d * seq_len
    elif arch == "mamba2":
        q = min(cfg.chunk_size, seq_len)
        g, s, h, p = cfg.n_groups, cfg.state_size, cfg.num_heads, cfg.head_dim
        extra = 6 * layers * (2 * q * (g * s + h * p) + 4 * h * p * s)
    elif arch == "pararnn":
        blocks = 2 if cfg.cell == "lstm" else 1
        extra = 3 * layers * cfg.newton_iters * blocks * d * NEWTON_FLOPS_PER_ELEMENT
    else:
        raise ValueError(f"flops_per_token: no count for model_type {arch!r}")
    return {"6N": 6 * n, "model": 6 * n + extra}


def human(n: int) -> str:
    """1_436_000_000 -> '1.44B', 411_600_000 -> '411.6M'."""
    if n >= 10**9:
        return f"{n / 1e9:.2f}B"
    if n >= 10**6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="preset names (default: all in --presets-dir)")
    parser.add_argument("--presets-dir", default=PRESETS_DIR)
    args = parser.parse_args(argv)
    names = args.names or preset_names(args.presets_dir)
    width = max(len(n) for n in names)
    status = 0
    print(f"{'preset':<{width}} {'parameters':>14} {'non-embedding':>14} {'':>8}", flush=True)
    for name in names:
        preset = load_preset(name, args.presets_dir)
        try:
            model = build_meta(preset)
        except (ImportError, AttributeError) as err:  # arch module missing or not exporting its classes yet
            print(f"{name:<{width}} skipped: arch {preset['arch']!r} is not importable ({type(err).__name__}: {err})",
                  flush=True)
            status = 1
            continue
        n = count_params(model)
        print(f"{name:<{width}} {n:>14,d} {n - embedding_params(model):>14,d} {human(n):>8}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
