"""Fused activation quantizer (kernels/act_quant.py) on a GPU: RMSNorm / SiLU(gate) * up / plain + reorder + INT4/INT8
pack, against a device-to-device copy of the SAME number of bytes in the same run, CUDA-graph replays, L2 flushed.

    python benchmarks/bench_gemm_quant.py [--out results/gemm_h200_quant.json] [--quick]

Rows: the row kernel (one register-resident row per program, reorder through tl.gather, or no gather at all when
the index is the identity, i.e. the channels were permuted offline) and, for the reordered RMSNorm case, the
earlier chunked kernel (USE_CHUNKED) in the same run. Every result is compared with its *_ref on the GPU (q/s
bytes that differ are counted). A separate check pins the kernel's fast division (reciprocal + Markstein
correction) to tl.math.div_rn on every fp16 scale, at random quotients and at quotients next to rounding ties.
The bytes counted are the inputs read (x, up, weight, index) and the packed output written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import atom_lab  # noqa: E402,F401
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from atom_lab.kernels import act_quant as aq  # noqa: E402
from benchmarks.common import GRAPH_FAILURES, bench_ms, copy_bandwidth_gbs, device_facts, write_json  # noqa: E402

GROUP, KEEPER = 128, 128
DEV = atom_lab.default_device().type  # "cpu": a smoke run through the interpreter (--smoke), timings meaningless


@triton.jit
def _div_check_kernel(v_ptr, s_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    v = tl.load(v_ptr + i, mask=ok, other=1.0)
    s = tl.load(s_ptr + i, mask=ok, other=1.0)
    r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    y = v * r
    q = tl.fma(tl.fma(-y, s, v), r, y)
    bad = (q.to(tl.int32, bitcast=True) != tl.math.div_rn(v, s).to(tl.int32, bitcast=True)) & ok
    tl.atomic_add(out_ptr, tl.sum(bad.to(tl.int32), axis=0))


def division_check(per_scale: int = 2048) -> dict:
    """Markstein's division (as in act_quant._nibbles) vs div_rn: every positive normal fp16 scale >= 2^-14."""
    count = 30720 if per_scale > 2 else 64  # 0x0400..0x7BFF: every positive normal fp16 (fewer in a CPU smoke run)
    s16 = torch.arange(0x0400, 0x0400 + count, dtype=torch.int32, device=DEV).to(torch.int16).view(torch.float16)
    s = s16.float()[:, None].expand(-1, per_scale).contiguous()
    g = torch.Generator(device=DEV).manual_seed(0)
    u = torch.rand(s.shape, device=DEV, generator=g) * 17.2 - 8.6
    v_rand = (u * s).float()
    k = torch.randint(-9, 9, s.shape, device=DEV, generator=g).float() + 0.5
    v_tie = k * s
    steps = torch.randint(-3, 4, s.shape, device=DEV, generator=g)
    for _ in range(3):  # move 0..3 ulps away from the tie, either way
        v_tie = torch.where(steps > 0, torch.nextafter(v_tie, torch.full_like(v_tie, float("inf"))), v_tie)
        v_tie = torch.where(steps < 0, torch.nextafter(v_tie, torch.full_like(v_tie, -float("inf"))), v_tie)
        steps = steps - steps.sign()
    out = {}
    for name, v in (("random", v_rand), ("near_ties", v_tie)):
        bad = torch.zeros(1, dtype=torch.int32, device=DEV)
        n = v.numel()
        _div_check_kernel[(triton.cdiv(n, 1024),)](v.reshape(-1), s.reshape(-1), bad, n, BLOCK=1024)
        out[name] = dict(values=n, mismatches=int(bad.item()))
    return out


def _inputs(mode: str, M: int, K: int, gather: bool):
    g = torch.Generator(device=DEV).manual_seed(M + K)
    x = torch.randn(M, K, device=DEV, dtype=torch.float16, generator=g)
    up = torch.randn(M, K, device=DEV, dtype=torch.float16, generator=g) if mode == "silu_mul" else None
    w = (torch.rand(K, device=DEV, generator=g) + 0.5).half() if mode == "rmsnorm" else None
    index = torch.randperm(K, device=DEV, generator=g) if gather else torch.arange(K, device=DEV)
    return x, up, w, index


def _call(mode, x, up, w, index):
    if mode == "rmsnorm":
        return lambda: aq.rmsnorm_quantize(x, w, 1e-6, index, GROUP, KEEPER, 0.9, check_finite=False)
    if mode == "silu_mul":
        return lambda: aq.silu_mul_quantize(x, up, index, GROUP, KEEPER, 0.9, check_finite=False)
    return lambda: aq.reorder_quantize(x, index, GROUP, KEEPER, 0.9, check_finite=False)


