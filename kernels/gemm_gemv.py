"""W4A4 GEMM for a few tokens on CUDA cores ("gemv" method of kernels/gemm.py): no tensor cores, no split-K.

At M <= 4 a tensor-core kernel pads the tokens to 16 and walks K one dependent step at a time (benchmarks/NOTES.md:
latency-bound at 0.3-1.1 TB/s). Here each program owns BN output channels and loads their WHOLE packed weight rows
at once, [BN, groups, G/2] bytes (all loads in flight together, no K loop), unpacks them in registers, and for each
block of BM tokens forms the exact integer group dots with int32 multiply-adds on CUDA cores:
    lo16 = (b << 28) >> 24 = 16 x low nibble,  hi16 = b & -16 = 16 x high nibble  (b the sign-extended byte)
    dot16[m, n, g] = sum_j lo16_a lo16_w + hi16_a hi16_w = 256 x the group's integer dot (exact in int32)
    y[m, n] = sum_g dot16 * (s4a[m, g] * s4w[n, g]) / 256 + keeper dot * (s8a[m] * s8w[n])  (+ residual)
Both operands use the same byte layout (kernels/pack.py), so pairing low with low and high with high nibbles of the
same byte gives the group's dot without restoring the channel order (for G = 32 the low nibbles of a 64-block are
one group and the high nibbles the next). Runs in the CPU interpreter as is (tests).

Measured on the H200 (results/gemm_h200_gemv.json): 0.83-1.16x cuBLAS bf16 at M = 1, behind the fused kernel
(1.16-1.64x), and 4x / 16x slower again at M = 4 / 16: instruction-bound, not latency-bound. The SASS shows why:
Triton lays the [BN, groups, 64] byte tile out with a group's 64 bytes across lanes, so each dot ends in warp
reductions and a shared-memory layout conversion (872 instructions per 8 KB program: PRMT byte extraction, IMAD,
STS/LDS, barriers), and the token loop repeats all of it per token. Kept as a measured hypothesis, never dispatched.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import interpreting, pow2_at_least
from .formats import PackedAtom

BYTES_PER_PROGRAM = 8192  # weight bytes a GPU program holds (8 warps: 32 bytes, 64 int32 nibbles per thread)
NUM_WARPS = 8


@triton.jit
def _w4a4_gemv_kernel(a4, as4, a8, as8, w4, ws4, w8, ws8, out, res,
                      M, N, NG, KP, s_a4, s_as4, s_a8, s_as8, s_w4, s_ws4, s_w8, s_ws8, s_om, s_rm,
                      G: tl.constexpr, NG_P2: tl.constexpr, KP_P2: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, HAS_RES: tl.constexpr):
    HB: tl.constexpr = max(G, 64) // 2  # bytes per group (per 64-block when G = 32); NG counts such units
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = n < N
    n64 = n.to(tl.int64)
    g = tl.arange(0, NG_P2)
    g_ok = g < NG
    j = tl.arange(0, HB)
    byte = g[:, None] * HB + j[None, :]                                   # [NG_P2, HB] byte of a row
    m_gb = g_ok[:, None] & (j < HB)[None, :]
    wb = tl.load(w4 + n64[:, None, None] * s_w4 + byte[None], mask=n_ok[:, None, None] & m_gb[None], other=0)
    wb = wb.to(tl.int8, bitcast=True).to(tl.int32)
    wlo = (wb << 28) >> 24
    whi = wb & -16
    ms = n_ok[:, None] & g_ok[None, :]
    if G == 32:  # "groups" below are 64-blocks of two INT4 groups each
        swl = tl.load(ws4 + n64[:, None] * s_ws4 + 2 * g[None, :], mask=ms, other=0.0).to(tl.float32)
        swh = tl.load(ws4 + n64[:, None] * s_ws4 + 2 * g[None, :] + 1, mask=ms, other=0.0).to(tl.float32)
    else:
        sw = tl.load(ws4 + n64[:, None] * s_ws4 + g[None, :], mask=ms, other=0.0).to(tl.float32)  # [BN, NG_P2]
    if KP_P2 > 0:
        kk = tl.arange(0, KP_P2)
        k_ok = kk < KP
        kw = tl.load(w8 + n64[:, None] * s_w8 + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        kw = kw.to(tl.int32)
        s8w = tl.load(ws8 + n64 * s_ws8, mask=n_ok, other=0.0).to(tl.float32)
    for m0 in range(0, M, BM):
        m = m0 + tl.arange(0, BM)
        m_ok = m < M
        m64 = m.to(tl.int64)
        ab = tl.load(a4 + m64[:, None, None] * s_a4 + byte[None], mask=m_ok[:, None, None] & m_gb[None], other=0)
        ab = ab.to(tl.int8, bitcast=True).to(tl.int32)
        alo = (ab << 28) >> 24
        ahi = ab & -16
        if G == 32:  # a 64-block holds two groups: the low nibbles (group 2b) and the high ones (group 2b + 1)
            dlo = tl.sum(alo[:, None] * wlo[None], axis=3)                           # [BM, BN, NG_P2], x256
            dhi = tl.sum(ahi[:, None] * whi[None], axis=3)
            sal = tl.load(as4 + m64[:, None] * s_as4 + 2 * g[None, :], mask=m_ok[:, None] & g_ok[None, :], other=0.0)
            sah = tl.load(as4 + m64[:, None] * s_as4 + 2 * g[None, :] + 1, mask=m_ok[:, None] & g_ok[None, :],
                          other=0.0)
            y = tl.sum(dlo.to(tl.float32) * (sal.to(tl.float32)[:, None, :] * swl[None, :, :])
                       + dhi.to(tl.float32) * (sah.to(tl.float32)[:, None, :] * swh[None, :, :]), axis=2)
        else:
            dot = tl.sum(alo[:, None] * wlo[None] + ahi[:, None] * whi[None], axis=3)  # [BM, BN, NG_P2], x256
            sa = tl.load(as4 + m64[:, None] * s_as4 + g[None, :], mask=m_ok[:, None] & g_ok[None, :], other=0.0)
            y = tl.sum(dot.to(tl.float32) * (sa.to(tl.float32)[:, None, :] * sw[None, :, :]), axis=2)
        y = y * 0.00390625
        if KP_P2 > 0:
            ka = tl.load(a8 + m64[:, None] * s_a8 + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
            kdot = tl.sum(ka.to(tl.int32)[:, None, :] * kw[None, :, :], axis=2)           # [BM, BN]
            s8a = tl.load(as8 + m64 * s_as8, mask=m_ok, other=0.0).to(tl.float32)
            y += kdot.to(tl.float32) * (s8a[:, None] * s8w[None, :])
        o_ok = m_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            y += tl.load(res + m64[:, None] * s_rm + n64[None, :], mask=o_ok, other=0.0).to(tl.float32)
        tl.store(out + m64[:, None] * s_om + n64[None, :], y.to(out.dtype.element_ty), mask=o_ok)


def tiles(M: int, N: int, NG: int, G: int) -> tuple[int, int]:
    """(BM, BN): on a GPU one token at a time and BYTES_PER_PROGRAM weight bytes per program; under the interpreter
    (cost per operation, not per element) up to 16 tokens and 64 channels per step."""
    ng_p2 = triton.next_power_of_2(NG)
    if interpreting():
        return pow2_at_least(M, 1, 16), pow2_at_least(N, 1, 64)
    return 1, max(1, min(triton.next_power_of_2(N), BYTES_PER_PROGRAM // (ng_p2 * G // 2)))


def launch_gemv(a: PackedAtom, w: PackedAtom, out, residual) -> None:
    """out [M, N] = the W4A4 GEMM of a (M tokens) and w (N channels), checked by kernels/gemm.w4a4_gemm."""
    M, N, G, KP = a.rows, w.rows, a.group_size, a.keeper
    NG = a.q4.shape[1] // (max(G, 64) // 2)  # groups, or 64-blocks when G = 32
    BM, BN = tiles(M, N, NG, max(G, 64))
    res = out if residual is None else residual
    _w4a4_gemv_kernel[(triton.cdiv(N, BN),)](
        a.q4, a.s4, a.q8, a.s8, w.q4, w.s4, w.q8, w.s8, out, res,
        M, N, NG, KP, a.q4.stride(0), a.s4.stride(0), a.q8.stride(0), a.s8.stride(0),
        w.q4.stride(0), w.s4.stride(0), w.q8.stride(0), w.s8.stride(0), out.stride(0), res.stride(0),
        G=G, NG_P2=triton.next_power_of_2(NG), KP_P2=triton.next_power_of_2(KP) if KP else 0, BM=BM, BN=BN,
        HAS_RES=residual is not None, num_warps=NUM_WARPS)
