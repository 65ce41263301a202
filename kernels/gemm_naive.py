"""Version 0 of the W4A4 group GEMM, for teaching (notebook 04 writes this very kernel; a test keeps them equal).

One program computes a BM x BN tile of y = a @ w^T the plainest way: for every INT4 group, load the packed bytes
of both operands, unpack the nibbles that belong to the group (sign-extending shifts), accumulate the group's exact
integer dot with int8 tensor-core dots of K = 32 (one per 32-value run), then scale it once by the two fp16 group
scales in fp32. The INT8 keeper channels follow, in one int8 dot. The arithmetic is exactly w4a4_gemm_ref's (same
products, same order), so under the interpreter the result is bit for bit the reference's.

What it leaves on the table (kernels/gemm.py does better): each byte is loaded and both of its nibbles are unpacked
for every 32-value run, so half of the unpack work is thrown away; the scales stall every group; small M leaves
most of the GPU idle (no split-K, no operand swap); no FP8 path for large M.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting
from .formats import PackedAtom


@triton.jit
def w4a4_naive_kernel(a4, as4, a8, as8, w4, ws4, w8, ws8, out,
                      M, N, NG, KP,
                      s_a4, s_as4, s_a8, s_as8, s_w4, s_ws4, s_w8, s_ws8, s_out,
                      G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KP_P2: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)  # token rows of this tile
    rn = tl.program_id(1) * BN + tl.arange(0, BN)  # output channels of this tile
    m_ok = rm < M
    n_ok = rn < N
    run = tl.arange(0, 32)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g in range(0, NG):
        dot = tl.zeros((BM, BN), dtype=tl.int32)  # the group's integer dot: exact
        for h in tl.static_range(G // 32):  # the group's runs of 32 values
            k0 = g * G + 32 * h  # first value of the run
            byte = (k0 // 64) * 32 + run  # the 32 bytes of its 64-value block
            a = tl.load(a4 + rm[:, None] * s_a4 + byte[None, :], mask=m_ok[:, None], other=0)
            w = tl.load(w4 + rn[:, None] * s_w4 + byte[None, :], mask=n_ok[:, None], other=0)
            a = a.to(tl.int8, bitcast=True)
            w = w.to(tl.int8, bitcast=True)
            low = (k0 % 64) == 0  # values 0..31 of a block sit in the low nibbles, 32..63 in the high ones
            a = tl.where(low, (a << 4) >> 4, a >> 4)  # arithmetic shifts sign-extend the nibble
            w = tl.where(low, (w << 4) >> 4, w >> 4)
            dot += tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        sa = tl.load(as4 + rm * s_as4 + g, mask=m_ok, other=0).to(tl.float32)
        sw = tl.load(ws4 + rn * s_ws4 + g, mask=n_ok, other=0).to(tl.float32)
        acc += dot.to(tl.float32) * (sa[:, None] * sw[None, :])
    if KP_P2 > 0:  # the INT8 keeper channels: one dot, one scale per row
        kk = tl.arange(0, KP_P2)
        k_ok = kk < KP
        a = tl.load(a8 + rm[:, None] * s_a8 + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        w = tl.load(w8 + rn[:, None] * s_w8 + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        dot8 = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        sa = tl.load(as8 + rm * s_as8, mask=m_ok, other=0).to(tl.float32)
        sw = tl.load(ws8 + rn * s_ws8, mask=n_ok, other=0).to(tl.float32)
        acc += dot8.to(tl.float32) * (sa[:, None] * sw[None, :])
    tl.store(out + rm[:, None] * s_out + rn[None, :], acc.to(out.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def w4a4_gemm_naive(a: PackedAtom, w: PackedAtom, out_dtype: torch.dtype = torch.float16,
                    BM: int | None = None, BN: int | None = None) -> torch.Tensor:
    """y = a @ w^T with the naive kernel (same arguments and result as kernels.w4a4_gemm, without residual).

    Args:
        a: PackedAtom of M token rows; w: PackedAtom of N output rows (same K, keeper, group size).
        out_dtype: float16, bfloat16 or float32.
        BM, BN: tile (powers of two >= 16); default 64 x 64 on a GPU, few large tiles under the interpreter.
    Returns:
        [M, N] tensor of out_dtype.
    """
    from .gemm import _check_inputs

    _check_inputs(a, w, out_dtype, None, a.q4.device.type == "cpu")
    M, N, K8 = a.rows, w.rows, a.keeper
    if BM is None or BN is None:
        BM, BN = (min(256, max(16, triton.next_power_of_2(M))), 256) if interpreting() else (64, 64)
    # The interpreter has no bf16 arithmetic: compute in fp32 there and cast with PyTorch (as w4a4_gemm does).
    kernel_dtype = torch.float32 if interpreting() and out_dtype == torch.bfloat16 else out_dtype
    out = torch.empty(M, N, dtype=kernel_dtype, device=a.q4.device)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    w4a4_naive_kernel[grid](a.q4, a.s4, a.q8, a.s8, w.q4, w.s4, w.q8, w.s8, out,
                            M, N, a.s4.shape[1], K8,
                            a.q4.stride(0), a.s4.stride(0), max(a.q8.stride(0), 1), a.s8.stride(0),
                            w.q4.stride(0), w.s4.stride(0), max(w.q8.stride(0), 1), w.s8.stride(0), out.stride(0),
                            G=a.group_size, BM=BM, BN=BN, KP_P2=max(16, triton.next_power_of_2(K8)) if K8 else 0)
    return out if kernel_dtype == out_dtype else out.to(out_dtype)
