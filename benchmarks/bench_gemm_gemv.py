"""The CUDA-core "gemv" method (kernels/gemm_gemv.py) against the fused kernel and cuBLAS bf16 at a few tokens, in one
run (CUDA-graph replays, L2 flushed), Llama-2-7B/13B shapes; weight bytes per program 4096 / 8192 / 16384.

    python benchmarks/bench_gemm_gemv.py [--out results/gemm_h200_gemv.json] [--smoke]
Every output is checked against w4a4_gemm_ref (max |err| / max |ref| recorded).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import atom_lab  # noqa: E402,F401

from atom_lab.kernels import gemm_gemv, w4a4_gemm, w4a4_gemm_ref  # noqa: E402
from atom_lab.kernels.formats import quantize_atom_ref  # noqa: E402
from benchmarks.common import SHAPES, bench_ms, device_facts, write_json  # noqa: E402

DEV = atom_lab.default_device().type


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gemm_h200_gemv.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (a check of the script)")
    args = ap.parse_args()
    t0 = time.time()
    gpu = DEV == "cuda"
    time_ms = (lambda f: bench_ms(f, graph=True)) if gpu else (lambda f: (f(), 0.0)[1])
    shapes = [s for s in SHAPES if s[0] == "7B" or s[3] in ("up/gate", "down")] if not args.smoke else [
        ("tiny", 256, 192, "t")]
    ms = [1, 4, 16] if not args.smoke else [1, 3]
    info = device_facts() if gpu else atom_lab.environment()
    rows = []
    for model, K, N, name in shapes:
        g = torch.Generator(device=DEV).manual_seed(K + N)
        x = torch.randn(max(ms), K, device=DEV, generator=g)
        x[:, K - 128:] *= 20
        w = torch.randn(N, K, device=DEV, generator=g) * 0.02
        wq = quantize_atom_ref(w, 128, 128, clip=0.85)
        wb = w.to(torch.bfloat16)
        for M in ms:
            a = quantize_atom_ref(x[:M].contiguous(), 128, 128, clip=0.9)
            xb = x[:M].to(torch.bfloat16)
            ref = w4a4_gemm_ref(a, wq, torch.float32)
            row = dict(model=model, K=K, N=N, layer=name, M=M, bf16_us=time_ms(lambda: torch.matmul(xb, wb.T)) * 1e3)
            row["fused_us"] = time_ms(lambda: w4a4_gemm(a, wq, method="fused")) * 1e3
            for bpp in (4096, 8192, 16384):
                gemm_gemv.BYTES_PER_PROGRAM = bpp
                out = w4a4_gemm(a, wq, method="gemv")
                row[f"gemv{bpp}_err"] = float((out.float() - ref).abs().max() / ref.abs().max())
                row[f"gemv{bpp}_us"] = time_ms(lambda: w4a4_gemm(a, wq, method="gemv")) * 1e3
            gemm_gemv.BYTES_PER_PROGRAM = 8192
            best = min((row[f"gemv{b}_us"], b) for b in (4096, 8192, 16384))
            row.update(gemv_best_us=best[0], gemv_best_bytes=best[1])
            if gpu:
                row.update(fused_x_bf16=row["bf16_us"] / row["fused_us"], gemv_x_bf16=row["bf16_us"] / best[0])
            rows.append(row)
            print(f"{model:4s} {name:8s} K={K:5d} N={N:5d} M={M:3d} bf16 {row['bf16_us']:7.1f} "
                  f"fused {row['fused_us']:7.1f} gemv {row['gemv4096_us']:7.1f}/{row['gemv8192_us']:7.1f}/"
                  f"{row['gemv16384_us']:7.1f} us  x{row.get('fused_x_bf16', 0):.2f} -> "
                  f"x{row.get('gemv_x_bf16', 0):.2f}  err {row['gemv8192_err']:.1e}",
                  flush=True)
        res = dict(device=info, rows=rows, seconds=time.time() - t0)  # after every shape (a cut-off run keeps it)
        write_json(args.out, res)
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
