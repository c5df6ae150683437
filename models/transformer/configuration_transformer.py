"""Configuration of the Transformer baseline: transformers' ``LlamaConfig`` with DCLM-style defaults.

The saved ``config.json`` has ``model_type: llama``, so an export loads with plain transformers as
``LlamaForCausalLM``. Differences from ``LlamaConfig``'s defaults, and why:

* ``intermediate_size`` may be left out: it is DCLM's SwiGLU width 256·ceil(8d/3/256) (2816 at d=1024).
* ``rms_norm_eps=1e-5`` (DCLM/open_lm's norm eps), RoPE θ = 10000, no biases, untied embeddings.
* GPT-2 ``<|endoftext|>`` ids (50256) like the ParaRNN config.

``position_encoding`` is ours (plain transformers keeps it as an unused attribute): None, or ``"sinusoidal"``:
absolute sinusoids added to the embeddings, on top of RoPE. RoPE alone is relative, so one causal layer cannot
find an absolute position (the paper's Keep-nth task, which adds positional encoding to every model). Models
with it train and evaluate; they do not generate or export (a plain ``LlamaForCausalLM`` would drop it).

DCLM itself uses gain-only LayerNorm and QK-norm; Llama's RMSNorm without QK-norm is the spec's
"Llama/DCLM-style" choice, so the export runs on any transformers build.
"""
import math

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


def swiglu_width(hidden_size: int) -> int:
    """DCLM's (and the ParaRNN spec's) SwiGLU hidden width: 8d/3 rounded up to a multiple of 256."""
    return 256 * math.ceil(8 * hidden_size / 3 / 256)


@strict  # re-derive the field validators from this class's annotations (intermediate_size may be None here)
class TransformerConfig(LlamaConfig):
    """``LlamaConfig`` for ParaRNN-LM's Transformer baseline (see the module docstring)."""

    vocab_size: int = 50304
    hidden_size: int = 1024
    intermediate_size: int | None = None
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    position_encoding: str | None = None

    def __post_init__(self, **kwargs):
        if self.position_encoding not in (None, "sinusoidal"):
            raise ValueError(f"TransformerConfig: position_encoding={self.position_encoding!r} is not None or "
                             f"'sinusoidal'")
        if self.intermediate_size is None:
            self.intermediate_size = swiglu_width(self.hidden_size)
        super().__post_init__(**kwargs)
