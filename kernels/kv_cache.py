"""Quantize-and-write: new K/V rows of a batch -> packed codes + (scale, zero) in their cache pages.

Byte format of one token of one KV head (head_dim D, groups of G channels, asymmetric per group):
    INT4: D / 2 bytes, byte j = code[j] | code[j + D/2] << 4 (channel j low nibble, channel j + D/2 high nibble),
          then D / G pairs (scale, zero) in float16                         -> D/2 + 4 D/G bytes
    INT8: D bytes (one code each), then D / G (scale, zero) float16 pairs    -> D + 4 D/G bytes
The half split puts the two halves that RoPE's rotate_half mixes (channel j with j + D/2) in one byte, so a kernel
that applies RoPE after dequantizing (pre-RoPE keys, Atom) gets both halves from the same load.
Codes follow atom_lab.quantizers.quantize_asymmetric bit for bit (min/max widened to contain 0, IEEE division,
round half to even); the zero point is an integer 0..2^bits-1 stored exactly in float16.

Storage (head-major pages): a layer's codes are [num_pages, H, page_size, bytes], so the page_size rows of one head
of one page are contiguous (1 KB of INT4 codes at page 16, head_dim 128): a decode program reading one head streams
long runs instead of 64-byte pieces at an H x 64-byte stride (benchmarks/NOTES.md, KV section, v8-v9). Tokens are
still named by slot = page * page_size + offset (vLLM's slot_mapping); slot s of head h is row (s // page_size, h,
s % page_size). That rule lives in read_slots / write_slots (PyTorch) and page_row (Triton; the Gluon kernel has
its twin). kv_write_ref is the PyTorch reference; kv_write is the Triton kernel (one program per (tokens, head)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom_lab.quantizers import MIN_SCALE, dequantize_asymmetric, quantize_asymmetric

from ._common import check_tensor, interpreting

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_SCALE = tl.constexpr(MIN_SCALE)
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + M - M rounds half to even for |x| < 2^22


def code_bytes(bits: int, head_dim: int) -> int:
    """Bytes of codes per token per head."""
    return head_dim // 2 if bits == 4 else head_dim


def read_slots(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of a head-major page tensor t [P, H, n, ...] (n rows per head per page) by row id r = page * n + offset:
    -> [len(slots), H, ...] (a gather: a copy). Pool codes and pairs use n = page_size, KIVI key pairs n =
    page_size / key_tokens with r = slot // key_tokens."""
    s = slots.long()
    n = t.shape[2]
    return t[s // n, :, s % n]  # advanced indices split by a slice: the [T] index dimension comes first


def write_slots(t: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """t[rows of `slots`] = rows, in place; the inverse of read_slots (rows [len(slots), H, ...])."""
    s = slots.long()
    n = t.shape[2]
    t[s // n, :, s % n] = rows.to(t.dtype)


@triton.jit
def page_row(page, off, h, H, ROWS: tl.constexpr):
    """int64 row of (page, offset in the page, head) in a head-major page tensor [P, H, ROWS, ...] (the Triton twin
    of read_slots): one head's ROWS rows of a page are consecutive, so a program's tokens of one page are too."""
    return (page.to(tl.int64) * H + h) * ROWS + off


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
        codes: [P, H, page_size, code_bytes] uint8 (bits 4/8) or [P, H, page_size, D] float16/bfloat16 (bits 16)
            storage (head-major pages, module docstring).
        sz: float16 [P, H, page_size, D/G, 2] (scale, zero) storage, None for bits 16.
    """
    if bits >= 16:
        write_slots(codes, slots, x)
        return
    c, s = quantize_kv_ref(x, bits, group_size)
    write_slots(codes, slots, c)
    write_slots(sz, slots, s)


@triton.jit
def _kv_write_kernel(x_ptr, slot_ptr, codes_ptr, sz_ptr, T, H, D: tl.constexpr, G: tl.constexpr,
                     BITS: tl.constexpr, BLOCK_T: tl.constexpr, PAGE: tl.constexpr):
    # Program (i, h): rows i*BLOCK_T.. of head h, each quantized as D/G groups and stored at its slot.
    h = tl.program_id(1)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < T
    slot = tl.load(slot_ptr + tok, mask=tmask, other=0).to(tl.int64)
    NG: tl.constexpr = D // G
    maxq: tl.constexpr = 2 ** BITS - 1
    t3 = tok[:, None, None]
    g3 = tl.arange(0, NG)[None, :, None]
    c3 = tl.arange(0, G)[None, None, :]
    m3 = tmask[:, None, None]
    x = tl.load(x_ptr + (t3 * H + h) * D + g3 * G + c3, mask=m3, other=0.0).to(tl.float32)  # [BT, NG, G]
    lo = tl.minimum(tl.min(x, axis=2), 0.0)
    hi = tl.maximum(tl.max(x, axis=2), 0.0)
    # NaN/inf in a group: tl.min/max drop NaN, so without this the codes would be finite garbage; x * 0 is NaN for
    # exactly those values (else +0, which leaves the scale unchanged), so the stored scale turns NaN and every read
    # of the group is NaN, as the reference's amax gives: the step's logits show it (PagedDecoder checks them)
    poison = tl.sum(x * 0.0, axis=2)
    scale = (tl.maximum(tl.math.div_rn(hi - lo, tl.full(lo.shape, maxq, tl.float32)), _MIN_SCALE) + poison)
    scale = scale.to(tl.float16)
    s32 = scale.to(tl.float32)
    zero = tl.math.div_rn(-lo, s32)
    zero = tl.minimum(tl.maximum(zero, 0.0), maxq)  # clamp first: keeps |.| < 2^22 for the rounding trick
    zero = (zero + _ROUND_MAGIC) - _ROUND_MAGIC
    y = tl.math.div_rn(x, s32[:, :, None])
    y = tl.minimum(tl.maximum(y, -2.0 * maxq), 2.0 * maxq)  # clamped to the range below anyway
    y = (y + _ROUND_MAGIC) - _ROUND_MAGIC
    q = tl.minimum(tl.maximum(y + zero[:, :, None], 0.0), maxq).to(tl.uint8)  # [BT, NG, G]
    row = page_row(slot // PAGE, slot % PAGE, h, H, PAGE)  # [BT]
    ng = tl.arange(0, NG)[None, :]
    szp = sz_ptr + row[:, None] * (NG * 2) + ng * 2
    tl.store(szp, scale, mask=tmask[:, None])
    tl.store(szp + 1, zero.to(tl.float16), mask=tmask[:, None])
    if BITS == 4:
        # byte j = code[j] | code[j + D/2] << 4: each row [D] viewed as [2, D/2]
        q2 = tl.permute(tl.reshape(q, (BLOCK_T, 2, D // 2)), (0, 2, 1))
        lo_q, hi_q = tl.split(q2)
        tl.store(codes_ptr + row[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :], lo_q | (hi_q << 4),
                 mask=tmask[:, None])
    else:
        tl.store(codes_ptr + (row[:, None, None] * D) + g3 * G + c3, q, mask=m3)


def check_kv_rows(x: torch.Tensor, slots: torch.Tensor, codes: torch.Tensor, name: str = "x",
                  check_finite: bool = True) -> None:
    check_tensor(x, name, FLOAT_DTYPES, dim=3)
    check_tensor(slots, "slots", (torch.int32, torch.int64), dim=1)
    if slots.shape[0] != x.shape[0]:
        raise ValueError(f"slots has {slots.shape[0]} entries but {name} has {x.shape[0]} rows; one slot per row.")
    if x.device != codes.device or slots.device != codes.device:
        raise ValueError(f"{name} ({x.device}), slots ({slots.device}) and the cache ({codes.device}) must be on one "
                         "device; move them with .to(pool.device).")
    # the finiteness check reads a flag back to the host: a sync per call. A model's step (PagedDecoder) skips it
    # on a GPU and checks its logits once instead, which any NaN/inf K or V row reaches through the attention
    if check_finite and not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf values; the cache cannot quantize them (check the model's "
                         "activations).")


def kv_write(x: torch.Tensor, slots: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor | None,
             bits: int, group_size: int, check_finite: bool = True) -> None:
    """Triton quantize-and-write; same arguments and result as kv_write_ref (bit-exact codes and scales).
    check_finite=False skips the NaN/inf check of x (a device-to-host sync); the caller then checks downstream."""
    check_kv_rows(x, slots, codes, check_finite=check_finite)
    if bits >= 16:
        kv_write_ref(x, slots, codes, sz, bits, group_size)  # a plain scatter: nothing to quantize
        return
    T, H, D = x.shape
    if D & (D - 1) or group_size & (group_size - 1):
        raise ValueError(f"the kernel needs head_dim ({D}) and group_size ({group_size}) to be powers of two.")
    check_storage(codes, sz, H, D, bits, group_size)
    block_t = 64 if interpreting() else 4  # the interpreter pays per program: few, large ones there
    _kv_write_kernel[(triton.cdiv(T, block_t), H)](x.contiguous(), slots.contiguous(), codes, sz, T, H, D=D,
                                                    G=group_size, BITS=bits, BLOCK_T=block_t, PAGE=codes.shape[2])


def check_storage(codes: torch.Tensor, sz: torch.Tensor | None, H: int, D: int, bits: int, group_size: int,
                  key_tokens: int | None = None) -> None:
    """A layer's storage as PagePool allocates it (head-major pages, contiguous: the kernels compute addresses):
    codes [P, H, page_size, code_bytes], sz [P, H, page_size, D/G, 2] or, KIVI keys, [P, H, page_size / Tg, D, 2]."""
    P = codes.shape[0] if codes.dim() == 4 else None
    ps = codes.shape[2] if codes.dim() == 4 else None
    want_sz = None if sz is None else (P, H, ps // key_tokens, D, 2) if key_tokens else (P, H, ps, D // group_size, 2)
    if (codes.dim() != 4 or codes.shape[1] != H or codes.shape[3] != code_bytes(bits, D) or sz is None
            or tuple(sz.shape) != want_sz or not codes.is_contiguous() or not sz.is_contiguous()):
        raise ValueError(f"x rows [{H}, {D}] do not fit the cache storage {tuple(codes.shape)} / "
                         f"{None if sz is None else tuple(sz.shape)} (bits={bits}, group_size={group_size}, "
                         f"key_tokens={key_tokens}): pass a PagePool layer's contiguous head-major tensors, codes "
                         f"[pages, {H}, page_size, {code_bytes(bits, D)}] and pairs {want_sz or '[pages, H, ...]'}.")


# ---------------------------------------------------------------------------------------------------------------
# KIVI keys: one (scale, zero) per channel per group of Tg consecutive tokens
# ---------------------------------------------------------------------------------------------------------------
def quantize_kv_channel_ref(x: torch.Tensor, bits: int, token_group: int):
    """x: float [M, H, D], M a multiple of Tg = token_group, rows of one group consecutive ->
    (codes uint8 [M, H, code_bytes], sz float16 [M / Tg, H, D, 2]): each channel quantized over its Tg tokens."""
    M, H, D = x.shape
    xt = x.reshape(M // token_group, token_group, H, D).permute(0, 2, 3, 1)  # [M/Tg, H, D, Tg]
    q, scale, zero = quantize_asymmetric(xt, bits, token_group)
    q = q.permute(0, 3, 1, 2).reshape(M, H, D)
    codes = pack_half_ref(q) if bits == 4 else q
    return codes, torch.stack([scale[..., 0], zero[..., 0].to(torch.float16)], dim=-1)


def dequantize_kv_channel_ref(codes: torch.Tensor, sz: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [M, H, code_bytes] of M tokens, sz float16 [M, H, D, 2] the pair of each token's group ->
    float32 [M, H, D]."""
    q = unpack_half_ref(codes) if bits == 4 else codes
    return (q.float() - sz[..., 1].float()) * sz[..., 0].float()


def kv_write_channel_ref(x: torch.Tensor, slots: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor, bits: int,
                         token_group: int) -> None:
    """Write whole key groups, in place. x: float [M, H, D] (M a multiple of Tg; rows g*Tg .. g*Tg + Tg - 1 are one
    group, their slots consecutive and the first a multiple of Tg); slots: int [M]; codes [P, H, page_size,
    code_bytes]; sz float16 [P, H, page_size / Tg, D, 2] (group row slot // Tg, head-major like the codes)."""
    check_key_groups(x, slots, token_group)
    c, s = quantize_kv_channel_ref(x, bits, token_group)
    write_slots(codes, slots, c)
    write_slots(sz, slots.long()[::token_group] // token_group, s)


def check_key_groups(x: torch.Tensor, slots: torch.Tensor, token_group: int) -> None:
    """KIVI key rows come in whole groups of token_group rows whose slots are consecutive and start at a multiple of
    token_group (one (scale, zero) row per group); anything else would mix tokens of two groups."""
    if x.shape[0] % token_group:
        raise ValueError(f"{x.shape[0]} rows are not whole groups of token_group={token_group}; write complete "
                         "groups (the newest, incomplete group stays in the float window).")
    if x.shape[0]:
        g = slots.long().view(-1, token_group)
        if bool((g[:, 0] % token_group).any()) or bool((g - g[:, :1] != torch.arange(token_group,
                                                                                      device=g.device)).any()):
            raise ValueError(f"slots of a key group must be {token_group} consecutive slots starting at a multiple "
                             f"of token_group={token_group} (token_group must divide the page size).")


@triton.jit
def _kv_write_channel_kernel(x_ptr, slot_ptr, codes_ptr, sz_ptr, H, D: tl.constexpr, TG: tl.constexpr,
                             BITS: tl.constexpr, PAGE: tl.constexpr):
    # Program (g, h): the TG rows of group g of head h; min / max per channel over the group's tokens.
    g = tl.program_id(0)
    h = tl.program_id(1)
    maxq: tl.constexpr = 2 ** BITS - 1
    r = tl.arange(0, TG)
    d = tl.arange(0, D)
    tok = g * TG + r
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    x = tl.load(x_ptr + (tok[:, None] * H + h) * D + d[None, :]).to(tl.float32)  # [TG, D]
    lo = tl.minimum(tl.min(x, axis=0), 0.0)
    hi = tl.maximum(tl.max(x, axis=0), 0.0)
    poison = tl.sum(x * 0.0, axis=0)  # a NaN scale for a group with NaN/inf, as in _kv_write_kernel
    scale = (tl.maximum(tl.math.div_rn(hi - lo, tl.full(lo.shape, maxq, tl.float32)), _MIN_SCALE) + poison)
    scale = scale.to(tl.float16)
    s32 = scale.to(tl.float32)
    zero = tl.minimum(tl.maximum(tl.math.div_rn(-lo, s32), 0.0), maxq)
    zero = (zero + _ROUND_MAGIC) - _ROUND_MAGIC
    y = tl.math.div_rn(x, s32[None, :])
    y = tl.minimum(tl.maximum(y, -2.0 * maxq), 2.0 * maxq)
    y = (y + _ROUND_MAGIC) - _ROUND_MAGIC
    q = tl.minimum(tl.maximum(y + zero[None, :], 0.0), maxq).to(tl.uint8)  # [TG, D]
    s0 = tl.load(slot_ptr + g * TG).to(tl.int64)  # the group's first slot (a multiple of TG)
    szp = sz_ptr + page_row(s0 // PAGE, (s0 % PAGE) // TG, h, H, PAGE // TG) * (D * 2) + d * 2
    tl.store(szp, scale)
    tl.store(szp + 1, zero.to(tl.float16))
    row = page_row(slot // PAGE, slot % PAGE, h, H, PAGE)
    if BITS == 4:
        lo_q, hi_q = tl.split(tl.permute(tl.reshape(q, (TG, 2, D // 2)), (0, 2, 1)))
        tl.store(codes_ptr + row[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :], lo_q | (hi_q << 4))
    else:
        tl.store(codes_ptr + row[:, None] * D + d[None, :], q)


def kv_write_channel(x: torch.Tensor, slots: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor, bits: int,
                     token_group: int) -> None:
    """Triton twin of kv_write_channel_ref (bit-exact codes and scales); same arguments."""
    check_kv_rows(x, slots, codes)
    M, H, D = x.shape
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: KIVI keys are stored in 4 or 8 bits.")
    check_key_groups(x, slots, token_group)
    if D & (D - 1) or token_group & (token_group - 1):
        raise ValueError(f"the kernel needs head_dim ({D}) and token_group ({token_group}) to be powers of two.")
    check_storage(codes, sz, H, D, bits, D, token_group)
    if M:
        _kv_write_channel_kernel[(M // token_group, H)](x.contiguous(), slots.contiguous(), codes, sz, H, D=D,
                                                        TG=token_group, BITS=bits, PAGE=codes.shape[2])
