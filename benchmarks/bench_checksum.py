"""What the checkpoints' SHA-256 manifest costs: hashing vs writing the same bytes, extrapolated to a 1B model.

    python benchmarks/bench_checksum.py --gib 1 --out /tmp/ck        # CPU only; writes and deletes 2 x 1 GiB

A checkpoint of the ``single``/``ddp`` layout is two big files (``model.safetensors``: fp32 weights,
``optimizer.bin``: AdamW's two fp32 moments), hashed in parallel threads by :func:`training.checkpoint.manifest_files`
at save and by :func:`training.checkpoint.verify` at load. This writes two files of that 1:2 ratio (``--gib``
in total), times their write (with fsync), the manifest's hashing (page cache warm, as right after a save) and
the load-time verification, and extrapolates the per-byte costs to the parameters of ``configs/model/paragru_1b``.
Prints a table last; writes ``checksum.json`` to ``--out``.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def params_of(preset: str) -> int:
    import torch
    import yaml

    from models.registry import build_model

    with open(os.path.join(os.path.dirname(__file__), "..", "configs", "model", f"{preset}.yaml")) as f:
        cfg = yaml.safe_load(f)
    with torch.device("meta"):
        model = build_model(cfg["arch"], cfg["config"], 50257)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="bytes written and hashed in total, GiB")
    parser.add_argument("--preset", default="paragru_1b", help="model preset to extrapolate to")
    parser.add_argument("--dir", default=None, help="where to write the test files (default: a temp dir)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from training.checkpoint import MANIFEST, manifest_files, verify

    total = int(args.gib * (1 << 30))
    sizes = {"model.safetensors": total // 3, "optimizer.bin": total - total // 3}
    chunk = os.urandom(64 << 20)
    with tempfile.TemporaryDirectory(dir=args.dir) as ckpt:
        start = time.perf_counter()
        for name, size in sizes.items():
            with open(os.path.join(ckpt, name), "wb") as f:
                for offset in range(0, size, len(chunk)):
                    f.write(chunk[: min(len(chunk), size - offset)])
                f.flush()
                os.fsync(f.fileno())
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        files = manifest_files(ckpt)
        hash_s = time.perf_counter() - start
        with open(os.path.join(ckpt, MANIFEST), "w") as f:
            json.dump({"files": files}, f)
        start = time.perf_counter()
        assert verify(ckpt) is None
        verify_s = time.perf_counter() - start

    params = params_of(args.preset)
    ckpt_bytes = params * 4 * 3  # fp32 weights + AdamW's exp_avg and exp_avg_sq
    scale = ckpt_bytes / total
    result = {"bytes": total, "write_fsync_s": write_s, "manifest_hash_s": hash_s, "verify_s": verify_s,
              "hash_gb_per_s": total / hash_s / 1e9, "write_gb_per_s": total / write_s / 1e9,
              "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "preset": args.preset, "params": params,
              "preset_ckpt_bytes": ckpt_bytes,
              "preset_hash_s": hash_s * scale, "preset_verify_s": verify_s * scale,
              "preset_write_s": write_s * scale}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "checksum.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"| what | measured on {total / 2**30:.2f} GiB | {args.preset} checkpoint "
          f"({params / 1e9:.2f}B params, {ckpt_bytes / 1e9:.1f} GB) |")
    print("|---|---|---|")
    print(f"| write + fsync | {write_s:.2f} s ({result['write_gb_per_s']:.2f} GB/s) | {write_s * scale:.1f} s |")
    print(f"| SHA-256 manifest at save | {hash_s:.2f} s ({result['hash_gb_per_s']:.2f} GB/s) "
          f"| {hash_s * scale:.1f} s |")
    print(f"| verification at load | {verify_s:.2f} s | {verify_s * scale:.1f} s |")


if __name__ == "__main__":
    main()
