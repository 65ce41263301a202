"""KV-cache formats on SmolLM2 / wiki: perplexity through the real paged cache next to the float simulation of the
same format (simulate_kv), for the float model and a W4A4 model (atom preset layers with kv_bits=16, so the cache
does all the KV quantization; GPTQ with --gptq, as in the ablation).

Protocol: atom_lab.eval (non-overlapping windows of --seq-len tokens of the wiki test split, each window
teacher-forced independently: one prefill step through the cache; with a float window, each query sees what decode
would have shown it). The ablation's protocol is --windows 8 --seq-len 2048 --gptq (calibration 16,384 tokens of
the calibration split in windows of 512). The JSON is rewritten after every row, so a cut-short run keeps its rows.

    python benchmarks/kv_accuracy.py --windows 8 --seq-len 2048 --gptq --json benchmarks/results/kv_accuracy_w8.json
"""
from __future__ import annotations

import argparse
import copy
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

FORMATS = [KVFormat(bits=16, dtype=torch.float16),                                        # 0
           KVFormat(bits=8), KVFormat(bits=8, rope="post"),                               # 1, 2
           KVFormat(bits=4), KVFormat(bits=4, rope="post"),                               # 3, 4  Atom's
           KVFormat(bits=4, group_size=32), KVFormat(bits=4, group_size=32, rope="post"),  # 5, 6
           KVFormat(bits=4, group_size=16), KVFormat(bits=4, group_size=16, rope="post"),  # 7, 8
           KVFormat(bits=4, key_tokens=32), KVFormat(bits=4, key_tokens=32, rope="post"),  # 9, 10 KIVI keys
           KVFormat(bits=4, key_tokens=32, window=128, rope="post"),                      # 11 KIVI (keys + window)
           KVFormat(bits=4, window=128, rope="post")]                                     # 12 window only


def ppl_of(nll, windows):
    return math.exp(nll.sum().item() / (windows.shape[0] * (windows.shape[1] - 1)))


