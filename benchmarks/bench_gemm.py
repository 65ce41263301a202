"""Benchmark of the W4A4 kernels against the libraries, on Llama-2-7B shapes, all in one run on one GPU.

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
from atom_lab.kernels import gemm_fp8  # noqa: E402
from atom_lab.kernels import w4a4_gemm, w4a4_gemm_ref  # noqa: E402
from benchmarks.common import (GRAPH_FAILURES, LLAMA2_7B, MS, QUICK_MS, bench_ms, copy_bandwidth_gbs,  # noqa: E402
                               device_facts, floors_us, library_fns, packed_inputs)

GROUP, KEEPER = 128, 128
BAR_SMALL, BAR_LARGE = 3.0, 1.3   # issue 6: x cuBLAS bf16 at M <= 16, and at M >= 2048
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


def bench_gemms(ms, log=print):
    """Per shape and M: GPU time from CUDA-graph replays (the primary number, L2 flushed by do_bench before each
    replay), the eager do_bench time, and for M <= 256 the clean-L2 GPU time (see benchmarks/common.py)."""
    rows = []
    for K, N, layer in LLAMA2_7B:
        for M in ms:
            x, w, a, wq = packed_inputs(M, K, N, GROUP, KEEPER)
            row = dict(layer=layer, K=K, N=N, M=M, method=G.choose_method(M, x.device))
            libs = library_fns(x, w)
            for lib, fn in libs.items():
                if callable(fn):
                    row[lib + "_ms"] = bench_ms(fn, graph=True)
                else:
                    row[lib + "_ms"] = None
                    row[lib + "_error"] = fn
            out = w4a4_gemm(a, wq)  # the first call autotunes
            torch.cuda.synchronize()
            if M <= 1024:  # exact reference is affordable: check the timed kernel's output
                ref = w4a4_gemm_ref(a, wq, torch.float32)
                row["rel_err_vs_ref"] = ((out.float() - ref).norm() / ref.norm()).item()
            ours = lambda: w4a4_gemm(a, wq)  # noqa: E731
            row["w4a4_ms"] = bench_ms(ours, graph=True)
            row["config"] = G.last_config(M, row["method"])
            row["cublas_bf16_eager_ms"] = bench_ms(libs["cublas_bf16"])
            row["w4a4_eager_ms"] = bench_ms(ours)
            if row["method"] == "fp8":
                a8, w8 = G.unpack_fp8(a), G.unpack_fp8(wq)
                row["w4a4_unpack_a_ms"] = bench_ms(lambda: G.unpack_fp8(a), graph=True)
                row["w4a4_unpack_w_ms"] = bench_ms(lambda: G.unpack_fp8(wq), graph=True)
                row["w4a4_gemm_only_ms"] = bench_ms(lambda: gemm_fp8._launch_fp8_tuned(a, wq, out, None, a8=a8, w8=w8),
                                                    graph=True)
            base = row["cublas_bf16_ms"]
            row["speedup_vs_bf16"] = base / row["w4a4_ms"]
            row["speedup_vs_bf16_eager"] = row["cublas_bf16_eager_ms"] / row["w4a4_eager_ms"]
            if M <= 256:  # memory-bound: also time with a clean L2 (see benchmarks/common.py)
                row["cublas_bf16_clean_l2_ms"] = bench_ms(libs["cublas_bf16"], flush="read", graph=True)
                row["w4a4_clean_l2_ms"] = bench_ms(ours, flush="read", graph=True)
                row["speedup_vs_bf16_clean_l2"] = row["cublas_bf16_clean_l2_ms"] / row["w4a4_clean_l2_ms"]
            for lib in ("int_mm_int8", "scaled_mm_fp8"):
                t = row[lib + "_ms"]
                row[f"{lib}_speedup_vs_bf16"] = base / t if t else None
            row["tflops_w4a4"] = 2 * M * N * K / row["w4a4_ms"] / 1e9
            if layer == "o_proj" and M == 1:
                row["host_us_per_call_w4a4"] = host_us_per_call(ours)
                row["host_us_per_call_cublas_bf16"] = host_us_per_call(libs["cublas_bf16"])
            rows.append(row)
            log(f"{layer:8s} K={K:5d} N={N:5d} M={M:5d}  bf16 {base * 1e3:8.1f} us  w4a4 {row['w4a4_ms'] * 1e3:8.1f} us"
                f" ({row['method']}, {row['config']})  x{row['speedup_vs_bf16']:.2f}"
                f"  [eager x{row['speedup_vs_bf16_eager']:.2f}"
                + (f", clean L2 x{row['speedup_vs_bf16_clean_l2']:.2f}]" if M <= 256 else "]"))
            x = w = a = wq = out = libs = None  # free before the next shape
            torch.cuda.empty_cache()
    return rows


def bench_quantize(ms, copy_gbs, log=print):
    """Fused RMSNorm + reorder + quantize of M rows of 4096, against the copy bandwidth (bytes read + written)."""
    fn = getattr(kernels, "rmsnorm_quantize", None)
    if fn is None:
        return {"available": False, "note": "kernels.rmsnorm_quantize not in this checkout"}
    rows = []
    K = 4096
    # check_finite=False: the NaN/inf check synchronizes with the host, which a CUDA graph cannot capture.
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        weight = torch.rand(K, device="cuda", dtype=torch.float16) + 0.5
        index = torch.randperm(K, device="cuda")
        p = fn(x, weight, 1e-6, index, GROUP, KEEPER, 0.9, check_finite=False)
        torch.cuda.synchronize()
        ms_ = bench_ms(lambda: fn(x, weight, 1e-6, index, GROUP, KEEPER, 0.9, check_finite=False), graph=True)
        nbytes = (x.numel() * x.element_size() + weight.numel() * weight.element_size()
                  + index.numel() * index.element_size() + p.nbytes())
        gbs = nbytes / ms_ / 1e6
        ms_clean = bench_ms(lambda: fn(x, weight, 1e-6, index, GROUP, KEEPER, 0.9, check_finite=False), flush="read", graph=True)
        rows.append(dict(M=M, K=K, ms=ms_, bytes=nbytes, gbs=gbs, fraction_of_copy=gbs / copy_gbs,
                         ms_clean_l2=ms_clean, fraction_of_copy_clean_l2=nbytes / ms_clean / 1e6 / copy_gbs))
        log(f"rmsnorm_quantize M={M:5d}: {ms_ * 1e3:8.1f} us  {gbs:7.0f} GB/s = {gbs / copy_gbs:.0%} of copy "
            f"(clean L2: {ms_clean * 1e3:.1f} us)")
    return {"available": True, "rows": rows}


def bars(rows, quant):
    out = {"small_m": [], "small_m_clean_l2": [], "large_m": [], "quantize": []}
    for r in rows:
        if r["M"] <= 16:
            out["small_m"].append(dict(layer=r["layer"], M=r["M"], ratio=r["speedup_vs_bf16"],
                                       met=r["speedup_vs_bf16"] >= BAR_SMALL))
            out["small_m_clean_l2"].append(dict(layer=r["layer"], M=r["M"], ratio=r["speedup_vs_bf16_clean_l2"],
                                                met=r["speedup_vs_bf16_clean_l2"] >= BAR_SMALL))
        if r["M"] >= 2048:
            out["large_m"].append(dict(layer=r["layer"], M=r["M"], ratio=r["speedup_vs_bf16"],
                                       met=r["speedup_vs_bf16"] >= BAR_LARGE))
    for r in quant.get("rows", []):
        if r["M"] >= 256:
            out["quantize"].append(dict(M=r["M"], fraction=r["fraction_of_copy"], met=r["fraction_of_copy"] >= BAR_QUANT))
    summary = {}
    for key, bar in (("small_m", BAR_SMALL), ("small_m_clean_l2", BAR_SMALL), ("large_m", BAR_LARGE),
                     ("quantize", BAR_QUANT)):
        vals = [v["ratio" if key != "quantize" else "fraction"] for v in out[key]]
        if vals:
            summary[key] = dict(bar=bar, worst=min(vals), best=max(vals), all_met=all(v["met"] for v in out[key]))
    out["summary"] = summary
    return out


def markdown(res, lib_note: str | None = None) -> str:
    """README table. lib_note: where the INT8/FP8 library times come from, when not from this run."""
    dev = res["device"]
    star = "*" if lib_note else ""
    lines = [f"W4A4 GEMM (group {GROUP}, {KEEPER} INT8 keeper channels, fp16 out) on **{dev['device']}**, "
             f"torch {dev['torch']}, triton {dev['triton']}. GPU times in microseconds: median of CUDA-graph replays "
             f"(triton.testing.do_bench, L2 flushed before each); x = speed-up over cuBLAS bf16 in the same run; "
             f"clean L2 = the same with the flush done by reading (no dirty lines left to write back).", "",
             f"| layer (K x N) | M | cuBLAS bf16 | INT8 _int_mm{star} | FP8 _scaled_mm{star} | W4A4 (ours) | method | x bf16 "
             "| x bf16, clean L2 | x bf16, eager |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]

    def us(v):
        return "n/a" if v is None else f"{v * 1e3:.1f}"
    for r in res["gemm"]:
        lines.append(f"| {r['layer']} ({r['K']}x{r['N']}) | {r['M']} | {us(r['cublas_bf16_ms'])} | "
                     f"{us(r['int_mm_int8_ms'])} | {us(r['scaled_mm_fp8_ms'])} | {us(r['w4a4_ms'])} | "
                     f"{r['method']} | {r['speedup_vs_bf16']:.2f} | "
                     + (f"{r['speedup_vs_bf16_clean_l2']:.2f}" if "speedup_vs_bf16_clean_l2" in r else "")
                     + f" | {r['speedup_vs_bf16_eager']:.2f} |")
    if lib_note:
        lines += ["", f"\\* {lib_note}"]
    q = res.get("quantize", {})
    if q.get("rows"):
        lines += ["", f"Fused RMSNorm + reorder + quantize, rows of 4096 (copy bandwidth {res['copy_gbs']:.0f} GB/s, "
                      f"bytes read + written):", "", "| M | time (us) | GB/s | of copy |", "|---:|---:|---:|---:|"]
        for r in q["rows"]:
            lines.append(f"| {r['M']} | {r['ms'] * 1e3:.1f} | {r['gbs']:.0f} | {r['fraction_of_copy']:.0%} |")
    s = res["bars"]["summary"]
    lines += ["", "Bars (issue 6): " + "; ".join(
        f"{k}: worst {v['worst']:.2f} vs bar {v['bar']} -> {'met' if v['all_met'] else 'NOT met'}"
        for k, v in s.items())]
    return "\n".join(lines) + "\n"


def plot(res, path, suptitle: str | None = None, lib_title: str | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    colors = sns.color_palette("colorblind", 4)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for i, (K, N, layer) in enumerate(LLAMA2_7B):
        rs = [r for r in res["gemm"] if r["K"] == K and r["N"] == N]
        Ms = [r["M"] for r in rs]
        axes[0].plot(Ms, [r["speedup_vs_bf16"] for r in rs], "o-", color=colors[i], label=f"{layer} {K}x{N}")
        for lib, style in (("scaled_mm_fp8", "--"), ("int_mm_int8", ":")):
            pts = [(r["M"], r[f"{lib}_speedup_vs_bf16"]) for r in rs if r[f"{lib}_speedup_vs_bf16"]]
            if pts:
                axes[1].plot(*zip(*pts), style, marker=".", color=colors[i],
                             label=f"{lib.split('_')[-1].upper()} {layer}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speed-up over cuBLAS bf16 (x)")
    axes[0].axhline(BAR_SMALL, color="black", ls="--", lw=0.8)
    axes[0].axhline(BAR_LARGE, color="black", ls=":", lw=0.8)
    axes[0].text(1, BAR_SMALL * 1.02, "bar M<=16", fontsize=8)
    axes[0].text(2048, BAR_LARGE * 1.04, "bar M>=2048", fontsize=8)
    axes[0].set_title("W4A4 group-128 GEMM (ours)")
    axes[1].set_title(lib_title or "Library INT8 / FP8 GEMMs (no group scales)")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(suptitle or f"{res['device']['device']}: Llama-2-7B linear layers, one run, GPU times")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(json_path=None, plot_path=None, md_path=None, quick=False, log=print) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("atom-lab bench needs a CUDA GPU: under the CPU interpreter timings mean nothing.")
    t0 = time.time()
    info = device_facts()
    info["copy_gbs"] = copy_bandwidth_gbs()
    log(f"{info['device']}: copy bandwidth {info['copy_gbs']:.0f} GB/s (read + write)")
    ms = QUICK_MS if quick else MS
    rows = bench_gemms(ms, log)
    fp8_rates = [2 * r["M"] * r["N"] * r["K"] / r["scaled_mm_fp8_ms"] / 1e9 for r in rows if r["scaled_mm_fp8_ms"]]
    tc = max(fp8_rates) if fp8_rates else 1000.0
    for r in rows:
        f = floors_us(r["M"], r["K"], r["N"], GROUP, KEEPER, info["copy_gbs"], tc)
        r.update(floor_bytes_us=f["bytes_us"], floor_flops_us=f["flops_us"],
                 of_floor=max(f["bytes_us"], f["flops_us"]) / (r["w4a4_ms"] * 1e3))
    quant = bench_quantize([256, 1024, 4096, 8192] if not quick else [256, 4096], info["copy_gbs"], log)
    res = dict(device=info, copy_gbs=info["copy_gbs"], fp8_library_peak_tflops=tc, group=GROUP, keeper=KEEPER,
               timing="triton.testing.do_bench median of CUDA-graph replays, L2 flushed before each run",
               graph_capture_failures=GRAPH_FAILURES, gemm=rows, quantize=quant, seconds=time.time() - t0)
    res["bars"] = bars(rows, quant)
    res["markdown"] = markdown(res)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every shape and time here")
    ap.add_argument("--plot", help="PNG of speed-ups (default: next to --json)")
    ap.add_argument("--markdown", help="write the README table here")
    ap.add_argument("--quick", action="store_true", help=f"M in {QUICK_MS} only")
    args = ap.parse_args(argv)
    plot_path = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    run(args.json, plot_path, args.markdown, args.quick)


if __name__ == "__main__":
    main()
