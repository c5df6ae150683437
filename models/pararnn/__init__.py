"""ParaRNN: the op (``para_gru``, ``para_lstm``, ``para_rnn``), the cell modules and the language model,
registered with the Auto classes."""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_pararnn import ParaRNNConfig
from .modeling_pararnn import ParaRNNForCausalLM, ParaRNNModel
from .pararnn_cells import ParaGRU, ParaLSTM, ParaRNNCell
from .pararnn_math import GRU, LSTM, CellMath, generic_math
from .pararnn_op import FALLBACK_TOL, MODES, para_gru, para_lstm, para_rnn, resets_from_cu_seqlens
from .pararnn_scan import linear_scan, sequential_scan

AutoConfig.register(ParaRNNConfig.model_type, ParaRNNConfig, exist_ok=True)
AutoModelForCausalLM.register(ParaRNNConfig, ParaRNNForCausalLM, exist_ok=True)
# Exported checkpoints carry this package's modeling code (loaded with trust_remote_code=True).
ParaRNNConfig.register_for_auto_class()
ParaRNNForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["FALLBACK_TOL", "GRU", "LSTM", "MODES", "CellMath", "ParaGRU", "ParaLSTM", "ParaRNNCell", "ParaRNNConfig",
           "ParaRNNForCausalLM", "ParaRNNModel", "generic_math", "linear_scan", "para_gru", "para_lstm", "para_rnn",
           "resets_from_cu_seqlens", "sequential_scan"]
