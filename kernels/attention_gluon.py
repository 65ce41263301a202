"""Split-KV decode attention on the INT4 per-token-head cache with tensor cores fed straight from registers (Gluon).

Why (benchmarks/NOTES.md, KV section, v7-v8): the CUDA-core kernel (_decode_core_kernel) is instruction-bound, and
Triton's tl.dot moves every code tile through shared memory into the mma operand layouts. Here the bytes a thread
loads from global memory already sit where `mma.sync.m16n8k16` wants them: the codes become float16 in place
(0x6400 | c is the float16 1024 + c) and a chain of join / reshape / permute only RENAMES registers (each one is
checked at compile time with convert_layout(..., assert_trivial=True)). One warp per program, 16 tokens a step:
  scores  S[16, 16 tok] = Q[16, D] . Kc^T[D, 16 tok]   (B operand = the K codes; the 16 rows of Q are copies of the
          one query: the mma has 16 rows, MHA needs one), then s_t * (S - z_t * sum(q))
  output  O^T[D, 8] += Vc^T[D, 16 tok] . P[16 tok, 8]  (A operand = the V codes, B = p_t * s_t in float16: its
          register layout is the scores' own), minus sum_t p_t s_t z_t, over sum_t p_t at the end.
Channel orders: a thread's 16 bytes of a K row (channels j and j + D/2 of byte j) are the mma's K index in an order
of our choosing, so q is loaded in that order (_k_channel); the V codes come out as output channels in another
order, undone at the store (_v_channel). Same storage, partial outputs and LSE contract as _decode_core_kernel:
kernels/attention.py merges the splits (variant="gluon").
Gluon does not run in the Triton interpreter: on a CPU the CUDA-core kernel is the twin (tests pin them together on
a GPU, tests/test_attention_gluon.py).
Measured (H200, same run as cuDNN bf16 SDPA, Llama-2-7B 32 x 128, batch 8-256, context 4k-32k, head-major pages
(v9)): 1.79-2.33x, the CUDA-core kernel 1.59-1.92x; the library's default for the cases it covers. With the v8
token-major pages it was 1.69-2.03x, capped by the layout (its read-only twin, READ_ONLY, read 2.4-3.1 TB/s); on
head-major pages the read-only twin reads 3.8-4.4 TB/s (cuDNN bf16 4.0-4.7), so the math is the limit again.
"""
from __future__ import annotations

import torch

try:  # triton >= 3.5 on a CUDA machine; absent or unusable elsewhere (the wrapper then refuses variant="gluon")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed triton
    HAVE_GLUON = False

# launch options (launch_gluon): grid order, the scores' mma chains, the read-only diagnostic, a register cap. The
# defaults are the fastest measured on the H200 (benchmarks/NOTES.md, KV section, v8 second run): heads-first
# +3-10%, 2 chains +5%, maxnreg 168 (12 warps per SM instead of 10) +10-25%
OPTIONS = dict(heads_first=True, k_chains=2, read_only=False, maxnreg=168)


