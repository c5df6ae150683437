"""Transformer baseline: ``LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU, no biases) with DCLM initialisation.

What is special here, compared with ``transformers.LlamaForCausalLM``:

* **Document boundaries** need no code of ours: with ``attention_mask=None`` and no cache,
  ``transformers.masking_utils.create_causal_mask`` detects packed rows from ``position_ids``
  (``find_packed_sequence_indices``: a new document wherever the position does not continue) and
  ands a same-document mask into the causal mask. With SDPA that is a boolean [B, 1, T, T] mask
  (rows with one document keep ``is_causal`` and the flash kernel); with
  ``attn_implementation="flex_attention"`` it is a block-sparse ``BlockMask``. RoPE uses the
  restarted positions, so a packed row computes exactly what its documents compute alone
  (``tests/test_baselines.py`` checks it). That detection is off whenever a cache exists, and
  LlamaModel creates one when ``use_cache`` is on, so ``forward`` here defaults ``use_cache`` to
  False; ``generate()`` passes True and keeps its KV cache. (A plain ``LlamaForCausalLM`` loaded from
  an export follows ``config.use_cache=True``: give it ``use_cache=False`` for packed rows.)
* **DCLM (open_lm) initialisation** instead of Llama's N(0, 0.02): truncated normals (±3σ) with
  σ = 1/√d for embeddings, q/k/v, gate/up and the LM head, and depth-scaled output projections:
  σ = 1/√d / √(2(l+1)) for o_proj and σ = 1/√ffn / √(2(l+1)) for down_proj in layer l. Loaded
  weights are never re-initialised (transformers' init helpers skip them).
* ``config.position_encoding="sinusoidal"`` adds absolute sinusoids (those of the ParaRNN and Mamba2
  models) to the embeddings, for the synthetic Keep-nth task; such a model refuses a cache and an export.
* ``save_pretrained`` writes ``architectures: ["LlamaForCausalLM"]``: exports load with plain
  transformers and no code of ours.
"""
import math

import torch
from transformers import LlamaForCausalLM
from transformers import initialization as init

from ..pararnn.modeling_pararnn import sinusoidal_positions
from .configuration_transformer import TransformerConfig

EXPORT_ARCHITECTURE = "LlamaForCausalLM"


def _trunc_normal(weight, std: float) -> None:
    init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


class TransformerForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with DCLM initialisation; the parameters and forward are Llama's."""

    config_class = TransformerConfig
    config: TransformerConfig

    def forward(self, input_ids=None, *args, use_cache=None, position_ids=None, inputs_embeds=None, **kwargs):
        """Llama's forward; ``use_cache`` defaults to False (packed rows need it off; generate() sets it)."""
        if self.config.position_encoding == "sinusoidal":
            if use_cache or kwargs.get("past_key_values") is not None:
                raise ValueError("Transformer position_encoding='sinusoidal' is for training and evaluation (no cache)")
            if inputs_embeds is None:
                inputs_embeds, input_ids = self.model.embed_tokens(input_ids), None
            positions = position_ids if position_ids is not None else torch.arange(
                inputs_embeds.shape[1], device=inputs_embeds.device).expand(inputs_embeds.shape[:2])
            inputs_embeds = inputs_embeds + sinusoidal_positions(positions, inputs_embeds.shape[-1]).to(
                inputs_embeds.dtype)
        return super().forward(input_ids, *args, use_cache=bool(use_cache), position_ids=position_ids,
                               inputs_embeds=inputs_embeds, **kwargs)

    @torch.no_grad()
    def initialize_weights(self):
        """Llama's initialisation, then DCLM's on top (parameters loaded from a checkpoint are skipped).

        Done here rather than in ``_init_weights``: transformers skips ``_init_weights`` for modules
        without parameters of their own when the model class lives outside transformers, and the
        inner ``LlamaModel`` is initialised by its own (Llama) ``_init_weights``.
        """
        super().initialize_weights()
        d = self.config.hidden_size
        std = 1.0 / math.sqrt(d)
        _trunc_normal(self.model.embed_tokens.weight, std)
        _trunc_normal(self.lm_head.weight, std)
        for layer in self.model.layers:
            depth = math.sqrt(2 * (layer.self_attn.layer_idx + 1))
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _trunc_normal(proj.weight, std)
            _trunc_normal(attn.o_proj.weight, std / depth)
            _trunc_normal(mlp.down_proj.weight, 1.0 / math.sqrt(mlp.down_proj.in_features) / depth)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As HF's, but ``config.json`` names ``LlamaForCausalLM``, so the export needs no code of ours."""
        if self.config.position_encoding is not None:
            raise ValueError("a Transformer with position_encoding cannot be exported: LlamaForCausalLM has none")
        super().save_pretrained(save_directory, *args, **kwargs)
        self.config.architectures = [EXPORT_ARCHITECTURE]
        if kwargs.get("is_main_process", True):
            self.config.save_pretrained(save_directory)
