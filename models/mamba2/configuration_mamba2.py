"""Configuration of the Mamba2 baseline: transformers' ``Mamba2Config`` with the paper's defaults.

The saved ``config.json`` has ``model_type: mamba2``, so an export loads with plain transformers as
``Mamba2ForCausalLM``. Differences from ``Mamba2Config``'s defaults, and why:

* ``n_groups=1`` (mamba-ssm's default; HF's 8 comes from Codestral). Only with one group do the
  parameter counts reproduce the paper's (2.83B and 6.96B exactly), and with one group HF's gated
  RMSNorm (over the whole inner width) is the same function as mamba-ssm's grouped one.
* ``num_heads`` may be left out: it is ``expand · hidden_size / head_dim``.
* ``tie_word_embeddings=False`` (the paper's models are untied), GPT-2 ``<|endoftext|>`` ids (50256)
  like the ParaRNN config.

Fields that are ours (plain transformers keeps them as unused attributes):

* ``use_triton``: None = the Triton SSD kernels when the activations are on a CUDA device, torch
  otherwise; True/False force a path.
* ``block``: ``"lm"`` (the LM: blocks of norm, mixer, residual) or ``"bare"``: the SSM alone (one linear map
  to x, B, C, dt, the scan, the output projection; no conv, gate, norm or residual, and no final norm),
  the paper's † synthetic tasks (App. C.2). Bare models train and evaluate; they do not generate or export.
* ``position_encoding``: None or ``"sinusoidal"`` (added to the embeddings; the paper's Keep-nth task).
* ``init_scheme``: ``"hf"`` = transformers' initialisation (what the paper trained; the class default, so
  exports and outside configs keep it), ``"mamba_ssm"`` = mamba-ssm's, the reference implementation's
  (every LM preset in configs/model). They differ in three places, all by width: ``in_proj`` N(0, 0.1)
  vs ``nn.Linear``'s U(±1/√d) (7.8× larger at d=2048), embeddings N(0, 0.1) vs N(0, 0.02), A =
  1..num_heads vs U(1, 16). With transformers' scales at d=2048, Adam's relative update of ``in_proj`` at
  a given LR is 7.8× smaller than with mamba-ssm's, and the model fits a repeated batch several times
  slower than the others (``benchmarks/probe_fit.py``, ``benchmarks/RESULTS.md``); at d=64 they coincide.
"""
from huggingface_hub.dataclasses import strict
from transformers import Mamba2Config

INIT_SCHEMES = ("hf", "mamba_ssm")


@strict  # re-derive the field validators from this class's annotations (num_heads may be None here)
class Mamba2DocConfig(Mamba2Config):
    """``Mamba2Config`` for ParaRNN-LM's Mamba2 baseline (see the module docstring for the changed defaults)."""

    num_heads: int | None = None
    head_dim: int = 64
    vocab_size: int = 50304
    hidden_size: int = 1024
    state_size: int = 128
    num_hidden_layers: int = 48
    n_groups: int = 1
    chunk_size: int = 256
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    use_triton: bool | None = None
    block: str = "lm"
    position_encoding: str | None = None
    init_scheme: str = "hf"

    def __post_init__(self, **kwargs):
        if self.block not in ("lm", "bare"):
            raise ValueError(f"Mamba2DocConfig: block={self.block!r} is not one of lm, bare")
        if self.position_encoding not in (None, "sinusoidal"):
            raise ValueError(f"Mamba2DocConfig: position_encoding={self.position_encoding!r} is not None or "
                             f"'sinusoidal'")
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(f"Mamba2DocConfig: init_scheme={self.init_scheme!r} is not one of "
                             f"{', '.join(INIT_SCHEMES)}")
        if self.num_heads is None:
            if (self.expand * self.hidden_size) % self.head_dim:
                raise ValueError(f"Mamba2DocConfig: expand·hidden_size={self.expand * self.hidden_size} is not "
                                 f"a multiple of head_dim={self.head_dim}")
            self.num_heads = self.expand * self.hidden_size // self.head_dim
        if self.num_heads % self.n_groups:
            raise ValueError(f"Mamba2DocConfig: num_heads={self.num_heads} is not a multiple of "
                             f"n_groups={self.n_groups}")
        super().__post_init__(**kwargs)

