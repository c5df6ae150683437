"""``trainer.compile``: ``torch.compile`` of every decoder block, as torchtitan does (``apply_compile``).

Per block rather than the whole model: the blocks of a model are the same code on different parameters,
so Dynamo traces one block and every other block reuses its graph (one compilation whatever the depth,
checked in tests/test_compile.py); each block is compiled in place (``nn.Module.compile``), so parameter
names, checkpoints and exports are unchanged; and it composes with the other wrappers in the order
torchtitan uses: activation checkpointing outside the compiled block, then FSDP2's ``fully_shard`` of the
compiled blocks (``training/distributed.py``). The embedding, the final norm and the loss stay outside the
blocks; the fused loss compiles its per-chunk softmax itself (``training/loss.py``).

``fullgraph=True``: a block that cannot be traced whole is an error at its first call, never a silent
fallback to eager pieces. What made that possible per architecture:

* ParaRNN: the cell's op goes through ``torch.library`` custom ops while Dynamo traces
  (``models/pararnn/pararnn_library.py``; Triton and torch paths alike), so the block's glue (RMSNorm,
  conv, SiLU, gating, residual scale, MLP) compiles into fused kernels around it; the reset mask is an
  input of the op, not traced.
* Transformer: HF Llama's block as is; the packed-document mask is built once per forward outside the
  blocks (SDPA with the boolean block-diagonal mask, as in eager).
* Mamba2: the Triton SSD through a custom op as well (``models/mamba2/ssd/ops.py``); on the CPU the torch
  SSD is traced.

Not supported: DeepSpeed (its engine wraps the model after this point and owns the parameters' hooks) and
sequence parallelism (the split solve exchanges carries between ranks inside the op, which the custom op's
plain-tensor signature does not carry); ``TrainerConfig.check`` refuses either combination in one line.
"""
import torch
from torch import nn

from training.distributed import decoder_blocks


def compile_blocks(model: nn.Module) -> int:
    """Compile every decoder block in place (before FSDP2 shards them); returns the number of blocks."""
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile(fullgraph=True)
    # One graph serves every block; variants (train/eval, Newton residual tracked or not) each add one
    # entry per block code, well under the limit, which is raised anyway so a deep model never falls back.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    return len(blocks)
