"""Mamba2 baseline: transformers' Mamba2 with document resets and Triton SSD kernels on GPU.

What is special here, compared with ``transformers.Mamba2ForCausalLM``:

* **Document resets.** ``forward(input_ids, position_ids)`` turns packed ``position_ids`` (restarting
  at 0 at each document) into ``seq_idx`` (document ids). In every layer the causal conv gives zero
  weight to taps from the previous document and the SSD scan restarts the state from zero, so no
  information crosses a boundary (``ssd_torch`` documents the masks). HF's torch path cannot do this.
* **Two scan back-ends, one function.** On CUDA the chunked scan runs mamba-ssm's Triton SSD kernels
  (vendored in ``ssd/``, no CUDA build step); elsewhere a pure-torch chunked SSD (``ssd_torch``).
  ``config.use_triton`` forces either one.
* **Same parameters, same function.** Module and parameter names are HF's (``backbone.layers.N.mixer
  .in_proj`` ...), the block is HF's (RMSNorm, mixer, fp32 residual), HF's default initialisation is
  kept (the paper trained "the HuggingFace implementation with default init") except for the LM head
  (``Mamba2DocForCausalLM.initialize_weights`` says why), and for a single document the output equals
  HF's torch path. ``save_pretrained`` writes ``architectures: ["Mamba2ForCausalLM"]`` so exports load
  with plain transformers.
* ``forward`` defaults ``use_cache`` to False (HF's follows ``config.use_cache`` in eval mode), so
  plain calls (training, validation) take the path with resets. With a cache (``generate()``) or a
  padding ``attention_mask`` the mixer defers to HF's own code, which knows nothing of documents:
  position_ids are then ignored, and packed rows with a padding mask are refused.
* ``config.block="bare"`` replaces each block by :class:`Mamba2BareMixer` (the SSM alone) and drops the final
  norm, for the paper's † synthetic tasks; ``config.position_encoding="sinusoidal"`` adds sinusoids to the
  embeddings.
* Logits are returned in the head's dtype (HF upcasts them to fp32, which at seq 2048 × 50k vocab
  costs GBs per batch); the training loss upcasts where it needs to.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mamba2ForCausalLM
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.mamba2.modeling_mamba2 import (
    Mamba2CausalLMOutput,
    Mamba2Mixer,
    Mamba2Output,
    Mamba2PreTrainedModel,
    Mamba2RMSNorm,
)

from ..pararnn.modeling_pararnn import sinusoidal_positions
from ..pararnn.pararnn_norm import gated_rms_norm
from .configuration_mamba2 import Mamba2DocConfig
from .ssd_torch import causal_conv1d, seq_idx_from_position_ids, ssd_chunked

EXPORT_ARCHITECTURE = "Mamba2ForCausalLM"


class Mamba2DocMixer(Mamba2Mixer):
    """HF's ``Mamba2Mixer`` (same parameters and init) with a training/eval forward that takes ``seq_idx``."""

    def __init__(self, config: Mamba2DocConfig, layer_idx: int, initialize_mixer_weights: bool = True):
        super().__init__(config, layer_idx=layer_idx, initialize_mixer_weights=initialize_mixer_weights)
        self.use_triton = getattr(config, "use_triton", None)

    def forward(self, hidden_states: torch.Tensor, cache_params: Cache | None = None,
                attention_mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None, **kwargs):
        if cache_params is not None or attention_mask is not None:
            if seq_idx is not None:
                raise ValueError("Mamba2: packed rows (document resets) are not supported together with a cache "
                                 "or a padding attention_mask")
            return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)

        batch, length, _ = hidden_states.shape
        groups_state = self.n_groups * self.ssm_state_size
        projected = self.in_proj(hidden_states)
        # The activations' dtype is the projection's (bf16 under autocast, as mamba-ssm's mixer under AMP),
        # not the block input's (fp32 behind HF's norm with fp32 weights): fp32 x, B, C would double the
        # SSD's reads and saved tensors and run its dots in tf32.
        dtype = projected.dtype
        gate, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        # As HF: conv and activation in the conv weight's dtype, result back in the activations' dtype.
        xBC = self.act(causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx)).to(dtype)
        x, B, C = xBC.split([self.intermediate_size, groups_state, groups_state], dim=-1)
        x = x.reshape(batch, length, self.num_heads, self.head_dim)
        B = B.reshape(batch, length, self.n_groups, self.ssm_state_size)
        C = C.reshape(batch, length, self.n_groups, self.ssm_state_size)
        y = _scan(self, x, dt, B, C, seq_idx)
        # HF's gated RMSNorm (self.norm: gate before the norm, over the whole inner width), recomputed in the
        # backward instead of keeping its fp32 intermediates
        y = gated_rms_norm(y.reshape(batch, length, -1), gate, self.norm.weight, self.norm.variance_epsilon,
                           norm_before_gate=False)
        return self.out_proj(y.to(dtype))


