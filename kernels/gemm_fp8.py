"""Method "fp8" of the W4A4 GEMM (kernels/gemm.py), for GPUs with FP8 tensor cores (Hopper, Ada).

A bandwidth-bound pass unpacks both operands once into FP8 e4m3 (exact for -8..7), then a block-scaled FP8 GEMM
reads plain FP8 tiles that Triton can pipeline through shared memory into wgmma, and rescales its fp32 partial once
per group. Its integer group sums are exact: products of integers in [-8, 7], |group sum| <= 64 * 128 < 2^13.
This is the teaching kernel and the fallback; kernels/gemm_blockwise.py feeds the same unpacked operands to the
library's blockwise-scaled FP8 GEMM.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, m_bucket, tune_bench
from .formats import PackedAtom


@triton.jit
def _unpack_fp8_kernel(p, s4, out, sT, R, KB, sp, ss, so,
                       GROUP: tl.constexpr, BR: tl.constexpr, UNITS: tl.constexpr):
    # A unit is U bytes (one group, or one 64-value block when G = 32). Its low nibbles go to out[2U*u : 2U*u+U],
    # its high nibbles right after: every group of G values stays contiguous, in the same order for A and W.
    # The unit's scales go to sT [groups, R] as fp32, so the GEMM loads each group's scales as one vector.
    U: tl.constexpr = GROUP // 2 if GROUP >= 64 else 32
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    rb = tl.arange(0, U)
    for t in tl.static_range(UNITS):
        u = tl.program_id(1) * UNITS + t
        ok = rmask[:, None] & ((u * U + rb) < KB)[None, :]
        b = tl.load(p + rows[:, None] * sp + (u * U + rb)[None, :], mask=ok, other=0).to(tl.int8, bitcast=True)
        lo = ((b << 4) >> 4).to(tl.float16).to(tl.float8e4nv)
        hi = (b >> 4).to(tl.float16).to(tl.float8e4nv)
        dst = out + rows[:, None] * so + (2 * U * u + rb)[None, :]
        tl.store(dst, lo, mask=ok)
        tl.store(dst + U, hi, mask=ok)
        smask = rmask & ((rows * 0 + u * U) < KB)
        if GROUP == 32:
            for h in tl.static_range(2):
                sc = tl.load(s4 + rows * ss + 2 * u + h, mask=smask, other=0).to(tl.float32)
                tl.store(sT + (2 * u + h) * R + rows, sc, mask=smask)
        else:
            sc = tl.load(s4 + rows * ss + u, mask=smask, other=0).to(tl.float32)
            tl.store(sT + u * R + rows, sc, mask=smask)


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _keeper_tile(ka, ska, kw, skw, rml, rnl, KP, s_ka, s_ska, s_kw, s_skw,
                 BM: tl.constexpr, BN: tl.constexpr, KPC: tl.constexpr):
    # The INT8 keeper channels of one output tile: int32 dots (exact), scaled once.
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rk = tl.arange(0, KPC)
    for k0 in range(0, KP, KPC):
        kmask = (k0 + rk) < KP
        xa = tl.load(ka + rml[:, None] * s_ka + (k0 + rk)[None, :], mask=kmask[None, :], other=0)
        xw = tl.load(kw + rnl[:, None] * s_kw + (k0 + rk)[None, :], mask=kmask[None, :], other=0)
        acc += tl.dot(xa, tl.trans(xw), out_dtype=tl.int32).to(tl.float32)
    sa = tl.load(ska + rml * s_ska).to(tl.float32)
    sw = tl.load(skw + rnl * s_skw).to(tl.float32)
    return acc * (sa[:, None] * sw[None, :])


@triton.jit
def _fp8_group_gemm_kernel(
        a8, saT, ka, ska, w8, swT, kw, skw, out, res,
        M, N, NG, KP,
        s_a8, s_ka, s_ska, s_w8, s_kw, s_skw, s_om, s_rm, M_BUCKET,
        GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
        HAS_RES: tl.constexpr, KPC: tl.constexpr):
    tile_m, tile_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = tile_m * BM + tl.arange(0, BM)
    rn = tile_n * BN + tl.arange(0, BN)
    rml = rm % M
    rnl = rn % N
    acc = _keeper_tile(ka, ska, kw, skw, rml, rnl, KP, s_ka, s_ska, s_kw, s_skw, BM, BN, KPC)
    rg = tl.arange(0, GROUP)
    # Group g + 1's scales load while group g computes (Triton's pipeliner leaves these small loads in the loop).
    sa_n = tl.load(saT + rml)
    sw_n = tl.load(swT + rnl)
    for g in range(0, NG):
        sa_g = sa_n
        sw_g = sw_n
        gn = tl.minimum(g + 1, NG - 1)
        sa_n = tl.load(saT + gn * M + rml)
        sw_n = tl.load(swT + gn * N + rnl)
        a = tl.load(a8 + rml[:, None] * s_a8 + (g * GROUP + rg)[None, :])
        b = tl.load(w8 + rnl[:, None] * s_w8 + (g * GROUP + rg)[None, :])
        d = tl.dot(a, tl.trans(b))  # fp32; exact: integer products, |group sum| <= 64 * 128
        acc += d * (sa_g[:, None] * sw_g[None, :])
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_RES:
        acc += tl.load(res + rm[:, None] * s_rm + rn[None, :], mask=mask, other=0).to(tl.float32)
    tl.store(out + rm[:, None] * s_om + rn[None, :], acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_group_gemm_tma_kernel(
        a_desc, saT, ka, ska, w_desc, swT, kw, skw, out, res,
        M, N, NG, KP,
        s_ka, s_ska, s_kw, s_skw, s_om, s_rm, M_BUCKET,
        GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
        HAS_RES: tl.constexpr, KPC: tl.constexpr):
    # Same as _fp8_group_gemm_kernel, the FP8 tiles arriving through the tensor memory accelerator (TMA).
    tile_m, tile_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = tile_m * BM + tl.arange(0, BM)
    rn = tile_n * BN + tl.arange(0, BN)
    rml = rm % M
    rnl = rn % N
    acc = _keeper_tile(ka, ska, kw, skw, rml, rnl, KP, s_ka, s_ska, s_kw, s_skw, BM, BN, KPC)
    sa_n = tl.load(saT + rml)
    sw_n = tl.load(swT + rnl)
    for g in range(0, NG):
        sa_g = sa_n
        sw_g = sw_n
        gn = tl.minimum(g + 1, NG - 1)
        sa_n = tl.load(saT + gn * M + rml)
        sw_n = tl.load(swT + gn * N + rnl)
        a = a_desc.load([tile_m * BM, g * GROUP])
        b = w_desc.load([tile_n * BN, g * GROUP])
        d = tl.dot(a, tl.trans(b))
        acc += d * (sa_g[:, None] * sw_g[None, :])
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_RES:
        acc += tl.load(res + rm[:, None] * s_rm + rn[None, :], mask=mask, other=0).to(tl.float32)
    tl.store(out + rm[:, None] * s_om + rn[None, :], acc.to(out.dtype.element_ty), mask=mask)


def unpack_fp8(p: PackedAtom, extra_cols: int = 0, extra_groups: int = 0):
    """The INT4 part of p as FP8 e4m3 [rows, K - keeper], each group of G channels contiguous (the order inside a
    group differs from unpack_int4's; A and W use the same one, so group dots are unchanged), and its scales
    transposed to fp32 [groups, rows]. extra_cols / extra_groups leave that many columns / scale rows after them
    unwritten, for a caller that appends blocks of its own (kernels/gemm_blockwise.py: the keeper channels)."""
    R, KB = p.q4.shape
    G = p.group_size
    U = G // 2 if G >= 64 else 32
    out = torch.empty(R, 2 * KB + extra_cols, dtype=torch.float8_e4m3fn, device=p.q4.device)
    sT = torch.empty(p.s4.shape[1] + extra_groups, R, dtype=torch.float32, device=p.q4.device)
    if interpreting():
        BR, UNITS = min(256, triton.next_power_of_2(R)), max(1, min(64, KB // U))
    else:
        BR, UNITS = 64, max(1, min(8, KB // U))
    grid = (triton.cdiv(R, BR), triton.cdiv(KB // U, UNITS))
    _unpack_fp8_kernel[grid](p.q4, p.s4, out, sT, R, KB, p.q4.stride(0), p.s4.stride(0), out.stride(0),
                             GROUP=G, BR=BR, UNITS=UNITS, num_warps=4)
    return out, sT


def _fp8_common(a: PackedAtom, w: PackedAtom, out, residual):
    strides = (max(a.q8.stride(0), 1), a.s8.stride(0), max(w.q8.stride(0), 1), w.s8.stride(0),
               out.stride(0), residual.stride(0) if residual is not None else 0)
    return strides, (residual if residual is not None else out)


def _launch_fp8(a: PackedAtom, w: PackedAtom, out: torch.Tensor, residual, BM: int, BN: int,
                num_warps: int, num_stages: int, group_m: int = 8, tma: bool = False, a8=None, w8=None) -> None:
    """One explicit configuration. a8/w8: (fp8, scalesT) from unpack_fp8, when the caller already has them
    (benchmarks of the GEMM alone)."""
    M, N = out.shape
    G = a.group_size
    a8, saT = unpack_fp8(a) if a8 is None else a8
    w8, swT = unpack_fp8(w) if w8 is None else w8
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    strides, res = _fp8_common(a, w, out, residual)
    tail = dict(GROUP=G, BM=BM, BN=BN, GROUP_M=group_m, HAS_RES=residual is not None, KPC=64,
                num_warps=num_warps, num_stages=num_stages)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor.from_tensor(a8, [BM, G])
        w_desc = TensorDescriptor.from_tensor(w8, [BN, G])
        _fp8_group_gemm_tma_kernel[grid](a_desc, saT, a.q8, a.s8, w_desc, swT, w.q8, w.s8, out, res,
                                         M, N, a.s4.shape[1], a.keeper, *strides, m_bucket(M), **tail)
    else:
        _fp8_group_gemm_kernel[grid](a8, saT, a.q8, a.s8, w8, swT, w.q8, w.s8, out, res,
                                     M, N, a.s4.shape[1], a.keeper, a8.stride(0), strides[0], strides[1],
                                     w8.stride(0), *strides[2:], m_bucket(M), **tail)


def _set_tma_blocks(nargs):
    G = nargs["GROUP"]
    nargs["a_desc"].block_shape = [nargs["BM"], G]
    nargs["w_desc"].block_shape = [nargs["BN"], G]


# FP8 GEMM candidates (benchmarks/sweep_gemm.py on an H100): 128x128 tiles with 8 warps, or 64x128 / 128x64 tiles
# with 4 warps, which leave room for two programs per SM whose scaling and tensor-core phases can overlap.
FP8_CONFIGS = [(64, 128, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (64, 128, 4, 5),
               (128, 64, 4, 4)]
_fp8_tuner = None


def _launch_fp8_tuned(a: PackedAtom, w: PackedAtom, out: torch.Tensor, residual, a8=None, w8=None,
                      autotune: bool = True) -> None:
    global _fp8_tuner
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not autotune:
        BM, BN, nw, ns = FP8_CONFIGS[0]
        _launch_fp8(a, w, out, residual, BM, BN, nw, ns, tma=True, a8=a8, w8=w8)
        return
    if _fp8_tuner is None:
        configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=nw, num_stages=ns, pre_hook=_set_tma_blocks)
                   for bm, bn, nw, ns in FP8_CONFIGS]
        _fp8_tuner = triton.autotune(configs, key=["M_BUCKET", "N", "NG", "KP"],
                                     do_bench=tune_bench)(_fp8_group_gemm_tma_kernel)
    M, N = out.shape
    G = a.group_size
    a8, saT = unpack_fp8(a) if a8 is None else a8
    w8, swT = unpack_fp8(w) if w8 is None else w8
    a_desc = TensorDescriptor.from_tensor(a8, [64, G])  # block shapes are set per config by _set_tma_blocks
    w_desc = TensorDescriptor.from_tensor(w8, [64, G])
    strides, res = _fp8_common(a, w, out, residual)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _fp8_tuner[grid](a_desc, saT, a.q8, a.s8, w_desc, swT, w.q8, w.s8, out, res,
                     M, N, a.s4.shape[1], a.keeper, *strides, m_bucket(M),
                     GROUP=G, GROUP_M=8, HAS_RES=residual is not None, KPC=64)
