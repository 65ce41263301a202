"""Issue 15's W4A4-KV4 recipe: the atom W4A4 layers (GPTQ, KV left in float in the layers) with the KV format
chosen on the CALIBRATION split only, then measured on the wiki test split (the first 8 windows, the ablation's
protocol, and every window of the split), with KL and top-1 against the float model token by token.

Selection (no test text is read before the choice is made): the W4A4 model is calibrated on the first
--calib-tokens tokens of wiki/calibration; the windows of --seq-len tokens that come AFTER those tokens in the same
split are held out and score each candidate KV format; the lowest perplexity wins. The candidates are 4-bit KV
formats of the paged cache (atom_lab.kv_cache.KVFormat): Atom's INT4 per token per head (pre-RoPE), and KIVI's
keys per channel over groups of 32 tokens (pre- and post-RoPE), values per token in both.

Evaluation: simulate_kv (the float simulation of the cache, equal to the real cache to 3 decimals in the KV
chapter's rows and tests), reference backend, float32 on the CPU. The float model runs outside the simulation (the
simulation patches the attention module both models share). The JSON is rewritten after every test window, so a
run cut short keeps what it measured; --cache keeps the quantized model (save_quantized), so a second run skips
the ~30 minutes of GPTQ.

    OMP_NUM_THREADS=1 python -m benchmarks.ablation_kv4 --cache /tmp/atom_w4a4_kv16 \
        --json benchmarks/results/ablation_smollm2_kv4.json
    OMP_NUM_THREADS=1 python -m benchmarks.ablation_kv4 --preset atom-g32 --cache /tmp/atom_g32_kv16 \
        --json benchmarks/results/ablation_smollm2_kv4_g32.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import atom_lab

import torch
import torch.nn.functional as F

from atom_lab.eval import eval_windows, window_nll
from atom_lab.kv_cache import KVFormat, PagePool
from atom_lab.paged_model import simulate_kv
from atom_lab.recipe import model_size_report, quantize_model

CANDIDATES = {"INT4 per head, pre-RoPE (Atom)": KVFormat(bits=4),
              "INT4, KIVI keys per channel / 32 tokens, pre-RoPE": KVFormat(bits=4, key_tokens=32),
              "INT4, KIVI keys per channel / 32 tokens, post-RoPE": KVFormat(bits=4, key_tokens=32, rope="post")}
CHUNK = 512


def quantized_model(float_model, tok, calib, args):
    """The preset's W4A4 layers with the KV left in float (the KV format is applied by simulate_kv)."""
    cache = Path(args.cache) if args.cache else None
    if cache is not None and (cache / "atom_lab.json").exists():
        t = time.time()
        model, _ = atom_lab.load_quantized(cache, device="cpu", backend="reference")
        want = atom_lab.AtomConfig.preset(args.preset, kv_bits=16, gptq=not args.rtn).to_dict()
        got = model.atom_config.to_dict()
        diff = sorted(k for k in want if k != "name" and want[k] != got.get(k))
        if diff:
            raise SystemExit(f"--cache {cache} holds another config (fields {diff} differ from --preset "
                             f"{args.preset}); use another --cache directory.")
        return model, {"loaded_from_cache": True, "load_s": round(time.time() - t, 1)}
    cfg = atom_lab.AtomConfig.preset(args.preset, kv_bits=16, gptq=not args.rtn,
                                     name=f"{args.preset} W4A4 (KV in the cache format)")
    t = time.time()
    model = quantize_model(copy.deepcopy(float_model), cfg, calibration=calib, tokenizer=tok, progress=False,
                           n_tokens=args.calib_tokens, seq_len=args.calib_seq_len)
    info = {"loaded_from_cache": False, "quantize_s": round(time.time() - t, 1)}
    if cache is not None:
        atom_lab.save_quantized(model, cache)
    return model, info


def kv_bytes_per_token(model, fmt) -> float:
    kw = dict(max_seqs=1) if fmt.has_window else {}
    pool = PagePool.for_model(model, fmt, page_size=32, num_pages=2, **kw)
    return pool.bytes_per_page / pool.page_size


def ppl(nll_sum, tokens):
    return math.exp(nll_sum / tokens)


