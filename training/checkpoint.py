"""Checkpoints under ``run_dir/checkpoints/step_NNNNNNN``: written atomically, verified on load.

A checkpoint is first written to a ``.tmp`` directory (model, optimizer, scheduler, RNG and custom
state through ``accelerate``'s ``save_state``, plus one data-stream state per rank), then a manifest
listing every file and its size, then renamed into place. Loading takes the newest checkpoint whose
manifest matches its files; a partial or corrupted one is skipped with a warning. Only the last
``keep_last`` checkpoints are kept.
"""
import json
import os
import shutil
import warnings
from typing import Optional

import torch

MANIFEST = "manifest.json"


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:07d}")


def _files(path: str) -> dict:
    sizes = {}
    for base, _, names in os.walk(path):
        for name in names:
            full = os.path.join(base, name)
            rel = os.path.relpath(full, path)
            if rel != MANIFEST:
                sizes[rel] = os.path.getsize(full)
    return sizes


def is_complete(path: str) -> bool:
    """True if ``path`` has a manifest and every file it lists, with the listed size."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
        return all(os.path.getsize(os.path.join(path, rel)) == size for rel, size in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def list_checkpoints(root: str) -> list:
    """Checkpoint directories under ``root``, oldest first (complete or not)."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and not n.endswith(".tmp"))
    return [os.path.join(root, n) for n in names]


class Checkpointer:
    def __init__(self, accelerator, root: str, keep_last: int):
        self.accelerator, self.root, self.keep_last = accelerator, root, keep_last

    def latest(self) -> Optional[str]:
        """The newest complete checkpoint; newer incomplete ones are reported and skipped."""
        for path in reversed(list_checkpoints(self.root)):
            if is_complete(path):
                return path
            warnings.warn(f"checkpoint {path} is incomplete or corrupted; falling back to an older one")
        return None

    def save(self, step: int, data_state: dict) -> str:
        acc = self.accelerator
        final = _step_dir(self.root, step)
        tmp = final + ".tmp"
        if acc.is_main_process and os.path.exists(tmp):
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        torch.save(data_state, os.path.join(tmp, f"data_rank{acc.process_index}.pt"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump({"step": step, "world_size": acc.num_processes, "files": _files(tmp)}, f, indent=1)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: str) -> dict:
        """Restore everything registered with the accelerator; returns this rank's data-stream state."""
        acc = self.accelerator
        acc.load_state(path)
        data_file = os.path.join(path, f"data_rank{acc.process_index}.pt")
        if not os.path.exists(data_file):
            raise RuntimeError(f"{path} has no data state for rank {acc.process_index}: it was written with a "
                               f"different world size; resume on the same number of processes")
        return torch.load(data_file, weights_only=False)
