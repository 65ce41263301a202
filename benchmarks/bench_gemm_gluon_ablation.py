"""Where the Gluon W4A4 kernel's time goes: time it with one stage of its K loop left out (METHOD.md: "time variants
that leave one stage out and take differences"). Timing only: every ablated variant computes a wrong result.

    ablate 0  the kernel as shipped
    ablate 1  no unpack in the loop (no shared-memory load / bit ops / store / barriers; the MMA reads stale buffers)
    ablate 2  no scale loads in the loop (constant scales; the rescale arithmetic stays)
    ablate 3  no overlap: wait for step t's MMA before rescaling step t - 1 (as a plain Triton dot would)
    ablate 4  no global copies after the prologue (the cp.async ring keeps stale bytes)

Same inputs, same configuration (64 x 64, 4 stages, not swapped, no split), L2 flushed (do_bench), cuBLAS bf16 in the
same run. Writes JSON (--json) with the device and versions.

    python benchmarks/bench_gemm_gluon_ablation.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import atom_lab  # noqa: E402,F401

import torch  # noqa: E402

from atom_lab.kernels import gemm_gluon, w4a4_gemm_ref  # noqa: E402
from benchmarks.common import bench_ms, device_facts, packed_inputs  # noqa: E402

CASES = [(8192, 4096, 11008), (256, 4096, 11008), (64, 11008, 4096)]  # (M, K, N): large, mid, small-mid
CFG = (False, 64, 64, 4, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not gemm_gluon.AVAILABLE:
        raise SystemExit(f"no Gluon here: {gemm_gluon.IMPORT_ERROR}")
    rows = []
    for M, K, N in CASES:
        x, w, a, wq = packed_inputs(M, K, N)
        xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
        bf16 = bench_ms(lambda: torch.matmul(xb, wb.T))
        out = torch.empty(M, N, device="cuda", dtype=torch.float16)
        row = dict(M=M, K=K, N=N, cublas_bf16_ms=bf16, config=CFG)
        for ab in range(5):
            gemm_gluon.launch(a, wq, out, None, *CFG, ablate=ab)
            torch.cuda.synchronize()
            if ab == 0 and M <= 1024:
                ref = w4a4_gemm_ref(a, wq, torch.float32)
                row["rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
            row[f"ablate{ab}_ms"] = bench_ms(lambda ab=ab: gemm_gluon.launch(a, wq, out, None, *CFG, ablate=ab))
        steps = (K - 128) // 128  # one step = one group of 128 channels
        tiles = -(-M // 64) * -(-N // 64)
        row["us_per_step_per_cta_slot"] = row["ablate0_ms"] * 1e3 / (tiles * steps / (2 * 132))
        rows.append(row)
        print(f"M={M:5d} K={K:5d} N={N:5d}  bf16 {bf16 * 1e3:7.1f} us  " + "  ".join(
            f"ab{ab} {row[f'ablate{ab}_ms'] * 1e3:7.1f} us" for ab in range(5)), flush=True)
        x = w = a = wq = xb = wb = out = None
        torch.cuda.empty_cache()
    res = dict(device=device_facts(), timing="triton.testing.do_bench median, L2 flushed (eager: ms-scale kernels)",
               ablations=__doc__.split("\n\n")[1], rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
