"""Export a model to a Hugging Face directory (safetensors, config, tokenizer).

At the end of training ``train.py`` calls :func:`export_hf` on the live model. For any checkpoint:

    python -m eval.export RUN_DIR                       # newest complete checkpoint -> RUN_DIR/hf
    python -m eval.export RUN_DIR --checkpoint RUN_DIR/checkpoints/step_0000200 --out /tmp/hf

Transformer and Mamba2 exports load with plain transformers; ParaRNN exports carry their modeling
code (pure torch) and load with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.
Load the tokenizer the same way, ``AutoTokenizer.from_pretrained(dir, trust_remote_code=True)``: transformers
reads the config (and its ``auto_map``) for the tokenizer too, and without the flag asks "Do you wish to run
the custom code? [y/N]".
Sharded checkpoints (FSDP2's DCP directory ``model_optim/``, DeepSpeed ZeRO's ``pytorch_model/``) are
consolidated into one fp32 state dict first, on the CPU, without any process group.

The newest checkpoint is the newest whose files match their manifest's checksums; a corrupted one is
skipped with a warning naming the file (:mod:`training.checkpoint`). A wrong run directory or checkpoint
fails with one line before torch, transformers or accelerate are imported.
"""
import argparse
import os
import sys
import warnings

from training.common import ConfigError


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

    from training.distributed import SHARDED_DIR

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
    raise ConfigError(f"{checkpoint}: no model weights found (model.safetensors, {SHARDED_DIR}/ "
                            f"or pytorch_model/)")


def check_run_dir(run_dir: str, checkpoint: str | None = None) -> None:
    """Fail with one line, before any heavy import, unless ``run_dir`` is a run of train.py (and
    ``checkpoint``, if given, a directory)."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run directory {run_dir} not found" if not os.path.exists(run_dir) else
                          f"{run_dir} is not a directory (expected a run directory of train.py)")
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise ConfigError(f"{run_dir}/config.yaml not found: is {run_dir} a run directory of train.py?")
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise ConfigError(f"--checkpoint {checkpoint}: not a directory")


def export_checkpoint(run_dir: str, checkpoint: str | None = None, out_dir: str | None = None) -> str:
    check_run_dir(run_dir, checkpoint)
    import torch
    from omegaconf import OmegaConf

    from data.pipeline import load_tokenizer
    from models.registry import build_model
    from training.checkpoint import Checkpointer, verify

    cfg = OmegaConf.load(os.path.join(run_dir, "config.yaml"))
    if checkpoint is None:
        checkpoint = Checkpointer(None, os.path.join(run_dir, "checkpoints"), 1).latest()  # skips corrupted ones
        if checkpoint is None:
            raise ConfigError(f"{run_dir}/checkpoints has no complete checkpoint")
    elif (problem := verify(checkpoint)) is not None:
        raise ConfigError(f"checkpoint {checkpoint} is incomplete or corrupted: {problem} (omit --checkpoint to "
                          f"export the newest intact one)")
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
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"exported to {out}")


if __name__ == "__main__":
    main()
