"""Rebuild the small evaluation slices shipped in ``eval/tasks/data/`` from the full sets.

    python eval/tasks/make_slices.py --src ../shared/data/eval --out eval/tasks/data

Each slice keeps the source's rows unchanged and in their original order:
the first ``--rows`` (50) rows of every validation split; for MMLU the first 2 validation rows
and all 5 dev rows of each of the 57 subjects. Files are gzip'd with mtime 0 (byte-reproducible).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
from collections import defaultdict

# directory under the data root -> split files
SETS = {
    "arc_easy": ["validation"],
    "arc_challenge": ["validation"],
    "hellaswag": ["validation"],
    "piqa": ["validation"],
    "winogrande_xl": ["validation"],
    "openbookqa": ["validation"],
    "boolq": ["validation"],
    "sciq": ["validation"],
    "social_iqa": ["validation"],
    "commonsense_qa": ["validation"],
    "copa": ["validation"],
    "mmlu": ["validation", "dev"],
}
MMLU_ROWS_PER_SUBJECT = {"validation": 2, "dev": 5}


def read_jsonl(path: str) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="../shared/data/eval")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    ap.add_argument("--rows", type=int, default=50)
    args = ap.parse_args()
    for name, splits in SETS.items():
        for split in splits:
            rows = read_jsonl(os.path.join(args.src, name, f"{split}.jsonl.gz"))
            if name == "mmlu":
                per: dict[str, list[dict]] = defaultdict(list)
                for row in rows:
                    per[row["subject"]].append(row)
                keep = [r for subject in per for r in per[subject][: MMLU_ROWS_PER_SUBJECT[split]]]
            else:
                keep = rows[: args.rows]
            write_jsonl(os.path.join(args.out, name, f"{split}.jsonl.gz"), keep)
            print(f"{name}/{split}: {len(keep)} of {len(rows)} rows")


if __name__ == "__main__":
    main()
