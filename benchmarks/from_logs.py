"""Rebuild the committed H100 results (JSON, plot, README table) from the raw outputs of the device runs.

Why this exists: the final `atom-lab bench` run on the H100 printed every GEMM row, then ran past the 270 s limit
its command had (while timing the RMSNorm+quantize kernel), so it never wrote its JSON. The printed rows are the
measurements; this script parses them, adds the INT8/FP8 library timings of the sweep run (the same day, same
machine type; ratios there are against that run's own cuBLAS number) and writes the files bench_gemm.py would have.

    python benchmarks/from_logs.py --bench-log benchmarks/results/h100_bench_run.log \
        --sweep benchmarks/results/h100_sweep_v2.json --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ROW = re.compile(r"^(\S+)\s+K=\s*(\d+) N=\s*(\d+) M=\s*(\d+)\s+bf16\s+([\d.]+) us\s+w4a4\s+([\d.]+) us "
                 r"\((\w+), (.*)\)\s+x([\d.]+)\s+\[eager x([\d.]+)(?:, clean L2 x([\d.]+))?\]")


def parse_bench_log(path):
    rows, copy_gbs = [], None
    for line in open(path):
        m = re.search(r"copy bandwidth (\d+) GB/s", line)
        if m:
            copy_gbs = float(m.group(1))
        m = ROW.match(line.strip())
        if not m:
            continue
        layer, K, N, M, bf16, ours, method, config, x, xe, xc = m.groups()
        row = dict(layer=layer, K=int(K), N=int(N), M=int(M), method=method, config=config,
                   cublas_bf16_ms=float(bf16) / 1e3, w4a4_ms=float(ours) / 1e3, speedup_vs_bf16=float(x),
                   speedup_vs_bf16_eager=float(xe))
        if xc:
            row["speedup_vs_bf16_clean_l2"] = float(xc)
        rows.append(row)
    return rows, copy_gbs


def library_from_sweep(path):
    """{(K, N, M): {lib: ms, ...}} from a sweep JSON (eager do_bench, write flush)."""
    out = {}
    for r in json.load(open(path))["rows"]:
        if r.get("flush", "write") != "write" or r["variant"] not in ("cublas_bf16", "int_mm_int8", "scaled_mm_fp8"):
            continue
        K, N = map(int, r["shape"].split("x"))
        out.setdefault((K, N, r["M"]), {})[r["variant"]] = r.get("ms")
    return out


def main():
    from benchmarks import bench_gemm
    from benchmarks.common import floors_us

    ap = argparse.ArgumentParser()
    ap.add_argument("--bench-log", required=True)
    ap.add_argument("--sweep", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="NVIDIA H100 80GB HBM3")
    args = ap.parse_args()
    rows, copy_gbs = parse_bench_log(args.bench_log)
    libs = library_from_sweep(args.sweep)
    fp8_rates = []
    for (K, N, M), t in libs.items():
        if t.get("scaled_mm_fp8") and M >= 1024:
            fp8_rates.append(2 * M * N * K / t["scaled_mm_fp8"] / 1e9)
    tc = max(fp8_rates)
    for r in rows:
        t = libs.get((r["K"], r["N"], r["M"]), {})
        base = t.get("cublas_bf16")
        for lib in ("int_mm_int8", "scaled_mm_fp8"):
            r[f"sweep_{lib}_ms"] = t.get(lib)
            r[f"{lib}_speedup_vs_bf16"] = base / t[lib] if base and t.get(lib) else None
        r["sweep_cublas_bf16_ms"] = base
        r["int_mm_int8_ms"] = r["sweep_int_mm_int8_ms"]  # for the table: the sweep run's library times
        r["scaled_mm_fp8_ms"] = r["sweep_scaled_mm_fp8_ms"]
        f = floors_us(r["M"], r["K"], r["N"], bench_gemm.GROUP, bench_gemm.KEEPER, copy_gbs, tc)
        r.update(floor_bytes_us=f["bytes_us"], floor_flops_us=f["flops_us"],
                 floor_over_measured=max(f["bytes_us"], f["flops_us"]) / (r["w4a4_ms"] * 1e3))
    quant = {"available": True, "measured": False,
             "note": "kernels.rmsnorm_quantize (branch kern) was merged and is benchmarked by bench_gemm.py, but the "
                     "H100 run ended (command timeout) before its first row; no number of ours to report."}
    res = dict(device={"device": args.device, "torch": "2.11.0+cu130", "triton": "3.6.0", "python": "3.12.3",
                       "sm_count": 132, "l2_mb": 50.0},
               copy_gbs=copy_gbs, fp8_library_peak_tflops=tc, group=bench_gemm.GROUP, keeper=bench_gemm.KEEPER,
               timing=("GEMM rows: triton.testing.do_bench median of CUDA-graph replays, L2 flushed (written) before "
                       "each; eager and clean-L2 (read flush) ratios beside them. INT8/FP8 library times: the sweep "
                       "run (eager do_bench), each ratio against that run's own cuBLAS bf16 time."),
               source={"gemm": os.path.basename(args.bench_log), "libraries": os.path.basename(args.sweep)},
               gemm=rows, quantize=quant)
    res["bars"] = bench_gemm.bars(rows, {})
    res["markdown"] = bench_gemm.markdown(
        res, lib_note="INT8/FP8 library times from the sweep run (results/h100_sweep_v2.json, eager do_bench, "
                      "write flush); in that run cuBLAS bf16 took `sweep_cublas_bf16_ms` (in the JSON), within a few "
                      "percent of the bf16 column here at M >= 64.")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "h100_w4a4_gemm.json"), "w") as f:
        json.dump(res, f, indent=1)
    bench_gemm.plot(res, os.path.join(args.out, "h100_w4a4_gemm.png"),
                    suptitle=f"{args.device}: Llama-2-7B linear layers (left: final bench run, CUDA-graph GPU times)",
                    lib_title="Library INT8 / FP8 GEMMs, sweep run (no group scales)")
    print(res["markdown"])


if __name__ == "__main__":
    main()
