"""Configuration sweep of the W4A4 GEMM on a GPU: every variant, every Llama-2-7B shape, checked and timed in one
run, next to cuBLAS bf16 in the same run. Its tables chose the dispatch in kernels/gemm.py (benchmarks/NOTES.md).

    python benchmarks/sweep_gemm.py [--out DIR] [--small] [--large] [--shapes 0,1,2,3]
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

from atom_lab.kernels import gemm_fp8, gemm_int4  # noqa: E402
from atom_lab.kernels import w4a4_gemm, w4a4_gemm_ref  # noqa: E402
from benchmarks.common import LLAMA2_7B, bench_ms, copy_bandwidth_gbs, device_facts, library_fns, packed_inputs  # noqa: E402,E501


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "sweep_out"))
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--shapes", default="0,1,2,3")
    ap.add_argument("--small-ms", default="1,16,64")
    ap.add_argument("--large-ms", default="256,1024,4096,8192")
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop starting new shapes after this")
    args = ap.parse_args()
    both = not (args.small or args.large)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    rows = []
    info = device_facts()
    print(info, flush=True)
    info["copy_gbs"] = copy_bandwidth_gbs()
    print(f"copy bandwidth {info['copy_gbs']:.0f} GB/s (read + write)", flush=True)

    def save():
        with open(os.path.join(args.out, "sweep.json"), "w") as f:
            json.dump({"device": info, "rows": rows}, f, indent=1)

    def record(shape, M, variant, fn, ref=None, flush="write"):
        try:
            out = fn()
            torch.cuda.synchronize()
            err = rel_err(out, ref) if ref is not None else None
            ms = bench_ms(fn, flush=flush)
        except Exception as e:  # keep sweeping; the failure is part of the record
            rows.append(dict(shape=shape, M=M, variant=variant, error=f"{type(e).__name__}: {str(e)[:200]}"))
            print(f"  {variant:40s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            return None
        rows.append(dict(shape=shape, M=M, variant=variant, ms=ms, rel_err=err, flush=flush))
        print(f"  {variant:40s} {ms * 1e3:9.1f} us  err {err if err is None else f'{err:.1e}'}", flush=True)
        return ms

    shapes = [LLAMA2_7B[int(i)] for i in args.shapes.split(",")]
    small_ms = [int(m) for m in args.small_ms.split(",")] if (args.small or both) else []
    large_ms = [int(m) for m in args.large_ms.split(",")] if (args.large or both) else []
    for K, N, name in shapes:
        if time.time() - t_start > args.budget_s:
            print("budget reached, stopping", flush=True)
            break
        shape = f"{K}x{N}"
        for M in small_ms + large_ms:
            x, w, a, wq = packed_inputs(M, K, N)
            out16 = torch.empty(M, N, dtype=torch.float16, device="cuda")
            ref = w4a4_gemm_ref(a, wq, torch.float32) if M <= 1024 else None
            print(f"== {name} K={K} N={N} M={M}", flush=True)
            libs = library_fns(x, w)
            for lib, fn in libs.items():
                if callable(fn):
                    record(shape, M, lib, fn)
                    if M <= 256:
                        record(shape, M, lib + " [read-flush]", fn, flush="read")
                else:
                    rows.append(dict(shape=shape, M=M, variant=lib, error=fn))
            record(shape, M, "w4a4_gemm (autotuned)", lambda: w4a4_gemm(a, wq), ref)
            if M <= 256:
                record(shape, M, "w4a4_gemm (autotuned) [read-flush]", lambda: w4a4_gemm(a, wq), ref, flush="read")
            if M <= 64:
                BY = max(16, min(64, 1 << (M - 1).bit_length()))
                best = (None, 1e9)
                for BX in (64, 128):
                    for split in ((1, 2, 4, 8, 16) if M <= 16 else (1, 2, 4, 8)):
                        def fn(BX=BX, split=split):
                            gemm_int4._launch_fused(wq, a, out16, None, True, BX, BY, split, 4, 4)
                            return out16
                        t = record(shape, M, f"fused swap BX{BX} BY{BY} split{split} s4", fn, ref)
                        if t is not None and t < best[1]:
                            best = ((BX, split), t)
                if best[0] is not None:
                    BX, split = best[0]
                    for ns in (3, 6):
                        def fn(BX=BX, split=split, ns=ns):
                            gemm_int4._launch_fused(wq, a, out16, None, True, BX, BY, split, 4, ns)
                            return out16
                        record(shape, M, f"fused swap BX{BX} BY{BY} split{split} s{ns}", fn, ref)
            else:
                a8 = gemm_fp8.unpack_fp8(a)
                w8 = gemm_fp8.unpack_fp8(wq)
                record(shape, M, "unpack_fp8 A", lambda: gemm_fp8.unpack_fp8(a)[0])
                record(shape, M, "unpack_fp8 W", lambda: gemm_fp8.unpack_fp8(wq)[0])
                for BM, BN, nw, ns, tma in ((128, 128, 8, 3, True), (128, 128, 8, 4, True), (64, 128, 4, 3, True),
                                            (64, 128, 4, 4, True), (64, 128, 4, 5, True), (128, 64, 4, 4, True),
                                            (64, 128, 4, 4, False)):
                    tag = f"fp8{' tma' if tma else ''} {BM}x{BN} w{nw} s{ns}"

                    def gemm_only(BM=BM, BN=BN, nw=nw, ns=ns, tma=tma):
                        gemm_fp8._launch_fp8(a, wq, out16, None, BM, BN, nw, ns, tma=tma, a8=a8, w8=w8)
                        return out16

                    def full(BM=BM, BN=BN, nw=nw, ns=ns, tma=tma):
                        gemm_fp8._launch_fp8(a, wq, out16, None, BM, BN, nw, ns, tma=tma)
                        return out16
                    if (BM, BN, ns, tma) in ((64, 128, 4, True), (128, 128, 4, True)):
                        record(shape, M, tag + " gemm-only", gemm_only, ref)
                    record(shape, M, tag + " +unpack", full, ref)
                if M <= 1024:
                    def fn():
                        gemm_int4._launch_fused(a, wq, out16, None, False, 64, 128, 1, 4, 4)
                        return out16
                    record(shape, M, "fused 64x128 w4 s4", fn, ref)
                if M <= 256:
                    for BX, split in ((64, 1), (64, 2), (128, 1)):
                        def fn(BX=BX, split=split):
                            gemm_int4._launch_fused(wq, a, out16, None, True, BX, 128, split, 4, 4)
                            return out16
                        record(shape, M, f"fused swap BX{BX} BY128 split{split} s4", fn, ref)
            if libs.get("cublas_bf16") and callable(libs["cublas_bf16"]):
                record(shape, M, "cublas_bf16 (again)", libs["cublas_bf16"])
            save()
            x = w = a = wq = out16 = ref = None  # free before the next shape
            torch.cuda.empty_cache()

    # Short table: per shape and M, cuBLAS bf16 and the best of our variants (ratio = bf16 time / ours).
    print("\nshape        M   bf16_us   best_us  ratio  (tuned: autotuned w4a4_gemm; read-flush: clean-L2 timing)")
    for K, N, _ in shapes:
        shape = f"{K}x{N}"
        for M in small_ms + large_ms:
            rs = [r for r in rows if r["shape"] == shape and r["M"] == M and "ms" in r]
            base = [r for r in rs if r["variant"] == "cublas_bf16"]
            ours = [r for r in rs if (r["variant"].startswith("fused") or r["variant"].endswith("+unpack")
                                      or r["variant"] == "w4a4_gemm (autotuned)")]
            if not base or not ours:
                continue
            best = min(ours, key=lambda r: r["ms"])
            tuned = [r for r in rs if r["variant"] == "w4a4_gemm (autotuned)"]
            tr = f"{base[0]['ms'] / tuned[0]['ms']:6.2f}" if tuned else "   n/a"
            rd = {r["variant"]: r["ms"] for r in rs if r.get("flush") == "read"}
            rr = (f"{rd['cublas_bf16 [read-flush]'] / rd['w4a4_gemm (autotuned) [read-flush]']:6.2f}"
                  if "cublas_bf16 [read-flush]" in rd and "w4a4_gemm (autotuned) [read-flush]" in rd else "   n/a")
            print(f"{shape:10s} {M:5d} {base[0]['ms'] * 1e3:9.1f} {best['ms'] * 1e3:9.1f} "
                  f"{base[0]['ms'] / best['ms']:6.2f} tuned {tr} read-flush {rr}  {best['variant']}")
    save()


if __name__ == "__main__":
    main()
