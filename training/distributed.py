"""Parallelism strategies (``trainer.strategy``): how the model is spread over the processes.

============  ===========================================================================================
``single``    one process (launched with several, accelerate makes it DDP, as ``ddp``)
``ddp``       accelerate's DistributedDataParallel: every rank holds the whole model and optimizer
``fsdp2``     torch's ``fully_shard`` (FSDP2) on every decoder block and on the root, applied here by
              :func:`shard`, with the same code on CPU (gloo) and CUDA (NCCL). Under bf16 the compute
              copies of the parameters are bf16 and gradients are reduce-scattered in fp32 (the sharded
              fp32 master parameters and the AdamW state never leave fp32). ``trainer.gradient_checkpointing``
              checkpoints the activations of every block (HF's non-reentrant checkpointing, inside each
              block's FSDP unit). With ``grad_accum > 1`` gradients are reduce-scattered after every
              micro-batch (keeping them sharded; no ``no_sync``).
``deepspeed`` accelerate's DeepSpeed plugin, ZeRO stage ``trainer.zero_stage`` (1, 2 or 3); bf16 runs keep
              fp32 masters in the ZeRO optimizer. ZeRO-1/2 skip a step with non-finite gradients
              themselves; ZeRO-3 (bf16/fp32) does not, so there a non-finite step is counted and stops the
              run after ``trainer.max_nonfinite_steps`` in a row but is not undone.
============  ===========================================================================================

Launch with ``torchrun``, ``accelerate launch --multi_gpu`` or SLURM's ``srun`` (``slurm/``): anything
that sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``. The strategy comes
from ``trainer=`` alone: do not add ``--use_fsdp`` / ``--use_deepspeed`` to ``accelerate launch``.

Why FSDP2 is applied here and not by accelerate's FSDP plugin: that plugin needs CUDA (on a CPU
machine it silently falls back to DDP), so its path could not be tested on CPU; it finds blocks only
through ``_no_split_modules`` (Mamba2's names HF's ``Mamba2Block``, not the block class used here); and
one code path on CPU and GPU means the CPU tests cover what runs on the cluster. The sharded model is
never passed to ``accelerator.prepare`` (accelerate would wrap it in DDP): gradients are averaged by
FSDP's reduce-scatter, and :class:`ShardedState` checkpoints model and optimizer as a
``torch.distributed.checkpoint`` (DCP) directory in which every rank writes its own shards. Every rank
builds the model from the same seed on its own device, then rank 0's values are broadcast before
sharding; a single-process FSDP2 run gets a one-rank process group.

Checkpoint layout per strategy (inside ``run_dir/checkpoints/step_NNNNNNN/``, besides ``manifest.json``,
``random_states_<rank>.pkl``, ``custom_checkpoint_{0,1}.pkl`` (scheduler, progress) and
``data_rank<rank>.pt``):

* single / ddp: ``model.safetensors`` + ``optimizer.bin`` (whole, written by rank 0): resumes on any
  world size;
* fsdp2: ``model_optim/`` (DCP: ``.metadata`` + ``__<rank>_0.distcp``): resumes on any world size
  (DCP reshards on load);
* deepspeed: ``pytorch_model/`` (``*mp_rank_00_model_states.pt`` + ``zero_pp_rank_<rank>_mp_rank_00_optim_states.pt``,
  plus DeepSpeed's ``latest`` and ``zero_to_fp32.py``): resumes on the same world size only.

On another world size the model and optimizer are restored but the per-rank data positions cannot
be mapped, so the data streams restart from the beginning (with a warning). ``python -m eval.export
RUN_DIR`` turns any of these into an HF directory (:func:`eval.export.load_checkpoint_state`); the
end-of-training export gathers the whole fp32 model through :func:`full_state_dict`.
"""
import os

import torch
from torch import nn

from training.common import ConfigError

SHARDED_DIR = "model_optim"  # the DCP directory of an FSDP2 checkpoint


