"""Quantize-and-write: new K/V rows of a batch -> packed codes + (scale, zero) in their cache pages.

Byte format of one token of one KV head (head_dim D, groups of G channels, asymmetric per group):
    INT4: D / 2 bytes, byte j = code[j] | code[j + D/2] << 4 (channel j low nibble, channel j + D/2 high nibble),
          then D / G pairs (scale, zero) in float16                         -> D/2 + 4 D/G bytes
    INT8: D bytes (one code each), then D / G (scale, zero) float16 pairs    -> D + 4 D/G bytes
The half split puts the two halves that RoPE's rotate_half mixes (channel j with j + D/2) in one byte, so a kernel
that applies RoPE after dequantizing (pre-RoPE keys, Atom) gets both halves from the same load.
Codes follow atom_lab.quantizers.quantize_asymmetric bit for bit (min/max widened to contain 0, IEEE division,
round half to even); the zero point is an integer 0..2^bits-1 stored exactly in float16.

Storage ("slots"): a layer's codes are [num_pages * page_size, H, bytes] with slot = page * page_size + offset, so a
write is a scatter of rows to slot indices (vLLM's slot_mapping). kv_write_ref is the PyTorch reference; kv_write
is the Triton kernel (one program per (token, head)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom_lab.quantizers import MIN_SCALE, dequantize_asymmetric, quantize_asymmetric

from ._common import check_tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_SCALE = tl.constexpr(MIN_SCALE)
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + M - M rounds half to even for |x| < 2^22


def code_bytes(bits: int, head_dim: int) -> int:
    """Bytes of codes per token per head."""
    return head_dim // 2 if bits == 4 else head_dim


def pack_half_ref(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D] codes in [0, 15] -> uint8 [..., D/2]: byte j = code[j] | code[j + D/2] << 4."""
    D = codes.shape[-1]
    return (codes[..., : D // 2] | (codes[..., D // 2:] << 4)).to(torch.uint8)


def unpack_half_ref(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_half_ref: uint8 [..., D/2] -> uint8 [..., D]."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)


def quantize_kv_ref(x: torch.Tensor, bits: int, group_size: int):
    """x: float [..., D] -> (codes uint8 [..., code_bytes], sz float16 [..., D/G, 2] = (scale, zero))."""
    q, scale, zero = quantize_asymmetric(x, bits, group_size)
    codes = pack_half_ref(q) if bits == 4 else q
    return codes, torch.stack([scale, zero.to(torch.float16)], dim=-1)


def dequantize_kv_ref(codes: torch.Tensor, sz: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [..., code_bytes], sz float16 [..., D/G, 2] -> float32 [..., D]."""
    q = unpack_half_ref(codes) if bits == 4 else codes
    return dequantize_asymmetric(q, sz[..., 0], sz[..., 1].to(torch.uint8))


def kv_write_ref(x: torch.Tensor, slots: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor | None,
                 bits: int, group_size: int) -> None:
    """Write rows into a layer's storage, in place.

    Args:
        x: float [T, H, D] the new K (or V) rows of the batch.
        slots: int [T] slot = page * page_size + offset of each row.
        codes: [S, H, code_bytes] uint8 (bits 4/8) or [S, H, D] float16/bfloat16 (bits 16) storage.
        sz: float16 [S, H, D/G, 2] (scale, zero) storage, None for bits 16.
    """
    if bits >= 16:
        codes[slots.long()] = x.to(codes.dtype)
        return
    c, s = quantize_kv_ref(x, bits, group_size)
    codes[slots.long()] = c
    sz[slots.long()] = s


@triton.jit
def _kv_write_kernel(x_ptr, slot_ptr, codes_ptr, sz_ptr, H, D: tl.constexpr, G: tl.constexpr,
                     BITS: tl.constexpr):
    # One program quantizes one (token, head) row of D channels as D/G groups and stores it at its slot.
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    NG: tl.constexpr = D // G
    maxq: tl.constexpr = 2 ** BITS - 1
    g = tl.arange(0, NG)[:, None]
    c = tl.arange(0, G)[None, :]
    x = tl.load(x_ptr + (t * H + h) * D + g * G + c).to(tl.float32)  # [NG, G]
    lo = tl.minimum(tl.min(x, axis=1), 0.0)
    hi = tl.maximum(tl.max(x, axis=1), 0.0)
    scale = tl.maximum(tl.math.div_rn(hi - lo, tl.full(lo.shape, maxq, tl.float32)), _MIN_SCALE).to(tl.float16)
    s32 = scale.to(tl.float32)
    zero = tl.math.div_rn(-lo, s32)
    zero = tl.minimum(tl.maximum(zero, 0.0), maxq)  # clamp first: keeps |.| < 2^22 for the rounding trick
    zero = (zero + _ROUND_MAGIC) - _ROUND_MAGIC
    y = tl.math.div_rn(x, s32[:, None])
    y = tl.minimum(tl.maximum(y, -2.0 * maxq), 2.0 * maxq)  # far outside the range either way; keeps the trick exact
    y = (y + _ROUND_MAGIC) - _ROUND_MAGIC
    q = tl.minimum(tl.maximum(y + zero[:, None], 0.0), maxq).to(tl.uint8)  # [NG, G]
    row = slot * H + h
    ng = tl.arange(0, NG)
    tl.store(sz_ptr + row * NG * 2 + ng * 2, scale)
    tl.store(sz_ptr + row * NG * 2 + ng * 2 + 1, zero.to(tl.float16))
    if BITS == 4:
        # byte j = code[j] | code[j + D/2] << 4: the flat row [D] viewed as [2, D/2]
        q2 = tl.reshape(q, (2, D // 2))
        lo_q, hi_q = tl.split(tl.permute(q2, (1, 0)))
        tl.store(codes_ptr + row * (D // 2) + tl.arange(0, D // 2), lo_q | (hi_q << 4))
    else:
        tl.store(codes_ptr + row * D + g * G + c, q)


def check_kv_rows(x: torch.Tensor, slots: torch.Tensor, codes: torch.Tensor, name: str = "x") -> None:
    check_tensor(x, name, FLOAT_DTYPES, dim=3)
    check_tensor(slots, "slots", (torch.int32, torch.int64), dim=1)
    if slots.shape[0] != x.shape[0]:
        raise ValueError(f"slots has {slots.shape[0]} entries but {name} has {x.shape[0]} rows; one slot per row.")
    if x.device != codes.device or slots.device != codes.device:
        raise ValueError(f"{name} ({x.device}), slots ({slots.device}) and the cache ({codes.device}) must be on one "
                         "device; move them with .to(pool.device).")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf values; the cache cannot quantize them (check the model's "
                         "activations).")


def kv_write(x: torch.Tensor, slots: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor | None,
             bits: int, group_size: int) -> None:
    """Triton quantize-and-write; same arguments and result as kv_write_ref (bit-exact codes and scales)."""
    check_kv_rows(x, slots, codes)
    if bits >= 16:
        kv_write_ref(x, slots, codes, sz, bits, group_size)  # a plain scatter: nothing to quantize
        return
    T, H, D = x.shape
    if D & (D - 1) or group_size & (group_size - 1):
        raise ValueError(f"the kernel needs head_dim ({D}) and group_size ({group_size}) to be powers of two.")
    _kv_write_kernel[(T, H)](x.contiguous(), slots.contiguous(), codes, sz, H, D=D, G=group_size, BITS=bits)