@torch.no_grad()
def window_stats(float_model, model, fmt, ids):
    """(float NLL sum, quantized NLL sum, KL sum, top-1 agreements, tokens) of one window [1, L]."""
    target = ids[0, 1:]
    ref = float_model(ids, use_cache=False).logits[0, :-1].float()
    with simulate_kv(model, fmt):
        q = model(ids, use_cache=False).logits[0, :-1].float()
    s = [0.0, 0.0, 0.0, 0.0, target.numel()]
    for r0 in range(0, target.numel(), CHUNK):
        rl, lp, t = F.log_softmax(ref[r0:r0 + CHUNK], -1), F.log_softmax(q[r0:r0 + CHUNK], -1), target[r0:r0 + CHUNK]
        s[0] += -rl.gather(1, t[:, None]).sum().item()
        s[1] += -lp.gather(1, t[:, None]).sum().item()
        s[2] += (rl.exp() * (rl - lp)).sum().item()
        s[3] += (lp.argmax(-1) == rl.argmax(-1)).sum().item()
    return s


@torch.no_grad()
def triton_check(args) -> int:
    """--triton-check: the --cache model on the reference backend, the same in float64, and on the triton backend
    (the CPU runs the kernels under the Triton interpreter), with the chosen KV format, on the first test window of
    --triton-check tokens: perplexity and KL against the reference, as README's issue-5 check of the atom preset."""
    if not (args.cache and (Path(args.cache) / "atom_lab.json").exists()):
        raise SystemExit("--triton-check needs --cache DIR holding the quantized model (run without it first).")
    fmt = CANDIDATES[args.kv]
    _, tok = atom_lab.load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    ids = eval_windows(tok, atom_lab.load_corpus("wiki")["test"]["text"], args.triton_check, 1)
    out = {"command": "python -m benchmarks.ablation_kv4 " + " ".join(sys.argv[1:]), "kv": args.kv,
           "tokens": ids.shape[1], "environment": atom_lab.environment(), "rows": {}}
    logits = {}
    runs = (("reference", torch.float32, "reference"), ("reference float64", torch.float64, "reference"),
            ("triton", torch.float32, "triton"))
    for name, dtype, backend in runs:
        t = time.time()
        model, _ = atom_lab.load_quantized(args.cache, device="cpu", backend=backend)
        if dtype != torch.float32:  # the reference's w_ref and float tensors (the triton backend needs fp16 scales)
            model.to(dtype)
        with simulate_kv(model, fmt):
            logits[name] = model(ids, use_cache=False).logits[0, :-1].double()
        nll = F.cross_entropy(logits[name], ids[0, 1:], reduction="sum").item()
        ref = logits["reference"]
        out["rows"][name] = {"ppl": math.exp(nll / (ids.shape[1] - 1)), "seconds": round(time.time() - t, 1),
                             "kl_vs_reference": F.kl_div(F.log_softmax(logits[name], -1), F.log_softmax(ref, -1),
                                                         log_target=True, reduction="batchmean").item(),
                             "top1_vs_reference": (logits[name].argmax(-1) == ref.argmax(-1)).double().mean().item()}
        print(name, out["rows"][name], flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def summary(acc):
    f, q, kl, agree, n = acc
    return {"windows_done": None, "predicted_tokens": n, "float_ppl": ppl(f, n), "ppl": ppl(q, n),
            "x_float": ppl(q, n) / ppl(f, n), "kl": kl / n, "top1": agree / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--select-windows", type=int, default=2, help="held-out calibration windows for the choice")
    ap.add_argument("--test-windows", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--cache", default=None, help="directory for the quantized model (save_quantized)")
    ap.add_argument("--preset", default="atom", choices=["atom", "atom-g32"],
                    help="the W4A4 layers (atom-g32: chosen by benchmarks/ablation_w4a4_select.py)")
    ap.add_argument("--rtn", action="store_true", help="round-to-nearest instead of GPTQ (a quick check only)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--triton-check", type=int, default=None, metavar="TOKENS",
                    help="only compare the --cache model on both backends on the first test window of TOKENS tokens")
    ap.add_argument("--kv", default="INT4, KIVI keys per channel / 32 tokens, post-RoPE", choices=list(CANDIDATES),
                    help="the KV format of --triton-check")
    args = ap.parse_args(argv)
    if args.triton_check:
        return triton_check(args)
    torch.manual_seed(0)
    t0 = time.time()
    float_model, tok = atom_lab.load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    corpus = atom_lab.load_corpus("wiki")
    calib = corpus["calibration"]["text"]
    out = {"command": "python -m benchmarks.ablation_kv4 " + " ".join(sys.argv[1:]),
           "protocol": {"model": "smollm2-135m (GGUF Q4_1 dequantized to float32)", "seq_len": args.seq_len,
                        "calibration": f"wiki/calibration, first {args.calib_tokens} tokens in windows of "
                                       f"{args.calib_seq_len}",
                        "selection": f"wiki/calibration windows {args.calib_tokens // args.seq_len}.."
                                     f"{args.calib_tokens // args.seq_len + args.select_windows - 1} of "
                                     f"{args.seq_len} tokens (after the calibration tokens)",
                        "test": "wiki/test, non-overlapping windows (first 8 = the ablation's protocol)",
                        "backend": "reference (float32 fake quantization), KV by simulate_kv"},
           "environment": atom_lab.environment()}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))

    model, out["quantization"] = quantized_model(float_model, tok, calib, args)
    size = model_size_report(model)
    out["bits_per_weight"] = round(8 * size["stored_bytes"] / (size["fp16_bytes"] // 2), 4)
    out["w4a4_config"] = model.atom_config.to_dict()
    print(f"W4A4 model ready ({out['quantization']}), {out['bits_per_weight']} bits/weight", flush=True)

    skip = args.calib_tokens // args.seq_len
    sel = eval_windows(tok, calib, args.seq_len, skip + args.select_windows)[skip:]
    if sel.shape[0] < args.select_windows:
        raise SystemExit(f"wiki/calibration holds only {sel.shape[0]} windows after the calibration tokens")
    out["selection"] = {"float_ppl": ppl(window_nll(float_model, sel, progress=False).sum().item(),
                                         sel.shape[0] * (args.seq_len - 1)), "candidates": {}}
    for name, fmt in CANDIDATES.items():
        t = time.time()
        with simulate_kv(model, fmt):
            p = ppl(window_nll(model, sel, progress=False).sum().item(), sel.shape[0] * (args.seq_len - 1))
        out["selection"]["candidates"][name] = {"ppl": p, "kv_bytes_per_token": kv_bytes_per_token(model, fmt),
                                                "format": fmt.name, "seconds": round(time.time() - t, 1)}
        print(f"  selection {name:52s} {p:8.3f} ({time.time() - t:.0f} s)", flush=True)
        save()
    chosen = min(CANDIDATES, key=lambda n: out["selection"]["candidates"][n]["ppl"])
    fmt = CANDIDATES[chosen]
    out["chosen"] = {"kv": chosen, "format": fmt.name, "key_tokens": fmt.key_tokens, "rope": fmt.rope,
                     "kv_bytes_per_token": kv_bytes_per_token(model, fmt),
                     "kv_float_tokens_per_sequence": fmt.window_capacity,
                     "name": f"{args.preset} W4A4 + " + chosen}
    print(f"chosen on the calibration split: {chosen}", flush=True)

    test = eval_windows(tok, corpus["test"]["text"], args.seq_len, args.test_windows)
    out["test"] = {"windows_total": test.shape[0], "per_window": []}
    acc = [0.0, 0.0, 0.0, 0.0, 0]
    for w in range(test.shape[0]):
        t = time.time()
        s = window_stats(float_model, model, fmt, test[w:w + 1])
        acc = [a + b for a, b in zip(acc, s)]
        out["test"]["per_window"].append({"float_nll": s[0], "nll": s[1], "kl": s[2], "agree": s[3],
                                          "tokens": s[4]})
        cur = summary(acc)
        cur["windows_done"] = w + 1
        if w + 1 == min(8, test.shape[0]):
            out["test"]["first_8"] = dict(cur)
        out["test"]["all_done"] = cur
        out["seconds"] = round(time.time() - t0, 1)
        save()
        print(f"  test window {w + 1}/{test.shape[0]}: running ppl {cur['ppl']:.3f} / float {cur['float_ppl']:.3f} "
              f"= {cur['x_float']:.3f}x ({time.time() - t:.0f} s)", flush=True)
    print(json.dumps({k: out["test"][k] for k in ("first_8", "all_done") if k in out["test"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
