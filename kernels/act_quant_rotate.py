"""Activation quantizers with an online rotation (QuaRot's Hadamard of down_proj's input, atom_lab.rotation):
SiLU(gate) * up, then y @ R, then Atom's reorder + INT4/INT8 quantize + pack, beside their PyTorch `*_ref`.

Two kernels: a dense one for any orthogonal R [K, K] (_silu_mul_rotate_quantize_kernel, a small GEMM per chunk of
outputs) and a structured one for R = diag(signs) kron(A, H_128 / sqrt(128)) (_silu_mul_hadamard_kernel, a
128-point fast Walsh-Hadamard transform per block plus an m x m product). The quantization itself, the checks and
the plain kernel they hand gathered rows to are kernels/act_quant.py's (its module docstring says why they are
bit-exact against the references; AUTOTUNE there governs these kernels too).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import act_quant as _aq
from ._common import check_tensor, interpreting
from .act_quant import (FLOAT_DTYPES, MODE_PLAIN, _check_all, _check_index, _empty_packed, _finish, _gate_up,
                        _is_identity, _launch, _quantize, _quantize_ref, _reordered_values, _scale_fp16, silu_mul_ref)
from .formats import PackedAtom


def silu_mul_rotate_quantize_ref(gate, up, rotation, index, group_size: int, keeper: int,
                                 clip: float = 1.0) -> PackedAtom:
    """Reference for silu_mul_rotate_quantize: ((SiLU(gate) * up) @ rotation)[:, index] quantized.

    gate, up: float [..., K] of one shape; rotation: float [K, K] (an orthogonal matrix, e.g. a randomised
    Hadamard, atom_lab.rotation); index: int [K] -> PackedAtom. The product with the rotation is computed in
    float64 from the float32 SiLU * up values and rounded once to float32.
    """
    g2, u2 = _gate_up(gate, up, check_finite=True)
    _check_rotation(rotation, g2.shape[1], g2.device)
    _check_index(index, g2.shape[1], g2.device)
    y = (silu_mul_ref(g2, u2).double() @ rotation.double()).float()
    return _quantize_ref(y[:, index.long()], "(SiLU(gate) * up) @ rotation", group_size, keeper, clip)


# ---------------------------------------------------------------------------------------------------------------
# SiLU(gate) * up, then an online rotation (QuaRot's Hadamard of the down_proj input), then reorder + quantize.
# A program owns BLOCK_M rows and ONE chunk of CHUNK reordered output positions (or the keeper part): it computes
# those outputs as a small GEMM over K, (silu * up)[rows, k-tile] @ R[k-tile, index[chunk]], gathering R's columns
# by the index in its loads (the reorder costs nothing more), then quantizes whole groups as above. SiLU * up is
# recomputed for every chunk: it is cheap next to the dot. The rotation is dense (K^2 per row), so any orthogonal
# matrix works; a fast Walsh-Hadamard transform (K log K) would be cheaper for large K (not done here).
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _rotated_chunk(g_ptr, u_ptr, r_ptr, rows, row_ok, cols, col_ok, K, stride_g, stride_u,
                   BLOCK_K: tl.constexpr, N: tl.constexpr, LIBDEVICE: tl.constexpr, PRECISION: tl.constexpr):
    """float32 [BLOCK_M, N]: (SiLU(gate) * up)[rows] @ R[:, cols] (R row-major [K, K])."""
    acc = tl.zeros([rows.shape[0], N], tl.float32)
    kk0 = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + kk0
        k_ok = kk < K
        v = _reordered_values(g_ptr, u_ptr, g_ptr, rows, kk, row_ok[:, None] & k_ok[None, :], stride_g, stride_u,
                              tl.zeros([rows.shape[0]], tl.float32), 2, LIBDEVICE)
        r = tl.load(r_ptr + kk[:, None].to(tl.int64) * K + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(v, r, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _silu_mul_rotate_quantize_kernel(
        g_ptr, u_ptr, r_ptr, idx_ptr, q4_ptr, s4_ptr, q8_ptr, s8_ptr,
        M, K, NORMAL, KEEPER, stride_g, stride_u, clip,
        G: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
        KEEP_P2: tl.constexpr, LIBDEVICE: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    c0 = tl.program_id(1) * CHUNK
    if c0 < NORMAL:  # an INT4 chunk (CHUNK a multiple of G and 64: whole groups and 64-blocks, as above)
        pos = tl.arange(0, CHUNK)
        grp = tl.arange(0, CHUNK // G)
        byte = tl.arange(0, CHUNK // 2)
        ok = c0 + pos < NORMAL
        src = tl.load(idx_ptr + c0 + pos, mask=ok, other=0)
        v = _rotated_chunk(g_ptr, u_ptr, r_ptr, rows, row_ok, src, ok, K, stride_g, stride_u, BLOCK_K, CHUNK,
                           LIBDEVICE, PRECISION)
        v = tl.reshape(v, [BLOCK_M, CHUNK // G, G])
        s4 = _scale_fp16(tl.max(tl.abs(v), axis=2), clip, 7)
        tl.store(s4_ptr + rows[:, None] * (NORMAL // G) + (c0 // G + grp)[None, :], s4,
                 mask=row_ok[:, None] & (c0 // G + grp < NORMAL // G)[None, :])
        q = _quantize(v, s4[:, :, None], 7)
        q = tl.reshape(q, [BLOCK_M, CHUNK // 64, 2, 32]).to(tl.int32) & 0xF
        shift = (tl.arange(0, 2) * 4)[None, None, :, None]
        packed = tl.reshape(tl.sum(q << shift, axis=2), [BLOCK_M, CHUNK // 2]).to(tl.uint8)
        tl.store(q4_ptr + rows[:, None] * (NORMAL // 2) + (c0 // 2 + byte)[None, :], packed,
                 mask=row_ok[:, None] & (c0 // 2 + byte < NORMAL // 2)[None, :])
    else:  # the last program along axis 1: the INT8 keeper part
        if KEEP_P2 > 0:
            kk = tl.arange(0, KEEP_P2)
            k_ok = kk < KEEPER
            ksrc = tl.load(idx_ptr + NORMAL + kk, mask=k_ok, other=0)
            kv = _rotated_chunk(g_ptr, u_ptr, r_ptr, rows, row_ok, ksrc, k_ok, K, stride_g, stride_u, BLOCK_K,
                                KEEP_P2, LIBDEVICE, PRECISION)
            km = row_ok[:, None] & k_ok[None, :]
            kv = tl.where(km, kv, 0.0)
            s8 = _scale_fp16(tl.max(tl.abs(kv), axis=1), 1.0, 127)
            tl.store(s8_ptr + rows, s8, mask=row_ok)
            tl.store(q8_ptr + rows[:, None] * KEEPER + kk[None, :], _quantize(kv, s8[:, None], 127), mask=km)


# GPU configs: (rows, output positions, K-step, warps) of each program's small GEMM; tl.dot needs 16 | BLOCK_M.
ROTATE_GPU_CONFIGS = [(16, 128, 64, 4), (32, 128, 64, 4), (64, 128, 64, 4), (64, 256, 64, 8), (128, 128, 64, 8),
                      (128, 256, 32, 8)]
# tf32x3 (three tf32 tensor-core products) keeps float32 accuracy; plain "tf32" would round the inputs to 10 bits
ROTATE_PRECISION = "tf32x3"
_silu_mul_rotate_quantize_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "CHUNK": ch, "BLOCK_K": bk}, num_warps=w)
             for bm, ch, bk, w in ROTATE_GPU_CONFIGS],
    key=["M", "K", "NORMAL", "KEEPER"],
)(_silu_mul_rotate_quantize_kernel)


def _launch_rotate(g2, u2, rotation, index, clip, group_size, keeper) -> PackedAtom:
    M, K = g2.shape
    normal = K - keeper
    q4, s4, q8, s8 = _empty_packed(M, normal, keeper, group_size, g2.device)
    args = (g2, u2, rotation, index, q4, s4, q8, s8, M, K, normal, keeper, g2.stride(0), u2.stride(0), float(clip))
    meta = dict(G=group_size, KEEP_P2=triton.next_power_of_2(keeper) if keeper else 0, LIBDEVICE=not interpreting())

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(normal, cfg["CHUNK"]) + (1 if keeper else 0))

    if interpreting():  # few, large programs (cost per program per step); ieee: the interpreter's dot is numpy's
        cfg = dict(BLOCK_M=max(16, min(triton.next_power_of_2(M), 64)),
                   CHUNK=max(128, min(2048, triton.next_power_of_2(normal))), BLOCK_K=256)
        _silu_mul_rotate_quantize_kernel[grid(cfg)](*args, **cfg, PRECISION="ieee", **meta)
    elif _aq.AUTOTUNE:
        _silu_mul_rotate_quantize_tuned[grid](*args, PRECISION=ROTATE_PRECISION, **meta)
    else:
        cfg = dict(BLOCK_M=32, CHUNK=128, BLOCK_K=64)
        _silu_mul_rotate_quantize_kernel[grid(cfg)](*args, **cfg, PRECISION=ROTATE_PRECISION, num_warps=4, **meta)
    return PackedAtom(q4, s4, q8, s8, group_size)


# ---------------------------------------------------------------------------------------------------------------
# SiLU(gate) * up, then a STRUCTURED online rotation R = diag(signs) @ kron(A, H_128 / sqrt(128)) (atom_lab.rotation
# KronRotation: 1536 = 12 x 128), then quantize. A program walks ROWS rows; each row is held as a [NB_P2, 128]
# register tile (block i = channels i*128 .. i*128+127): y = A^T @ (((silu * up) * signs) @ H_128) / sqrt(128).
# - The 128-point Walsh-Hadamard transform is 7 butterfly stages on the tile (split the top index bit off with a
#   reshape [.., 2, 64] + permute + split, put (a + b, a - b) back as the LOWEST bit with join): after 7 stages the
#   bits are back in natural order, and each stage is one add and one subtract per pair, exact sums of +-x.
# - The m x m product across blocks is one tl.dot of A^T / sqrt(128) [NB_P2, NB_P2] (zero-padded to 16 or the
#   next power of two) with the tile: 12 x 1536 multiply-adds per row for SmolLM2, against 1536^2 for the dense one.
# - Without reordering or keepers (QuaRot: index = identity, keeper = 0) the groups of G are whole inside a block
#   and the tile is quantized and packed in registers (DIRECT). With a reorder index (atom + rotation) a gather
#   across blocks is needed: the rotated rows go to a float32 scratch buffer and the plain reorder + quantize
#   kernel reads it (two launches; tl.gather on registers compiles badly, see the module docstring).
# ---------------------------------------------------------------------------------------------------------------
HADAMARD_BLOCK = 128


@triton.jit
def _wht128(x, NB_P2: tl.constexpr):
    """x [NB_P2, 128] float32 -> x @ H_128 (Sylvester, unnormalised) along axis 1."""
    for _ in tl.static_range(7):
        x = tl.permute(tl.reshape(x, [NB_P2, 2, 64]), (0, 2, 1))
        a, b = tl.split(x)
        x = tl.reshape(tl.join(a + b, a - b), [NB_P2, 128])
    return x


@triton.jit
def _silu_mul_hadamard_kernel(
        g_ptr, u_ptr, s_ptr, a_ptr, y_ptr, q4_ptr, s4_ptr,
        M, K, NB, stride_g, stride_u, clip, M_KEY,
        NB_P2: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr, DIRECT: tl.constexpr,
        LIBDEVICE: tl.constexpr, PRECISION: tl.constexpr):
    blk = tl.arange(0, NB_P2)
    col = tl.arange(0, 128)
    blk_ok = blk < NB
    off = blk[:, None] * 128 + col[None, :]                          # channel of each tile element
    in_row = blk_ok[:, None] & (col < 128)[None, :]
    signs = tl.load(s_ptr + off, mask=in_row, other=0.0)
    # at[k, i] = A[i, k] / sqrt(128) (the wrapper passes A already divided), zero outside m x m
    at = tl.load(a_ptr + blk[None, :] * NB + blk[:, None], mask=blk_ok[:, None] & blk_ok[None, :], other=0.0)
    grp = tl.arange(0, 128 // G)
    byte = tl.arange(0, 64)
    shift = (tl.arange(0, 2) * 4)[None, None, :, None]
    for r in range(ROWS):
        row = tl.program_id(0) * ROWS + r
        ok = in_row & ((row + 0 * off) < M)  # a full-shape mask (the interpreter rejects scalar-broadcast ones)
        row = row.to(tl.int64)
        g = tl.load(g_ptr + row * stride_g + off, mask=ok, other=0.0).to(tl.float64)
        up = tl.load(u_ptr + row * stride_u + off, mask=ok, other=0.0).to(tl.float32)
        if LIBDEVICE:  # SiLU in float64, rounded once, exactly as _reordered_values (module docstring)
            e = libdevice.exp(-g)
        else:
            e = tl.exp(-g)
        x = (g / (1.0 + e)).to(tl.float32) * up * signs
        y = tl.dot(at, _wht128(x, NB_P2), input_precision=PRECISION)  # [NB_P2, 128]
        if DIRECT:
            v = tl.reshape(y, [NB_P2, 128 // G, G])
            s4 = _scale_fp16(tl.max(tl.abs(v), axis=2), clip, 7)      # [NB_P2, 128 // G]
            tl.store(s4_ptr + row * (K // G) + blk[:, None] * (128 // G) + grp[None, :], s4,
                     mask=blk_ok[:, None] & ((row + 0 * grp[None, :]) < M))
            q = _quantize(v, s4[:, :, None], 7)
            q = tl.reshape(q, [NB_P2, 2, 2, 32]).to(tl.int32) & 0xF   # kernels/pack.py order, as above
            packed = tl.reshape(tl.sum(q << shift, axis=2), [NB_P2, 64]).to(tl.uint8)
            tl.store(q4_ptr + row * (K // 2) + blk[:, None] * 64 + byte[None, :], packed,
                     mask=blk_ok[:, None] & ((row + 0 * byte[None, :]) < M))
        else:
            tl.store(y_ptr + row * K + off, y, mask=ok)


# GPU configs: (rows per program, warps)
HADAMARD_GPU_CONFIGS = [(1, 4), (2, 4), (4, 4), (1, 8), (4, 8), (8, 8)]
_silu_mul_hadamard_tuned = triton.autotune(
    configs=[triton.Config({"ROWS": r}, num_warps=w) for r, w in HADAMARD_GPU_CONFIGS],
    key=["M_KEY", "K", "DIRECT"],
)(_silu_mul_hadamard_kernel)
def _launch_hadamard(g2, u2, signs, kron, index, clip, group_size, keeper) -> PackedAtom:
    M, K = g2.shape
    nb = K // HADAMARD_BLOCK
    direct = keeper == 0 and _is_identity(index)
    a = (kron.float() / HADAMARD_BLOCK ** 0.5).contiguous()  # fold H_128's 1/sqrt(128) into A (one rounding)
    q4, s4, q8, s8 = _empty_packed(M, K - keeper, keeper, group_size, g2.device)
    y = q4 if direct else torch.empty(M, K, dtype=torch.float32, device=g2.device)
    args = (g2, u2, signs.float().contiguous(), a, y, q4, s4, M, K, nb, g2.stride(0), u2.stride(0), float(clip),
            min(8192, triton.next_power_of_2(M)))
    meta = dict(NB_P2=max(16, triton.next_power_of_2(nb)), G=group_size, DIRECT=direct, LIBDEVICE=not interpreting())
    if interpreting():  # one program: the interpreter pays per program and per step, not per element
        _silu_mul_hadamard_kernel[(1,)](*args, ROWS=M, PRECISION="ieee", **meta)
    elif _aq.AUTOTUNE:
        _silu_mul_hadamard_tuned[lambda cfg: (triton.cdiv(M, cfg["ROWS"]),)](*args, PRECISION=ROTATE_PRECISION,
                                                                            **meta)
    else:
        _silu_mul_hadamard_kernel[(triton.cdiv(M, 2),)](*args, ROWS=2, PRECISION=ROTATE_PRECISION, num_warps=4,
                                                        **meta)
    if direct:
        return PackedAtom(q4, s4, q8, s8, group_size)
    return _launch(MODE_PLAIN, y, None, None, index, 0.0, clip, group_size, keeper)


def silu_mul_hadamard_quantize_ref(gate, up, signs, kron, index, group_size: int, keeper: int,
                                  clip: float = 1.0) -> PackedAtom:
    """Reference for silu_mul_hadamard_quantize: ((SiLU(gate) * up) @ R)[:, index] quantized, with the dense
    R = diag(signs) @ kron(A, H_128 / sqrt(128)) built in float64 (the product rounded once to float32)."""
    g2, u2 = _gate_up(gate, up, check_finite=True)
    _check_kron(signs, kron, g2.shape[1], g2.device)
    _check_index(index, g2.shape[1], g2.device)
    y = (silu_mul_ref(g2, u2).double() @ kron_dense(signs, kron)).float()
    return _quantize_ref(y[:, index.long()], "(SiLU(gate) * up) @ rotation", group_size, keeper, clip)


def kron_dense(signs: torch.Tensor, kron: torch.Tensor) -> torch.Tensor:
    """diag(signs) @ kron(A, H_128 / sqrt(128)): float64 [K, K] (K = 128 m for A = kron [m, m])."""
    h = torch.ones(1, 1, dtype=torch.float64, device=kron.device)
    while h.shape[0] < HADAMARD_BLOCK:  # Sylvester
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return signs.double()[:, None] * torch.kron(kron.double(), h / HADAMARD_BLOCK ** 0.5)


def silu_mul_rotate_quantize(gate, up, rotation, index, group_size: int, keeper: int, clip: float = 1.0,
                             check_finite: bool | None = None) -> PackedAtom:
    """Fused SiLU(gate) * up + online rotation + reorder + quantize: the input of a rotated down_proj (QuaRot).

    Args:
        gate, up: float32/float16/bfloat16 [..., K], same shape (row-strided views are read in place).
        rotation: float32 [K, K] contiguous, the orthogonal matrix R (y = (SiLU(gate) * up) @ R); down_proj's
            weight holds W @ R already (atom_lab.rotation.rotate_model).
        index, group_size, keeper, clip, check_finite: as in reorder_quantize (the index orders the ROTATED
            channels).
    Returns:
        PackedAtom of M = gate.numel() // K rows (shapes as in reorder_quantize).
    """
    g2, u2 = _gate_up(gate, up, check_finite)
    _check_all(g2, index, group_size, keeper, clip)
    if not isinstance(rotation, torch.Tensor):  # a structured rotation (atom_lab.rotation.KronRotation)
        signs, kron = getattr(rotation, "signs", None), getattr(rotation, "kron", None)
        if signs is None or kron is None:
            raise TypeError(f"rotation must be a float32 [K, K] tensor or a KronRotation (signs, kron), got "
                            f"{type(rotation).__name__}.")
        return silu_mul_hadamard_quantize(gate, up, signs, kron, index, group_size, keeper, clip, check_finite)
    _check_rotation(rotation, g2.shape[1], g2.device)
    return _finish(_launch_rotate(g2, u2, rotation, index, clip, group_size, keeper), g2, check_finite,
                   "(SiLU(gate) * up) @ rotation")


def silu_mul_hadamard_quantize(gate, up, signs, kron, index, group_size: int, keeper: int, clip: float = 1.0,
                               check_finite: bool | None = None) -> PackedAtom:
    """Fused SiLU(gate) * up + STRUCTURED online rotation + quantize (a 128-point fast Walsh-Hadamard transform
    per block of 128 channels times a small m x m matrix): silu_mul_rotate_quantize with
    R = diag(signs) @ kron(kron, H_128 / sqrt(128)) without the K x K matrix (K log 128 + K m work per row).

    Args:
        gate, up: float32/float16/bfloat16 [..., K], same shape, K = 128 m (SmolLM2: 1536 = 12 x 128).
        signs: float [K] of +-1; kron: float [m, m], orthogonal (hadamard(m) / sqrt(m), or a random orthogonal
            matrix where no Hadamard of order m exists: 11008 = 86 x 128).
        index, group_size, keeper, clip, check_finite: as in reorder_quantize (index orders ROTATED channels).
    Returns:
        PackedAtom of M = gate.numel() // K rows. With keeper = 0 and the identity index the quantization happens
        in the same kernel; otherwise a second launch (the plain kernel) gathers and quantizes the rotated rows.
    """
    g2, u2 = _gate_up(gate, up, check_finite)
    _check_all(g2, index, group_size, keeper, clip)
    _check_kron(signs, kron, g2.shape[1], g2.device)
    return _finish(_launch_hadamard(g2, u2, signs, kron, index, clip, group_size, keeper), g2, check_finite,
                   "(SiLU(gate) * up) @ rotation")


def _check_rotation(rotation, K: int, device) -> None:
    check_tensor(rotation, "rotation", (torch.float32,), dim=2)
    if tuple(rotation.shape) != (K, K):
        raise ValueError(f"rotation must be [K, K] = [{K}, {K}] for K={K} channels, got {tuple(rotation.shape)}.")
    if rotation.device != device:
        raise ValueError(f"rotation is on {rotation.device} but gate is on {device}; move it once with "
                         "rotation.to(gate.device).")
    if not rotation.is_contiguous():
        raise ValueError("rotation must be contiguous; pass rotation.contiguous() (once, not per call).")


def _check_kron(signs, kron, K: int, device) -> None:
    check_tensor(signs, "signs", FLOAT_DTYPES, dim=1)
    check_tensor(kron, "kron", FLOAT_DTYPES, dim=2)
    if K % HADAMARD_BLOCK:
        raise ValueError(f"the structured rotation works on blocks of {HADAMARD_BLOCK} channels, but K={K} is not a "
                         f"multiple of {HADAMARD_BLOCK}; use silu_mul_rotate_quantize with a dense [K, K] rotation.")
    m = K // HADAMARD_BLOCK
    if tuple(kron.shape) != (m, m):
        raise ValueError(f"kron must be [m, m] = [{m}, {m}] for K={K} = {m} x {HADAMARD_BLOCK}, got "
                         f"{tuple(kron.shape)}.")
    if tuple(signs.shape) != (K,):
        raise ValueError(f"signs must have K={K} entries, got {tuple(signs.shape)}.")
    for name, t in (("signs", signs), ("kron", kron)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but gate is on {device}; move it once with .to(gate.device).")


# Validating a permutation needs the values on the host (a GPU sync). An index is a fixed per-layer tensor, so
# each one is checked once and remembered until it is modified in place (its _version changes) or freed.
