"""Cost of QuaRot's online rotation of the down_proj input on the GPU: SiLU * up + rotation + quantize against the
plain fused SiLU * up + quantize kernel, measured in the same run.

Shapes (random fp16 activations: the model files are not on the GPU machine):
    smollm2     K = 1536 = 12 x 128, groups of 64: the structured randomised Hadamard kron(H_12, H_128)
    llama2-7b   K = 11008 = 86 x 128, groups of 128: NO Hadamard matrix of order 86 exists (86 is not a multiple of
                4) and 11008 = 64 x 172 would need a 172 Hadamard matrix (Williamson's, not built here); the only
                Hadamard matrix of order 11008 built here is 2 x 5504 (Paley), dense. The structured kernel runs
                with a random orthogonal 86 x 86 factor instead (an orthogonal rotation, not a Hadamard one).
    llama2-13b  K = 13824 = 108 x 128 (Paley I, 107 prime): structured Hadamard, groups of 128.
For each M: plain (silu_mul_quantize, identity index, no keepers), hadamard (silu_mul_hadamard_quantize, one fused
kernel), the same two with 128 INT8 keepers and a reorder index (the structured path is then two launches), and
the dense rotation kernel (silu_mul_rotate_quantize) at K = 1536 and small M only. CUDA graphs (bench_ms(graph=True)),
median of do_bench. Every structured result is checked against its *_ref on the first rows.

    python -m benchmarks.bench_rotate --json benchmarks/results/rotation_h200.json
    python -m benchmarks.bench_rotate --device cpu --shapes smollm2 --ms 1,2   # a check of the code path under
                                                   # TRITON_INTERPRET=1 (wall-clock times, not a measurement)
"""
from __future__ import annotations

import argparse
import json
import time

import atom_lab  # noqa: F401  (must precede triton)

import torch

from atom_lab.kernels import silu_mul_quantize, silu_mul_rotate_quantize
from atom_lab.kernels.act_quant_rotate import silu_mul_hadamard_quantize, silu_mul_hadamard_quantize_ref
from atom_lab.rotation import kron_order, kron_rotation, rotation_matrix
from benchmarks.common import GRAPH_FAILURES, bench_ms, device_facts

