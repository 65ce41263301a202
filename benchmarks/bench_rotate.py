"""Cost of QuaRot's online rotation of the down_proj input: silu_mul_rotate_quantize vs silu_mul_quantize.

Llama-2-7B's down_proj input (K = 11008 = 2 x 5504, a randomised Hadamard built by atom_lab.rotation; random
activations, the model files are not on the GPU machine), M = 1..8192 token rows, 128 INT8 keepers, groups of 128,
CUDA graphs (bench_ms(graph=True)). The rotation kernel is dense (a K x K product per row), so it costs a GEMM of
M x K x K: the table shows how much that adds next to the plain fused kernel.

    python -m benchmarks.bench_rotate --json benchmarks/results/h200_rotate.json
"""
from __future__ import annotations

import argparse
import json
import time

import atom_lab  # noqa: F401  (must precede triton)

import torch

from atom_lab.kernels import silu_mul_quantize, silu_mul_rotate_quantize
from atom_lab.rotation import rotation_matrix
from benchmarks.common import MS, bench_ms, device_facts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--K", type=int, default=11008)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--keeper", type=int, default=128)
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--json")
    args = p.parse_args(argv)
    K, G, keeper = args.K, args.group, args.keeper
    t0 = time.time()
    R = rotation_matrix(K, "hadamard", seed=1).float().cuda().contiguous()
    build_s = time.time() - t0
    index = torch.randperm(K, device="cuda")
    rows = []
    print(f"K={K} G={G} keeper={keeper} (Hadamard built in {build_s:.1f} s)")
    print(f"{'M':>6}{'plain us':>11}{'rotate us':>11}{'ratio':>8}{'rot TFLOP/s':>13}")
    for M in [int(m) for m in args.ms.split(",")]:
        gate = torch.randn(M, K, device="cuda", dtype=torch.float16)
        up = torch.randn(M, K, device="cuda", dtype=torch.float16)
        plain = bench_ms(lambda: silu_mul_quantize(gate, up, index, G, keeper, 0.9), graph=True)
        rot = bench_ms(lambda: silu_mul_rotate_quantize(gate, up, R, index, G, keeper, 0.9), graph=True)
        tflops = 2 * M * K * K / (rot * 1e-3) / 1e12
        rows.append({"M": M, "plain_us": plain * 1e3, "rotate_us": rot * 1e3, "ratio": rot / plain,
                     "rotate_tflops": tflops})
        print(f"{M:>6}{plain * 1e3:>11.1f}{rot * 1e3:>11.1f}{rot / plain:>8.2f}{tflops:>13.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"what": "silu_mul_rotate_quantize vs silu_mul_quantize, Llama-2-7B down_proj input, random "
                               "fp16 activations, CUDA graphs, median of do_bench", "K": K, "group": G,
                       "keeper": keeper, "device": device_facts(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
