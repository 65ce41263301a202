"""Issue 15: choose the W4A4 layer format on the CALIBRATION split only, before any test-split run.

Each candidate changes the atom preset's W4A4 layers (groups of 64, 128 INT8 keepers, clip 0.85 / 0.9, GPTQ damp
0.01) in one generic way: keepers proportional to each layer's input width, activation/weight groups of 32 (for
down_proj only, or everywhere), GPTQ damping. The model is quantized with GPTQ on the first --calib-tokens tokens of
wiki/calibration (4,096 here, a quarter of the final recipe's 16,384, to afford ~2.7 min per candidate on one CPU
thread), and scored on wiki/calibration windows 8-9 of 2,048 tokens (the tokens after the final recipe's 16,384
calibration tokens, the windows benchmarks/ablation_kv4.py selects its KV format on) with the KV format that
selection chose (KIVI: INT4 keys per channel over 32 tokens, post-RoPE; values per token per head), through
simulate_kv, reference backend, float32. The test split is never read. Bits per weight are the stored bytes of the
decoder's linear layers (INT4 nibbles, INT8 keepers, float16 scales, the reorder index) per weight.

Candidates that change one kind of layer only (down_proj, the one input 1536 wide on SmolLM2) are written as
overrides per input width (`per_width`), applied to the config handed to QuantLinear.from_linears; a proportional
keeper count is the library's AtomConfig.keeper_fraction (0.2: 128 of 576, 320 of 1536).

    OMP_NUM_THREADS=1 python -m benchmarks.ablation_w4a4_select --calib-tokens 4096 \
        --candidates atom,keep320_down,g32_down --json benchmarks/results/ablation_smollm2_w4a4_select.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

import atom_lab
import atom_lab.recipe as R
from atom_lab.eval import eval_windows, window_nll
from atom_lab.kv_cache import KVFormat
from atom_lab.paged_model import simulate_kv
from atom_lab.recipe import model_size_report, quantize_model

KV = KVFormat(bits=4, key_tokens=32, rope="post")  # chosen on the same windows by benchmarks/ablation_kv4.py
# name: (fields changed in every layer, {input width: fields changed in layers of that width only})
CANDIDATES = {
    "atom": ({}, {}),
    "keep320_down": ({}, {1536: dict(keeper=320)}),
    "keep384_down": ({}, {1536: dict(keeper=384)}),
    "g32_down": ({}, {1536: dict(group_size=32)}),
    "keep320_down_g32_down": ({}, {1536: dict(keeper=320, group_size=32)}),
    "g32_all": (dict(group_size=32), {}),
    "g32_all_keep320_down": (dict(group_size=32), {1536: dict(keeper=320)}),
    "damp0.1": (dict(gptq_damp=0.1), {}),
}
PER_WIDTH: dict[int, dict] = {}  # the running candidate's per-width overrides
_from_linears = R.QuantLinear.from_linears.__func__


def _from_linears_per_width(cls, linears, config, *args, **kwargs):
    changes = PER_WIDTH.get(linears[0].in_features)
    return _from_linears(cls, linears, config.replace(**changes) if changes else config, *args, **kwargs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--select-from", type=int, default=16384, help="selection windows start after these tokens")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--json", required=True, help="read and extended: rows already there are kept")
    args = ap.parse_args(argv)
    names = args.candidates.split(",")
    bad = [n for n in names if n not in CANDIDATES]
    if bad:
        raise SystemExit(f"unknown candidate(s) {bad}; known: {', '.join(CANDIDATES)}")
    R.QuantLinear.from_linears = classmethod(_from_linears_per_width)
    torch.manual_seed(0)
    float_model, tok = atom_lab.load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    calib = atom_lab.load_corpus("wiki")["calibration"]["text"]
    skip = args.select_from // 2048
    sel = eval_windows(tok, calib, 2048, skip + 2)[skip:]
    n_pred = sel.shape[0] * 2047
    path = Path(args.json)
    out = json.loads(path.read_text()) if path.exists() else {}
    out.update({"protocol": {"model": "smollm2-135m",
                             "calibration": f"wiki/calibration, first {args.calib_tokens} tokens in windows of 512, "
                                            "GPTQ",
                             "selection": f"wiki/calibration windows {skip}..{skip + 1} of 2048 tokens",
                             "kv": KV.name, "backend": "reference (float32), KV by simulate_kv"},
                "environment": atom_lab.environment()})
    rows = out.setdefault("candidates", {})
    if "float_ppl" not in out:
        out["float_ppl"] = math.exp(window_nll(float_model, sel, progress=False).sum().item() / n_pred)
    out.setdefault("commands", []).append("python -m benchmarks.ablation_w4a4_select " + " ".join(sys.argv[1:]))
    base = atom_lab.AtomConfig.preset("atom", kv_bits=16)
    for name in names:
        every, per_width = CANDIDATES[name]
        PER_WIDTH.clear()
        PER_WIDTH.update(per_width)
        t = time.time()
        model = quantize_model(copy.deepcopy(float_model), base.replace(**every), calibration=calib, tokenizer=tok,
                               progress=False, n_tokens=args.calib_tokens, seq_len=512)
        quant_s = time.time() - t
        size = model_size_report(model)
        t = time.time()
        with simulate_kv(model, KV):
            p = math.exp(window_nll(model, sel, progress=False).sum().item() / n_pred)
        bits = round(8 * size["stored_bytes"] / (size["fp16_bytes"] // 2), 4)
        rows[f"{name}@{args.calib_tokens}"] = {
            "ppl": p, "x_float": p / out["float_ppl"], "bits_per_weight": bits, "every_layer": every,
            "per_width": {str(k): v for k, v in per_width.items()}, "quantize_s": round(quant_s, 1),
            "eval_s": round(time.time() - t, 1)}
        out["rule"] = "lowest perplexity on the selection windows (to 2 decimals; a tie goes to fewer bits per weight)"
        out["chosen"] = min(rows, key=lambda k: (round(rows[k]["ppl"], 2), rows[k]["bits_per_weight"]))
        path.write_text(json.dumps(out, indent=1))
        print(f"{name:28s} ppl {p:8.3f} x {p / out['float_ppl']:.4f} bits/weight {bits:.4f} "
              f"({quant_s:.0f} s + {time.time() - t:.0f} s)", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