SHAPES = {"smollm2": (1536, 64), "llama2-7b": (11008, 128), "llama2-13b": (13824, 128)}
MS = [1, 4, 16, 64, 256, 1024, 4096]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--dense-max-m", type=int, default=16, help="largest M for the dense rotation kernel (K = 1536)")
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (interpreter: a path check)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    dev = args.device
    timer = bench_ms if dev == "cuda" else _wall_ms
    rows, t_start = [], time.time()
    for shape in args.shapes.split(","):
        K, G = SHAPES[shape]
        kind = "hadamard" if kron_order(K) else "random"
        rot = kron_rotation(K, kind, seed=1).to(dev)
        dense = rotation_matrix(K, "hadamard", seed=1).float().to(dev).contiguous() if K == 1536 else None
        ident, perm = torch.arange(K, device=dev), torch.randperm(K, device=dev)
        print(f"{shape}: K={K} = {K // 128} x 128 ({kind} factor), G={G}", flush=True)
        print(f"{'M':>6}{'plain':>9}{'hadamard':>10}{'ratio':>7}{'plain+k':>9}{'had+k':>8}{'ratio':>7}{'dense':>9}"
              "  (us)")
        for M in [int(m) for m in args.ms.split(",")]:
            gate = torch.randn(M, K, device=dev, dtype=torch.float16)
            up = torch.randn(M, K, device=dev, dtype=torch.float16)
            r = {"shape": shape, "K": K, "group": G, "M": M, "factor": kind}
            h0 = silu_mul_hadamard_quantize(gate, up, rot.signs, rot.kron, ident, G, 0, 0.9)
            h1 = silu_mul_hadamard_quantize(gate, up, rot.signs, rot.kron, perm, G, 128, 0.9)
            n = min(M, 64)  # the reference builds the dense K x K matrix: check the first rows only
            r["q4_mismatch_fused"] = _agreement_rows(h0, gate, up, rot, ident, G, 0, n)
            r["q4_mismatch_keeper"] = _agreement_rows(h1, gate, up, rot, perm, G, 128, n)
            r["plain_us"] = 1e3 * timer(lambda: silu_mul_quantize(gate, up, ident, G, 0, 0.9), graph=True)
            r["hadamard_us"] = 1e3 * timer(
                lambda: silu_mul_hadamard_quantize(gate, up, rot.signs, rot.kron, ident, G, 0, 0.9), graph=True)
            r["plain_keeper_us"] = 1e3 * timer(lambda: silu_mul_quantize(gate, up, perm, G, 128, 0.9), graph=True)
            r["hadamard_keeper_us"] = 1e3 * timer(
                lambda: silu_mul_hadamard_quantize(gate, up, rot.signs, rot.kron, perm, G, 128, 0.9), graph=True)
            r["ratio"] = r["hadamard_us"] / r["plain_us"]
            r["ratio_keeper"] = r["hadamard_keeper_us"] / r["plain_keeper_us"]
            if dense is not None and M <= args.dense_max_m:
                r["dense_us"] = 1e3 * timer(
                    lambda: silu_mul_rotate_quantize(gate, up, dense, ident, G, 0, 0.9), graph=True)
            # bytes the fused kernel must move at least: gate + up read (fp16), packed codes + fp16 scales written
            r["hadamard_gbs"] = M * K * (4 + 0.5 + 2 / G) / (r["hadamard_us"] * 1e-6) / 1e9
            rows.append(r)
            _write(args.json, rows, t_start, dev)  # after every row: a run cut short keeps what it measured
            print(f"{M:>6}{r['plain_us']:>9.1f}{r['hadamard_us']:>10.1f}{r['ratio']:>7.2f}{r['plain_keeper_us']:>9.1f}"
                  f"{r['hadamard_keeper_us']:>8.1f}{r['ratio_keeper']:>7.2f}{r.get('dense_us', float('nan')):>9.1f}"
                  f"  mismatch {r['q4_mismatch_fused']:.1e}/{r['q4_mismatch_keeper']:.1e}", flush=True)
    return 0


def _wall_ms(fn, **_) -> float:
    """CPU stand-in for bench_ms (one call after a warm-up, wall clock): the interpreter's time means nothing."""
    fn()
    t = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t)


def _write(path, rows, t_start, dev) -> None:
    if not path:
        return
    out = {"what": "fused SiLU*up + structured rotation + quantize (silu_mul_hadamard_quantize) vs the plain fused "
                   "kernel (silu_mul_quantize), and the dense rotation kernel, same run; random fp16 activations, "
                   "CUDA graphs, median of do_bench; q4_mismatch_*: fraction of packed INT4 bytes differing from "
                   "silu_mul_hadamard_quantize_ref on the first min(M, 64) rows",
           "shapes": {k: {"K": v[0], "group": v[1], "factor": "hadamard" if kron_order(v[0]) else
                          "random orthogonal (no Hadamard of order K/128)"} for k, v in SHAPES.items()},
           "seconds": round(time.time() - t_start, 1),
           "device": device_facts() if dev == "cuda" else atom_lab.environment(),
           "graph_failures": list(GRAPH_FAILURES), "rows": rows}
    with open(path, "w") as f:
        json.dump(out, f, indent=2)


def _agreement_rows(p, gate, up, rot, index, G, keeper, n) -> float:
    """Fraction of packed INT4 bytes of the first n rows that differ from the reference (summation-order flips)."""
    ref = silu_mul_hadamard_quantize_ref(gate[:n], up[:n], rot.signs, rot.kron, index, G, keeper, 0.9)
    return float((p.q4[:n] != ref.q4).float().mean())


if __name__ == "__main__":
    raise SystemExit(main())
