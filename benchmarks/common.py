"""Shared pieces of the benchmarks: timing, device facts, Llama-2-7B shapes, inputs, and the library baselines.

Timing: triton.testing.do_bench, median of many runs after a warm-up. do_bench writes a 256 MB buffer before every
run, which evicts the 50 MB L2, so every run reads its inputs from device memory (no buffer rotation needed) and,
because that clearing kernel is queued ahead of the timed call, the host's launch overhead is hidden as well.

Eager timing has a blind spot: when fn spends more host time (Python, argument checks, launches) than that flush
takes on the GPU (~85 us), the GPU waits for the host inside the timed region. bench_ms(..., graph=True) captures fn
in a CUDA graph and times its replays: GPU time alone, the number a decode engine that replays graphs sees.

One side effect matters for memory-bound shapes: the flush leaves the L2 full of DIRTY lines, so a kernel that
reads B bytes also makes the L2 write back up to min(B, 50 MB) of the flush buffer while it runs. bench_ms(...,
flush="read") flushes by reading the buffer instead (the L2 is left holding clean lines, as between two layers of
a decode step, where the L2 holds the previous layer's weights); both are reported for small M.
"""
from __future__ import annotations

import atom_lab  # noqa: F401  (must precede triton)

import torch
import triton

from atom_lab.kernels import quantize_atom_ref

# Llama-2-7B linear layers, K x N (in x out): q/k/v/o 4096x4096, up/gate 4096x11008, down 11008x4096, fused QKV.
LLAMA2_7B = [(4096, 4096, "o_proj"), (4096, 11008, "up/gate"), (11008, 4096, "down"), (4096, 12288, "qkv")]
# Llama-2-13B: hidden 5120, MLP 13824, fused QKV 3 x 5120.
LLAMA2_13B = [(5120, 5120, "o_proj"), (5120, 13824, "up/gate"), (13824, 5120, "down"), (5120, 15360, "qkv")]
SHAPES = [("7B", *s) for s in LLAMA2_7B] + [("13B", *s) for s in LLAMA2_13B]
MS = [1, 4, 16, 64, 256, 1024, 4096, 8192]
QUICK_MS = [1, 16, 256, 4096]


GRAPH_FAILURES: list = []


def graphed(fn):
    """fn captured in a CUDA graph (after one warm-up call, which also runs any autotuning): replaying it costs the
    host a few microseconds whatever fn does in Python, so the timing is the GPU's alone, as in a decode engine that
    replays CUDA graphs."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


def bench_ms(fn, warmup: int = 10, rep: int = 40, flush: str = "write", graph: bool = False) -> float:
    """Median milliseconds of fn(), the L2 flushed before each run by writing (do_bench's own) or reading 256 MB.
    graph=True times replays of fn captured in a CUDA graph (GPU time without host overhead)."""
    if graph:
        try:
            fn = graphed(fn)
        except Exception as e:  # recorded in the JSON; the eager time stands in
            GRAPH_FAILURES.append(f"{getattr(fn, '__name__', fn)}: {type(e).__name__}: {str(e)[:200]}")
            torch.cuda.synchronize()
    driver = triton.runtime.driver.active
    if flush == "read":
        driver.clear_cache = lambda cache: cache.sum()  # instance attribute over do_bench's cache.zero_()
    try:
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    finally:
        driver.__dict__.pop("clear_cache", None)


def write_json(path: str, obj) -> None:
    """Write a benchmark's results (creating the folder), so a run cut short still leaves what it measured."""
    import json
    import os

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def device_facts() -> dict:
    env = atom_lab.environment()
    p = torch.cuda.get_device_properties(0)
    env.update(sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
               memory_gib=round(p.total_memory / 2**30, 1), l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    return env


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """Device-to-device copy, counting bytes read plus bytes written (GB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def packed_inputs(M: int, K: int, N: int, group: int = 128, keeper: int = 128, seed: int = 0):
    """Random non-zero activations [M, K] and weights [N, K] (normal; outlier keeper channels), packed as Atom."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", generator=g)
    x[:, K - keeper:] *= 20
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    a = quantize_atom_ref(x, group, keeper, clip=0.9)
    wq = quantize_atom_ref(w, group, keeper, clip=0.85)
    return x, w, a, wq


def library_fns(x: torch.Tensor, w: torch.Tensor) -> dict:
    """Closures timing cuBLAS bf16 (torch.matmul), torch._int_mm (INT8) and torch._scaled_mm (FP8, per-tensor
    scales): the dense library GEMMs on the same shape. A library that rejects the shape maps to its error text."""
    fns = {}
    xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
    fns["cublas_bf16"] = lambda: torch.matmul(xb, wb.T)
    x8 = (x / x.abs().amax() * 127).round().to(torch.int8)
    w8 = (w / w.abs().amax() * 127).round().to(torch.int8)
    fns["int_mm_int8"] = lambda: torch._int_mm(x8, w8.T)
    xf = (x / x.abs().amax() * 400).to(torch.float8_e4m3fn)
    wf = (w / w.abs().amax() * 400).to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    fns["scaled_mm_fp8"] = lambda: torch._scaled_mm(xf, wf.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    out = {}
    for name, fn in fns.items():
        try:
            fn()
            torch.cuda.synchronize()
            out[name] = fn
        except Exception as e:  # e.g. _int_mm needs M > 16, _scaled_mm dims that are multiples of 16
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return out


def floors_us(M: int, K: int, N: int, group: int, keeper: int, copy_gbs: float, tc_tflops: float) -> dict:
    """The two numbers of METHOD.md for one W4A4 GEMM: fewest bytes over copy bandwidth, operations over the
    tensor-core rate we can reach (FP8, measured through torch._scaled_mm)."""
    k4 = K - keeper

    def row_bytes(rows):
        return rows * (k4 // 2 + 2 * (k4 // group) + keeper + 2)

    nbytes = row_bytes(M) + row_bytes(N) + 2 * M * N
    return {"bytes": nbytes, "flops": 2 * M * N * K, "bytes_us": nbytes / copy_gbs / 1e3,
            "flops_us": 2 * M * N * K / tc_tflops / 1e6}
