"""Architecture registry: one name per architecture, each building a transformers model from plain kwargs.

Every architecture is a ``transformers.PreTrainedModel`` for causal LM with the same call contract:
``model(input_ids=[B, T], position_ids=[B, T]) -> output.logits [B, T, V]``, where ``position_ids``
restart at 0 at each document start of a packed row. That is the one document-boundary policy for all
architectures: nothing crosses a boundary (ParaRNN resets its state and conv, the Transformer masks
attention block-diagonally, Mamba2 resets through ``seq_idx``).
"""
import math
from collections.abc import Callable

from huggingface_hub.errors import StrictDataclassError
from transformers import PretrainedConfig, PreTrainedModel

VOCAB_MULTIPLE = 64
_ARCHS: dict[str, Callable[[], tuple[type[PretrainedConfig], type[PreTrainedModel]]]] = {}


def register_arch(name: str):
    """Register ``fn() -> (ConfigClass, ModelClass)`` under ``name`` (lazy: imports happen on use)."""
    def wrap(fn):
        _ARCHS[name] = fn
        return fn
    return wrap


def arch_names() -> list[str]:
    return sorted(_ARCHS)


def padded_vocab(vocab_size: int) -> int:
    """Vocab rounded up to a multiple of 64 (tensor-core friendly embedding and logits GEMMs)."""
    return VOCAB_MULTIPLE * math.ceil(vocab_size / VOCAB_MULTIPLE)


def build_config(arch: str, config: dict, vocab_size: int | None = None) -> PretrainedConfig:
    """The arch's config from kwargs; ``vocab_size`` (the tokenizer's) is padded unless config sets one."""
    if arch not in _ARCHS:
        raise ValueError(f"model.arch={arch!r} is not one of {', '.join(arch_names())}")
    config_cls, _ = _ARCHS[arch]()
    kwargs = dict(config)
    if vocab_size is not None:
        given = kwargs.get("vocab_size")
        if given is not None and given < vocab_size:
            raise ValueError(f"model.config.vocab_size={given} is smaller than the tokenizer's {vocab_size} ids")
        kwargs["vocab_size"] = given if given is not None else padded_vocab(vocab_size)
    try:
        return config_cls(**kwargs)
    except (TypeError, StrictDataclassError) as err:  # the latter: transformers' config validators
        message = " ".join(str(err).split())
        raise ValueError(f"model.config for arch {arch!r}: {message}") from None


def build_model(arch: str, config: dict, vocab_size: int | None = None) -> PreTrainedModel:
    """Build a freshly initialised model of ``arch``."""
    config = build_config(arch, config, vocab_size)  # checks arch and kwargs first
    _, model_cls = _ARCHS[arch]()
    return model_cls(config)


@register_arch("pararnn")
def _pararnn():
    from .pararnn import ParaRNNConfig, ParaRNNForCausalLM
    return ParaRNNConfig, ParaRNNForCausalLM


@register_arch("transformer")
def _transformer():
    from .transformer import TransformerConfig, TransformerForCausalLM
    return TransformerConfig, TransformerForCausalLM


@register_arch("mamba2")
def _mamba2():
    from .mamba2 import Mamba2DocConfig, Mamba2DocForCausalLM
    return Mamba2DocConfig, Mamba2DocForCausalLM
