"""Mamba2 baseline (transformers-compatible; document resets; Triton SSD on GPU). See ``modeling_mamba2``."""
from .configuration_mamba2 import Mamba2DocConfig
from .modeling_mamba2 import Mamba2DocForCausalLM, Mamba2DocModel

__all__ = ["Mamba2DocConfig", "Mamba2DocForCausalLM", "Mamba2DocModel"]
