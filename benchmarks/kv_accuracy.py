"""KV-cache formats on SmolLM2 / wiki: perplexity through the real paged cache next to the float simulation of the
same format (simulate_kv), for the float model and optionally a W4A4 model (atom preset layers, kv_bits=16 in the
layers: the cache does the KV quantization).

Protocol: atom_lab.eval (non-overlapping windows of --seq-len tokens of the wiki test split, each window
teacher-forced independently: one prefill step through the cache, attention over K/V as stored).

    python benchmarks/kv_accuracy.py --windows 4 --seq-len 512 --json benchmarks/results/kv_accuracy_smollm2.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import atom_lab  # noqa: E402

import torch  # noqa: E402

from atom_lab.eval import eval_windows, window_nll  # noqa: E402
from atom_lab.kv_cache import KVFormat, PagePool  # noqa: E402
from atom_lab.paged_model import PagedDecoder, simulate_kv  # noqa: E402

FORMATS = [KVFormat(bits=16, dtype=torch.float16), KVFormat(bits=8), KVFormat(bits=8, rope="post"),
           KVFormat(bits=4), KVFormat(bits=4, rope="post"), KVFormat(bits=4, group_size=32),
           KVFormat(bits=4, group_size=32, rope="post"), KVFormat(bits=4, group_size=16),
           KVFormat(bits=4, group_size=16, rope="post")]


def rows_for(model, label, windows, log):
    rows = []
    n_tok = windows.shape[0] * (windows.shape[1] - 1)
    for fmt in FORMATS:
        t = time.time()
        pool = PagePool.for_model(model, fmt, page_size=32, num_pages=-(-windows.shape[1] // 32))
        real = math.exp(PagedDecoder(model, pool, kernels="reference").window_nll(windows).sum().item() / n_tok)
        with simulate_kv(model, fmt):
            sim = math.exp(window_nll(model, windows, progress=False).sum().item() / n_tok)
        rows.append(dict(model=label, format=fmt.name, bits=fmt.bits, group_size=fmt.group_size, rope=fmt.rope,
                         ppl_cache=real, ppl_simulated=sim, bytes_per_token=pool.bytes_per_token))
        log(f"{label:10s} {fmt.name:32s} cache {real:8.3f}  simulated {sim:8.3f}  {pool.bytes_per_token:7.0f} B/token"
            f"  ({time.time() - t:.0f} s)")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--models", default="float,w4a4", help="float and/or w4a4 (atom preset layers, RTN: no GPTQ "
                    "on the CPU, kv_bits=16 in the layers)")
    ap.add_argument("--formats", default=None, help="comma-separated indices into FORMATS (default: all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    model, tok = atom_lab.load_model("smollm2-135m", dtype=torch.float32)
    corpus = atom_lab.load_corpus("wiki")
    windows = eval_windows(tok, corpus["test"]["text"], args.seq_len, args.windows)
    base = math.exp(window_nll(model, windows, progress=False).sum().item() / (windows.numel() - windows.shape[0]))
    print(f"float model, no KV quantization: {base:.3f}")
    global FORMATS
    if args.formats:
        FORMATS = [FORMATS[int(i)] for i in args.formats.split(",")]
    models = args.models.split(",")
    rows = rows_for(model, "float", windows, print) if "float" in models else []
    if "w4a4" in models:
        cfg = atom_lab.AtomConfig.preset("atom", gptq=False, kv_bits=16, name="atom (RTN), KV in the cache")
        qmodel = atom_lab.quantize_model(model, cfg, calibration=corpus["calibration"]["text"], tokenizer=tok,
                                         progress=False, n_tokens=2048)
        nll = window_nll(qmodel, windows, progress=False).sum().item()
        print(f"w4a4 model, no KV quantization: {math.exp(nll / (windows.numel() - windows.shape[0])):.3f}")
        rows += rows_for(qmodel, "w4a4", windows, print)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "windows": args.windows, "seq_len": args.seq_len,
                       "float_no_kv_quant": base, "rows": rows, "environment": atom_lab.environment()}, f, indent=1)


if __name__ == "__main__":
    main()
