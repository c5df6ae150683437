"""ParaRNN cells (``pararnn_cells``) and the ParaRNN language model, registered with the Auto classes."""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_pararnn import ParaRNNConfig
from .modeling_pararnn import ParaRNNForCausalLM, ParaRNNModel
from .pararnn_cells import MODES, ParaGRU, ParaLSTM, ParaRNNCell, resets_from_cu_seqlens
from .pararnn_scan import linear_scan, sequential_scan

AutoConfig.register(ParaRNNConfig.model_type, ParaRNNConfig, exist_ok=True)
AutoModelForCausalLM.register(ParaRNNConfig, ParaRNNForCausalLM, exist_ok=True)
# Exported checkpoints carry this package's modeling code (loaded with trust_remote_code=True).
ParaRNNConfig.register_for_auto_class()
ParaRNNForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MODES", "ParaGRU", "ParaLSTM", "ParaRNNCell", "ParaRNNConfig", "ParaRNNForCausalLM", "ParaRNNModel",
           "resets_from_cu_seqlens", "linear_scan", "sequential_scan"]