def _scan(mixer, x, dt, B, C, seq_idx):
    """The SSD scan of ``mixer``'s parameters (Triton on CUDA unless ``use_triton`` says otherwise)."""
    A = -torch.exp(mixer.A_log.float())
    use_triton = mixer.use_triton if mixer.use_triton is not None else x.is_cuda
    if use_triton:
        from .ssd import chunk_scan  # imports triton; only on this path

        return chunk_scan(x, dt, A, B, C, mixer.chunk_size, D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True,
                          seq_idx=seq_idx, dt_limit=tuple(mixer.time_step_limit))
    dt = F.softplus(dt + mixer.dt_bias.to(dt.dtype))
    dt = torch.clamp(dt, mixer.time_step_limit[0], mixer.time_step_limit[1])
    return ssd_chunked(x, dt, A, B, C, mixer.chunk_size, D=mixer.D, seq_idx=seq_idx)


class Mamba2BareMixer(nn.Module):
    """The SSM alone (``config.block="bare"``): x, B, C and dt from one linear map of the input, the scan, the
    output projection; no conv, gate, gated norm or residual. A, D and dt_bias are initialised as HF's mixer."""

    init_mamba2_weights = Mamba2Mixer.init_mamba2_weights

    def __init__(self, config: Mamba2DocConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim, self.chunk_size = config.num_heads, config.head_dim, config.chunk_size
        self.n_groups, self.ssm_state_size = config.n_groups, config.state_size
        self.intermediate_size = int(config.expand * config.hidden_size)
        self.time_step_limit, self.time_step_min = config.time_step_limit, config.time_step_min
        self.time_step_max, self.time_step_floor = config.time_step_max, config.time_step_floor
        self.use_triton = config.use_triton
        groups_state = self.n_groups * self.ssm_state_size
        self.in_proj = nn.Linear(config.hidden_size, self.intermediate_size + 2 * groups_state + self.num_heads,
                                 bias=config.use_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden_states: torch.Tensor, cache_params: Cache | None = None,
                attention_mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None, **kwargs):
        if cache_params is not None or attention_mask is not None:
            raise ValueError("Mamba2 block='bare' has no generation cache and takes no padding attention_mask")
        batch, length, _ = hidden_states.shape
        groups_state = self.n_groups * self.ssm_state_size
        x, B, C, dt = self.in_proj(hidden_states).split(
            [self.intermediate_size, groups_state, groups_state, self.num_heads], dim=-1)
        y = _scan(self, x.reshape(batch, length, self.num_heads, self.head_dim), dt,
                  B.reshape(batch, length, self.n_groups, self.ssm_state_size),
                  C.reshape(batch, length, self.n_groups, self.ssm_state_size), seq_idx)
        return self.out_proj(y.reshape(batch, length, -1).to(hidden_states.dtype))


class Mamba2DocBlock(GradientCheckpointingLayer):
    """HF's ``Mamba2Block`` (pre-RMSNorm, mixer, residual kept in fp32) passing ``seq_idx`` through."""

    def __init__(self, config: Mamba2DocConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = Mamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = Mamba2DocMixer(config, layer_idx=layer_idx, initialize_mixer_weights=False)

    def forward(self, hidden_states, cache_params: Cache | None = None,
                attention_mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None, **kwargs):
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        hidden_states = self.mixer(hidden_states, cache_params=cache_params, attention_mask=attention_mask,
                                   seq_idx=seq_idx, **kwargs)
        return residual + hidden_states


class Mamba2DocModel(Mamba2PreTrainedModel):
    """HF's ``Mamba2Model`` layout (``embeddings``, ``layers``, ``norm_f``) with ``seq_idx`` support."""

    config_class = Mamba2DocConfig
    config: Mamba2DocConfig

    def __init__(self, config: Mamba2DocConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        block = Mamba2BareMixer if config.block == "bare" else Mamba2DocBlock
        self.layers = nn.ModuleList([block(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.norm_f = (nn.Identity() if config.block == "bare"
                       else Mamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon))
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Mamba2BareMixer):  # as HF's mixer (which it is not, to HF's _init_weights)
            module.init_mamba2_weights()
            init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    def forward(self, input_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cache_params: Cache | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                attention_mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                **kwargs) -> Mamba2Output:
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if use_cache and cache_params is None:
            cache_params = DynamicCache(config=self.config)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: keep the document-aware path

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        for block in self.layers:
            hidden_states = block(hidden_states, cache_params=cache_params, attention_mask=attention_mask,
                                  seq_idx=seq_idx, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return Mamba2Output(last_hidden_state=hidden_states, cache_params=cache_params if use_cache else None,
                            hidden_states=all_hidden_states)


class Mamba2DocForCausalLM(Mamba2ForCausalLM):
    """Causal LM on ``Mamba2DocModel``; ``forward(input_ids, position_ids)`` resets at document starts.

    Subclasses HF's ``Mamba2ForCausalLM`` for its generation plumbing; ``__init__`` builds our
    backbone instead of HF's (same names, so the state dict is HF's).
    """

    config_class = Mamba2DocConfig
    config: Mamba2DocConfig

    def __init__(self, config: Mamba2DocConfig):
        Mamba2PreTrainedModel.__init__(self, config)  # skip HF's __init__: it would build HF's backbone
        self.backbone = Mamba2DocModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def initialize_weights(self):
        """HF's initialisation, then the LM head's as mamba-ssm's, and with ``init_scheme="mamba_ssm"`` also
        the embeddings, ``in_proj`` and A as mamba-ssm's (parameters loaded from a checkpoint are skipped).

        HF's ``_init_weights`` draws every ``nn.Linear`` from N(0, initializer_range=0.1) whatever its
        width, the LM head included. Behind ``norm_f`` (unit RMS) the logits then have std 0.1·√d: 4.5
        at d=2048, 6.4 at d=4096, and the initial loss is ~20 (1B) / ~28 (7B) instead of about ln V.
        mamba-ssm leaves an untied head at ``nn.Linear``'s default, U(±1/√d): logits of std 1/√3 at
        every width, initial loss ln V + ~0.2. The same width-blind N(0, 0.1) slows ``in_proj``'s learning
        at large widths (``Mamba2DocConfig`` says by how much); ``init_scheme`` chooses.
        """
        super().initialize_weights()
        init.kaiming_uniform_(self.lm_head.weight, a=math.sqrt(5))  # nn.Linear's default: U(±1/√d)
        if self.config.init_scheme == "mamba_ssm":  # mamba_ssm/models/mixer_seq_simple.py, modules/mamba2.py
            init.normal_(self.backbone.embeddings.weight, mean=0.0, std=0.02)
            for layer in self.backbone.layers:
                mixer = layer.mixer
                init.kaiming_uniform_(mixer.in_proj.weight, a=math.sqrt(5))
                a = torch.empty_like(mixer.A_log, dtype=torch.float32).uniform_(1, 16)  # A_init_range
                init.copy_(mixer.A_log, torch.log(a).to(mixer.A_log.dtype))

    def forward(self, input_ids: torch.LongTensor | None = None, position_ids: torch.LongTensor | None = None,
                inputs_embeds: torch.Tensor | None = None, cache_params: Cache | None = None,
                labels: torch.LongTensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, use_cache: bool | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> Mamba2CausalLMOutput:
        # use_cache defaults to False (HF's follows config.use_cache in eval): a plain forward takes the
        # path with document resets; generate() passes use_cache=True. With a cache, position_ids are
        # generation positions (with left padding they even jump), not document starts: no resets.
        use_cache = bool(use_cache)
        caching = use_cache or cache_params is not None
        seq_idx = None if caching else seq_idx_from_position_ids(position_ids)
        if self.config.position_encoding == "sinusoidal":
            if caching:
                raise ValueError("Mamba2 position_encoding='sinusoidal' is for training and evaluation (no cache)")
            if inputs_embeds is None:
                inputs_embeds = self.backbone.embeddings(input_ids)
                input_ids = None
            positions = position_ids if position_ids is not None else torch.arange(
                inputs_embeds.shape[1], device=inputs_embeds.device).expand(inputs_embeds.shape[:2])
            inputs_embeds = inputs_embeds + sinusoidal_positions(positions, inputs_embeds.shape[-1]).to(
                inputs_embeds.dtype)
        out = self.backbone(input_ids, inputs_embeds=inputs_embeds, cache_params=cache_params, use_cache=use_cache,
                            output_hidden_states=output_hidden_states, attention_mask=attention_mask,
                            seq_idx=seq_idx)
        hidden_states = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :].to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return Mamba2CausalLMOutput(loss=loss, logits=logits, cache_params=out.cache_params,
                                    hidden_states=out.hidden_states)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As HF's, but ``config.json`` names HF's class, so the export needs no code of ours."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.config.architectures = [EXPORT_ARCHITECTURE]
        if kwargs.get("is_main_process", True):
            self.config.save_pretrained(save_directory)
