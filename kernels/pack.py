"""Two signed 4-bit values per byte, in the layout the W4A4 GEMM reads.

Layout: the K values of a row are cut into blocks of 64. Byte j (0 <= j < 32) of a block holds value j in its low
nibble and value j + 32 in its high nibble, each as 4-bit two's complement (-8..7). A GEMM program that loads a
block's 32 bytes gets two contiguous runs of 32 values (low nibbles, high nibbles) and can feed each straight to a
dot of K=32 without interleaving them back (the smallest K an int8 tensor-core dot accepts). The same order holds
for weights and activations, so a dot over a whole group never needs the original order back.

    values  v0 v1 ... v31 | v32 v33 ... v63        packed byte j = (v[j] & 0xF) | (v[j+32] & 0xF) << 4
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_tensor, interpreting

PACK_BLOCK = 64  # values per block; K must be a multiple of it
HALF = PACK_BLOCK // 2
HALF_ = tl.constexpr(HALF)  # the same number, usable inside @triton.jit functions


def pack_int4_ref(q: torch.Tensor) -> torch.Tensor:
    """PyTorch reference. q: int8 [..., K] with values in [-8, 7], K % 64 == 0 -> uint8 [..., K // 2]."""
    blocks = q.reshape(*q.shape[:-1], -1, 2, HALF).to(torch.int16) & 0xF
    packed = blocks[..., 0, :] | (blocks[..., 1, :] << 4)
    return packed.to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // 2)


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """PyTorch reference. packed: uint8 [..., K // 2] -> int8 [..., K] in [-8, 7]."""
    b = packed.reshape(*packed.shape[:-1], -1, HALF).view(torch.int8)
    lo = (b << 4) >> 4  # arithmetic shifts on int8 sign-extend the nibble
    hi = b >> 4
    return torch.stack([lo, hi], dim=-2).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


@triton.jit
def _pack_int4_kernel(q_ptr, out_ptr, R, NB, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    # One program packs BLOCK_R rows x BLOCK_B output bytes; NB = K // 2 bytes per row.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    byte = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    col_lo = (byte // HALF_) * (2 * HALF_) + byte % HALF_
    mask = (rows[:, None] < R) & (byte[None, :] < NB)
    src = q_ptr + rows[:, None] * (2 * NB) + col_lo[None, :]
    lo = tl.load(src, mask=mask, other=0)
    hi = tl.load(src + HALF_, mask=mask, other=0)
    packed = (lo & 0xF) | ((hi & 0xF) << 4)
    tl.store(out_ptr + rows[:, None] * NB + byte[None, :], packed.to(tl.uint8, bitcast=True), mask=mask)


@triton.jit
def _unpack_int4_kernel(p_ptr, out_ptr, R, NB, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    byte = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (rows[:, None] < R) & (byte[None, :] < NB)
    b = tl.load(p_ptr + rows[:, None] * NB + byte[None, :], mask=mask, other=0).to(tl.int8, bitcast=True)
    lo = (b << 4) >> 4
    hi = b >> 4
    col_lo = (byte // HALF_) * (2 * HALF_) + byte % HALF_
    dst = out_ptr + rows[:, None] * (2 * NB) + col_lo[None, :]
    tl.store(dst, lo, mask=mask)
    tl.store(dst + HALF_, hi, mask=mask)


def _launch(kernel, src: torch.Tensor, out: torch.Tensor, rows: int, nbytes: int) -> None:
    # Under the interpreter each program costs ~1 ms whatever its size, so use few, large programs there.
    block_r, block_b = (64, 256) if interpreting() else (16, 128)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(nbytes, block_b))
    kernel[grid](src, out, rows, nbytes, BLOCK_R=block_r, BLOCK_B=block_b)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit values two per byte (layout in the module docstring).

    Args:
        q: int8 [..., K], values in [-8, 7], K a multiple of 64.
    Returns:
        uint8 [..., K // 2].
    """
    check_tensor(q, "q", torch.int8)
    K = q.shape[-1]
    if K % PACK_BLOCK:
        raise ValueError(f"q's last dimension K={K} must be a multiple of {PACK_BLOCK} to pack into int4 blocks; "
                         f"pad K to {-(-K // PACK_BLOCK) * PACK_BLOCK} or keep those channels out of the int4 part.")
    lo, hi = int(q.min()), int(q.max())
    if lo < -8 or hi > 7:
        raise ValueError(f"q holds values in [{lo}, {hi}], outside int4's [-8, 7]: quantize with 4 bits first.")
    q2 = q.contiguous().view(-1, K)
    out = torch.empty(q2.shape[0], K // 2, dtype=torch.uint8, device=q.device)
    _launch(_pack_int4_kernel, q2, out, q2.shape[0], K // 2)
    return out.view(*q.shape[:-1], K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4. packed: uint8 [..., K // 2] -> int8 [..., K] in [-8, 7]."""
    check_tensor(packed, "packed", torch.uint8)
    if packed.shape[-1] % HALF:
        raise ValueError(f"packed's last dimension {packed.shape[-1]} must be a multiple of {HALF} bytes "
                         f"(blocks of {PACK_BLOCK} values); was it made by pack_int4?")
    nb = packed.shape[-1]
    p2 = packed.contiguous().view(-1, nb)
    out = torch.empty(p2.shape[0], nb * 2, dtype=torch.int8, device=packed.device)
    _launch(_unpack_int4_kernel, p2, out, p2.shape[0], nb)
    return out.view(*packed.shape[:-1], nb * 2)
