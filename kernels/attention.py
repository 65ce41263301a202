"""Attention over the paged KV cache: split-KV decode attention (+ LSE merge) and prefill attention.

Decode (one query token per sequence), flash-decoding in two stages:
  stage 1, one program per (sequence, KV head, split): the split's pages are read through the page table, the codes
           dequantized in registers ((code - zero) * scale, never a dequantized copy in memory), RoPE applied to K
           when the cache holds pre-RoPE keys (Atom), and an online softmax over the split gives a partial output
           and its log-sum-exp LSE = max + log(sum). All query heads of the KV head (GQA: 3 for SmolLM2, 4 for
           Mistral) share the program, so each K/V byte is read once.
  stage 2, one program per (sequence, query head): merge the splits: out = sum_s exp(lse_s - LSE) out_s.
Two stage-1 kernels: _decode_split_kernel (tensor cores, tl.dot: every format, GQA) and _decode_core_kernel (CUDA
cores, float32: INT4 with one (scale, zero) per token-head and ONE query head per KV head, where tl.dot would pad
that one row to 16 and convert each tile through shared memory). On the H200 (benchmarks/NOTES.md, KV section),
Llama-2-7B INT4 post-RoPE: CUDA-core 1.45-1.92x of cuDNN bf16 SDPA, tensor-core 0.81-1.01x in the same run; the
wrapper picks the CUDA-core kernel whenever it applies, unless the Gluon one does (kernels/attention_gluon.py:
tensor cores fed from registers, MHA INT4 post-RoPE, head_dim 128, batch >= 8: 1.79-2.33x in the bar region, v9).
Prefill: the library's SDPA (torch.nn.functional.scaled_dot_product_attention, causal) over the sequence's K/V as
read back from the cache (what the float simulation of the same KV format computes), or over the fresh float K/V
of the chunk (Atom's choice); see atom_lab.kv_cache.

Storage layout (atom_lab.kv_cache.PagePool), head-major pages: a layer's K codes [P, Hkv, page_size, code_bytes],
(scale, zero) float16 [P, Hkv, page_size, D/G, 2]; a float cache stores [P, Hkv, page_size, D] in float16/bfloat16.
Token t of a sequence sits at page = page_table[t // page_size], offset t % page_size, and one head's rows of a page
are consecutive (kernels/kv_cache.py page_row / read_slots: the one address rule).
KIVI keys (key_tokens = Tg): K's pairs are float16 [P, Hkv, page_size / Tg, D, 2], one per channel per group of Tg
slots (group row slot // Tg).
A float window (formats with window / key_tokens): each sequence's newest tokens [n_q, n) are unquantized in a ring
k_win, v_win [num_windows * W, Hkv, D] (token p at row id * W + p % W). The decode kernel then runs twice, over
the codes [0, n_q) and over the ring [n_q, n), and one LSE merge combines the splits of both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_tensor, interpreting
from .kv_cache import dequantize_kv_channel_ref, dequantize_kv_ref, page_row, read_slots


# ---------------------------------------------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------------------------------------------
def rope_ref(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Llama's RoPE (rotate_half convention) in float32. x: [T, H, D]; pos: int [T]; inv_freq: float32 [D/2]."""
    freqs = pos.float()[:, None] * inv_freq.float()[None, :]
    cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
    x = x.float()
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rope_table(inv_freq: torch.Tensor, scaling: float, n: int) -> torch.Tensor:
    """cos | sin of positions 0..n-1 as float32 [n, D] (cos in [:, :D/2], sin in [:, D/2:]), computed as rope_ref
    computes them: the decode kernel reads a row per position instead of evaluating cos/sin per element."""
    freqs = torch.arange(n, device=inv_freq.device).float()[:, None] * inv_freq.float()[None, :]
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=1).contiguous()


