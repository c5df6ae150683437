"""Parameter count of every model preset (``configs/model/*.yaml``), built through the arch registry.

    python -m models.count                      # every preset
    python -m models.count transformer_1b ...   # some presets

One line per preset: ``NAME PARAMS HUMAN``. Models are built on the meta device (no memory, no
initialisation), so even the 7B presets take well under a second each. A preset whose arch cannot be
imported (e.g. an arch still being written) is reported as skipped, with the reason, and the exit
status is 1.
"""
import argparse
import os
import sys

import torch

PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "model")


def preset_names(presets_dir: str = PRESETS_DIR) -> list[str]:
    """Preset names (file stems) in ``presets_dir``, sorted by arch then by size."""
    order = {"tiny": 0, "400m": 1, "1b": 2, "3b": 3, "7b": 4}
    names = [f[:-5] for f in os.listdir(presets_dir) if f.endswith(".yaml")]
    return sorted(names, key=lambda n: (n.rsplit("_", 1)[0], order.get(n.rsplit("_", 1)[-1], 9), n))


def load_preset(name: str, presets_dir: str = PRESETS_DIR) -> dict:
    """A preset as a plain dict (``name``, ``arch``, ``lr``, ``weight_decay``, ``config``), read as Hydra would."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(os.path.join(presets_dir, f"{name}.yaml")), resolve=True)


def build_meta(preset: dict) -> torch.nn.Module:
    """The preset's model on the meta device (shapes only). ``vocab_size`` is the preset's or the config default."""
    from models.registry import build_model

    with torch.device("meta"):
        return build_model(preset["arch"], preset.get("config") or {})


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied tensors once)."""
    return sum(p.numel() for p in model.parameters())


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
        print(f"{name:<{width}} {n:>14,d} {human(n):>8}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