def _ref(mode, x, up, w, index):
    if mode == "rmsnorm":
        return aq.rmsnorm_quantize_ref(x, w, 1e-6, index, GROUP, KEEPER, 0.9)
    if mode == "silu_mul":
        return aq.silu_mul_quantize_ref(x, up, index, GROUP, KEEPER, 0.9)
    return aq.reorder_quantize_ref(x, index, GROUP, KEEPER, 0.9)


def _differ(p, r) -> int:
    return sum(int((getattr(p, n).view(torch.uint8) != getattr(r, n).view(torch.uint8)).sum())
               for n in ("q4", "s4", "q8", "s8"))


def _time(fn) -> float:
    if DEV == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return bench_ms(fn, graph=True)


def same_bytes_copy_ms(nbytes: int) -> float:
    """A torch copy moving nbytes in all (nbytes / 2 read + nbytes / 2 written)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    return _time(lambda: dst.copy_(src))


def run(ms, cases, chunked_cases, log=print) -> dict:
    aq.AUTOTUNE = True
    rows = []
    for mode, K, gather in cases:
        for M in ms:
            x, up, w, index = _inputs(mode, M, K, gather)
            for kernel in (["rows", "chunked"] if (mode, K, gather) in chunked_cases else ["rows"]):
                aq.USE_CHUNKED = kernel == "chunked"
                call = _call(mode, x, up, w, index)
                p = call()
                differ = _differ(p, _ref(mode, x, up, w, index))
                t = _time(call)
                nbytes = (x.numel() * 2 * (2 if up is not None else 1) + (0 if w is None else K * 2)
                          + (K * index.element_size() if gather else 0) + p.nbytes())
                c = same_bytes_copy_ms(nbytes)
                cfg = None
                if kernel == "rows":
                    tuner = aq._QUANTIZE_TUNERS.get((min(8192, triton.next_power_of_2(M)), triton.next_power_of_2(K)))
                    best = getattr(tuner, "best_config", None)
                    cfg = None if best is None else dict(num_warps=best.num_warps, **best.kwargs)
                row = dict(mode=mode, K=K, M=M, gather=gather, kernel=kernel, us=t * 1e3, bytes=nbytes,
                           gbs=nbytes / t / 1e6, copy_same_bytes_us=c * 1e3, fraction_of_same_bytes_copy=c / t,
                           differing_bytes_vs_ref=differ, config=cfg)
                rows.append(row)
                log(f"{mode:8s} K={K:5d} M={M:5d} {'gather' if gather else 'ident.'} {kernel:7s} "
                    f"{t * 1e3:8.1f} us {row['gbs']:6.0f} GB/s  copy {c * 1e3:7.1f} us -> {c / t:5.2f} of copy  "
                    f"diff {differ} cfg {cfg}")
            aq.USE_CHUNKED = False
            x = up = w = index = None
            if DEV != "cpu":
                torch.cuda.empty_cache()
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gemm_h200_quant.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter check of this script)")
    args = ap.parse_args()
    t0 = time.time()
    info = device_facts() if DEV != "cpu" else dict(atom_lab.environment())
    info["copy_gbs_1gib"] = copy_bandwidth_gbs() if DEV != "cpu" else 1.0
    print(info)
    res = dict(device=info, group=GROUP, keeper=KEEPER, division_check=division_check(2 if args.smoke else 2048))
    print("division check:", res["division_check"])
    ms = [3] if args.smoke else [256, 4096] if args.quick else [256, 1024, 4096, 8192]
    cases = [("rmsnorm", 4096, True), ("rmsnorm", 11008, True), ("rmsnorm", 4096, False),
             ("rmsnorm", 11008, False), ("silu_mul", 11008, False), ("silu_mul", 11008, True),
             ("plain", 4096, True)]
    res.update(run(ms, cases, {("rmsnorm", 4096, True), ("rmsnorm", 11008, True)}))
    for r in res["rows"]:
        r["fraction_of_1gib_copy"] = r["gbs"] / info["copy_gbs_1gib"]
    res["graph_failures"] = GRAPH_FAILURES
    res["command"] = "python benchmarks/bench_gemm_quant.py --out benchmarks/results/" + os.path.basename(args.out) + (
        " --quick" if args.quick else "")
    res["seconds"] = time.time() - t0
    write_json(args.out, res)
    print(f"wrote {args.out} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
