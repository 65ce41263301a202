"""Attention over the paged KV cache: split-KV decode attention (+ LSE merge) and prefill attention.

Decode (one query token per sequence), flash-decoding in two stages:
  stage 1, one program per (sequence, KV head, split): the split's pages are read through the page table, the codes
           dequantized in registers ((code - zero) * scale, never a dequantized copy in memory), RoPE applied to K
           when the cache holds pre-RoPE keys (Atom), and an online softmax over the split gives a partial output
           and its log-sum-exp LSE = max + log(sum). All query heads of the KV head (GQA: 3 for SmolLM2, 4 for
           Mistral) share the program, so each K/V byte is read once.
  stage 2, one program per (sequence, query head): merge the splits: out = sum_s exp(lse_s - LSE) out_s.
Prefill: the library's SDPA (torch.nn.functional.scaled_dot_product_attention, causal) over the sequence's K/V as
read back from the cache (what the float simulation of the same KV format computes), or over the fresh float K/V
of the chunk (Atom's choice); see atom_lab.kv_cache.

Storage layout (atom_lab.kv_cache.PagePool): a layer's K codes [S, Hkv, code_bytes] with slot S = page * page_size +
offset, (scale, zero) float16 [S, Hkv, D/G, 2]; a float cache stores [S, Hkv, D] in float16/bfloat16.
KIVI keys (key_tokens = Tg): K's pairs are float16 [S / Tg, Hkv, D, 2], one per channel per group of Tg slots.
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
from .kv_cache import dequantize_kv_channel_ref, dequantize_kv_ref


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


def gather_kv_ref(codes: torch.Tensor, sz: torch.Tensor | None, bits: int, pages: torch.Tensor, length: int,
                  page_size: int, key_tokens: int | None = None) -> torch.Tensor:
    """The first `length` tokens of one sequence as float32 [length, Hkv, D] (dequantized). pages: int [n_pages].
    key_tokens: Tg when sz holds KIVI per-channel pairs [S / Tg, Hkv, D, 2]."""
    pos = torch.arange(length, device=codes.device)
    slots = pages.long()[pos // page_size] * page_size + pos % page_size
    if bits >= 16:
        return codes[slots].float()
    if key_tokens:
        return dequantize_kv_channel_ref(codes[slots], sz[slots // key_tokens], bits)
    return dequantize_kv_ref(codes[slots], sz[slots], bits)


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
        rope: (inv_freq float32 [D/2], scaling) when K is stored before RoPE (rotated here at positions 0..len-1).
        key_tokens: Tg for KIVI keys (k_sz float16 [S / Tg, Hkv, D, 2]), None for keys per token.
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
            k = rope_ref(k, torch.arange(n, device=q.device), *rope)
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
    T, Hq, D = q.shape
    N, Hkv = k.shape[0], k.shape[1]
    if mask is None:
        i = torch.arange(T, device=q.device)[:, None] + (N - T)
        mask = torch.arange(N, device=q.device)[None, :] <= i  # [T, N]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=sm_scale, enable_gqa=Hq != Hkv)
    return out[0].transpose(0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Triton: split-KV decode + merge
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_half(codes_ptr, sz_ptr, slot, h, Hkv, HALF: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
               BITS: tl.constexpr, mask, TG: tl.constexpr = 0):
    """Rows `slot` [N] of head h -> (channels [0, D/2), channels [D/2, D)) as float32 [N, D/2] each, dequantized.
    TG > 0: KIVI keys, the (scale, zero) of channel c of slot s at sz[s // TG, h, c]."""
    d = tl.arange(0, HALF)[None, :]
    row = slot[:, None] * Hkv + h
    m = mask[:, None]
    if BITS == 16:
        lo = tl.load(codes_ptr + row * D + d, mask=m, other=0.0).to(tl.float32)
        hi = tl.load(codes_ptr + row * D + HALF + d, mask=m, other=0.0).to(tl.float32)
    else:
        NG: tl.constexpr = D // G
        if BITS == 4:
            b = tl.load(codes_ptr + row * HALF + d, mask=m, other=0)
            clo = (b & 0xF).to(tl.float32)
            chi = (b >> 4).to(tl.float32)
        else:
            clo = tl.load(codes_ptr + row * D + d, mask=m, other=0).to(tl.float32)
            chi = tl.load(codes_ptr + row * D + HALF + d, mask=m, other=0).to(tl.float32)
        base = sz_ptr + row * (NG * 2)
        if TG > 0:
            base = sz_ptr + ((slot[:, None] // TG) * Hkv + h) * (D * 2)
            lo = (clo - tl.load(base + d * 2 + 1, mask=m, other=0.0).to(tl.float32)) * \
                tl.load(base + d * 2, mask=m, other=0.0).to(tl.float32)
            hi = (chi - tl.load(base + (d + HALF) * 2 + 1, mask=m, other=0.0).to(tl.float32)) * \
                tl.load(base + (d + HALF) * 2, mask=m, other=0.0).to(tl.float32)
        elif NG == 1:  # one (scale, zero) per token per head: broadcast, no per-channel loads
            s = tl.load(base, mask=m, other=0.0).to(tl.float32)
            z = tl.load(base + 1, mask=m, other=0.0).to(tl.float32)
            lo = (clo - z) * s
            hi = (chi - z) * s
        else:
            glo = (d // G) * 2
            ghi = ((d + HALF) // G) * 2
            lo = (clo - tl.load(base + glo + 1, mask=m, other=0.0).to(tl.float32)) * \
                tl.load(base + glo, mask=m, other=0.0).to(tl.float32)
            hi = (chi - tl.load(base + ghi + 1, mask=m, other=0.0).to(tl.float32)) * \
                tl.load(base + ghi, mask=m, other=0.0).to(tl.float32)
    return lo, hi


@triton.jit
def _load_codes(codes_ptr, sz_ptr, slot, h, Hkv, HALF: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, mask):
    """Rows `slot` [N] of head h, one (scale, zero) per row -> (codes of channels [0, D/2) and [D/2, D) as float16
    [N, D/2] each, exact integers; scale [N] and zero [N] as float32)."""
    d = tl.arange(0, HALF)[None, :]
    row = slot[:, None] * Hkv + h
    m = mask[:, None]
    if BITS == 4:
        b = tl.load(codes_ptr + row * HALF + d, mask=m, other=0)
        clo = (b & 0xF).to(tl.float16)
        chi = (b >> 4).to(tl.float16)
    else:
        clo = tl.load(codes_ptr + row * D + d, mask=m, other=0).to(tl.float16)
        chi = tl.load(codes_ptr + row * D + HALF + d, mask=m, other=0).to(tl.float16)
    s = tl.load(sz_ptr + slot * (Hkv * 2) + h * 2, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(sz_ptr + slot * (Hkv * 2) + h * 2 + 1, mask=mask, other=0.0).to(tl.float32)
    return clo, chi, s, z


@triton.jit
def _decode_split_kernel(q_ptr, kc_ptr, ksz_ptr, vc_ptr, vsz_ptr, pt_ptr, start_ptr, len_ptr, inv_freq_ptr, o_ptr,
                         lse_ptr, Hq, Hkv, max_pages, tokens_per_split, sm_scale, rope_scaling, split0,
                         D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, PAGE: tl.constexpr,
                         QPK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr,
                         NSPLIT: tl.constexpr, KEY_TG: tl.constexpr, RING: tl.constexpr, HAS_START: tl.constexpr):
    # Program (b, h, sp): query heads h*QPK .. h*QPK+QPK-1 of sequence b over tokens [t0, t0 + TPS) of its range
    # [start_b, n_b); writes split split0 + sp of the (o, lse) buffers. RING: slot = pt[b, 0] * PAGE + t % PAGE
    # (a float window, PAGE = its capacity) instead of a page-table lookup.
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
    q_lo = (tl.load(qrow + d[None, :], mask=qmask[:, None], other=0.0).to(tl.float32) * sm_scale).to(tl.float16)
    q_hi = (tl.load(qrow + HALF + d[None, :], mask=qmask[:, None], other=0.0).to(tl.float32) * sm_scale).to(
        tl.float16)
    m_i = tl.full([BLOCK_Q], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc_lo = tl.zeros([BLOCK_Q, HALF], tl.float32)
    acc_hi = tl.zeros([BLOCK_Q, HALF], tl.float32)
    if ROPE:
        inv_freq = tl.load(inv_freq_ptr + d)
    if BITS < 16 and D // G == 1 and not ROPE and KEY_TG == 0:
        # One (scale, zero) per token per head, keys after RoPE: no per-element dequantization at all. Scores
        # s_t * (q . c_t - z_t * sum(q)) from the raw codes, and the value scale folded into the probabilities:
        # sum_t p_t s_t (c_t - z_t) = (p * s) . C - sum_t p_t s_t z_t (vLLM's int4_per_token_head does the same).
        q_sum = tl.sum(q_lo.to(tl.float32), axis=1) + tl.sum(q_hi.to(tl.float32), axis=1)
        for start in range(t0, t_end, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            tmask = t < t_end
            page = tl.load(pt_ptr + b * max_pages + t // PAGE, mask=tmask, other=0)
            slot = page.to(tl.int64) * PAGE + t % PAGE
            c_lo, c_hi, ks, kz = _load_codes(kc_ptr, ksz_ptr, slot, h, Hkv, HALF, D, BITS, tmask)
            qc = tl.dot(q_lo, tl.trans(c_lo)) + tl.dot(q_hi, tl.trans(c_hi))
            sc = ks[None, :] * (qc - kz[None, :] * q_sum[:, None])
            sc = tl.where(tmask[None, :], sc, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_lo, v_hi, vs, vz = _load_codes(vc_ptr, vsz_ptr, slot, h, Hkv, HALF, D, BITS, tmask)
            ps16 = (p * vs[None, :]).to(tl.float16)
            pz = tl.sum(ps16.to(tl.float32) * vz[None, :], axis=1)  # the same rounded p * s as the dot
            acc_lo = acc_lo * alpha[:, None] + tl.dot(ps16, v_lo) - pz[:, None]
            acc_hi = acc_hi * alpha[:, None] + tl.dot(ps16, v_hi) - pz[:, None]
            m_i = m_new
    else:
        for start in range(t0, t_end, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            tmask = t < t_end
            if RING:
                slot = tl.load(pt_ptr + b * max_pages).to(tl.int64) * PAGE + t % PAGE
            else:
                page = tl.load(pt_ptr + b * max_pages + t // PAGE, mask=tmask, other=0)  # page table, per token
                slot = page.to(tl.int64) * PAGE + t % PAGE
            k_lo, k_hi = _load_half(kc_ptr, ksz_ptr, slot, h, Hkv, HALF, D, G, BITS, tmask, KEY_TG)
            if ROPE:  # K stored before RoPE (Atom): rotate the dequantized halves at their positions
                f = t.to(tl.float32)[:, None] * inv_freq[None, :]
                c = tl.cos(f) * rope_scaling
                s = tl.sin(f) * rope_scaling
                k_lo, k_hi = k_lo * c - k_hi * s, k_hi * c + k_lo * s
            sc = tl.dot(q_lo, tl.trans(k_lo.to(tl.float16))) + tl.dot(q_hi, tl.trans(k_hi.to(tl.float16)))
            sc = tl.where(tmask[None, :], sc, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_lo, v_hi = _load_half(vc_ptr, vsz_ptr, slot, h, Hkv, HALF, D, G, BITS, tmask)
            p16 = p.to(tl.float16)
            acc_lo = acc_lo * alpha[:, None] + tl.dot(p16, v_lo.to(tl.float16))
            acc_hi = acc_hi * alpha[:, None] + tl.dot(p16, v_hi.to(tl.float16))
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


def paged_decode_attention(q, k_codes, k_sz, v_codes, v_sz, page_table, lengths, bits: int, page_size: int,
                           sm_scale: float, rope: tuple | None = None, num_splits: int | None = None,
                           max_length: int | None = None, block_n: int | None = None,
                           num_warps: int = 4, key_tokens: int | None = None,
                           window: tuple | None = None) -> torch.Tensor:
    """Triton split-KV decode attention; same arguments and result as paged_decode_attention_ref (float32 out).

    num_splits: KV splits per sequence (default: enough programs to fill the GPU; 1-2 on the CPU interpreter).
    max_length: an upper bound of `lengths` (default: the page table's capacity); no device read-back, so the
        call can be captured in a CUDA graph. block_n: tokens per loop step (default 64, 32 at head_dim 256; 128
        when interpreting).
    key_tokens, window: KIVI keys and the float window (see paged_decode_attention_ref): the codes [0, n_q) and
        the ring [n_q, n) are two launches of the same kernel writing disjoint splits of one LSE merge.
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
    if key_tokens and (bits >= 16 or k_sz.shape[2] != D):
        raise ValueError(f"key_tokens={key_tokens} needs a quantized cache whose key pairs are per channel "
                         f"[S / Tg, Hkv, {D}, 2]; got bits={bits}, k_sz {None if k_sz is None else tuple(k_sz.shape)}.")
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
    G = D if bits >= 16 else D // v_sz.shape[2]
    max_pages = page_table.shape[1]
    max_length = max_pages * page_size if max_length is None else max_length
    # tokens per loop step: few, large steps for the interpreter; on a GPU 64, or 32 at head_dim 256, where the
    # dequantized [64, 128] halves of K and V and KIVI's per-channel pairs overflow the shared memory (H200: 272 KB)
    block_n = block_n or (128 if interpreting() else 32 if D >= 256 else 64)
    blocks = max(1, -(-max_length // block_n))
    if num_splits is None:  # aim at ~4 programs per SM of the H200 over the B * Hkv (sequence, head) pairs
        num_splits = min(2, blocks) if interpreting() else max(1, min(blocks, -(-528 // (B * Hkv))))
    tokens_per_split = -(-blocks // num_splits) * block_n
    num_splits = -(-max_length // tokens_per_split)
    qpk = Hq // Hkv
    win_splits, win_tps = 0, 0
    if window is not None:
        win_tps = -(-cap // block_n) * block_n
        win_splits = 1
    total = num_splits + win_splits
    o = torch.empty(B, Hq, total, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, total, dtype=torch.float32, device=q.device)
    inv_freq, scaling = rope if rope is not None else (q, 1.0)
    q = q.contiguous()
    common = dict(D=D, QPK=qpk, BLOCK_Q=max(16, triton.next_power_of_2(qpk)), BLOCK_N=block_n,
                  ROPE=rope is not None, NSPLIT=total, num_warps=num_warps)
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_codes, k_sz if k_sz is not None else k_codes, v_codes, v_sz if v_sz is not None else v_codes,
        page_table, lengths, lengths if window is None else quant_len, inv_freq, o, lse, Hq, Hkv, max_pages,
        tokens_per_split, float(sm_scale), float(scaling), 0, G=G, BITS=bits, PAGE=page_size,
        KEY_TG=key_tokens or 0, RING=False, HAS_START=False, **common)
    if window is not None:  # the float ring: tokens [n_q, n) of each sequence
        _decode_split_kernel[(B, Hkv, 1)](
            q, k_win, k_win, v_win, v_win, win_ids[:, None], quant_len, lengths, inv_freq, o, lse, Hq, Hkv, 1,
            win_tps, float(sm_scale), float(scaling), num_splits, G=D, BITS=16, PAGE=cap, KEY_TG=0, RING=True,
            HAS_START=True, **common)
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
    _merge_kernel[(B * Hq,)](o, lse, out, D=D, NSPLIT=total, BLOCK_S=triton.next_power_of_2(total))
    return out
