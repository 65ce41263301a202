"""Per-token FP8 quantization of an activation, fused: the W8A8 baseline's quantizer in one launch.

The serving chapter's W8A8 format (atom_lab/serve/lowbit.py) multiplies FP8 e4m3 activations with one fp32 scale
per token by FP8 weights on torch's cuBLASLt GEMM. Written as torch ops, its quantizer is six kernels (abs, amax,
clamp, div, clamp, cast) and two fp32 copies of the activation per linear: more time per decode step than the GEMM
itself on the H200 (benchmarks/serve_profile.py), which would make W8A8 look slower than it is. This kernel reads
each row once for its absolute maximum and once more to write the codes, as vLLM's dynamic per-token FP8 quantizer
does, so the baseline Atom is compared with is not handicapped.

    scale = max(amax(|x_row|), 1e-12) / 448            (fp32, IEEE division)
    codes = e4m3(clamp(x / scale, -448, 448))          (IEEE division, round to nearest even)

Same bits as quantize_fp8_rows_ref: both divide exactly (div_rn) and round once to e4m3.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_tensor, interpreting

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x float [M, K] -> (FP8 e4m3 [M, K], fp32 scale [M, 1]) with x ~ codes * scale (one scale per row)."""
    amax = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12)
    # a tensor divisor, not the Python float: torch's CUDA division by a scalar multiplies by its rounded
    # reciprocal (amax * fl(1/448) != amax / 448 for some amax), its CPU division does not; this is IEEE on both
    s = amax / torch.full_like(amax, FP8_MAX)
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    xrow = x_ptr + row.to(tl.int64) * stride_x
    qrow = q_ptr + row.to(tl.int64) * K
    amax = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):  # pass 1: the row's absolute maximum
        k = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(xrow + k, mask=k < K, other=0.0).to(tl.float32)))
    s = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), 448.0)
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK):  # pass 2: the codes (the row is still in L2)
        k = k0 + tl.arange(0, BLOCK)
        v = tl.math.div_rn(tl.load(xrow + k, mask=k < K, other=0.0).to(tl.float32), s)
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        tl.store(qrow + k, v.to(tl.float8e4nv), mask=k < K)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton twin of quantize_fp8_rows_ref (same arguments, bit-identical result) on a CUDA tensor; on the CPU
    the reference itself: Triton's interpreter rounds e4m3's subnormals (|v| < 2^-6) to zero where the GPU's cvt
    and torch keep them, so the kernel is pinned to the reference by a GPU test (tests/test_serve_lowbit.py).

    x: float16 / bfloat16 / float32 [M, K], rows contiguous (stride 1 along K). Non-finite values are not checked
    here (a per-token hot path); the GEMM output shows them.
    """
    check_tensor(x, "x", (torch.float16, torch.bfloat16, torch.float32), dim=2)
    if x.device.type != "cuda" or interpreting():
        return quantize_fp8_rows_ref(x)
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    q = torch.empty(M, K, dtype=FP8, device=x.device)
    s = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    _fp8_rows_kernel[(M,)](x, q, s, K, x.stride(0), BLOCK=1024, num_warps=4)
    return q, s
