"""The parallelism strategy of ``trainer.strategy`` as accelerate plugins.

``single`` and ``ddp`` need no plugin: accelerate picks DDP when launched with several processes.
"""


def strategy_plugins(t) -> dict:
    if t.strategy == "fsdp2":
        from accelerate.utils import FullyShardedDataParallelPlugin

        return {"fsdp_plugin": FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
            activation_checkpointing=t.gradient_checkpointing, state_dict_type="SHARDED_STATE_DICT")}
    if t.strategy == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        return {"deepspeed_plugin": DeepSpeedPlugin(zero_stage=3, gradient_accumulation_steps=t.grad_accum,
                                                    gradient_clipping=t.grad_clip)}
    return {}
