"""The ParaRNN language model as a transformers ``PreTrainedModel`` (shipped with exported checkpoints).

Each layer is an RNN block followed by an MLP block (spec §5.1)::

    u = RMSNorm(x);  [v, g] = W_in u;  v = SiLU(causal depthwise conv(v));  v = cell(v)
    x = s·x + W_out (RMSNorm(v) ⊙ SiLU(g))              # s: a learnable residual scale
    x = x + SwiGLU(RMSNorm(x))

Document boundaries come as ``position_ids`` that restart at 0 where a document starts: the cell's
state and the conv's window are both reset there, so nothing crosses a boundary of a packed row.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutput

from .configuration_pararnn import ParaRNNConfig
from .pararnn_cells import ParaGRU, ParaLSTM, ParaRNNCell


def resolve_mode(mode: str) -> str:
    """``"auto"`` means the fused Triton kernels on a CUDA machine and the torch parallel mode elsewhere."""
    if mode != "auto":
        return mode
    return "triton" if torch.cuda.is_available() else "parallel"


class CausalDepthwiseConv(nn.Module):
    """Short causal depthwise conv whose window never reaches back across a document start."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(dim, kernel))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, positions: Optional[Tensor]) -> Tensor:
        # weight[:, -1] is the tap on the current step, weight[:, -1 - j] the tap j steps back.
        out = x * self.weight[:, -1]
        for j in range(1, min(self.kernel, x.shape[1] + 1)):
            shifted = F.pad(x[:, :-j], (0, 0, j, 0))
            if positions is not None:
                shifted = shifted * (positions >= j).unsqueeze(-1).to(x.dtype)
            out = out + shifted * self.weight[:, -1 - j]
        return out + self.bias


class RNNBlock(nn.Module):
    def __init__(self, config: ParaRNNConfig):
        super().__init__()
        d = config.hidden_size
        cell_cls = ParaGRU if config.cell == "gru" else ParaLSTM
        self.norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.in_proj = nn.Linear(d, 2 * d, bias=False)
        self.conv = CausalDepthwiseConv(d, config.conv_kernel)
        self.cell = cell_cls(d, d, config.num_heads, mode=resolve_mode(config.mode),
                             newton_iters=config.newton_iters, clip=config.clip, init=config.cell_init)
        self.out_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(d, d, bias=False)
        # One element, not 0-dim: FSDP2's fully_shard and DeepSpeed ZeRO cannot shard 0-dim parameters.
        self.residual_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor, positions: Optional[Tensor], reset: Optional[Tensor]) -> Tensor:
        v, g = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        v = F.silu(self.conv(v, positions))
        v = self.cell(v, reset=reset)
        return self.residual_scale * x + self.out_proj(self.out_norm(v) * F.silu(g))


class MLPBlock(nn.Module):
    def __init__(self, config: ParaRNNConfig):
        super().__init__()
        d, hidden = config.hidden_size, config.intermediate_size
        self.norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class ParaRNNLayer(GradientCheckpointingLayer):
    def __init__(self, config: ParaRNNConfig):
        super().__init__()
        self.rnn = RNNBlock(config)
        self.mlp = MLPBlock(config)

    def forward(self, x: Tensor, positions: Optional[Tensor] = None, reset: Optional[Tensor] = None) -> Tensor:
        return self.mlp(self.rnn(x, positions, reset))


class ParaRNNPreTrainedModel(PreTrainedModel):
    config_class = ParaRNNConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ParaRNNLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, ParaRNNCell):
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            # DCLM-style: output projections into the residual stream are scaled down with depth.
            scale = (2 * self.config.num_hidden_layers) ** -0.5 if getattr(module, "_is_residual_out", False) else 1.0
            module.weight.normal_(0.0, std * scale)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, CausalDepthwiseConv):
            bound = module.kernel ** -0.5
            module.weight.uniform_(-bound, bound)
            module.bias.zero_()
        elif isinstance(module, RNNBlock):
            module.residual_scale.fill_(1.0)


class ParaRNNModel(ParaRNNPreTrainedModel):
    def __init__(self, config: ParaRNNConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ParaRNNLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        for layer in self.layers:
            layer.rnn.out_proj._is_residual_out = True
            layer.mlp.down._is_residual_out = True
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None) -> Tensor:
        x = self.embed_tokens(input_ids)
        reset = None if position_ids is None else position_ids == 0
        for layer in self.layers:
            x = layer(x, position_ids, reset)
        return self.norm(x)


class ParaRNNForCausalLM(ParaRNNPreTrainedModel, GenerationMixin):
    """ParaRNN LM with an untied output head. ``forward(labels=...)`` follows the HF convention
    (labels are the inputs; the shift happens here)."""

    def __init__(self, config: ParaRNNConfig):
        super().__init__(config)
        self.model = ParaRNNModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def cells(self) -> list:
        return [layer.rnn.cell for layer in self.model.layers]

    def set_cell_mode(self, mode: str) -> None:
        for cell in self.cells():
            cell.mode = resolve_mode(mode)

    def track_newton_residual(self, enabled: bool) -> None:
        """Make every cell record its final Newton residual max-norm on the next forward passes."""
        for cell in self.cells():
            cell.track_residual = enabled

    def newton_residual(self) -> Optional[Tensor]:
        """Largest final Newton residual over the layers from the last forward (if tracked)."""
        values = [cell.last_residual for cell in self.cells() if cell.last_residual is not None]
        return torch.stack(values).amax() if values else None

    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, **kwargs) -> CausalLMOutput:
        if attention_mask is not None and position_ids is None and not bool(attention_mask.all()):
            # Left padding (batched generation): each row's document starts at its first real token.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.lm_head(self.model(input_ids, position_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        # No recurrent cache through generate() yet: every step re-runs the prefix in parallel mode.
        return {"input_ids": input_ids, "attention_mask": attention_mask}
