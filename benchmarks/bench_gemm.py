"""Benchmark of the W4A4 kernels against the libraries, on Llama-2-7B/13B and Qwen2.5-7B shapes, in one run on one GPU.

What is timed (median of triton.testing.do_bench, L2 flushed before every run, random non-zero data; the primary
numbers are replays of a CUDA graph of each call, i.e. GPU time; eager times and clean-L2 times are recorded too,
see benchmarks/common.py):
  cublas_bf16    torch.matmul on bf16 [M, K] x [K, N] (the baseline every ratio divides)
  int_mm_int8    torch._int_mm on int8 (cuBLASLt; needs M > 16)
  scaled_mm_fp8  torch._scaled_mm on FP8 e4m3, per-tensor scales (needs dims that are multiples of 16)
  w4a4           atom_lab.kernels.w4a4_gemm: packed INT4 activations and weights (group 128, 128 INT8 keeper
                 channels, fp16 out), everything the layer needs from packed inputs to fp16 output: for the "fp8"
                 method that is both unpack kernels plus the GEMM, for "fused" the one kernel.
and the fused RMSNorm + reorder + quantize kernel (kernels/act_quant.py, when present) against the device-to-device
copy bandwidth, counting bytes read + written.

    python benchmarks/bench_gemm.py [--json out.json] [--plot out.png] [--markdown out.md] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import atom_lab  # noqa: E402,F401

import torch  # noqa: E402

from atom_lab import kernels  # noqa: E402
from atom_lab.kernels import gemm as G  # noqa: E402
from atom_lab.kernels import gemm_blockwise, gemm_fp8, gemm_gluon, gemm_gluon_ws, gemm_int4  # noqa: E402
from atom_lab.kernels import w4a4_gemm, w4a4_gemm_ref  # noqa: E402
from benchmarks.common import (GRAPH_FAILURES, LLAMA2_7B, MS, QUICK_MS, SHAPES, bench_ms, copy_bandwidth_gbs,  # noqa: E402
                               device_facts, floors_us, library_fns, packed_inputs)

GROUP, KEEPER = 128, 128
# A model the kernels were not tuned on (issue 12: "other models' shapes will be checked"): Qwen2.5-7B, hidden 3584
# (28 heads of 128, 4 KV heads: fused QKV 3584 + 2 x 512), MLP 18944.
QWEN25_7B = [(3584, 3584, "o_proj"), (3584, 18944, "up/gate"), (18944, 3584, "down"), (3584, 4608, "qkv")]
ALL_SHAPES = SHAPES + [("Qwen2.5-7B", *s) for s in QWEN25_7B]
BAR_MODELS = ("7B", "13B")  # the bars are defined on Llama-2 shapes; the other model is reported beside them
# Issue 12's bars, x cuBLAS bf16 in the same run: M <= 16 (2.5x on 4096/5120-wide shapes, 3.0x where K or N >= 11008),
# M = 64-1024 (1.5x; 1.0x is the minimum), M >= 2048 (1.3x).
BAR_SMALL, BAR_SMALL_WIDE, BAR_MID, BAR_LARGE = 2.5, 3.0, 1.5, 1.3
BAR_QUANT = 0.75                  # fused RMSNorm+quantize: fraction of copy bandwidth at M >= 256


def host_us_per_call(fn, calls: int = 200) -> float:
    """Host time per eager call when calls are queued back to back (no sync in the loop)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


REP = 40  # do_bench's rep (ms) of every timing here; --rep lowers it for a short device lease
GLUON_MS = None  # None: time the Gluon method at every M; else only at these M (--gluon-ms)
WS_MS = None  # the same for the warp-specialized Gluon method "gluon_ws" (--ws-ms)
MODELS = None  # None: every model's shapes; else only these (--models 7B,13B)
NO_QUANT = False  # --no-quant: skip the fused-quantizer benchmark


def _tm(fn, **kw):
    return bench_ms(fn, rep=REP, **kw)


