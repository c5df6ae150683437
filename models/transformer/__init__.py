"""Transformer baseline (Llama layout, DCLM init; exports load as plain ``LlamaForCausalLM``)."""
from .configuration_transformer import TransformerConfig, swiglu_width
from .modeling_transformer import TransformerForCausalLM

__all__ = ["TransformerConfig", "TransformerForCausalLM", "swiglu_width"]