def make_accelerator(t):
    """The ``Accelerator`` of ``trainer.device`` / ``precision`` / ``strategy`` / ``grad_accum``."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    use_cuda = torch.cuda.is_available() and t.device != "cpu"
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda: no CUDA device is available")
    if not use_cuda:
        # accelerate imports DeepSpeed whenever it is installed (unwrap_model, save_state), and DeepSpeed
        # then warns that it found no GPU; on the CPU that is known.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    precision = ("bf16" if use_cuda else "fp32") if t.precision == "auto" else t.precision
    kwargs = {}
    if not use_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # accelerate leaves the backend unset without CUDA; several CPU processes need gloo.
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    # cpu=True would make accelerate ignore the DeepSpeed plugin; without CUDA the device is the CPU anyway.
    cpu = not use_cuda and t.strategy != "deepspeed"
    return Accelerator(cpu=cpu, mixed_precision="bf16" if precision == "bf16" else "no",
                       gradient_accumulation_steps=t.grad_accum, **strategy_plugins(t), **kwargs)


def strategy_plugins(t) -> dict:
    """Keyword arguments of ``Accelerator`` for ``trainer.strategy`` (only DeepSpeed needs a plugin)."""
    if t.strategy == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        return {"deepspeed_plugin": DeepSpeedPlugin(zero_stage=t.zero_stage, gradient_accumulation_steps=t.grad_accum,
                                                    gradient_clipping=t.grad_clip)}
    return {}


def decoder_blocks(model: nn.Module) -> list:
    """The model's decoder blocks: modules named in ``_no_split_modules``, else its gradient-checkpointing
    layers (every block of ParaRNN, Llama and Mamba2 is one), outermost only."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        found = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    inner = {id(sub) for m in found for sub in m.modules() if sub is not m}
    blocks = [m for m in found if id(m) not in inner]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no decoder blocks to shard (no module named in "
                         f"_no_split_modules={sorted(names)} and no GradientCheckpointingLayer)")
    return blocks


def _process_group(accelerator):
    """The default process group; a one-rank group is created when the run has a single process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if accelerator.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist


def shard(accelerator, model: nn.Module, t) -> nn.Module:
    """FSDP2 (``trainer.strategy=fsdp2``): ``fully_shard`` every decoder block, then the root. Call it
    before building the optimizer (sharding replaces the parameters). Other strategies: unchanged.
    First checks that the launcher's accelerate settings do not contradict the strategy."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if t.strategy == "deepspeed" and kind != DistributedType.DEEPSPEED:
        raise ConfigError(f"trainer.strategy=deepspeed but accelerate runs {kind.value} (ACCELERATE_USE_CPU=true "
                          f"disables DeepSpeed: unset it)")
    if t.strategy != "deepspeed" and kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise ConfigError(f"trainer.strategy={t.strategy} but the launcher enabled accelerate's {kind.value}: the "
                          f"strategy comes from trainer= only (drop --use_fsdp / --use_deepspeed)")
    if t.strategy != "fsdp2":
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist = _process_group(accelerator)
    model.to(accelerator.device)
    # Every rank built the model from the same seed; rank 0's copy is broadcast anyway, so the shards
    # are slices of one model whatever the devices' RNGs did.
    for tensor in model.state_dict().values():
        dist.broadcast(tensor.data, src=0)
    mesh = init_device_mesh(accelerator.device.type, (dist.get_world_size(),))
    bf16 = accelerator.mixed_precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by the backward pass: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def prepare(accelerator, model: nn.Module, optimizer, t, micro_batch: int):
    """``accelerator.prepare`` for single / ddp / deepspeed; an FSDP2 model and its optimizer as they are."""
    if t.strategy == "fsdp2":
        return model, optimizer
    if t.strategy == "deepspeed":
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
    return accelerator.prepare(model, optimizer)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def plain_model(model: nn.Module) -> nn.Module:
    """The model class behind FSDP2's wrapper class (``FSDPParaRNNForCausalLM`` -> ``ParaRNNForCausalLM``)
    as a parameterless (meta) instance with the same config, for ``save_pretrained``."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule) and issubclass(c, nn.Module))
    with torch.device("meta"):
        return cls(model.config)


def full_state_dict(accelerator, model: nn.Module) -> dict:
    """The whole model's fp32 state dict on the main process (an empty dict elsewhere), from a plain,
    DDP, FSDP2 or DeepSpeed model. Collective: every rank must call it."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if engine is not None:
        # The fp32 master weights (a bf16 run's module parameters are bf16 copies).
        from deepspeed.utils import safe_get_full_fp32_param

        module = accelerator.unwrap_model(model)
        state = {}
        for name, param in module.named_parameters():
            full = safe_get_full_fp32_param(param)
            if accelerator.is_main_process:
                state[name] = full.detach().cpu()
        if accelerator.is_main_process:
            persistent = set(module.state_dict())
            state.update({name: buf.detach().cpu() for name, buf in module.named_buffers() if name in persistent})
        return state
    state = accelerator.get_state_dict(model)
    return state if accelerator.is_main_process else {}


class ShardedState:
    """Model and optimizer of an FSDP2 run as one DCP directory: each rank writes and reads its own
    shards; a checkpoint loads on any world size (DCP reshards on load)."""

    def __init__(self, model: nn.Module, optimizer):
        self.model, self.optimizer = model, optimizer

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=directory)

    def load(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def sharded_state(model: nn.Module, optimizer, t):
    """What :class:`training.checkpoint.Checkpointer` saves besides accelerate's state: FSDP2's
    model and optimizer shards (accelerate does not know that model); ``None`` for other strategies."""
    return ShardedState(model, optimizer) if t.strategy == "fsdp2" else None

