"""ParaRNN cells and language model (see ``pararnn_cells`` for the cells and their modes)."""
from .pararnn_cells import MODES, ParaGRU, ParaLSTM, ParaRNNCell, resets_from_cu_seqlens
from .pararnn_scan import linear_scan, sequential_scan

__all__ = ["MODES", "ParaGRU", "ParaLSTM", "ParaRNNCell", "resets_from_cu_seqlens", "linear_scan",
           "sequential_scan"]
