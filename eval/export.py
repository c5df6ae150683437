"""Export a model to a Hugging Face directory (safetensors, config, tokenizer).

At the end of training ``train.py`` calls :func:`export_hf` on the live model. For any checkpoint:

    python -m eval.export RUN_DIR                       # newest complete checkpoint -> RUN_DIR/hf
    python -m eval.export RUN_DIR --checkpoint RUN_DIR/checkpoints/step_0000200 --out /tmp/hf

Transformer and Mamba2 exports load with plain transformers; ParaRNN exports carry their modeling
code (pure torch) and load with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.
Sharded checkpoints (FSDP2's DCP directory ``model_optim/``, DeepSpeed ZeRO's ``pytorch_model/``) are
consolidated into one fp32 state dict first, on the CPU, without any process group.
"""
import argparse
import os
import sys
import warnings

import torch

from training.distributed import SHARDED_DIR


def export_hf(accelerator, model, tokenizer, out_dir: str) -> None:
    """Save the (possibly sharded or wrapped) training model as an HF directory, on the main process."""
    from training.distributed import full_state_dict, is_sharded, plain_model

    state_dict = full_state_dict(accelerator, model)  # gathers shards; every rank must call it
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        if is_sharded(model):  # save_pretrained needs the model class, not FSDP's wrapper class
            model = plain_model(model)
            model.load_state_dict(state_dict, assign=True)
        save_hf(model, state_dict, tokenizer, out_dir)
    accelerator.wait_for_everyone()


def save_hf(model, state_dict: dict, tokenizer, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def load_checkpoint_state(checkpoint: str) -> dict:
    """The full model state dict of a checkpoint written by ``train.py``, whatever the strategy."""
    from safetensors.torch import load_file

    single = os.path.join(checkpoint, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    dcp_dir = os.path.join(checkpoint, SHARDED_DIR)
    if os.path.isdir(dcp_dir):  # FSDP2: read only the model's entries of the DCP checkpoint
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
            return _load_state_dict_from_keys({"model"}, checkpoint_id=dcp_dir)["model"]
    if os.path.isdir(os.path.join(checkpoint, "pytorch_model")):  # DeepSpeed ZeRO: fp32 master weights
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag="pytorch_model")
    raise FileNotFoundError(f"{checkpoint}: no model weights found (model.safetensors, {SHARDED_DIR}/ "
                            f"or pytorch_model/)")


def export_checkpoint(run_dir: str, checkpoint: str | None = None, out_dir: str | None = None) -> str:
    from omegaconf import OmegaConf

    from data.pipeline import load_tokenizer
    from models.registry import build_model
    from training.checkpoint import Checkpointer

    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: is {run_dir} a run directory of train.py?")
    cfg = OmegaConf.load(config_path)
    if checkpoint is None:
        checkpoint = Checkpointer(None, os.path.join(run_dir, "checkpoints"), 1).latest()
        if checkpoint is None:
            raise FileNotFoundError(f"{run_dir}/checkpoints has no complete checkpoint")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    with torch.device("meta"):
        model = build_model(cfg.model.arch, OmegaConf.to_container(cfg.model.config), len(tokenizer))
    state_dict = load_checkpoint_state(checkpoint)
    model.load_state_dict(state_dict, assign=True)
    out_dir = out_dir or os.path.join(run_dir, "hf")
    save_hf(model, state_dict, tokenizer, out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--checkpoint", default=None, help="checkpoint dir (default: newest complete one)")
    parser.add_argument("--out", default=None, help="output dir (default: RUN_DIR/hf)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.run_dir, args.checkpoint, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"exported to {out}")


if __name__ == "__main__":
    main()
