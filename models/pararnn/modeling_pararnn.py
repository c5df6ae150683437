"""The ParaRNN language model as a transformers ``PreTrainedModel`` (shipped with exported checkpoints).

Each layer is an RNN block followed by an MLP block (the paper's §5.2 and App. C.1)::

    u = RMSNorm(x);  [v, g] = W_in u;  v = SiLU(causal depthwise conv(v));  v = cell(v)
    x = s·x + W_out (RMSNorm(v) ⊙ SiLU(g))              # s: a learnable residual scale
    x = x + SwiGLU(RMSNorm(x))

Memory (``config.recompute_elementwise``, off by default): the backward keeps the block's GEMM outputs, the
cell's trajectory and the residual stream; the norms, conv, SiLU and gating between them are recomputed
(``pararnn_norm.recompute_elementwise``), and so is the cell's input projection (``save_projection``) unless
``config.recompute_projection`` says otherwise.

Document boundaries come as ``position_ids`` that restart at 0 where a document starts: the cell's
state and the conv's window are both reset there, so nothing crosses a boundary of a packed row.

``config.block`` can drop the MLP block (``"mixer"``) or everything but the cell (``"bare"``: embeddings ->
cell -> head), the single-layer models of the paper's synthetic tasks (App. C.2).

Sequence parallelism (:meth:`ParaRNNForCausalLM.set_sequence_parallel`): each rank of a process group
runs the model on its chunk of the time axis; the cells exchange chunk summaries and the conv reads the
previous rank's last ``kernel - 1`` inputs (``pararnn_seqpar.py``); norms and MLPs are per token.

Generation keeps a recurrent cache (:class:`ParaRNNCache`, passed as ``cache_params`` like Mamba's): per layer
the conv's last ``kernel - 1`` inputs and the cell state. The prompt goes through the parallel forward once
(prefill); every later token costs O(1) (conv step + ``cell.step``), so ``generate()`` is linear in its length.
On CUDA each such step is one replay of a captured CUDA graph (``decoding.py``).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_pararnn import ParaRNNConfig
from .decoding import graph_decode
from .pararnn_cells import ParaGRU, ParaLSTM, ParaRNNCell
from .pararnn_conv import CausalDepthwiseConv
from .pararnn_norm import gated_rms_norm, recompute_elementwise
from .pararnn_seqpar import previous_tail


def resolve_mode(mode: str) -> str:
    """``"auto"`` means the fused Triton kernels on a CUDA machine and the torch parallel mode elsewhere."""
    if mode != "auto":
        return mode
    return "triton" if torch.cuda.is_available() else "parallel"


def sinusoidal_positions(positions: Tensor, dim: int) -> Tensor:
    """Transformer sinusoids ``[..., dim]`` for integer ``positions``: sin/cos pairs at periods up to 10000·2π."""
    freqs = torch.exp(torch.arange(0, dim, 2, device=positions.device) * (-math.log(10000.0) / dim))
    angles = positions.unsqueeze(-1).float() * freqs
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)[..., :dim]


def make_cell(config: ParaRNNConfig) -> ParaRNNCell:
    cell_cls = ParaGRU if config.cell == "gru" else ParaLSTM
    d = config.hidden_size
    return cell_cls(d, d, config.num_heads, mode=resolve_mode(config.mode), newton_iters=config.newton_iters,
                    clip=config.clip, init=config.cell_init, fallback_tol=config.fallback_tol)


class RNNBlock(nn.Module):
    def __init__(self, config: ParaRNNConfig):
        super().__init__()
        d = config.hidden_size
        self.norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.in_proj = nn.Linear(d, 2 * d, bias=False)
        self.conv = CausalDepthwiseConv(d, config.conv_kernel)
        self.cell = make_cell(config)
        # With recompute_elementwise the cell also redoes its input projection P (3d values per token) in the
        # backward rather than keeping it: one block-diagonal GEMM (d²·3/heads multiply-adds per token) against
        # 6 bytes per token and channel, the largest activation of the block after the MLP's
        # (benchmarks/profile_memory.py).
        recompute_p = config.recompute_projection
        self.cell.save_projection = not (config.recompute_elementwise if recompute_p is None else recompute_p)
        self.recompute = config.recompute_elementwise
        self.fused_conv = config.fused_conv
        self.out_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(d, d, bias=False)
        # One element, not 0-dim: FSDP2's fully_shard and DeepSpeed ZeRO cannot shard 0-dim parameters.
        self.residual_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor, positions: Tensor | None, reset: Tensor | None,
                cache: Optional["ParaRNNCache"] = None, layer_idx: int = 0) -> Tensor:
        group = self.cell.seq_group
        if group is not None and cache is not None:
            raise ValueError("ParaRNN: generation (a cache) does not run sequence parallel")
        if group is None:
            v, u, g = recompute_elementwise(self._input, x, positions, None, enabled=self.recompute)
        else:  # not recomputed: the conv's prefix comes from the previous rank (a collective)
            v, u, g = self._input(x, positions, group)
        if cache is not None:
            # Prefill: the parallel forward, keeping the final state and the conv's window.
            h, state = self.cell(u, reset=reset, return_state=True)
            cache.conv_states[layer_idx] = self.conv.tail(v, positions)
            cache.cell_states[layer_idx] = state.clone()  # a view would keep the whole trajectory alive
        else:
            h = self.cell(u, reset=reset)
        return recompute_elementwise(self._output, x, h, g, enabled=self.recompute)

    def _input(self, x: Tensor, positions: Tensor | None, group) -> tuple[Tensor, Tensor, Tensor]:
        """``(conv input v, cell input SiLU(conv(v)), gate g)`` of the block input ``x``."""
        v, g = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        prefix = None if group is None else previous_tail(v, self.conv.kernel - 1, group)
        fused = self.fused_conv and self.cell.mode == "triton"  # the block's kernels go with the cell's
        return v, self.conv.silu(v, positions, prefix, fused=fused), g

    def decode(self, x: Tensor, window: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Token by token from the conv window and the cell state, O(1) per token (what the CUDA graph of
        ``decoding.py`` captures): ``x [B, T, d]`` -> ``(output, new window, new state)``."""
        v, g = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        ys = []
        for t in range(v.shape[1]):
            u, window = self.conv.step(v[:, t], window)
            y, state = self.cell.step(F.silu(u), state)
            ys.append(y)
        return self._output(x, torch.stack(ys, dim=1), g), window, state

    def _output(self, x: Tensor, v: Tensor, g: Tensor) -> Tensor:
        # RMSNorm(v)·SiLU(g) in fp32, back in v's dtype for the projection (bf16 under autocast, and with bf16
        # weights without autocast: FSDP2's param_dtype); its backward recomputes from v and g (pararnn_norm)
        y = gated_rms_norm(v, g, self.out_norm.weight, self.out_norm.eps or torch.finfo(torch.float32).eps)
        return self.residual_scale * x + self.out_proj(y)