def row_for(model, label, fmt, windows, simulate, log):
    t = time.time()
    kw = dict(max_seqs=1) if fmt.has_window else {}
    pool = PagePool.for_model(model, fmt, page_size=32, num_pages=-(-windows.shape[1] // 32), **kw)
    real = ppl_of(PagedDecoder(model, pool, kernels="reference").window_nll(windows), windows)
    sim = None
    if simulate:
        with simulate_kv(model, fmt):
            sim = ppl_of(window_nll(model, windows, progress=False), windows)
    row = dict(model=label, format=fmt.name, bits=fmt.bits, group_size=fmt.group_size, rope=fmt.rope,
               key_tokens=fmt.key_tokens, window=fmt.window, ppl_cache=real, ppl_simulated=sim,
               bytes_per_token=pool.bytes_per_token,
               bytes_per_token_quantized=pool.bytes_per_page / pool.page_size, seconds=time.time() - t)
    log(f"{label:6s} {fmt.name:48s} cache {real:8.3f}  simulated {'-' if sim is None else f'{sim:8.3f}'}  "
        f"{row['bytes_per_token_quantized']:7.0f} B/token  ({row['seconds']:.0f} s)")
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--models", default="float,w4a4", help="float and/or w4a4 (atom preset layers, kv_bits=16)")
    ap.add_argument("--gptq", action="store_true", help="GPTQ for the w4a4 layers (the ablation's atom preset)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--formats", default=None, help="comma-separated indices into FORMATS (default: all)")
    ap.add_argument("--simulate", default="all", help="indices into FORMATS that also get the float simulation "
                    "(default all; 'none')")
    ap.add_argument("--json", default=None)
    ap.add_argument("--load-quantized", default=None, help="a directory written by atom_lab.save_quantized with the "
                    "same W4A4 config and calibration (e.g. benchmarks/ablation_kv4.py --cache): load it instead of "
                    "quantizing (2,051 s on a 2-core CPU)")
    ap.add_argument("--baseline-from", default=None, help="a JSON of an earlier run at the same protocol: reuse its "
                    "float model's no-KV perplexity instead of recomputing it (541 s at 8 x 2048 on a 2-core CPU)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = atom_lab.load_model("smollm2-135m", dtype=torch.float32)
    corpus = atom_lab.load_corpus("wiki")
    windows = eval_windows(tok, corpus["test"]["text"], args.seq_len, args.windows)
    idx = [int(i) for i in args.formats.split(",")] if args.formats else list(range(len(FORMATS)))
    sim_idx = set(idx if args.simulate == "all" else [] if args.simulate == "none" else
                  [int(i) for i in args.simulate.split(",")])
    out = {"command": "python " + " ".join(sys.argv), "windows": args.windows, "seq_len": args.seq_len,
           "protocol": "wiki test split, non-overlapping windows, each teacher-forced through the cache in one "
                       "prefill step (reference kernels); ppl_simulated: the HF model with the format "
                       "fake-quantized (simulate_kv)", "no_kv_quant": {}, "rows": [],
           "environment": atom_lab.environment()}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    t0 = time.time()
    if args.baseline_from:
        with open(args.baseline_from) as f:
            prev = json.load(f)
        if (prev["windows"], prev["seq_len"]) != (args.windows, args.seq_len):
            raise ValueError(f"--baseline-from {args.baseline_from} has windows={prev['windows']}, seq_len="
                             f"{prev['seq_len']}: use a run of the same protocol or drop --baseline-from.")
        out["no_kv_quant"].update(prev["no_kv_quant"])
        out["baseline_from"] = args.baseline_from
    else:
        out["no_kv_quant"]["float"] = ppl_of(window_nll(model, windows, progress=False), windows)
    print(f"float model, no KV quantization: {out['no_kv_quant']['float']:.3f} ({time.time() - t0:.0f} s)",
          flush=True)
    models = args.models.split(",")
    if "w4a4" in models:  # first: the row the chapter is about (a copy: quantize_model works in place)
        t = time.time()
        cfg = atom_lab.AtomConfig.preset("atom", gptq=args.gptq, kv_bits=16,
                                         name=f"atom ({'GPTQ' if args.gptq else 'RTN'}), KV in the cache")
        if args.load_quantized:
            qmodel, _ = atom_lab.load_quantized(args.load_quantized, device="cpu", backend="reference")
            if {k: v for k, v in vars(qmodel.atom_config).items() if k != "name"} != \
                    {k: v for k, v in vars(cfg).items() if k != "name"}:
                raise ValueError(f"--load-quantized {args.load_quantized} holds config {qmodel.atom_config}, not "
                                 f"{cfg}: quantize it with the same preset or drop --load-quantized.")
            out["loaded_from"] = args.load_quantized
        else:
            qmodel = atom_lab.quantize_model(copy.deepcopy(model), cfg, calibration=corpus["calibration"]["text"],
                                             tokenizer=tok, progress=False, n_tokens=args.calib_tokens,
                                             seq_len=args.calib_seq_len)
        out["w4a4_config"] = cfg.name
        out["calibration"] = f"wiki/calibration, {args.calib_tokens} tokens in windows of {args.calib_seq_len}"
        if "w4a4" not in out["no_kv_quant"]:
            out["no_kv_quant"]["w4a4"] = ppl_of(window_nll(qmodel, windows, progress=False), windows)
        print(f"w4a4 model ({cfg.name}, quantized in {time.time() - t:.0f} s), no KV quantization: "
              f"{out['no_kv_quant']['w4a4']:.3f}", flush=True)
        save()
        for i in idx:
            out["rows"].append(row_for(qmodel, "w4a4", FORMATS[i], windows, i in sim_idx, print))
            save()
        del qmodel
    if "float" in models:
        for i in idx:
            out["rows"].append(row_for(model, "float", FORMATS[i], windows, i in sim_idx, print))
            save()
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