def gluon_ok(device: torch.device) -> bool:
    """Gluon imports and `device` is a CUDA GPU with mma.sync float16 (sm_80+)."""
    return HAVE_GLUON and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def _k_channel() -> torch.Tensor:
    """int64 [128]: the cache channel behind each index k' of the scores' mma K dimension (head_dim 128). Lane
    4 g + qd loads words 4 qd .. 4 qd + 3 (32-bit, 4 bytes each) of token rows g and g + 8; byte j holds channels j
    (low nibble) and j + 64. k' = p + 2 qd + 8 s + 16 b1 + 32 w0 + 64 wq for word 4 qd + 2 wq + w0, byte 2 b1 + p
    of it and nibble s: k' bit 0 (p, the float16 pair of one 32-bit register) is a byte's neighbour, as the
    unpack writes it; qd are the lanes the mma fragment puts there; the other bits are whole registers."""
    k = torch.arange(128)
    word = 4 * (k // 2 % 4) + 2 * (k // 64) + k // 32 % 2
    return 4 * word + 2 * (k // 16 % 2) + k % 2 + 64 * (k // 8 % 2)


def _v_channel() -> torch.Tensor:
    """int64 [128]: the cache channel behind each row n' of the output tile O^T: lane 4 g + qd holds words 2g, 2g + 1
    of its tokens; n' = g + 8 (w0 + 2 byte + 8 s) for word 2g + w0, byte and nibble s."""
    n = torch.arange(128)
    return 4 * (2 * (n % 8) + n // 8 % 2) + n // 16 % 4 + 64 * (n // 64)


if HAVE_GLUON:
    # Codes -> float16 (the 0x6400 trick: 0x6400 | c is 1024 + c, one packed sub; 0x6400 | 16 c is 1024 + 16 c,
    # one packed fma by 1/16 - 64), all exact. K: two words of one token ($8, $9) -> 8 registers, each the float16
    # pair (byte 2 b, byte 2 b + 1) of nibble s of word w: output r = w + 2 b + 4 s.
    _K_PTX = gl.constexpr(
        "{\n.reg .b32 t<4>, m1024, s16, m64;\nmov.b32 m1024, 0x64006400;\nmov.b32 s16, 0x2C002C00;\n"
        "mov.b32 m64, 0xD400D400;\n" + "".join(
            f"prmt.b32 t{w + 2 * b}, ${8 + w}, 0, 0x4{2 * b + 1}4{2 * b};\n"
            f"lop3.b32 ${w + 2 * b}, t{w + 2 * b}, 0x000F000F, 0x64006400, 0xEA;\n"
            f"sub.f16x2 ${w + 2 * b}, ${w + 2 * b}, m1024;\n"
            f"lop3.b32 ${w + 2 * b + 4}, t{w + 2 * b}, 0x00F000F0, 0x64006400, 0xEA;\n"
            f"fma.rn.f16x2 ${w + 2 * b + 4}, ${w + 2 * b + 4}, s16, m64;\n" for w in range(2) for b in range(2))
        + "}")
    # V: words w of an even token ($16 + w) and of the next token ($18 + w) -> 16 registers, each the float16 pair
    # (even, odd token) of one channel (byte b of word w, nibble s): output r = w + 2 b + 8 s. A prmt puts the two
    # tokens' byte b in the two halves: the pair runs along the mma's K (= tokens).
    _V_PTX = gl.constexpr(
        "{\n.reg .b32 t<8>, m1024, s16, m64;\nmov.b32 m1024, 0x64006400;\nmov.b32 s16, 0x2C002C00;\n"
        "mov.b32 m64, 0xD400D400;\n" + "".join(
            f"prmt.b32 t{w + 2 * b}, ${16 + w}, ${18 + w}, 0x{4 + b}{4 + b}{b}{b};\n"
            f"lop3.b32 ${w + 2 * b}, t{w + 2 * b}, 0x000F000F, 0x64006400, 0xEA;\n"
            f"sub.f16x2 ${w + 2 * b}, ${w + 2 * b}, m1024;\n"
            f"lop3.b32 ${w + 2 * b + 8}, t{w + 2 * b}, 0x00F000F0, 0x64006400, 0xEA;\n"
            f"fma.rn.f16x2 ${w + 2 * b + 8}, ${w + 2 * b + 8}, s16, m64;\n" for w in range(2) for b in range(4))
        + "}")

    @gluon.jit
    def _page_row(page, off, h, H, ROWS: gl.constexpr):
        """kernels/kv_cache.py page_row for Gluon (a Gluon kernel calls Gluon functions only): the int64 row of
        (page, offset, head) in a head-major page tensor [P, H, ROWS, ...]."""
        return (page.to(gl.int64) * H + h) * ROWS + off

    @gluon.jit
    def _load_tile(kc_ptr, ksz_ptr, vc_ptr, vsz_ptr, pt_ptr, b, h, Hkv, max_pages, start, t_end, offs_k, offs_v,
                   tok_k, tok_v, tok_s, PAGE: gl.constexpr):
        """Code words and (scale, zero) pairs (one int32 each) of tokens [start, start + 16) of head h, masked past
        t_end (nothing is read when the whole tile is past it). The codes of masked tokens are left undefined (no
        zeroing moves): any 4-bit pattern unpacks to a finite 0..15 and their probabilities are exactly 0. The
        tile lies in one page (PAGE % 16 == 0): one page-table read, and (head-major pages) its 16 rows of head h
        are consecutive: 1 KB of K codes, 1 KB of V codes, 64 B of each pairs."""
        page = gl.load(pt_ptr + b * max_pages + start // PAGE, mask=start < t_end, other=0)
        row0 = _page_row(page, start % PAGE, h, Hkv, PAGE)  # the row of token `start`; + i for token start + i
        kw = gl.load(kc_ptr + row0 * 16 + offs_k, mask=(start + tok_k) < t_end)
        ve = gl.load(vc_ptr + row0 * 16 + offs_v, mask=(start + tok_v) < t_end)
        vo = gl.load(vc_ptr + (row0 + 1) * 16 + offs_v, mask=(start + tok_v + 1) < t_end)
        smask = (start + tok_s) < t_end
        kp = gl.load(ksz_ptr + row0 + tok_s, mask=smask, other=0)
        vp = gl.load(vsz_ptr + row0 + tok_s, mask=smask, other=0)
        return kw, ve, vo, kp, vp

    @gluon.jit
    def _halves(pair):
        """int32 (scale | zero << 16) -> (scale, zero) as float32."""
        s = (pair & 0xFFFF).to(gl.uint16).to(gl.float16, bitcast=True).to(gl.float32)
        z = (pair >> 16).to(gl.uint16).to(gl.float16, bitcast=True).to(gl.float32)
        return s, z

    @gluon.jit
    def _decode_gluon_kernel(q_ptr, kc_ptr, ksz_ptr, vc_ptr, vsz_ptr, pt_ptr, len_ptr, o_ptr, lse_ptr, Hq, Hkv,
                             max_pages, tokens_per_split, sm_scale, PAGE: gl.constexpr, NSPLIT: gl.constexpr,
                             VL: gl.constexpr, AHEAD: gl.constexpr, HEADS_FIRST: gl.constexpr,
                             KCHAINS: gl.constexpr, READ_ONLY: gl.constexpr):
        # Program (b, h, sp), one warp: query head h of sequence b over tokens [t0, t0 + tokens_per_split).
        # head_dim 128; kc, vc are the codes seen as int32 words [P, Hkv, PAGE, 16] (4 bytes = 8 codes each).
        # HEADS_FIRST: grid (H, B, splits), so the programs of neighbouring heads (whose pages of a sequence are
        # neighbouring blocks in memory) run at the same time; else (B, H, splits).
        # KCHAINS 2: the scores' 8 dependent mma steps as 2 chains of 4 (k' < 64 and >= 64), summed. READ_ONLY: a
        # diagnostic, the same loads and no math (the access pattern's own speed; the outputs are meaningless).
        if HEADS_FIRST:
            h = gl.program_id(0)
            b = gl.program_id(1)
        else:
            b = gl.program_id(0)
            h = gl.program_id(1)
        sp = gl.program_id(2)
        D: gl.constexpr = 128
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
        A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
        # K words [16 tok, 16]: lane 4 g + qd holds words 4 qd .. 4 qd + 3 (one 16-byte load) of rows g and g + 8,
        # the B-operand fragment of tokens n = g, g + 8 once unpacked
        KL: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [1, 1], [1, 0])
        QL: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, 1], [1, 0])
        SL_TOK: gl.constexpr = gl.SliceLayout(0, MMA)  # a [16] vector along the scores' tokens
        SL_ROW: gl.constexpr = gl.SliceLayout(1, MMA)

        n = gl.load(len_ptr + b)
        t0 = sp * tokens_per_split
        t_end = gl.minimum(t0 + tokens_per_split, n)
        # q in the scores' K order (_k_channel), scaled by sm_scale * log2(e) (exp2 below), rounded to float16
        k = gl.arange(0, D, layout=gl.SliceLayout(0, QL))
        ch = 4 * (4 * (k // 2 % 4) + 2 * (k // 64) + k // 32 % 2) + 2 * (k // 16 % 2) + k % 2 + 64 * (k // 8 % 2)
        q16 = (gl.load(q_ptr + (b * Hq + h) * D + ch).to(gl.float32) * (sm_scale * 1.4426950408889634)).to(
            gl.float16)
        q_sum = gl.sum(q16.to(gl.float32), axis=0)
        q2 = gl.expand_dims(q16, 0) + gl.zeros([16, D], gl.float16, QL)  # 16 copies: the mma's rows
        if KCHAINS == 2:
            q3 = gl.reshape(q2, [16, 2, 64])
            q_lo, q_hi = gl.split(gl.permute(q3, (0, 2, 1)))
            q_op = gl.convert_layout(q_lo, A_OP)
            q_op2 = gl.convert_layout(q_hi, A_OP)
        else:
            q_op = gl.convert_layout(q2, A_OP)

        i_k = gl.arange(0, 16, layout=gl.SliceLayout(1, KL))
        offs_k = gl.expand_dims(i_k * 16, 1) + gl.expand_dims(gl.arange(0, 16, gl.SliceLayout(0, KL)), 0)
        tok_k = gl.expand_dims(i_k, 1)
        u = gl.arange(0, 8, layout=gl.SliceLayout(1, VL))
        offs_v = gl.expand_dims(u * 2 * 16, 1) + gl.expand_dims(gl.arange(0, 16, gl.SliceLayout(0, VL)), 0)
        tok_v = gl.expand_dims(u * 2, 1)
        tok_s = gl.arange(0, 16, layout=SL_TOK)

        m_i = gl.max(gl.full([16], -float("inf"), gl.float32, SL_ROW), axis=0)
        l_acc = gl.zeros([16, 16], gl.float32, MMA)
        pz_acc = gl.zeros([16, 16], gl.float32, MMA)
        acc = gl.zeros([D, 8], gl.float32, MMA)
        if READ_ONLY:
            chk_k = gl.zeros([16, 16], gl.int32, KL)
            chk_v = gl.zeros([8, 16], gl.int32, VL)
            chk_s = gl.zeros([16], gl.int32, SL_TOK)
        cur = _load_tile(kc_ptr, ksz_ptr, vc_ptr, vsz_ptr, pt_ptr, b, h, Hkv, max_pages, t0, t_end, offs_k, offs_v,
                         tok_k, tok_v, tok_s, PAGE)
        if AHEAD == 2:
            nxt = _load_tile(kc_ptr, ksz_ptr, vc_ptr, vsz_ptr, pt_ptr, b, h, Hkv, max_pages, t0 + 16, t_end, offs_k,
                             offs_v, tok_k, tok_v, tok_s, PAGE)
        for start in range(t0, t_end, 16):
            # the loads of the tile AHEAD steps on go out before this tile's math: AHEAD tiles in flight per warp
            # (registers: ~24 per tile), the only latency hiding besides the other warps on the SM
            fut = _load_tile(kc_ptr, ksz_ptr, vc_ptr, vsz_ptr, pt_ptr, b, h, Hkv, max_pages, start + 16 * AHEAD,
                             t_end, offs_k, offs_v, tok_k, tok_v, tok_s, PAGE)
            kw, ve, vo, kp, vp = cur
            if READ_ONLY:
                chk_k = chk_k ^ kw
                chk_v = chk_v ^ ve ^ vo
                chk_s = chk_s ^ kp ^ vp
            else:
                ks, kz = _halves(kp)
                vs, vz = _halves(vp)
                # K codes -> the B operand [128 (k'), 16 tok]; the reshapes and the permute only rename registers
                # (assert_trivial checks it at compile time)
                r = gl.inline_asm_elementwise(_K_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [kw], dtype=(gl.float16,) * 8,
                                              is_pure=True, pack=2)
                x = gl.join(gl.join(gl.join(r[0], r[1]), gl.join(r[2], r[3])),
                            gl.join(gl.join(r[4], r[5]), gl.join(r[6], r[7])))  # [16, 16 words, w0, b1, s]
                x = gl.reshape(x, [16, 4, 2, 2, 2, 2, 2])  # (tok, qd, wq, p, w0, b1, s)
                # k' = p + 2qd + 8s + 16b1 + 32w0 + 64wq
                x = gl.reshape(gl.permute(x, (2, 4, 5, 6, 1, 3, 0)), [D, 16])
                if KCHAINS == 2:
                    x_lo, x_hi = gl.split(gl.permute(gl.reshape(x, [2, 64, 16]), (1, 2, 0)))
                    s_raw = mma_v2(q_op, gl.convert_layout(x_lo, B_OP, assert_trivial=True),
                                   gl.zeros([16, 16], gl.float32, MMA)) + \
                        mma_v2(q_op2, gl.convert_layout(x_hi, B_OP, assert_trivial=True),
                               gl.zeros([16, 16], gl.float32, MMA))
                else:
                    k_op = gl.convert_layout(x, B_OP, assert_trivial=True)
                    s_raw = mma_v2(q_op, k_op, gl.zeros([16, 16], gl.float32, MMA))
                sc = gl.expand_dims(ks, 0) * (s_raw - gl.expand_dims(kz, 0) * q_sum)
                sc = gl.where(gl.expand_dims(start + tok_s < t_end, 0), sc, -float("inf"))
                m_tile = gl.max(gl.max(sc, axis=1), axis=0)  # the 16 rows are equal: their max is the row's max
                if m_tile > m_i:  # rescale only when the running max grows (a uniform branch: one query per warp)
                    alpha = gl.exp2(m_i - m_tile)
                    acc = acc * alpha
                    l_acc = l_acc * alpha
                    pz_acc = pz_acc * alpha
                    m_i = m_tile
                p = gl.exp2(sc - m_i)
                l_acc = l_acc + p
                ps = (p * gl.expand_dims(vs, 0)).to(gl.float16)
                pz_acc = pz_acc + ps.to(gl.float32) * gl.expand_dims(vz, 0)
                # P -> the B operand [16 tok, 8]: the scores' registers transposed, the first 8 rows kept
                pt = gl.permute(gl.reshape(gl.permute(ps, (1, 0)), [16, 2, 8]), (0, 2, 1))
                p_op = gl.convert_layout(gl.split(pt)[0], B_OP, assert_trivial=True)
                # V codes -> the A operand [128 (n'), 16 tok]: 16 outputs, each float16 pair = (token 2u, 2u + 1)
                v = gl.inline_asm_elementwise(_V_PTX, "=r," * 16 + "r,r,r,r", [ve, vo], dtype=(gl.float16,) * 16,
                                              is_pure=True, pack=2)
                y = gl.join(gl.join(gl.join(gl.join(v[0], v[1]), gl.join(v[2], v[3])),  # [8, 16, w0, b0, b1, s]
                                    gl.join(gl.join(v[4], v[5]), gl.join(v[6], v[7]))),
                            gl.join(gl.join(gl.join(v[8], v[9]), gl.join(v[10], v[11])),
                                    gl.join(gl.join(v[12], v[13]), gl.join(v[14], v[15]))))
                y = gl.reshape(y, [2, 4, 8, 2, 2, 2, 2, 2])  # (rr, qd, g, p, w0, b0, b1, s): token 8rr + 2qd + p
                y = gl.reshape(gl.permute(y, (7, 6, 5, 4, 2, 0, 1, 3)), [D, 16])  # n' = g + 8 (w0 + 2 b + 8 s)
                v_op = gl.convert_layout(y, A_OP, assert_trivial=True)
                acc = mma_v2(v_op, p_op, acc)
            if AHEAD == 2:
                cur = nxt
                nxt = fut
            else:
                cur = fut
        l = gl.max(gl.sum(l_acc, axis=1), axis=0)
        pz = gl.max(gl.sum(pz_acc, axis=1), axis=0)
        l_safe = gl.where(l > 0, l, 1.0)
        nr = gl.arange(0, D, layout=gl.SliceLayout(1, MMA))
        ch_o = 4 * (2 * (nr % 8) + nr // 8 % 2) + nr // 16 % 4 + 64 * (nr // 64)  # _v_channel
        col = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
        optr = o_ptr + ((b * Hq + h) * NSPLIT + sp) * D + gl.expand_dims(ch_o, 1) + gl.expand_dims(col * 0, 0)
        first = (gl.expand_dims(col, 0) + gl.expand_dims(nr * 0, 1)) == 0  # column 0: the 8 columns are equal
        gl.store(optr, (acc - pz) / l_safe, mask=first)
        lse = gl.where(t0 < n, (m_i + gl.log2(l_safe)) * 0.6931471805599453, -float("inf"))
        if READ_ONLY:  # keep the loads alive
            lse = (gl.xor_sum(gl.xor_sum(chk_k, axis=1), axis=0) ^ gl.xor_sum(gl.xor_sum(chk_v, axis=1), axis=0) ^
                   gl.xor_sum(chk_s, axis=0)).to(gl.float32)
        gl.store(lse_ptr + (b * Hq + h) * NSPLIT + sp, lse)


def v_layout():
    """The V words' layout [8, 16] (even or odd tokens of a tile, row u = token 2u or 2u + 1): lane 4 g + qd holds
    words 2g, 2g + 1 (one 8-byte load) of rows qd and qd + 4, i.e. tokens 2qd and 2qd + 8: the A operand's K pairs."""
    return gl.DistributedLinearLayout(reg_bases=[[0, 1], [4, 0]], lane_bases=[[1, 0], [2, 0], [0, 2], [0, 4], [0, 8]],
                                      warp_bases=[], block_bases=[], shape=[8, 16])


def launch_gluon(q, k_codes, k_sz, v_codes, v_sz, page_table, lengths, o, lse, sm_scale: float, page_size: int,
                 num_splits: int, tokens_per_split: int, ahead: int = 1, **options) -> None:
    """Stage 1 of decode attention (kernels/attention.py merges): writes o float32 [B, Hq, NSPLIT, D] and lse
    float32 [B, Hq, NSPLIT] for splits 0..num_splits-1 of tokens_per_split tokens (a multiple of 16).
    q: [B, H, D] (one query head per KV head); k_codes, v_codes uint8 [P, H, page_size, D/2]; k_sz, v_sz float16
    [P, H, page_size, 1, 2] (head-major pages, PagePool's layout);
    page_table int32 [B, max_pages] (page_size % 16 == 0); lengths int32 [B]. ahead: tiles of 16 tokens in flight
    per warp (1 or 2). options: heads_first, k_chains, read_only (the kernel's comment) and maxnreg (a register
    cap: 168 fits 12 warps per SM, 194 without; no spills at AHEAD=1), default OPTIONS."""
    for name, t in (("k_codes", k_codes), ("k_sz", k_sz), ("v_codes", v_codes), ("v_sz", v_sz)):
        if not t.is_contiguous():
            raise ValueError(f"variant='gluon' reads {name} as 32-bit words: pass it contiguous (a PagePool layer).")
    B, H, D = q.shape
    opt = {**OPTIONS, **options}
    _decode_gluon_kernel[(H, B, num_splits) if opt["heads_first"] else (B, H, num_splits)](
        q, k_codes.view(torch.int32), k_sz.view(torch.int32), v_codes.view(torch.int32), v_sz.view(torch.int32),
        page_table, lengths, o, lse, H, H, page_table.shape[1], tokens_per_split, float(sm_scale), PAGE=page_size,
        NSPLIT=o.shape[2], VL=v_layout(), AHEAD=ahead, HEADS_FIRST=bool(opt["heads_first"]),
        KCHAINS=int(opt["k_chains"]), READ_ONLY=bool(opt["read_only"]), num_warps=1,
        **({"maxnreg": opt["maxnreg"]} if opt["maxnreg"] else {}))