class BareBlock(nn.Module):
    """The cell alone (``config.block="bare"``): no norm, conv, gate or residual around it. Its generation
    cache holds an empty conv window ``[B, 0, d]``, so :meth:`decode` has :class:`RNNBlock`'s signature."""

    def __init__(self, config: ParaRNNConfig):
        super().__init__()
        self.cell = make_cell(config)

    def forward(self, x: Tensor, positions: Tensor | None, reset: Tensor | None,
                cache: Optional["ParaRNNCache"] = None, layer_idx: int = 0) -> Tensor:
        """The parallel forward; with ``cache`` (the prefill) it keeps the final state there."""
        if cache is None:
            return self.cell(x, reset=reset)
        y, state = self.cell(x, reset=reset, return_state=True)
        cache.conv_states[layer_idx] = x[:, :0]
        cache.cell_states[layer_idx] = state.clone()  # a view would keep the whole trajectory alive
        return y

    def decode(self, x: Tensor, window: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Token by token from the cell state: ``x [B, T, d]`` -> ``(output, window (empty), new state)``."""
        ys = []
        for t in range(x.shape[1]):
            y, state = self.cell.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, dim=1), window, state


class MLPBlock(nn.Module):
    def __init__(self, config: ParaRNNConfig):
        super().__init__()
        d, hidden = config.hidden_size, config.intermediate_size
        self.norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        self.recompute = config.recompute_elementwise

    def forward(self, x: Tensor) -> Tensor:
        return recompute_elementwise(self._forward, x, enabled=self.recompute)

    def _forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class ParaRNNLayer(GradientCheckpointingLayer):
    def __init__(self, config: ParaRNNConfig):
        super().__init__()
        self.rnn = BareBlock(config) if config.block == "bare" else RNNBlock(config)
        self.mlp = MLPBlock(config) if config.block == "lm" else None

    def forward(self, x: Tensor, positions: Tensor | None = None, reset: Tensor | None = None,
                cache_params: Optional["ParaRNNCache"] = None, layer_idx: int = 0) -> Tensor:
        """The parallel forward (``cache_params`` empty: the prefill, which fills it), or, with a filled
        cache, the tokens that follow it one by one (``rnn.decode``)."""
        if cache_params is not None and cache_params.has_previous_state:
            window, state = cache_params.conv_states[layer_idx], cache_params.cell_states[layer_idx]
            x, cache_params.conv_states[layer_idx], cache_params.cell_states[layer_idx] = self.rnn.decode(
                x, window, state)
        else:
            x = self.rnn(x, positions, reset, cache_params, layer_idx)
        return x if self.mlp is None else self.mlp(x)


class ParaRNNCache:
    """Recurrent generation cache: per layer the conv window ``[B, kernel-1, d]`` and the cell state
    ``[B, K·d]``. Filled by the prefill (the parallel forward on the prompt), then advanced one token at a time.
    Like the other recurrent models' caches it cannot be rolled back (no assisted generation)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        self.conv_states: list = [None] * num_layers
        self.cell_states: list = [None] * num_layers
        self.seen_tokens = 0

    @property
    def has_previous_state(self) -> bool:
        return self.seen_tokens > 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: keep the rows ``beam_idx`` picks."""
        for states in (self.conv_states, self.cell_states):
            for i, s in enumerate(states):
                if s is not None:
                    states[i] = s.index_select(0, beam_idx.to(s.device))

    def reset(self) -> None:
        self.__init__(len(self.conv_states))


@dataclass
class ParaRNNCausalLMOutput(ModelOutput):
    """``CausalLMOutput`` plus the recurrent cache (``cache_params``, the name generate() carries along)."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache_params: ParaRNNCache | None = None


class ParaRNNPreTrainedModel(PreTrainedModel):
    config_class = ParaRNNConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _is_stateful = True  # a recurrent cache: no assisted generation (it cannot roll back)
    _no_split_modules = ["ParaRNNLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The cells their own way (``ParaRNNCell.reset_parameters``, the paper's App. C.1); the rest DCLM's, as the
        paper says of its LMs and as our Transformer: truncated normals (±3σ) of std 1/√fan-in for the embeddings,
        projections and head, divided by √(2·(layer + 1)) for the projections into the residual stream. With
        ``config.initializer_range`` set: N(0, initializer_range), residual outputs / √(2·layers) (GPT-2's)."""
        std = self.config.initializer_range
        depth = getattr(module, "_residual_depth", None)  # layer index + 1 of an output projection
        if isinstance(module, ParaRNNCell):
            module.reset_parameters()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            if std is not None:
                scale = 1.0 if depth is None else (2 * self.config.num_hidden_layers) ** -0.5
                module.weight.normal_(0.0, std * scale)
            else:
                fan_in = module.embedding_dim if isinstance(module, nn.Embedding) else module.in_features
                sigma = fan_in ** -0.5 / (1.0 if depth is None else math.sqrt(2 * depth))
                nn.init.trunc_normal_(module.weight, 0.0, sigma, -3 * sigma, 3 * sigma)
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
        bare = config.block == "bare"
        self.norm = nn.Identity() if bare else nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        for i, layer in enumerate(self.layers):  # the projections into the residual stream, for _init_weights
            if not bare:
                layer.rnn.out_proj._residual_depth = i + 1
            if layer.mlp is not None:
                layer.mlp.down._residual_depth = i + 1
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                cache_params: ParaRNNCache | None = None) -> Tensor:
        x = self.embed_tokens(input_ids)
        decoding = cache_params is not None and cache_params.has_previous_state
        if self.config.position_encoding == "sinusoidal":
            positions = position_ids
            if positions is None or decoding:
                start = cache_params.seen_tokens if decoding else 0
                positions = torch.arange(start, start + input_ids.shape[1], device=x.device).expand_as(input_ids)
            x = x + sinusoidal_positions(positions, x.shape[-1]).to(x.dtype)
        reset = None if position_ids is None or decoding else position_ids == 0
        for i, layer in enumerate(self.layers):
            x = layer(x, position_ids, reset, cache_params=cache_params, layer_idx=i)
        if cache_params is not None:
            cache_params.seen_tokens += input_ids.shape[1]
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

    def set_sequence_parallel(self, group) -> None:
        """Split the time axis over the process group ``group`` (None: off). Each rank then passes its chunk
        of ``input_ids`` / ``position_ids`` (rank r: steps ``[r·T/P, (r+1)·T/P)``) and gets that chunk's
        logits; each rank's loss is its own tokens' (labels shifted beforehand: ``forward(labels=)`` would
        shift within the chunk) and the parameter gradients are this rank's part (summed over the ranks,
        as DDP / FSDP do, they are one device's)."""
        for cell in self.cells():
            cell.seq_group = group

    def track_newton_residual(self, enabled: bool) -> None:
        """Make every cell record its final Newton residual max-norm on the next forward passes."""
        for cell in self.cells():
            cell.track_residual = enabled

    def newton_residual(self) -> Tensor | None:
        """Largest final Newton residual over the layers from the last forward (if tracked)."""
        values = [cell.last_residual for cell in self.cells() if cell.last_residual is not None]
        return torch.stack(values).amax() if values else None

    def newton_fallbacks(self) -> Tensor:
        """Chains solved again exactly, over all layers since the model was built (Newton had not converged)."""
        return sum(cell.newton_fallbacks for cell in self.cells())

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, labels: Tensor | None = None,
                attention_mask: Tensor | None = None, cache_params: ParaRNNCache | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, **kwargs) -> ParaRNNCausalLMOutput:
        """``use_cache=True`` (set by generate()) returns ``cache_params``: with a filled cache, ``input_ids`` are
        the tokens that follow it (``attention_mask`` / ``position_ids`` are then ignored: padding was dealt
        with at the prefill). Without a cache this is the plain parallel forward. ``logits_to_keep=n > 0``
        computes the logits of the last n positions only (generate()'s prefill asks for 1; ignored with labels).

        On CUDA a one-token decode step replays a CUDA graph of the whole step (``decoding.py``,
        ``config.decode_graph``); the logits it returns are a fresh tensor, as here."""
        use_cache = bool(use_cache) and not self.training
        if use_cache and cache_params is None:
            cache_params = ParaRNNCache(self.config.num_hidden_layers)
        if not use_cache:
            cache_params = None
        decoding = cache_params is not None and cache_params.has_previous_state
        if decoding and labels is None:
            logits = graph_decode(self, input_ids, cache_params)
            if logits is not None:
                return ParaRNNCausalLMOutput(logits=logits, cache_params=cache_params)
        if decoding:
            position_ids = None
        elif attention_mask is not None and position_ids is None and not bool(attention_mask.all()):
            # Left padding (batched generation): each row's document starts at its first real token.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if labels is not None and self.cells()[0].seq_group is not None:
            raise ValueError("ParaRNN: forward(labels=) shifts within this rank's chunk under sequence parallelism; "
                             "compute the loss on labels shifted beforehand")
        hidden = self.model(input_ids, position_ids, cache_params)
        keep = logits_to_keep if labels is None else 0  # the loss needs every position
        logits = self.lm_head(hidden[:, -keep:] if keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return ParaRNNCausalLMOutput(loss=loss, logits=logits, cache_params=cache_params)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: forward creates its own ParaRNNCache (as Mamba / RWKV do).
        return False

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                                      cache_params: ParaRNNCache | None = None, use_cache: bool | None = None,
                                      is_first_iteration: bool | None = False, **kwargs):
        if use_cache and cache_params is not None and cache_params.has_previous_state:
            # Decode: only the tokens the cache has not seen; nothing else reaches forward (the padding mask
            # was used at the prefill). HF's generic preparation is skipped: per token it costs more host
            # time than a graph-replayed step takes on the GPU.
            new = input_ids.shape[1] - cache_params.seen_tokens
            return {"input_ids": input_ids[:, -max(new, 1):], "cache_params": cache_params, "use_cache": use_cache}
        return super().prepare_inputs_for_generation(
            input_ids, attention_mask=attention_mask, cache_params=cache_params, use_cache=use_cache,
            is_first_iteration=is_first_iteration, **kwargs)
