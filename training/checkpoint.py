"""Checkpoints under ``run_dir/checkpoints/step_NNNNNNN``: written atomically, verified on load.

A checkpoint is first written to a ``.tmp`` directory (model, optimizer, scheduler, RNG and custom
state through ``accelerate``'s ``save_state``; an FSDP2 model and optimizer as a DCP directory, see
:mod:`training.distributed`; one data-stream state per rank), then a manifest listing every file and
its size and SHA-256, then renamed into place. Loading takes the newest checkpoint whose files all
match their manifest entries, by content; a partial or corrupted one is skipped with a warning that
names the file, and the previous complete one is used (``python -m eval.export`` does the same).
Only the last ``keep_last`` checkpoints are kept.

Hashing costs one read of the checkpoint at save and one at load, files in parallel threads (hashlib
releases the GIL): ``benchmarks/bench_checksum.py`` measures it (numbers in ``benchmarks/RESULTS.md``).

A checkpoint written by another number of processes restores model, optimizer, schedule and progress
(single, DDP and FSDP2 checkpoints reshard; DeepSpeed ZeRO ones refuse) and restarts the data streams
from the beginning of the training data, with a warning: per-rank data positions do not map to
another world size.
"""
import hashlib
import json
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from accelerate.utils import DistributedType

from training.common import ConfigError
from training.distributed import SHARDED_DIR

MANIFEST = "manifest.json"


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:07d}")


def sha256_file(path: str, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _listing(path: str) -> list[str]:
    """Every file under ``path`` but the manifest, relative to it."""
    names = []
    for base, _, files in os.walk(path):
        names += [os.path.relpath(os.path.join(base, name), path) for name in files]
    return sorted(n for n in names if n != MANIFEST)


def _hash_all(path: str, names: list[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(1, len(names)))) as pool:
        return list(pool.map(lambda rel: sha256_file(os.path.join(path, rel)), names))


def manifest_files(path: str) -> dict:
    """``{relative path: {"size": bytes, "sha256": hex}}`` for every file of a checkpoint directory."""
    names = _listing(path)
    return {rel: {"size": os.path.getsize(os.path.join(path, rel)), "sha256": digest}
            for rel, digest in zip(names, _hash_all(path, names))}


def verify(path: str) -> str | None:
    """None if the checkpoint at ``path`` is complete and intact, else why not (one line, naming the file):
    no or unreadable manifest, a listed file missing, of another size, or with another SHA-256. Manifests
    from before checksums (sizes only) are checked by size."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} unreadable ({type(err).__name__})"
    hashed = []
    for rel, entry in files.items():
        full = os.path.join(path, rel)
        size = entry["size"] if isinstance(entry, dict) else entry
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, the manifest says {size}"
        if isinstance(entry, dict):
            hashed.append(rel)
    for rel, digest in zip(hashed, _hash_all(path, hashed)):
        if digest != files[rel]["sha256"]:
            return f"{rel} is corrupted (its SHA-256 differs from the manifest's)"
    return None


def is_complete(path: str) -> bool:
    """True if ``path`` has a manifest and every file it lists, with the listed size and checksum."""
    return verify(path) is None


def list_checkpoints(root: str) -> list:
    """Checkpoint directories under ``root``, oldest first (complete or not)."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and not n.endswith(".tmp"))
    return [os.path.join(root, n) for n in names]


class Checkpointer:
    """``sharded``: an extra component with ``save(dir)`` / ``load(dir)`` for state accelerate does not
    hold (FSDP2's model and optimizer: :func:`training.distributed.sharded_state`), or None."""

    def __init__(self, accelerator, root: str, keep_last: int, sharded=None):
        self.accelerator, self.root, self.keep_last, self.sharded = accelerator, root, keep_last, sharded

    def latest(self) -> str | None:
        """The newest complete checkpoint; newer incomplete ones are reported and skipped. Chosen by the
        main process and broadcast, so every rank loads the same one."""
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            return broadcast_object_list([self._latest() if acc.is_main_process else None], from_process=0)[0]
        return self._latest()

    def _latest(self) -> str | None:
        for path in reversed(list_checkpoints(self.root)):
            problem = verify(path)
            if problem is None:
                return path
            warnings.warn(f"checkpoint {path} is incomplete or corrupted: {problem}; falling back to an older one",
                          stacklevel=2)
        return None

    def save(self, step: int, data_state: dict) -> str:
        acc = self.accelerator
        final = _step_dir(self.root, step)
        tmp = final + ".tmp"
        if acc.is_main_process and os.path.exists(tmp):
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        if self.sharded is not None:
            self.sharded.save(os.path.join(tmp, SHARDED_DIR))
        torch.save(data_state, os.path.join(tmp, f"data_rank{acc.process_index}.pt"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump({"step": step, "world_size": acc.num_processes, "files": manifest_files(tmp)}, f, indent=1)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: str, stream) -> None:
        """Restore everything registered with the accelerator (and ``sharded``), and ``stream``'s position."""
        acc = self.accelerator
        with open(os.path.join(path, MANIFEST)) as f:
            saved_world = json.load(f).get("world_size", acc.num_processes)
        if saved_world != acc.num_processes and acc.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError(f"{path} was written by {saved_world} processes; DeepSpeed ZeRO checkpoints resume "
                              f"only on the same number of processes (now {acc.num_processes})")
        acc.load_state(path)
        if self.sharded is not None:
            self.sharded.load(os.path.join(path, SHARDED_DIR))
        if saved_world != acc.num_processes:
            if acc.is_main_process:
                warnings.warn(f"{path} was written by {saved_world} processes, resumed on {acc.num_processes}: "
                              f"model, optimizer and schedule are restored; the data streams restart from the "
                              f"beginning of the training data (per-rank positions do not map to another world size)",
                              stacklevel=2)
            return
        stream.load_state_dict(torch.load(os.path.join(path, f"data_rank{acc.process_index}.pt"), weights_only=False))