def fused_variants(row, M, a, wq, ref):
    """Controls and variants of the fused kernel beside the method columns, each at the configuration the
    autotuner chose for its method (so a column differs from its partner in one thing only):
      fused_noasm_ms     the fused kernel at fused's tuned configuration with LLVM's byte shifts instead of the
                         inline-PTX nibble shift (ASM=False): what _lo_x16 buys
      fused8_codes_ms    "fused8" with the activation codes already made (a quantizer that writes codes instead
                         of nibbles): what the per-call activation_codes launch costs
    (results/gemm_h200_band.json also has fused8_onedot_ms, a variant removed after that run.)"""
    out = torch.empty(M, wq.rows, dtype=torch.float16, device=a.q4.device)
    if row.get("fused_ms"):
        if M <= gemm_int4.SWAP_CLASSES[-1][0]:
            cls = next(i for i, c in enumerate(gemm_int4.SWAP_CLASSES) if M <= c[0])
            c = gemm_int4._SWAP_TUNERS[cls].best_config
            cfg = (wq, a, out, None, True, c.kwargs["BX"], gemm_int4.SWAP_CLASSES[cls][1], c.kwargs["SPLIT"], 4,
                   c.num_stages)
        else:
            c = gemm_int4._normal_tuner.best_config
            cfg = (a, wq, out, None, False, c.kwargs["BX"], c.kwargs["BY"], 1, c.num_warps, c.num_stages)
        fn = lambda: gemm_int4._launch_fused(*cfg, asm=False)  # noqa: E731
        fn()
        if ref is not None:
            row["rel_err_fused_noasm"] = ((out.float() - ref).norm() / ref.norm()).item()
        row["fused_noasm_ms"] = _tm(fn, graph=True)
        row["fused_config"] = str(c)
    if row.get("fused8_ms"):
        codes = gemm_int4.activation_codes(a)
        fn = lambda: gemm_int4.launch_fused8_tuned(a, wq, out, None, codes=codes)  # noqa: E731
        row["fused8_codes_ms"] = _tm(fn, graph=True)
        c = gemm_int4._FUSED8_TUNERS[gemm_int4.fused8_class(M)].best_config
        row["fused8_config"] = str(c)
        row["activation_codes_ms"] = _tm(lambda: gemm_int4.activation_codes(a), graph=True)
    cfg = gemm_gluon_ws.best_config(M, wq.rows, a.in_features, a.keeper, a.group_size) if row.get("gluon_ws_ms") else None
    if cfg:  # gluon_ws_codes_ms: "gluon_ws" at its tuned configuration with the activation codes already made
        codes = gemm_int4.activation_codes(a)
        row["gluon_ws_codes_ms"] = _tm(lambda: gemm_gluon_ws.launch(a, wq, out, None, *cfg, codes=codes), graph=True)


