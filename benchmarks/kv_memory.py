"""How many tokens fit in a KV-cache budget, per format: pools really allocated (on the CPU), bytes counted from
their tensors, not from a formula.

    python benchmarks/kv_memory.py --budget-mib 1024 --json benchmarks/results/kv_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import atom_lab  # noqa: E402,F401

import torch  # noqa: E402

from atom_lab.kv_cache import KVFormat, PagePool  # noqa: E402

SHAPES = {"smollm2-135m (30 x 3 KV heads x 64)": (30, 3, 64), "llama-2-7b (32 x 32 x 128)": (32, 32, 128),
          "mistral-7b (32 x 8 x 128)": (32, 8, 128)}
FORMATS = [KVFormat(bits=16, dtype=torch.float16), KVFormat(bits=8), KVFormat(bits=4),
           KVFormat(bits=4, group_size=32), KVFormat(bits=4, group_size=16)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-mib", type=int, default=1024)
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    budget = args.budget_mib * 2**20
    rows = []
    print(f"{'model':38s} {'format':24s} {'B/token':>8s} {'pages':>7s} {'tokens':>9s} {'allocated MiB':>13s} "
          f"{'x fp16':>6s}")
    for model, (L, H, D) in SHAPES.items():
        base = None
        for fmt in FORMATS:
            pool = PagePool(L, H, D, fmt, page_size=args.page_size, budget_bytes=budget, device="cpu")
            tokens = pool.capacity_tokens
            base = base or tokens
            rows.append(dict(model=model, format=fmt.name, bytes_per_token=pool.bytes_per_token,
                             pages=pool.num_pages, tokens=tokens, allocated_bytes=pool.nbytes,
                             tokens_vs_fp16=tokens / base))
            print(f"{model:38s} {fmt.name:24s} {pool.bytes_per_token:8.0f} {pool.num_pages:7d} {tokens:9d} "
                  f"{pool.nbytes / 2**20:13.1f} {tokens / base:6.2f}")
            del pool
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "budget_bytes": budget,
                       "page_size": args.page_size, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