def gather_kv_ref(codes: torch.Tensor, sz: torch.Tensor | None, bits: int, pages: torch.Tensor, length: int,
                  page_size: int, key_tokens: int | None = None) -> torch.Tensor:
    """The first `length` tokens of one sequence as float32 [length, Hkv, D] (dequantized). pages: int [n_pages];
    codes, sz: a layer's head-major storage (module docstring). key_tokens: Tg when sz holds KIVI per-channel pairs
    [P, Hkv, page_size / Tg, D, 2]."""
    pos = torch.arange(length, device=codes.device)
    slots = pages.long()[pos // page_size] * page_size + pos % page_size
    if bits >= 16:
        return read_slots(codes, slots).float()
    if key_tokens:
        return dequantize_kv_channel_ref(read_slots(codes, slots), read_slots(sz, slots // key_tokens), bits)
    return dequantize_kv_ref(read_slots(codes, slots), read_slots(sz, slots), bits)


def gather_window_ref(win: torch.Tensor, window_id: int, start: int, end: int, capacity: int) -> torch.Tensor:
    """Tokens [start, end) of one sequence's float window ring as float32 [end - start, Hkv, D]."""
    pos = torch.arange(start, end, device=win.device)
    return win[window_id * capacity + pos % capacity].float()


def paged_decode_attention_ref(q, k_codes, k_sz, v_codes, v_sz, page_table, lengths, bits: int, page_size: int,
                               sm_scale: float, rope: tuple | None = None, key_tokens: int | None = None,
                               window: tuple | None = None) -> torch.Tensor:
    """Reference decode attention.

    Args:
        q: float [B, Hq, D] one query per sequence (already rotated).
        k_codes, v_codes: a layer's storage (module docstring); k_sz, v_sz: its (scale, zero) or None for bits 16.
        page_table: int32 [B, max_pages] page ids (entries past a sequence's pages are ignored).
        lengths: int32 [B] tokens in each sequence (>= 1), including the one just written.
        rope: (inv_freq float32 [D/2], scaling) when K is stored before RoPE (rotated here at positions 0..len-1);
            a third entry, rope_table(inv_freq, scaling, n) with n >= every length, is the kernel's (ignored here).
        key_tokens: Tg for KIVI keys (k_sz float16 [P, Hkv, page_size / Tg, D, 2]), None for keys per token.
        window: (k_win, v_win, window_ids int32 [B], quant_lengths int32 [B], capacity W) when the newest tokens
            [quant_lengths[b], lengths[b]) sit in the float ring (module docstring); the codes hold [0, quant_len).
    Returns:
        float32 [B, Hq, D].
    """
    B, Hq, D = q.shape
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(lengths[b])
        nq = int(window[3][b]) if window is not None else n
        k = gather_kv_ref(k_codes, k_sz, bits, page_table[b], nq, page_size, key_tokens)
        v = gather_kv_ref(v_codes, v_sz, bits, page_table[b], nq, page_size)
        if window is not None:
            wid, cap = int(window[2][b]), window[4]
            k = torch.cat([k, gather_window_ref(window[0], wid, nq, n, cap)])
            v = torch.cat([v, gather_window_ref(window[1], wid, nq, n, cap)])
        if rope is not None:
            k = rope_ref(k, torch.arange(n, device=q.device), rope[0], rope[1])
        rep = Hq // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [n, Hq, D]
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * sm_scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v)
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a chunk's T queries over the sequence's first N = past + T keys (SDPA).

    q: [T, Hq, D]; k, v: [N, Hkv, D] (same float dtype as q) -> [T, Hq, D]. Query i sits at position N - T + i.
    mask: bool [T, N] which keys each query sees, instead of the causal one (a float window: atom_lab.paged_model).
    """
    T, N = q.shape[0], k.shape[0]
    if mask is None:
        i = torch.arange(T, device=q.device)[:, None] + (N - T)
        mask = torch.arange(N, device=q.device)[None, :] <= i  # [T, N]
    return sdpa_rows(q, k, v, sm_scale, mask)


def sdpa_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on token-major tensors: q [T, Hq, D], k, v [N, Hkv, D] -> [T, Hq, D] (GQA when Hkv < Hq).

    mask: bool [T, N]; None = SDPA's own causal flag, for a whole prompt (T == N): no mask tensor, so SDPA may
    take its flash / cuDNN kernels (in float16 / bfloat16 on a GPU).
    """
    if mask is None and q.shape[0] != k.shape[0]:
        raise ValueError(f"sdpa_rows without a mask is causal self-attention: q has {q.shape[0]} tokens, k "
                         f"{k.shape[0]}; pass the mask (prefill_attention builds it).")
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, is_causal=mask is None, scale=sm_scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Triton: split-KV decode + merge
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _codes_f16(b, SHIFT: tl.constexpr, MASK: tl.constexpr):
    """uint8 codes -> their integer values as float16, exactly, with no int->float conversion instruction (those
    run at 16 per clock per SM on Hopper and capped the INT4 kernel at ~1 TB/s): the bits 0x6400 | c are the
    float16 1024 + c for 0 <= c < 1024, so two integer ops and one float16 subtraction give c."""
    x = ((b.to(tl.uint16) >> SHIFT) & MASK) | 0x6400
    return x.to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _nibbles_f16(b, ASM: tl.constexpr):
    """uint8 bytes -> (low nibbles, high nibbles) as float16, exactly. ASM (GPU only: inline PTX cannot run in the
    interpreter): 4 bytes per 32-bit register at a time, 10 instructions for 8 codes instead of ~5 per code: a byte
    permute spreads bytes (0, 1) and (2, 3) into the two 16-bit halves of a register; one lop3 then makes
    0x6400 | (b & 0xF) = 1024 + lo per half (minus 1024: one packed subtraction), another 0x6400 | (b & 0xF0) =
    1024 + 16 hi, and one packed fma (x / 16 - 64) gives hi, all exact. Without ASM: _codes_f16, the same values
    (tests/test_attention.py pins the two together on the GPU)."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 t0, t1, m1024, s16, m64;
            mov.b32 m1024, 0x64006400;
            mov.b32 s16, 0x2C002C00;
            mov.b32 m64, 0xD400D400;
            prmt.b32 t0, $4, 0, 0x4140;
            prmt.b32 t1, $4, 0, 0x4342;
            lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 $2, t0, 0x00F000F0, 0x64006400, 0xEA;
            lop3.b32 $3, t1, 0x00F000F0, 0x64006400, 0xEA;
            sub.f16x2 $0, $0, m1024;
            sub.f16x2 $1, $1, m1024;
            fma.rn.f16x2 $2, $2, s16, m64;
            fma.rn.f16x2 $3, $3, s16, m64;
            }
            """,
            constraints="=r,=r,=r,=r,r", args=[b], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        return lo, hi
    else:
        return _codes_f16(b, 0, 0xF), _codes_f16(b, 4, 0xF)


@triton.jit
def _load_codes(codes_ptr, row, HALF: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, mask,
                ASM: tl.constexpr = False):
    """Storage rows `row` [N] (page_row) -> codes of channels [0, D/2) and [D/2, D) as float16 [N, D/2] each
    (exact)."""
    d = tl.arange(0, HALF)[None, :]
    row = row[:, None]
    m = mask[:, None]
    if BITS == 4:
        b = tl.load(codes_ptr + row * HALF + d, mask=m, other=0)
        return _nibbles_f16(b, ASM)
    else:
        clo = _codes_f16(tl.load(codes_ptr + row * D + d, mask=m, other=0), 0, 0xFF)
        chi = _codes_f16(tl.load(codes_ptr + row * D + HALF + d, mask=m, other=0), 0, 0xFF)
        return clo, chi


@triton.jit
def _load_half(codes_ptr, sz_ptr, row, srow, HALF: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
               BITS: tl.constexpr, mask, TG: tl.constexpr = 0, F32: tl.constexpr = False):
    """Storage rows `row` [N] -> (channels [0, D/2), channels [D/2, D)) as float16 [N, D/2] each, dequantized
    (float32 with F32, for RoPE: one rounding to float16 after it). (c - z) * s in float16 is the float32 result
    rounded once: c - z is a small integer (exact) and the product of two float16 is exact in float32.
    srow [N]: each row's row of pairs in sz (= row; TG > 0, KIVI keys: its token group's row, D pairs each)."""
    d = tl.arange(0, HALF)[None, :]
    srow = srow[:, None]
    r2 = row[:, None]
    m = mask[:, None]
    OUT: tl.constexpr = tl.float32 if F32 else tl.float16
    if BITS == 16:
        lo = tl.load(codes_ptr + r2 * D + d, mask=m, other=0.0).to(OUT)
        hi = tl.load(codes_ptr + r2 * D + HALF + d, mask=m, other=0.0).to(OUT)
    else:
        NG: tl.constexpr = D // G
        clo, chi = _load_codes(codes_ptr, row, HALF, D, BITS, mask)
        if TG > 0:
            base = sz_ptr + srow * (D * 2)
            glo = d * 2
            ghi = (d + HALF) * 2
        else:
            base = sz_ptr + srow * (NG * 2)
            glo = (d // G) * 2
            ghi = ((d + HALF) // G) * 2
        lo = (clo - tl.load(base + glo + 1, mask=m, other=0.0)).to(OUT) * \
            tl.load(base + glo, mask=m, other=0.0).to(OUT)
        hi = (chi - tl.load(base + ghi + 1, mask=m, other=0.0)).to(OUT) * \
            tl.load(base + ghi, mask=m, other=0.0).to(OUT)
    return lo, hi


@triton.jit
def _rope_rows(lo, hi, tab_ptr, t, HALF: tl.constexpr, mask):
    """Rotate float32 halves [N, D/2] at positions t [N] with the table rows tab[t] = (cos | sin) [D] (float32,
    rope_table: the reference's own values, so no transcendental per element here)."""
    d = tl.arange(0, HALF)[None, :]
    trow = tab_ptr + t[:, None] * (2 * HALF)
    c = tl.load(trow + d, mask=mask[:, None], other=0.0)
    s = tl.load(trow + HALF + d, mask=mask[:, None], other=0.0)
    return lo * c - hi * s, hi * c + lo * s


@triton.jit
def _decode_split_kernel(q_ptr, kc_ptr, ksz_ptr, vc_ptr, vsz_ptr, pt_ptr, start_ptr, len_ptr, tab_ptr, o_ptr,
                         lse_ptr, Hq, Hkv, max_pages, tokens_per_split, sm_scale, split0,
                         D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, PAGE: tl.constexpr,
                         QPK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr,
                         NSPLIT: tl.constexpr, KEY_TG: tl.constexpr, RING: tl.constexpr, HAS_START: tl.constexpr,
                         K_MODE: tl.constexpr, V_MODE: tl.constexpr, ASM: tl.constexpr):
    # Program (b, h, sp): query heads h*QPK .. h*QPK+QPK-1 of sequence b over tokens [t0, t0 + TPS) of its range
    # [start_b, n_b); writes split split0 + sp of the (o, lse) buffers. RING: a float window (token-major rows
    # (pt[b, 0] * PAGE + t % PAGE) * Hkv + h, PAGE = its capacity) instead of head-major pages (page_row).
    # K_MODE (how scores come out of the keys; the wrapper picks it):
    #   0 dequantize each element (float cache, sub-head groups, KIVI groups shorter than BLOCK_N), RoPE if asked;
    #   1 one (scale, zero) per token per head: scores s_t * (q . c_t - z_t * sum(q)) from the raw codes (post-
    #     RoPE), or s_t * q . R_t (c_t - z_t) (pre-RoPE: the rotation of exact integers, then one float16 rounding);
    #   2 KIVI keys, one token group per tile (BLOCK_N divides Tg): the group's per-channel scales are folded into
    #     q once per tile, q_s = q * s, scores q_s . c_t - q_s . z (no per-element dequantization);
    #   3 KIVI keys, one token group per tile, pre-RoPE: the group's pairs loaded once per tile and broadcast.
    # V_MODE: 0 dequantize each element; 1 one pair per token per head: the scale folded into the probabilities,
    #   sum_t p_t s_t (c_t - z_t) = (p * s) . C - sum_t p_t s_t z_t (vLLM's int4_per_token_head does the same).
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    HALF: tl.constexpr = D // 2
    n = tl.load(len_ptr + b)
    if HAS_START:
        first = tl.load(start_ptr + b)
    else:
        first = 0
    t0 = first + sp * tokens_per_split
    t_end = tl.minimum(t0 + tokens_per_split, n)
    qi = tl.arange(0, BLOCK_Q)
    qmask = qi < QPK
    qh = h * QPK + qi
    d = tl.arange(0, HALF)
    qrow = q_ptr + (b * Hq + qh[:, None]) * D
    # fp16 operands for the tensor cores (tl.dot needs >= 16 rows: BLOCK_Q pads the QPK heads), fp32 accumulators
    q32_lo = tl.load(qrow + d[None, :], mask=qmask[:, None], other=0.0).to(tl.float32) * sm_scale
    q32_hi = tl.load(qrow + HALF + d[None, :], mask=qmask[:, None], other=0.0).to(tl.float32) * sm_scale
    q_lo = q32_lo.to(tl.float16)
    q_hi = q32_hi.to(tl.float16)
    q_sum = tl.sum(q_lo.to(tl.float32), axis=1) + tl.sum(q_hi.to(tl.float32), axis=1)
    m_i = tl.full([BLOCK_Q], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc_lo = tl.zeros([BLOCK_Q, HALF], tl.float32)
    acc_hi = tl.zeros([BLOCK_Q, HALF], tl.float32)
    for start in range(t0, t_end, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < t_end
        if RING:
            row = (tl.load(pt_ptr + b * max_pages).to(tl.int64) * PAGE + t % PAGE) * Hkv + h
        else:
            page = tl.load(pt_ptr + b * max_pages + t // PAGE, mask=tmask, other=0)  # page table, per token
            row = page_row(page, t % PAGE, h, Hkv, PAGE)
        if K_MODE == 1:
            c_lo, c_hi = _load_codes(kc_ptr, row, HALF, D, BITS, tmask, ASM)
            ks = tl.load(ksz_ptr + row * 2, mask=tmask, other=0.0).to(tl.float32)
            kz = tl.load(ksz_ptr + row * 2 + 1, mask=tmask, other=0.0)
            if ROPE:  # rotate the exact integers c - z, round once to float16, the scale after the dot
                u_lo, u_hi = _rope_rows((c_lo - kz[:, None]).to(tl.float32), (c_hi - kz[:, None]).to(tl.float32),
                                        tab_ptr, t, HALF, tmask)
                sc = ks[None, :] * (tl.dot(q_lo, tl.trans(u_lo.to(tl.float16))) +
                                    tl.dot(q_hi, tl.trans(u_hi.to(tl.float16))))
            else:
                qc = tl.dot(q_lo, tl.trans(c_lo)) + tl.dot(q_hi, tl.trans(c_hi))
                sc = ks[None, :] * (qc - kz.to(tl.float32)[None, :] * q_sum[:, None])
        elif K_MODE == 2 or K_MODE == 3:
            # the tile's tokens share one key group: its pairs are one [D] row of k_sz (scale, zero interleaved)
            g = page_row(tl.load(pt_ptr + b * max_pages + start // PAGE), (start % PAGE) // KEY_TG, h, Hkv,
                         PAGE // KEY_TG)
            gbase = ksz_ptr + g * (D * 2)
            s_lo = tl.load(gbase + d * 2)
            z_lo = tl.load(gbase + d * 2 + 1)
            s_hi = tl.load(gbase + (d + HALF) * 2)
            z_hi = tl.load(gbase + (d + HALF) * 2 + 1)
            c_lo, c_hi = _load_codes(kc_ptr, row, HALF, D, BITS, tmask, ASM)
            if K_MODE == 2:
                qs_lo = (q32_lo * s_lo.to(tl.float32)[None, :]).to(tl.float16)
                qs_hi = (q32_hi * s_hi.to(tl.float32)[None, :]).to(tl.float16)
                bias = tl.sum(qs_lo.to(tl.float32) * z_lo.to(tl.float32)[None, :], axis=1) + \
                    tl.sum(qs_hi.to(tl.float32) * z_hi.to(tl.float32)[None, :], axis=1)
                sc = tl.dot(qs_lo, tl.trans(c_lo)) + tl.dot(qs_hi, tl.trans(c_hi)) - bias[:, None]
            else:
                k_lo, k_hi = _rope_rows((c_lo - z_lo[None, :]).to(tl.float32) * s_lo.to(tl.float32)[None, :],
                                        (c_hi - z_hi[None, :]).to(tl.float32) * s_hi.to(tl.float32)[None, :],
                                        tab_ptr, t, HALF, tmask)
                sc = tl.dot(q_lo, tl.trans(k_lo.to(tl.float16))) + tl.dot(q_hi, tl.trans(k_hi.to(tl.float16)))
        else:
            if KEY_TG > 0:  # the pairs of each token's key group
                srow = page_row(page, (t % PAGE) // KEY_TG, h, Hkv, PAGE // KEY_TG)
            else:
                srow = row
            k_lo, k_hi = _load_half(kc_ptr, ksz_ptr, row, srow, HALF, D, G, BITS, tmask, KEY_TG, ROPE)
            if ROPE:  # K stored before RoPE (Atom): rotate the dequantized halves at their positions
                k_lo, k_hi = _rope_rows(k_lo, k_hi, tab_ptr, t, HALF, tmask)
                k_lo, k_hi = k_lo.to(tl.float16), k_hi.to(tl.float16)
            sc = tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))
        sc = tl.where(tmask[None, :], sc, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_MODE == 1:
            v_lo, v_hi = _load_codes(vc_ptr, row, HALF, D, BITS, tmask, ASM)
            vs = tl.load(vsz_ptr + row * 2, mask=tmask, other=0.0).to(tl.float32)
            vz = tl.load(vsz_ptr + row * 2 + 1, mask=tmask, other=0.0).to(tl.float32)
            ps16 = (p * vs[None, :]).to(tl.float16)
            pz = tl.sum(ps16.to(tl.float32) * vz[None, :], axis=1)  # the same rounded p * s as the dot
            acc_lo = acc_lo * alpha[:, None] + tl.dot(ps16, v_lo) - pz[:, None]
            acc_hi = acc_hi * alpha[:, None] + tl.dot(ps16, v_hi) - pz[:, None]
        else:
            v_lo, v_hi = _load_half(vc_ptr, vsz_ptr, row, row, HALF, D, G, BITS, tmask)
            p16 = p.to(tl.float16)
            acc_lo = acc_lo * alpha[:, None] + tl.dot(p16, v_lo)
            acc_hi = acc_hi * alpha[:, None] + tl.dot(p16, v_hi)
        m_i = m_new
    valid = t0 < n
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    sp = split0 + sp
    orow = o_ptr + ((b * Hq + qh[:, None]) * NSPLIT + sp) * D
    tl.store(orow + d[None, :], acc_lo / l_safe[:, None], mask=qmask[:, None])
    tl.store(orow + HALF + d[None, :], acc_hi / l_safe[:, None], mask=qmask[:, None])
    lse = tl.where(valid, m_i + tl.log(l_safe), -float("inf"))
    tl.store(lse_ptr + (b * Hq + qh) * NSPLIT + sp, lse, mask=qmask)


@triton.jit
def _decode_core_kernel(q_ptr, kc_ptr, ksz_ptr, vc_ptr, vsz_ptr, pt_ptr, len_ptr, tab_ptr, o_ptr, lse_ptr, Hq, Hkv,
                        max_pages, tokens_per_split, sm_scale, D: tl.constexpr, PAGE: tl.constexpr,
                        BLOCK_N: tl.constexpr, ROPE: tl.constexpr, NSPLIT: tl.constexpr, ASM: tl.constexpr,
                        STAGES: tl.constexpr):
    # INT4 with one (scale, zero) per token per head, ONE query head per KV head (MHA: Llama-2-7B), on the CUDA
    # cores: the tensor-core kernel above pads that one query row to 16 and converts every K/V tile through shared
    # memory into operand layouts, which made it as slow per tile as the 3.76x larger bf16 tile. Here a thread
    # keeps the bytes it loaded: byte j of a token row holds channels j (low nibble) and j + D/2 (high nibble), so
    #   scores  s_t * (q . c_t - z_t * sum(q))            (post-RoPE: products + a sum over the row's 4 threads)
    #           s_t * sum_j (c - z)_j qa_tj + (c - z)_{j+D/2} qb_tj, qa = q_lo cos + q_hi sin, qb = q_hi cos -
    #           q_lo sin (pre-RoPE: R_t^T applied to q instead of R_t to K, in float32; the cos | sin table is the
    #           reference's, read as float16 by default (rope_fp16: half its L2 bytes, which bound this loop))
    #   output  sum_t p_t s_t c_t - sum_t p_t s_t z_t, accumulated per (row slot, channel) in a [BLOCK_N, D] float32
    #           tile and summed over its rows once at the end (no cross-thread reduction per tile).
    # Everything after the exact integer codes is float32 (more accurate than the float16 operands of tl.dot).
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    HALF: tl.constexpr = D // 2
    n = tl.load(len_ptr + b)
    t0 = sp * tokens_per_split
    t_end = tl.minimum(t0 + tokens_per_split, n)
    d = tl.arange(0, HALF)
    qrow = q_ptr + (b * Hq + h) * D
    q_lo = tl.load(qrow + d).to(tl.float32) * sm_scale
    q_hi = tl.load(qrow + HALF + d).to(tl.float32) * sm_scale
    q_sum = tl.sum(q_lo, axis=0) + tl.sum(q_hi, axis=0)
    m_i = tl.max(tl.full([BLOCK_N], -float("inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    pz = l_i
    acc_lo = tl.zeros([BLOCK_N, HALF], tl.float32)
    acc_hi = tl.zeros([BLOCK_N, HALF], tl.float32)
    for start in tl.range(t0, t_end, BLOCK_N, num_stages=STAGES):  # STAGES > 1: loads staged through shared memory
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < t_end
        page = tl.load(pt_ptr + b * max_pages + t // PAGE, mask=tmask, other=0)
        row = page_row(page, t % PAGE, h, Hkv, PAGE)
        kb = tl.load(kc_ptr + row[:, None] * HALF + d[None, :], mask=tmask[:, None], other=0)
        ks = tl.load(ksz_ptr + row * 2, mask=tmask, other=0.0).to(tl.float32)
        kz = tl.load(ksz_ptr + row * 2 + 1, mask=tmask, other=0.0).to(tl.float32)
        vb = tl.load(vc_ptr + row[:, None] * HALF + d[None, :], mask=tmask[:, None], other=0)
        vs = tl.load(vsz_ptr + row * 2, mask=tmask, other=0.0).to(tl.float32)
        vz = tl.load(vsz_ptr + row * 2 + 1, mask=tmask, other=0.0).to(tl.float32)
        c_lo, c_hi = _nibbles_f16(kb, ASM)
        if ROPE:
            trow = tab_ptr + t[:, None] * D + d[None, :]
            cs = tl.load(trow, mask=tmask[:, None], other=0.0)
            sn = tl.load(trow + HALF, mask=tmask[:, None], other=0.0)
            qa = q_lo[None, :] * cs + q_hi[None, :] * sn
            qb = q_hi[None, :] * cs - q_lo[None, :] * sn
            sc = ks * tl.sum((c_lo.to(tl.float32) - kz[:, None]) * qa + (c_hi.to(tl.float32) - kz[:, None]) * qb,
                             axis=1)
        else:
            sc = ks * (tl.sum(c_lo.to(tl.float32) * q_lo[None, :] + c_hi.to(tl.float32) * q_hi[None, :], axis=1)
                       - kz * q_sum)
        sc = tl.where(tmask, sc, -float("inf"))
        m_tile = tl.max(sc, axis=0)
        if m_tile > m_i:  # rescale the [BLOCK_N, D] accumulator only when the running max grows (one branch for
            alpha = tl.exp(m_i - m_tile)  # the whole program: one query head), not on every tile
            acc_lo = acc_lo * alpha
            acc_hi = acc_hi * alpha
            l_i = l_i * alpha
            pz = pz * alpha
            m_i = m_tile
        p = tl.exp(sc - m_i)
        l_i = l_i + tl.sum(p, axis=0)
        ps = p * vs
        pz = pz + tl.sum(ps * vz, axis=0)
        v_lo, v_hi = _nibbles_f16(vb, ASM)
        acc_lo = acc_lo + ps[:, None] * v_lo.to(tl.float32)
        acc_hi = acc_hi + ps[:, None] * v_hi.to(tl.float32)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    orow = o_ptr + ((b * Hq + h) * NSPLIT + sp) * D
    tl.store(orow + d, (tl.sum(acc_lo, axis=0) - pz) / l_safe)
    tl.store(orow + HALF + d, (tl.sum(acc_hi, axis=0) - pz) / l_safe)
    lse = tl.where(t0 < n, m_i + tl.log(l_safe), -float("inf"))
    tl.store(lse_ptr + (b * Hq + h) * NSPLIT + sp, lse)


@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, D: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_S: tl.constexpr):
    # One program per (sequence, query head): out = sum_s exp(lse_s - LSE) o_s over the splits that saw tokens.
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    smask = s < NSPLIT
    lse = tl.load(lse_ptr + row * NSPLIT + s, mask=smask, other=-float("inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp(lse - m)
    w = w / tl.sum(w, axis=0)
    d = tl.arange(0, D)
    o = tl.load(o_ptr + (row * NSPLIT + s[:, None]) * D + d[None, :], mask=smask[:, None], other=0.0)
    tl.store(out_ptr + row * D + d, tl.sum(o * w[:, None], axis=0))


def merge_splits_ref(o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Reference merge. o: float32 [R, S, D] partial outputs; lse: float32 [R, S] (-inf = empty split) -> [R, D]."""
    w = torch.softmax(lse, dim=-1)
    return (o * w[..., None]).sum(dim=1)


# The CUDA-core kernel's launch on a GPU when a call names none (benchmarks/NOTES.md, KV section: the fastest
# measured on the H200): tokens per program step, warps per program, pipeline stages, programs the splits aim at.
CORE_CONFIG = dict(block_n=16, num_warps=1, num_stages=3, programs=4224, rope_fp16=True)
GLUON_PROGRAMS = 4224  # the Gluon kernel's split target (1-warp programs, like the CUDA-core kernel's)
GLUON_AHEAD = 1  # its tiles of 16 tokens in flight per warp (num_stages 1 or 2)


def _fp16_table(table: torch.Tensor) -> torch.Tensor:
    """table rounded to float16, made once per table object and kept on it (a decoder holds one table; a CUDA graph
    that captured the call keeps pointing at the same copy); remade if the table was written in place since."""
    if table.dtype == torch.float16:
        return table
    kept = getattr(table, "_atom_fp16_copy", None)
    if kept is None or kept[0] != table._version:
        kept = (table._version, table.to(torch.float16))
        table._atom_fp16_copy = kept
    return kept[1]


def default_variant(core_ok: bool, gluon_fits: bool = False) -> str:
    """The decode kernel a call gets when it names none (see benchmarks/NOTES.md, KV section): the Gluon kernel
    where it applies (v8, H200: 1.69-2.03x cuDNN vs the CUDA-core kernel's 1.50-1.93x in the same run, faster in all
    9 cases measured, batch 8-128), else the CUDA-core kernel, else the tensor-core one."""
    return "gluon" if gluon_fits else "core" if core_ok else "dot"


def _gluon_fits(core_ok, rope, D, page_size, B, tensors) -> bool:
    """The Gluon kernel covers the call and was measured faster there: MHA INT4 post-RoPE, head_dim 128, pages of a
    multiple of 16, batch >= 8 (smaller batches were not measured with its final options), contiguous storage
    `tensors` (read as int32 words), a CUDA GPU with Gluon (never under the interpreter)."""
    if not (core_ok and rope is None and D == 128 and page_size % 16 == 0 and B >= 8) or interpreting():
        return False
    from .attention_gluon import gluon_ok
    return gluon_ok(tensors[0].device) and all(t.is_contiguous() for t in tensors)


def paged_decode_attention(q, k_codes, k_sz, v_codes, v_sz, page_table, lengths, bits: int, page_size: int,
                           sm_scale: float, rope: tuple | None = None, num_splits: int | None = None,
                           max_length: int | None = None, block_n: int | None = None,
                           num_warps: int | None = None, key_tokens: int | None = None,
                           window: tuple | None = None, variant: str | None = None,
                           unpack_asm: bool | None = None, num_stages: int | None = None,
                           programs: int | None = None, rope_fp16: bool | None = None) -> torch.Tensor:
    """Triton split-KV decode attention; same arguments and result as paged_decode_attention_ref (float32 out).

    rope: (inv_freq, scaling) or (inv_freq, scaling, table): table = rope_table(inv_freq, scaling, n), n >=
        max_length, built once by the caller (else built here on every call).
    num_splits: KV splits per sequence (default: enough programs to fill the GPU; 1-2 on the CPU interpreter).
    max_length: an upper bound of `lengths` (default: the page table's capacity); no device read-back, so the
        call can be captured in a CUDA graph. block_n: tokens per loop step (tensor-core kernel: default 64, 32 at
        head_dim 256, 128 when interpreting; KIVI keys: at most key_tokens when that is >= 16, so a tile holds one
        key group; CUDA-core kernel: CORE_CONFIG). num_warps: per program (default 4, CORE_CONFIG's for "core").
    key_tokens, window: KIVI keys and the float window (see paged_decode_attention_ref): the codes [0, n_q) and
        the ring [n_q, n) are two launches of the same kernel writing disjoint splits of one LSE merge.
    variant: "dot" (tensor cores, every format) or "core" (CUDA cores: INT4 with one pair per token-head and one
        query head per KV head, no KIVI keys or window); default: default_variant (the faster one on the H200).
        "gluon" (GPU only): kernels/attention_gluon.py, mma.sync fed from registers, the "core" cases with K
        after RoPE, head_dim 128 and page_size % 16 == 0; num_stages 1 or 2 = tiles in flight per warp there.
    unpack_asm: INT4 codes -> float16 through inline PTX (default on a GPU, except the tensor-core kernel on post-RoPE
        per-token-head codes, where the plain unpack measured faster; the interpreter cannot run it).
    num_stages: software-pipelining depth of the token loop (Triton's pipeliner; default 3, Triton's own).
    programs: how many programs the splits aim at (default 1056, ~8 per SM of the H200; CORE_CONFIG's for "core").
    rope_fp16: the CUDA-core kernel reads the cos | sin table rounded to float16 (relative 2^-11, inside the float16
        bound the tests assert; converted once per table object and kept); default CORE_CONFIG's.
    """
    check_tensor(q, "q", (torch.float32, torch.float16, torch.bfloat16), dim=3)
    check_tensor(page_table, "page_table", torch.int32, dim=2)
    check_tensor(lengths, "lengths", torch.int32, dim=1)
    B, Hq, D = q.shape
    Hkv = k_codes.shape[1]
    if Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, not a multiple of the cache's {Hkv} KV heads (GQA needs Hq % Hkv == 0).")
    if D & (D - 1) or D < 32:
        raise ValueError(f"head_dim={D} must be a power of two >= 32 for the decode kernel (tensor-core tiles).")
    if page_table.shape[0] != B or lengths.shape[0] != B:
        raise ValueError(f"page_table {tuple(page_table.shape)} and lengths {tuple(lengths.shape)} need one row per "
                         f"sequence of q ({B}).")
    if bits < 16 and k_codes.dtype != torch.uint8:
        raise TypeError(f"a {bits}-bit cache holds uint8 codes, got {k_codes.dtype}.")
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes), ("k_sz", k_sz), ("v_sz", v_sz)):
        # the kernels compute addresses from the head-major page shape: a token-major (pre-v9) or strided tensor
        # would be read as garbage, so it is refused here
        if t is not None and (t.dim() < 4 or t.shape[:2] != k_codes.shape[:2] or not t.is_contiguous()):
            raise ValueError(f"{name} {tuple(t.shape)} is not a contiguous head-major page tensor [pages, Hkv, "
                             f"rows per page, ...] like k_codes {tuple(k_codes.shape)} (PagePool's layout).")
    if k_codes.shape[2] != page_size or v_codes.shape != k_codes.shape:
        raise ValueError(f"k_codes {tuple(k_codes.shape)} / v_codes {tuple(v_codes.shape)} do not hold pages of "
                         f"page_size={page_size} tokens: [pages, Hkv, {page_size}, bytes] (PagePool's layout).")
    if key_tokens and (bits >= 16 or tuple(k_sz.shape[2:]) != (page_size // key_tokens, D, 2)):
        raise ValueError(f"key_tokens={key_tokens} needs a quantized cache whose key pairs are per channel "
                         f"[P, Hkv, page_size / Tg, {D}, 2]; got bits={bits}, k_sz "
                         f"{None if k_sz is None else tuple(k_sz.shape)}.")
    if not key_tokens and bits < 16 and k_sz.shape != v_sz.shape:
        raise ValueError(f"k_sz {tuple(k_sz.shape)} and v_sz {tuple(v_sz.shape)} differ: KIVI per-channel key pairs "
                         "need key_tokens=Tg (PagePool.key_tokens).")
    if window is not None:
        if len(window) != 5:
            raise ValueError("window must be (k_win, v_win, window_ids, quant_lengths, capacity).")
        k_win, v_win, win_ids, quant_len, cap = window
        for name, w in (("k_win", k_win), ("v_win", v_win)):
            check_tensor(w, name, (torch.float32, torch.float16, torch.bfloat16), dim=3)
            if w.shape[1:] != (Hkv, D) or not isinstance(cap, int) or cap < 1 or w.shape[0] % cap:
                raise ValueError(f"{name} {tuple(w.shape)} is not rings of capacity {cap!r} x [{Hkv}, {D}] "
                                 "(PagePool.k_win[layer], PagePool.window_capacity).")
        check_tensor(win_ids, "window ids", torch.int32, dim=1)
        check_tensor(quant_len, "quant_lengths", torch.int32, dim=1)
        if win_ids.shape[0] != B or quant_len.shape[0] != B:
            raise ValueError(f"window ids {tuple(win_ids.shape)} and quant_lengths {tuple(quant_len.shape)} need one "
                             f"entry per sequence of q ({B}).")
    G = D if bits >= 16 else D // v_sz.shape[3]
    max_pages = page_table.shape[1]
    max_length = max_pages * page_size if max_length is None else max_length
    qpk = Hq // Hkv
    core_ok = bits == 4 and G == D and not key_tokens and window is None and qpk == 1
    named = variant
    variant = variant or default_variant(core_ok, _gluon_fits(core_ok, rope, D, page_size, B,
                                                              (k_codes, k_sz, v_codes, v_sz)))
    if variant == "gluon":  # tensor cores fed from registers (kernels/attention_gluon.py): MHA INT4 post-RoPE
        from .attention_gluon import gluon_ok
        if not (core_ok and rope is None and D == 128 and page_size % 16 == 0 and gluon_ok(q.device)
                and not interpreting()):
            raise ValueError(f"variant='gluon' needs a CUDA GPU with Gluon (triton >= 3.5; not the interpreter) and "
                             f"an INT4 cache with one (scale, zero) per token-head, K after RoPE, head_dim 128, "
                             f"page_size a multiple of 16, one query head per KV head (here bits={bits}, "
                             f"group={G}, rope={rope is not None}, head_dim={D}, page_size={page_size}, {qpk} "
                             f"query heads per KV head, device {q.device}).")
        if num_stages not in (None, 1, 2):
            if named:
                raise ValueError(f"num_stages={num_stages}: the Gluon kernel keeps 1 or 2 tiles in flight per warp.")
            num_stages = None  # a depth meant for the other kernels' pipeliner
        block_n, num_warps, programs = 16, 1, programs or GLUON_PROGRAMS
        num_stages = num_stages or GLUON_AHEAD
    elif variant not in ("dot", "core") or (variant == "core" and not core_ok):
        raise ValueError(f"variant={variant!r}: use 'dot', or 'core' for an INT4 cache with one (scale, zero) per "
                         f"token-head, no KIVI keys or window, and one query head per KV head (here bits={bits}, "
                         f"group={G}, key_tokens={key_tokens}, {qpk} query heads per KV head).")
    rope_fp16 = CORE_CONFIG["rope_fp16"] if rope_fp16 is None else bool(rope_fp16)
    if variant == "core" and not interpreting():
        block_n = block_n or max(2, CORE_CONFIG["block_n"] * 128 // D)  # the same bytes per thread at any head_dim
        num_warps = num_warps or CORE_CONFIG["num_warps"]
        num_stages = num_stages or CORE_CONFIG["num_stages"]
        programs = programs or CORE_CONFIG["programs"]
    num_warps, num_stages, programs = num_warps or 4, num_stages or 3, programs or 1056
    # tokens per loop step: few, large steps for the interpreter; on a GPU 64, or 32 at head_dim 256, where the
    # dequantized [64, 128] halves of K and V and KIVI's per-channel pairs overflow the shared memory (H200: 272 KB)
    block_n = block_n or (128 if interpreting() else 32 if D >= 256 else 64)
    if key_tokens and key_tokens >= 16:  # one key group per tile: its pairs are loaded once (K_MODE 2/3)
        block_n = min(block_n, key_tokens)
    if rope is not None:
        if len(rope) == 3:
            inv_freq, scaling, table = rope
            check_tensor(table, "rope table", torch.float32, dim=2)
            if table.shape[0] < max_length or table.shape[1] != D:
                raise ValueError(f"rope table {tuple(table.shape)} must be rope_table(inv_freq, scaling, n) with n "
                                 f">= max_length={max_length} rows of head_dim={D}.")
        else:
            table = rope_table(rope[0], rope[1], max_length)
    else:
        table = q
    k_mode = 0 if bits >= 16 else 1 if (not key_tokens and G == D) else \
        (3 if rope is not None else 2) if key_tokens and key_tokens % block_n == 0 else 0
    v_mode = 1 if bits < 16 and G == D else 0
    if unpack_asm is None:
        # v9 (H200, head-major pages, benchmarks/NOTES.md): in the tensor-core kernel on post-RoPE INT4 with one pair
        # per token-head, the inline-PTX unpack compiles to 142 registers against the plain one's 128, i.e. 3 instead
        # of 4 programs of 4 warps per SM, and the plain unpack was 3-19% faster in all 56 cases measured (GQA and
        # MHA, pages 16 and 32); pre-RoPE the PTX one stays (2-4% faster there)
        asm = not interpreting() and not (variant == "dot" and k_mode == 1 and rope is None)
    else:
        asm = bool(unpack_asm)
    if asm and interpreting():
        raise ValueError("unpack_asm=True needs a GPU: the Triton interpreter cannot run inline PTX.")
    blocks = max(1, -(-max_length // block_n))
    if num_splits is None:  # aim at `programs` programs over the B * Hkv (sequence, head) pairs
        num_splits = min(2, blocks) if interpreting() else max(1, min(blocks, -(-programs // (B * Hkv))))
    tokens_per_split = -(-blocks // num_splits) * block_n
    num_splits = -(-max_length // tokens_per_split)
    win_splits, win_tps = 0, 0
    if window is not None:
        win_tps = -(-cap // block_n) * block_n
        win_splits = 1
    total = num_splits + win_splits
    o = torch.empty(B, Hq, total, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, total, dtype=torch.float32, device=q.device)
    q = q.contiguous()
    if variant == "gluon":
        from .attention_gluon import launch_gluon
        launch_gluon(q, k_codes, k_sz, v_codes, v_sz, page_table, lengths, o, lse, sm_scale, page_size, num_splits,
                     tokens_per_split, ahead=num_stages)
    elif variant == "core":
        if rope is not None and rope_fp16:  # half the table's bytes (read from L2 per token-head: 3.8x the codes)
            table = _fp16_table(table)
        _decode_core_kernel[(B, Hkv, num_splits)](
            q, k_codes, k_sz, v_codes, v_sz, page_table, lengths, table, o, lse, Hq, Hkv, max_pages,
            tokens_per_split, float(sm_scale), D=D, PAGE=page_size, BLOCK_N=block_n, ROPE=rope is not None,
            NSPLIT=total, ASM=asm, STAGES=num_stages, num_warps=num_warps)
    else:
        common = dict(D=D, QPK=qpk, BLOCK_Q=max(16, triton.next_power_of_2(qpk)), BLOCK_N=block_n,
                      ROPE=rope is not None, NSPLIT=total, num_warps=num_warps)
        _decode_split_kernel[(B, Hkv, num_splits)](
            q, k_codes, k_sz if k_sz is not None else k_codes, v_codes, v_sz if v_sz is not None else v_codes,
            page_table, lengths, lengths if window is None else quant_len, table, o, lse, Hq, Hkv, max_pages,
            tokens_per_split, float(sm_scale), 0, G=G, BITS=bits, PAGE=page_size, KEY_TG=key_tokens or 0,
            RING=False, HAS_START=False, K_MODE=k_mode, V_MODE=v_mode, ASM=asm, num_stages=num_stages, **common)
        if window is not None:  # the float ring: tokens [n_q, n) of each sequence
            _decode_split_kernel[(B, Hkv, 1)](
                q, k_win, k_win, v_win, v_win, win_ids[:, None], quant_len, lengths, table, o, lse, Hq, Hkv, 1,
                win_tps, float(sm_scale), num_splits, G=D, BITS=16, PAGE=cap, KEY_TG=0, RING=True, HAS_START=True,
                K_MODE=0, V_MODE=0, ASM=False, **common)
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
    _merge_kernel[(B * Hq,)](o, lse, out, D=D, NSPLIT=total, BLOCK_S=triton.next_power_of_2(total))
    return out