def bench_gemms(ms, log=print, shapes=ALL_SHAPES, partial_path=None, lean=False):
    """Per shape and M: GPU time from CUDA-graph replays (the primary number, L2 flushed by do_bench before each
    replay) of cuBLAS bf16, the libraries, w4a4_gemm as dispatched (method=None) and every method side by side;
    the eager do_bench time, and for M <= 256 the clean-L2 GPU time (see benchmarks/common.py)."""
    rows = []
    cap = G.device_capability(torch.device("cuda"))
    blockwise_ok = gemm_blockwise.blockwise_supported(cap, gemm_blockwise.torch_version())
    for model, K, N, layer in shapes:
        for M in ms:
            x, w, a, wq = packed_inputs(M, K, N, GROUP, KEEPER)
            row = dict(model=model, layer=layer, K=K, N=N, M=M, method=G.choose_method(
                M, x.device, gluon_ws=gemm_gluon_ws.supported(cap, GROUP, KEEPER, N)))
            libs = library_fns(x, w)
            if lean:  # cuBLAS bf16 (the baseline every ratio divides); FP8 per-tensor at the largest M (its peak)
                keep = ("cublas_bf16", "scaled_mm_fp8") if M == ms[-1] else ("cublas_bf16",)
                libs = {k: (v if k in keep else "not timed (--lean)") for k, v in libs.items()}
            for lib, fn in libs.items():
                if callable(fn):
                    row[lib + "_ms"] = _tm(fn, graph=True)
                else:
                    row[lib + "_ms"] = None
                    row[lib + "_error"] = fn
            out = w4a4_gemm(a, wq)  # the first call autotunes
            torch.cuda.synchronize()
            ref = w4a4_gemm_ref(a, wq, torch.float32) if M <= 1024 else None  # affordable exact reference
            if ref is not None:
                row["rel_err_vs_ref"] = ((out.float() - ref).norm() / ref.norm()).item()
            ours = lambda: w4a4_gemm(a, wq)  # noqa: E731
            row["w4a4_ms"] = _tm(ours, graph=True)
            row["config"] = G.last_config(M, row["method"], (N, K, KEEPER, GROUP))
            # Every method side by side (the dispatch above is one of them). fused at M >= 4096 is skipped: it runs
            # at 0.34-0.37x bf16 there (benchmarks/NOTES.md) and its autotuning would cost a minute of the run.
            methods = {"fused": M <= 1024, "fused8": M <= gemm_int4.FUSED8_MAX_M,
                       "fp8": G.has_fp8_tensor_cores(x.device) and (M >= 64 or not lean), "blockwise": blockwise_ok,
                       "gluon": G.gluon_ok(x.device, GROUP) and (GLUON_MS is None or M in GLUON_MS),
                       "gluon_ws": gemm_gluon_ws.supported(cap, GROUP, KEEPER, N) and (WS_MS is None or M in WS_MS)}
            for meth, ok in methods.items():
                if not ok:
                    continue
                fn = (lambda m=meth: w4a4_gemm(a, wq, method=m))  # noqa: E731
                try:
                    o = fn()
                    torch.cuda.synchronize()
                except Exception as e:  # recorded, the run goes on
                    row[f"{meth}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    methods[meth] = False
                    continue
                if ref is not None:
                    row[f"rel_err_{meth}"] = ((o.float() - ref).norm() / ref.norm()).item()
                row[f"{meth}_ms"] = _tm(fn, graph=True)
                if meth in ("gluon", "gluon_ws"):
                    row[f"{meth}_config"] = G.last_config(M, meth, (N, K, KEEPER, GROUP))
            fused_variants(row, M, a, wq, ref)
            if blockwise_ok and methods["blockwise"]:
                # The weights stored as the library's FP8 operand (prepared once): what the per-call unpack costs.
                pa, pw = gemm_blockwise.prepare_fp8(a, "a"), gemm_blockwise.prepare_fp8(wq, "w")
                row["blockwise_fp8_weights_ms"] = _tm(lambda: w4a4_gemm(a, wq, method="blockwise", w_fp8=pw),
                                                           graph=True)
                # The dispatch with stored FP8 weights picks among the measured columns (no extra timing).
                row["method_fp8_weights"] = G.choose_method(M, x.device, fp8_weights=True)
                pick = row["method_fp8_weights"]
                pick = "blockwise_fp8_weights" if pick == "blockwise" else pick
                if row.get(f"{pick}_ms"):
                    row["w4a4_fp8_weights_ms"] = row[f"{pick}_ms"]
                    row["speedup_vs_bf16_fp8_weights"] = row["cublas_bf16_ms"] / row["w4a4_fp8_weights_ms"]
                row["blockwise_lib_only_ms"] = _tm(lambda: gemm_blockwise.blockwise_gemm(pa, pw, torch.float16),
                                                        graph=True)
                if M == ms[0]:  # the weight unpack does not depend on M
                    row["prepare_w_ms"] = _tm(lambda: gemm_blockwise.prepare_fp8(wq, "w"), graph=True)
                row["fp8_weight_bytes"] = pw[0].nbytes + pw[1].nbytes
                row["packed_weight_bytes"] = sum(t.nbytes for t in (wq.q4, wq.s4, wq.q8, wq.s8))
                pa = pw = None
            if row["method"] == "fp8":
                a8, w8 = G.unpack_fp8(a), G.unpack_fp8(wq)
                row["w4a4_unpack_a_ms"] = _tm(lambda: G.unpack_fp8(a), graph=True)
                row["w4a4_unpack_w_ms"] = _tm(lambda: G.unpack_fp8(wq), graph=True)
                row["w4a4_gemm_only_ms"] = _tm(lambda: gemm_fp8._launch_fp8_tuned(a, wq, out, None, a8=a8, w8=w8),
                                                    graph=True)
                a8 = w8 = None
            base = row["cublas_bf16_ms"]
            row["speedup_vs_bf16"] = base / row["w4a4_ms"]
            for meth in list(methods) + ["blockwise_fp8_weights", "fused_noasm", "fused8_codes", "gluon_ws_codes"]:
                if row.get(f"{meth}_ms"):
                    row[f"{meth}_speedup_vs_bf16"] = base / row[f"{meth}_ms"]
            if M in (1, 256) and not lean:  # eager (host-bound) numbers: a few points suffice
                row["cublas_bf16_eager_ms"] = bench_ms(libs["cublas_bf16"])
                row["w4a4_eager_ms"] = bench_ms(ours)
                row["speedup_vs_bf16_eager"] = row["cublas_bf16_eager_ms"] / row["w4a4_eager_ms"]
            if M <= 16 and not lean:  # memory-bound: also time with a clean L2 (see benchmarks/common.py)
                row["cublas_bf16_clean_l2_ms"] = bench_ms(libs["cublas_bf16"], flush="read", graph=True)
                row["w4a4_clean_l2_ms"] = bench_ms(ours, flush="read", graph=True)
                row["speedup_vs_bf16_clean_l2"] = row["cublas_bf16_clean_l2_ms"] / row["w4a4_clean_l2_ms"]
            for lib in ("int_mm_int8", "scaled_mm_fp8"):
                t_ = row[lib + "_ms"]
                row[f"{lib}_speedup_vs_bf16"] = base / t_ if t_ else None
            row["tflops_w4a4"] = 2 * M * N * K / row["w4a4_ms"] / 1e9
            if layer == "o_proj" and M == 1 and model == "7B":
                row["host_us_per_call_w4a4"] = host_us_per_call(ours)
                row["host_us_per_call_cublas_bf16"] = host_us_per_call(libs["cublas_bf16"])
            rows.append(row)
            side = "  ".join(f"{m} x{row[m + '_speedup_vs_bf16']:.2f}" for m in list(methods) + ["blockwise_fp8_weights"]
                             if row.get(m + "_speedup_vs_bf16"))
            log(f"{model:3s} {layer:8s} K={K:5d} N={N:5d} M={M:5d}  bf16 {base * 1e3:8.1f} us  w4a4 "
                f"{row['w4a4_ms'] * 1e3:8.1f} us ({row['method']})  x{row['speedup_vs_bf16']:.2f}   [{side}]")
            x = w = a = wq = out = libs = ref = None  # free before the next shape
            torch.cuda.empty_cache()
        if partial_path:  # what a run cut off by the device's time limit still leaves behind
            with open(partial_path, "w") as f:
                json.dump(rows, f)
    return rows


def bench_quantize(ms, copy_gbs, log=print):
    """Fused RMSNorm + reorder + quantize of M rows of 4096 and 11008, against the copy bandwidth (read + written)."""
    fn = getattr(kernels, "rmsnorm_quantize", None)
    if fn is None:
        return {"available": False, "note": "kernels.rmsnorm_quantize not in this checkout"}
    rows = []
    # check_finite=False: the NaN/inf check synchronizes with the host, which a CUDA graph cannot capture.
    for K in (4096, 11008):
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            weight = torch.rand(K, device="cuda", dtype=torch.float16) + 0.5
            index = torch.randperm(K, device="cuda")
            call = lambda: fn(x, weight, 1e-6, index, GROUP, KEEPER, 0.9, check_finite=False)  # noqa: E731
            p = call()
            torch.cuda.synchronize()
            ms_ = bench_ms(call, graph=True)
            nbytes = (x.numel() * x.element_size() + weight.numel() * weight.element_size()
                      + index.numel() * index.element_size() + p.nbytes())
            gbs = nbytes / ms_ / 1e6
            rows.append(dict(M=M, K=K, ms=ms_, bytes=nbytes, gbs=gbs, fraction_of_copy=gbs / copy_gbs))
            log(f"rmsnorm_quantize K={K:5d} M={M:5d}: {ms_ * 1e3:8.1f} us  {gbs:7.0f} GB/s = {gbs / copy_gbs:.0%} of copy")
    return {"available": True, "rows": rows}


def small_m_bar(K: int, N: int) -> float:
    """Issue 12: 3.0x where K or N >= 11008 (more bytes per launch), 2.5x on the 4096/5120-wide shapes."""
    return BAR_SMALL_WIDE if max(K, N) >= 11008 else BAR_SMALL


def bars(rows, quant, key="speedup_vs_bf16", models=BAR_MODELS):
    """Each bar of issue 12 per row: the ratio of w4a4_gemm as dispatched over cuBLAS bf16 in the same run
    (key="speedup_vs_bf16_fp8_weights": the dispatch when the weights are also kept as FP8), on the rows of
    `models` (None: every row)."""
    out = {"small_m": [], "mid_m": [], "large_m": [], "quantize": []}
    rows = [dict(r, speedup_vs_bf16=r[key]) for r in rows if r.get(key)
            and (models is None or r.get("model", "7B") in models)]
    for r in rows:
        key, bar = (("small_m", small_m_bar(r["K"], r["N"])) if r["M"] <= 16 else
                    ("mid_m", BAR_MID) if 64 <= r["M"] <= 1024 else
                    ("large_m", BAR_LARGE) if r["M"] >= 2048 else (None, None))
        if key:
            out[key].append(dict(model=r.get("model", "7B"), layer=r["layer"], M=r["M"], ratio=r["speedup_vs_bf16"],
                                 bar=bar, met=r["speedup_vs_bf16"] >= bar, short_by=bar / r["speedup_vs_bf16"]))
    for r in quant.get("rows", []):
        if r["M"] >= 256:
            out["quantize"].append(dict(M=r["M"], K=r.get("K"), ratio=r["fraction_of_copy"], bar=BAR_QUANT,
                                        met=r["fraction_of_copy"] >= BAR_QUANT))
    summary = {}
    for key, v in out.items():
        if v:
            summary[key] = dict(worst=min(x["ratio"] for x in v), best=max(x["ratio"] for x in v),
                                bars=sorted({x["bar"] for x in v}), met=sum(x["met"] for x in v), of=len(v),
                                all_met=all(x["met"] for x in v))
    if out["mid_m"]:
        summary["mid_m"]["minimum_1x_met"] = all(x["ratio"] >= 1.0 for x in out["mid_m"])
    out["summary"] = summary
    return out


METHOD_COLUMNS = [("fused", "fused INT4 (Triton)"), ("fused8", "fused INT4, activation codes (Triton)"),
                  ("fp8", "FP8 (Triton)"), ("blockwise", "blockwise FP8 (cuBLASLt)"),
                  ("blockwise_fp8_weights", "blockwise, FP8 weights stored"), ("gluon", "Gluon INT4 wgmma"),
                  ("gluon_ws", "Gluon warp-specialized")]
GLUON_NOTE = ("Gluon INT4 wgmma = kernels/gemm_gluon.py (in-kernel INT4 unpack into shared memory, one warpgroup, "
              "the rescale of a group overlapping the next group's MMA); benchmarks/NOTES.md.")


def markdown(res, lib_note: str | None = None) -> str:
    """README table: x = speed-up over cuBLAS bf16 in the same run. lib_note: where library times come from, when
    not from this run."""
    dev = res["device"]
    lines = [f"W4A4 GEMM (group {GROUP}, {KEEPER} INT8 keeper channels, fp16 out) on **{dev['device']}**, "
             f"torch {dev['torch']}, triton {dev['triton']}. GPU times in microseconds: median of CUDA-graph replays "
             f"(triton.testing.do_bench, L2 flushed before each); x = speed-up over cuBLAS bf16 in the same run. "
             f"`w4a4_gemm` = the method the dispatch picks; the method columns run each method on the same inputs "
             f"(fused is not run at M >= 4096).", "",
             "| model | layer (K x N) | M | cuBLAS bf16 (us) | w4a4_gemm (us) | method | x bf16 | "
             + " | ".join(f"x {name}" for _, name in METHOD_COLUMNS) + " |",
             "|---|---|---:|---:|---:|---|---:|" + "---:|" * len(METHOD_COLUMNS)]

    def x(r, m):
        v = r.get(f"{m}_speedup_vs_bf16")
        return "" if v is None else f"{v:.2f}"
    for r in res["gemm"]:
        lines.append(f"| {r.get('model', '7B')} | {r['layer']} ({r['K']}x{r['N']}) | {r['M']} | "
                     f"{r['cublas_bf16_ms'] * 1e3:.1f} | {r['w4a4_ms'] * 1e3:.1f} | {r['method']} | "
                     f"{r['speedup_vs_bf16']:.2f} | " + " | ".join(x(r, m) for m, _ in METHOD_COLUMNS) + " |")
    if lib_note:
        lines += ["", f"\\* {lib_note}"]
    q = res.get("quantize", {})
    if q.get("rows"):
        lines += ["", f"Fused RMSNorm + reorder + quantize (copy bandwidth {res['copy_gbs']:.0f} GB/s, "
                      f"bytes read + written):", "", "| K | M | time (us) | GB/s | of copy |", "|---:|---:|---:|---:|---:|"]
        for r in q["rows"]:
            lines.append(f"| {r.get('K', 4096)} | {r['M']} | {r['ms'] * 1e3:.1f} | {r['gbs']:.0f} | "
                         f"{r['fraction_of_copy']:.0%} |")
    for title, name in (("w4a4_gemm as dispatched", "bars"),
                        ("w4a4_gemm with the weights also stored as FP8 (w_fp8=)", "bars_fp8_weights")):
        s = res.get(name, {}).get("summary", {})
        if s:
            lines += ["", f"Bars (issue 12), {title}: " + "; ".join(
                f"{k}: {v['met']}/{v['of']} met, worst {v['worst']:.2f}, best {v['best']:.2f} "
                f"(bar {'/'.join(map(str, v['bars']))})" for k, v in s.items())]
    lines += ["", GLUON_NOTE]
    return "\n".join(lines) + "\n"


def dispatch_pick(res, M: int) -> str:
    """The method this checkout's select_method picks for M on the JSON's device."""
    cap = tuple(res.get("dispatch", {}).get("capability") or (9, 0))
    tv = gemm_blockwise.torch_version() if res["device"]["torch"] == torch.__version__ else \
        tuple(int(v) for v in res["device"]["torch"].split("+")[0].split(".")[:2])
    ws = bool(res.get("gluon_ws", {}).get("available"))  # the runs' shapes all suit its TMA copies
    return G.select_method(M, cap, tv, gluon_ws=ws)


def speed_summary(res, models=None) -> str:
    """README / notebook table: per M, the range over the shapes of `models` (None: the Llama-2 shapes the bars
    are defined on, then a second table for every other model in the run) of each method's speed-up over cuBLAS
    bf16 (same run), and of the method the dispatch of this checkout picks (select_method applied to the measured
    columns; where the library refused a shape the dispatch runs "fp8", and so does this table)."""
    if models is None:
        others = sorted({r.get("model", "7B") for r in res["gemm"]} - set(BAR_MODELS))
        return "\n".join([speed_summary(res, BAR_MODELS)] + [speed_summary(res, (m,)) for m in others])
    rows = [r for r in res["gemm"] if r.get("model", "7B") in models]
    cols = [(m, name) for m, name in METHOD_COLUMNS if any(r.get(m + "_speedup_vs_bf16") for r in res["gemm"])]
    names = " and ".join(("Llama-2-" + m if m in BAR_MODELS else m) for m in models)
    lines = [f"W4A4 GEMM vs cuBLAS bf16 on **{res['device']['device']}** (x = speed-up, min-max over the "
             f"{len({(r.get('model'), r['layer']) for r in rows})} {names} shapes, CUDA graphs, L2 flushed, one "
             f"run):", "",
             "| M | dispatch picks | x dispatch | " + " | ".join(f"x {n}" for _, n in cols) + " |",
             "|---:|---|---:|" + "---:|" * len(cols)]

    def span(vals):
        vals = [v for v in vals if v]
        return f"{min(vals):.2f}-{max(vals):.2f}" if vals else "-"
    for M in sorted({r["M"] for r in rows}):
        rs = [r for r in rows if r["M"] == M]
        pick = dispatch_pick(res, M)
        picked = [r.get(pick + "_speedup_vs_bf16") or r.get("fp8_speedup_vs_bf16") for r in rs]
        lines.append(f"| {M} | {pick} | {span(picked)} | "
                     + " | ".join(span(r.get(m + "_speedup_vs_bf16") for r in rs) for m, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(res, path, suptitle: str | None = None, lib_title: str | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    shapes = sorted({(r.get("model", "7B"), r["K"], r["N"], r["layer"]) for r in res["gemm"]},
                    key=lambda s: (s[0], s[3]))
    colors = sns.color_palette("colorblind", max(4, len(shapes)))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), dpi=100)
    for i, (model, K, N, layer) in enumerate(shapes):
        rs = sorted((r for r in res["gemm"] if r.get("model", "7B") == model and r["K"] == K and r["N"] == N),
                    key=lambda r: r["M"])
        style = "-" if model == "7B" else "--"
        axes[0].plot([r["M"] for r in rs], [r["speedup_vs_bf16"] for r in rs], "o" + style, color=colors[i],
                     ms=3, label=f"{model} {layer} {K}x{N}")
    if res["gemm"]:
        for m, name in METHOD_COLUMNS:
            pts = {}
            for r in res["gemm"]:
                v = r.get(f"{m}_speedup_vs_bf16")
                if v:
                    pts.setdefault(r["M"], []).append(v)
            if pts:
                Ms = sorted(pts)
                axes[1].plot(Ms, [sorted(pts[M_])[len(pts[M_]) // 2] for M_ in Ms], "o-", ms=3, label=name)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speed-up over cuBLAS bf16 (x)")
    for bar, ls in ((BAR_SMALL_WIDE, "--"), (BAR_MID, "-."), (BAR_LARGE, ":")):
        axes[0].axhline(bar, color="black", ls=ls, lw=0.8)
    axes[0].set_title("w4a4_gemm as dispatched (bars: 3.0 / 1.5 / 1.3)")
    axes[1].set_title(lib_title or f"each method, median over the {len(shapes)} shapes")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=8)
    fig.suptitle(suptitle or f"{res['device']['device']}: Llama-2-7B / 13B and Qwen2.5-7B linear layers, one run, "
                             f"GPU times")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(json_path=None, plot_path=None, md_path=None, quick=False, log=print, lean=False, ms=None) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("atom-lab bench needs a CUDA GPU: under the CPU interpreter timings mean nothing.")
    t0 = time.time()
    info = device_facts()
    info["copy_gbs"] = copy_bandwidth_gbs()
    log(f"{info['device']}: copy bandwidth {info['copy_gbs']:.0f} GB/s (read + write)")
    ms = ms or (QUICK_MS if quick else MS)
    shapes = ALL_SHAPES if MODELS is None else [s for s in ALL_SHAPES if s[0] in MODELS]
    rows = bench_gemms(ms, log, shapes=shapes, partial_path=json_path and json_path + ".partial", lean=lean)
    fp8_rates = [2 * r["M"] * r["N"] * r["K"] / r["scaled_mm_fp8_ms"] / 1e9 for r in rows if r["scaled_mm_fp8_ms"]]
    tc = max(fp8_rates) if fp8_rates else 1000.0
    for r in rows:
        f = floors_us(r["M"], r["K"], r["N"], GROUP, KEEPER, info["copy_gbs"], tc)
        r.update(floor_bytes_us=f["bytes_us"], floor_flops_us=f["flops_us"],
                 of_floor=max(f["bytes_us"], f["flops_us"]) / (r["w4a4_ms"] * 1e3))
    quant = (bench_quantize([256, 1024, 4096, 8192] if not quick else [256, 4096], info["copy_gbs"], log)
             if not NO_QUANT else {})
    res = dict(device=info, copy_gbs=info["copy_gbs"], fp8_library_peak_tflops=tc, group=GROUP, keeper=KEEPER,
               timing="triton.testing.do_bench median of CUDA-graph replays, L2 flushed before each run",
               graph_capture_failures=GRAPH_FAILURES, gemm=rows, quantize=quant, seconds=time.time() - t0)
    # the command as run, with output files named as committed (never the device's scratch folder)
    res["command"] = "python benchmarks/bench_gemm.py " + " ".join(
        "benchmarks/results/" + os.path.basename(a) if os.sep in a else a for a in sys.argv[1:])
    res["rep_ms"] = REP
    res["dispatch"] = dict(FP8_MIN_M=G.FP8_MIN_M, BLOCKWISE_MIN_M=G.BLOCKWISE_MIN_M,
                           capability=G.device_capability(torch.device("cuda")),
                           library_refused_fell_back_to_fp8=G.FALLBACKS[:20])
    res["gluon"] = dict(available=gemm_gluon.AVAILABLE, import_error=gemm_gluon.IMPORT_ERROR,
                        configs=gemm_gluon.CONFIGS,
                        compile_errors={str(k): v for k, v in gemm_gluon.COMPILE_ERRORS.items()},
                        chosen={str(k): v for k, v in gemm_gluon._BEST.items()})
    res["gluon_ws"] = dict(available=gemm_gluon_ws.AVAILABLE, import_error=gemm_gluon_ws.IMPORT_ERROR,
                           configs=gemm_gluon_ws.CONFIGS,
                           compile_errors={str(k): v for k, v in gemm_gluon_ws.COMPILE_ERRORS.items()},
                           chosen={str(k): v for k, v in gemm_gluon_ws._BEST.items()})
    summarize(res)
    log(res["markdown"])
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
    if plot_path:
        plot(res, plot_path)
    if md_path:
        with open(md_path, "w") as f:
            f.write(res["markdown"])
    return res


def summarize(res) -> None:
    """Bars, README table and summary of a result (after a run, or after redispatch)."""
    res["bars"] = bars(res["gemm"], res.get("quantize", {}))
    res["bars_fp8_weights"] = bars(res["gemm"], {}, "speedup_vs_bf16_fp8_weights")
    res["bars_other_model"] = bars(res["gemm"], {}, models=tuple(sorted({r["model"] for r in res["gemm"]}
                                                                        - set(BAR_MODELS))))
    res["markdown"] = markdown(res)
    res["summary_markdown"] = speed_summary(res)


def redispatch(path: str) -> dict:
    """The dispatch of this checkout applied to a recorded run: per row, the method select_method picks now and its
    measured column become the w4a4 (dispatch) time; the run's own dispatch is kept as method_at_run/w4a4_at_run_ms.
    Nothing is re-timed: every method column was measured in that one run beside cuBLAS bf16."""
    with open(path) as f:
        res = json.load(f)
    for r in res["gemm"]:
        r.setdefault("method_at_run", r["method"])
        r.setdefault("w4a4_at_run_ms", r["w4a4_ms"])
        pick = dispatch_pick(res, r["M"])
        if pick == "blockwise" and r["N"] % gemm_blockwise.N_ALIGN:
            pick = "fp8"
        t = r.get(f"{pick}_ms") or (r.get("fp8_ms") if pick == "blockwise" else None)
        if t:
            r["method"], r["w4a4_ms"] = pick, t
            r["speedup_vs_bf16"] = r["cublas_bf16_ms"] / t
    res["dispatch"]["redispatched"] = ("w4a4_ms / method / speedup_vs_bf16 = the column of the method this "
                                       "checkout's select_method picks; method_at_run / w4a4_at_run_ms = the run's")
    res["dispatch"].update(FP8_MIN_M=G.FP8_MIN_M, BLOCKWISE_MIN_M=G.BLOCKWISE_MIN_M,
                           FUSED8_MIN_M=getattr(G, "FUSED8_MIN_M", None), FUSED8_MAX_M=getattr(G, "FUSED8_MAX_M", None))
    summarize(res)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(res["markdown"])
    plot(res, os.path.splitext(path)[0] + ".png")
    print(res["summary_markdown"])
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every shape and time here")
    ap.add_argument("--plot", help="PNG of speed-ups (default: next to --json)")
    ap.add_argument("--markdown", help="write the README table here")
    ap.add_argument("--quick", action="store_true", help=f"M in {QUICK_MS} only")
    ap.add_argument("--lean", action="store_true", help="skip the INT8/FP8 per-tensor library columns, the eager and "
                    "the clean-L2 timings (they do not enter the bars); fits a short device lease")
    ap.add_argument("--ms", help="comma-separated token counts (default: " + ",".join(map(str, MS)) + ")")
    ap.add_argument("--rep", type=int, default=40, help="do_bench rep in ms per timing (default 40)")
    ap.add_argument("--gluon-ms", help="time the Gluon method only at these M (comma-separated; 0: never)")
    ap.add_argument("--ws-ms", help="time the warp-specialized Gluon method only at these M (comma-separated)")
    ap.add_argument("--models", help="only these models' shapes (comma-separated, e.g. 7B,13B)")
    ap.add_argument("--no-quant", action="store_true", help="skip the fused-quantizer benchmark")
    ap.add_argument("--redispatch", metavar="JSON", help="no GPU: re-derive the dispatch columns of a recorded run "
                    "from its method columns with this checkout's select_method, rewrite JSON, .md and the plot")
    args = ap.parse_args(argv)
    global REP, GLUON_MS, WS_MS, MODELS, NO_QUANT
    REP = args.rep
    GLUON_MS = [int(m) for m in args.gluon_ms.split(",")] if args.gluon_ms else None
    WS_MS = [int(m) for m in args.ws_ms.split(",")] if args.ws_ms else None
    MODELS = args.models.split(",") if args.models else None
    NO_QUANT = args.no_quant
    if args.redispatch:
        redispatch(args.redispatch)
        return
    plot_path = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    ms = [int(m) for m in args.ms.split(",")] if args.ms else None
    run(args.json, plot_path, args.markdown, args.quick, lean=args.lean, ms=ms)


if __name__ == "__main__":
    main()
