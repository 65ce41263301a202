"""Split-KV decode attention (kernels/attention.py) against its PyTorch reference, on random shapes and ragged
lengths, for float, INT8 and INT4 caches (per head and sub-head groups), with K before or after RoPE.

Tolerance, derived: the kernel feeds the tensor cores float16 operands (q * sm_scale, dequantized K, the
probabilities p, dequantized V; float32 accumulation), the reference computes in float32. Rounding q and k to
float16 (relative 2^-11 each) moves a score by at most 2^-10 * sum_d |q_d k_d| <= 2^-10 * |q| |k| * sm_scale =: e_s
(Cauchy-Schwarz; RoPE keeps norms). A softmax weight then moves by a factor within exp(+-2 e_s), and rounding p and
v adds 2^-10 relative, so |out - ref| <= (exp(2 e_s) - 1 + 2^-10) * max|v| (+ float32 summation noise, 600 terms x
2^-24, negligible). The test computes that bound from the data and asserts it.
"""
import atom_lab  # noqa: F401

import pytest
import torch
import triton
import triton.language as tl

from atom_lab.kernels.attention import (_nibbles_f16, merge_splits_ref, paged_decode_attention,
                                        paged_decode_attention_ref, prefill_attention, rope_ref, rope_table,
                                        sdpa_rows)
from atom_lab.kernels.kv_cache import dequantize_kv_ref, kv_write_ref

DEV = atom_lab.default_device()


def make_cache(B, Hkv, D, bits, group, page, lengths, gen):
    """A random cache with `lengths` tokens per sequence in pages handed out in a shuffled order."""
    pages_per = [-(-n // page) for n in lengths]
    n_pages = sum(pages_per) + 3
    perm = torch.randperm(n_pages, generator=gen).tolist()
    pt = torch.zeros(B, max(pages_per), dtype=torch.int32)
    it = iter(perm)
    for b, n in enumerate(pages_per):
        for j in range(n):
            pt[b, j] = next(it)
    S = n_pages * page
    if bits == 16:  # PagePool's head-major pages [pages, Hkv, page, ...]
        kc = torch.randn(n_pages, Hkv, page, D, generator=gen).to(DEV)
        vc = torch.randn(n_pages, Hkv, page, D, generator=gen).to(DEV)
        return kc, None, vc, None, pt.to(DEV)
    cb = D // 2 if bits == 4 else D
    kc = torch.zeros(n_pages, Hkv, page, cb, dtype=torch.uint8, device=DEV)
    vc = torch.zeros_like(kc)
    ksz = torch.zeros(n_pages, Hkv, page, D // group, 2, dtype=torch.float16, device=DEV)
    vsz = torch.zeros_like(ksz)
    slots = torch.arange(S, device=DEV)
    kv_write_ref(torch.randn(S, Hkv, D, generator=gen).to(DEV), slots, kc, ksz, bits, group)
    kv_write_ref(torch.randn(S, Hkv, D, generator=gen).to(DEV), slots, vc, vsz, bits, group)
    return kc, ksz, vc, vsz, pt.to(DEV)


def fp16_bound(q, kc, ksz, vc, vsz, bits, sm_scale):
    """The bound of the module docstring."""
    k = kc.float() if bits == 16 else dequantize_kv_ref(kc, ksz, bits)
    v = vc.float() if bits == 16 else dequantize_kv_ref(vc, vsz, bits)
    e_s = 2.0 ** -10 * q.float().norm(dim=-1).max() * k.norm(dim=-1).max() * sm_scale
    return float((torch.exp(2 * e_s) - 1 + 2.0 ** -10) * v.abs().max())


CASES = [  # (B, Hq, Hkv, D, bits, group, page, rope): head_dim 64/128/256, GQA 1/3/4/8, pages 16/32/64
    (3, 9, 3, 64, 4, 64, 16, "pre"),
    (5, 8, 2, 128, 4, 32, 32, "post"),
    (2, 8, 1, 64, 8, 16, 64, "pre"),
    (33, 2, 2, 64, 4, 64, 16, "post"),
    (1, 4, 1, 256, 4, 256, 32, "post"),
    (4, 6, 2, 64, 16, 64, 32, "pre"),
]


@pytest.mark.parametrize("B,Hq,Hkv,D,bits,group,page,rope", CASES)
def test_decode_matches_ref(B, Hq, Hkv, D, bits, group, page, rope):
    gen = torch.Generator().manual_seed(B * 1000 + D + bits)
    max_len = 600 if B <= 5 else 40
    lengths = torch.randint(1, max_len + 1, (B,), generator=gen)
    lengths[0] = max_len - 1 if max_len % page == 0 else max_len  # one long, not a multiple of the page
    kc, ksz, vc, vsz, pt = make_cache(B, Hkv, D, bits, group, page, lengths.tolist(), gen)
    q = torch.randn(B, Hq, D, generator=gen).to(DEV)
    lens = lengths.to(torch.int32).to(DEV)
    rp = (1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))).to(DEV), 1.0
    rp = rp if rope == "pre" else None
    sm = D ** -0.5
    ref = paged_decode_attention_ref(q, kc, ksz, vc, vsz, pt, lens, bits, page, sm, rp)
    out = paged_decode_attention(q, kc, ksz, vc, vsz, pt, lens, bits, page, sm, rp)
    assert (out - ref).abs().max() <= fp16_bound(q, kc, ksz, vc, vsz, bits, sm)


CORE_CASES = [  # (B, H, D, page, rope, lengths cap): one query head per KV head, INT4 per token-head
    (3, 2, 64, 16, "post", 300),
    (2, 2, 128, 32, "pre", 300),
    (9, 1, 256, 32, "post", 70),
]


@pytest.mark.parametrize("variant", ["core", "dot"])
@pytest.mark.parametrize("B,H,D,page,rope,cap", CORE_CASES)
def test_core_and_dot_kernels_match_ref(B, H, D, page, rope, cap, variant):
    """Both decode kernels on MHA (the CUDA-core one and the tensor-core one), ragged lengths, pages shuffled; the
    CUDA-core kernel computes in float32 after the exact codes, so the float16 bound holds for it a fortiori."""
    gen = torch.Generator().manual_seed(B * 100 + D)
    lengths = torch.randint(1, cap + 1, (B,), generator=gen)
    lengths[0] = cap - 1
    kc, ksz, vc, vsz, pt = make_cache(B, H, D, 4, D, page, lengths.tolist(), gen)
    q = torch.randn(B, H, D, generator=gen).to(DEV)
    lens = lengths.to(torch.int32).to(DEV)
    rp = ((1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))).to(DEV), 1.0) if rope == "pre" else None
    ref = paged_decode_attention_ref(q, kc, ksz, vc, vsz, pt, lens, 4, page, D ** -0.5, rp)
    out = paged_decode_attention(q, kc, ksz, vc, vsz, pt, lens, 4, page, D ** -0.5, rp, variant=variant,
                                 num_splits=2)
    assert (out - ref).abs().max() <= fp16_bound(q, kc, ksz, vc, vsz, 4, D ** -0.5)


def test_core_fp16_rope_table():
    """The CUDA-core kernel with the cos | sin table rounded to float16 stays inside the float16 bound, and the
    rounded table is made once per table object (a CUDA graph keeps pointing at it)."""
    from atom_lab.kernels.attention import _fp16_table
    gen = torch.Generator().manual_seed(11)
    lengths = [150, 7]
    kc, ksz, vc, vsz, pt = make_cache(2, 2, 64, 4, 64, 16, lengths, gen)
    q = torch.randn(2, 2, 64, generator=gen).to(DEV)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    inv = (1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))).to(DEV)
    tab = rope_table(inv, 1.0, 160)
    ref = paged_decode_attention_ref(q, kc, ksz, vc, vsz, pt, lens, 4, 16, 0.125, (inv, 1.0))
    out = paged_decode_attention(q, kc, ksz, vc, vsz, pt, lens, 4, 16, 0.125, (inv, 1.0, tab), variant="core",
                                 rope_fp16=True)
    assert (out - ref).abs().max() <= fp16_bound(q, kc, ksz, vc, vsz, 4, 0.125)
    assert _fp16_table(tab) is _fp16_table(tab) and torch.equal(_fp16_table(tab), tab.half())


@triton.jit
def _unpack_kernel(b_ptr, lo_ptr, hi_ptr, ASM: tl.constexpr):
    i = tl.arange(0, 256)
    lo, hi = _nibbles_f16(tl.load(b_ptr + i), ASM)
    tl.store(lo_ptr + i, lo)
    tl.store(hi_ptr + i, hi)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inline PTX runs on a GPU only (not in the interpreter)")
def test_asm_unpack_is_the_triton_twin():
    """The inline-PTX INT4 unpack gives exactly the codes of the plain-Triton twin, on every byte value, and both
    decode kernels give bit-identical outputs with either unpack (same float16 values in, same arithmetic)."""
    b = torch.arange(256, dtype=torch.uint8, device=DEV)[torch.randperm(256, device=DEV)]
    res = []
    for asm in (True, False):
        lo, hi = torch.full((256,), -1.0, dtype=torch.float16, device=DEV), torch.full_like(b, 0, dtype=torch.float16)
        _unpack_kernel[(1,)](b, lo, hi, ASM=asm, num_warps=1)
        res.append((lo, hi))
    assert torch.equal(res[0][0], (b & 15).half()) and torch.equal(res[0][1], (b >> 4).half())
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    gen = torch.Generator().manual_seed(3)
    for Hq, Hkv, variant in ((4, 4, "core"), (4, 4, "dot"), (8, 2, "dot")):
        kc, ksz, vc, vsz, pt = make_cache(3, Hkv, 128, 4, 128, 32, [200, 33, 129], gen)
        q = torch.randn(3, Hq, 128, generator=gen).to(DEV)
        lens = torch.tensor([200, 33, 129], dtype=torch.int32, device=DEV)
        a, t = (paged_decode_attention(q, kc, ksz, vc, vsz, pt, lens, 4, 32, 0.1, None, variant=variant,
                                       unpack_asm=asm) for asm in (True, False))
        assert torch.equal(a, t), variant


def _one_page(Hq: int):
    """q [1, Hq, 64] over an empty INT4 cache, one 32-token page, 2 KV heads: (q, codes, pairs, table, lengths)."""
    q = torch.randn(1, Hq, 64, device=DEV)
    kc = torch.zeros(1, 2, 32, 32, dtype=torch.uint8, device=DEV)
    sz = torch.zeros(1, 2, 32, 1, 2, dtype=torch.float16, device=DEV)
    return q, kc, sz, torch.zeros(1, 1, dtype=torch.int32, device=DEV), torch.ones(1, dtype=torch.int32, device=DEV)


def test_decode_variant_errors():
    q, kc, sz, pt, ln = _one_page(4)
    with pytest.raises(ValueError, match="one query head per KV head"):  # GQA 4/2 has no CUDA-core kernel
        paged_decode_attention(q, kc, sz, kc, sz, pt, ln, 4, 32, 1.0, variant="core")
    with pytest.raises(ValueError, match="variant='fast'"):
        paged_decode_attention(q, kc, sz, kc, sz, pt, ln, 4, 32, 1.0, variant="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="unpack_asm=True needs a GPU"):
            paged_decode_attention(q, kc, sz, kc, sz, pt, ln, 4, 32, 1.0, unpack_asm=True)


def test_decode_splits_agree():
    """Any number of splits gives the same result (the LSE merge is exact up to rounding)."""
    gen = torch.Generator().manual_seed(7)
    lengths = [300, 17]
    kc, ksz, vc, vsz, pt = make_cache(2, 2, 64, 4, 64, 32, lengths, gen)
    q = torch.randn(2, 4, 64, generator=gen).to(DEV)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    outs = [paged_decode_attention(q, kc, ksz, vc, vsz, pt, lens, 4, 32, 0.125, None, num_splits=s, block_n=64)
            for s in (1, 3)]
    # p is rounded to float16 relative to each split's own running max, so the splits' p differ by that rounding
    assert (outs[0] - outs[1]).abs().max() <= fp16_bound(q, kc, ksz, vc, vsz, 4, 0.125)


def test_merge_ref_by_hand():
    # two splits with equal LSE average their outputs; an empty split (-inf) is ignored
    o = torch.tensor([[[2.0, 0.0], [0.0, 4.0], [9.0, 9.0]]])
    lse = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert merge_splits_ref(o, lse).tolist() == [[1.0, 2.0]]


def test_rope_ref_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    x = torch.randn(5, 2, 8)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    pos = torch.arange(5)
    emb = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)
    ours = rope_ref(x, pos, inv)
    hf, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None])
    torch.testing.assert_close(ours, hf[0].transpose(0, 1), atol=1e-6, rtol=0)


def test_prefill_attention_is_causal():
    q, k, v = torch.randn(3, 2, 8), torch.randn(5, 1, 8), torch.randn(5, 1, 8)
    out = prefill_attention(q, k, v, 0.5)
    # the first query (position 2) sees keys 0..2 only: changing key 4 leaves it unchanged
    k2 = k.clone()
    k2[4] += 10
    assert torch.equal(prefill_attention(q, k2, v, 0.5)[0], out[0])


def test_sdpa_rows_causal_flag_is_the_causal_mask():
    # a whole prompt (T == N): SDPA's own causal flag gives prefill_attention's masked result (float rounding)
    q, k, v = torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    # each path rounds N = 6 softmax weights and a sum of 6 weighted values: a few N u of max|v| (u = 2^-24)
    err = (sdpa_rows(q, k, v, 0.3) - prefill_attention(q, k, v, 0.3)).abs().max()
    assert err <= 4 * 6 * 2 ** -24 * v.abs().max()
    with pytest.raises(ValueError, match="pass the mask"):  # a chunk after a past needs the offset mask
        sdpa_rows(q[:3], k, v, 0.3)


def test_decode_errors():
    q, kc, sz, pt, ln = _one_page(3)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_decode_attention(q, kc, sz, kc, sz, pt, ln, 4, 32, 1.0)
    with pytest.raises(TypeError, match="int32"):
        paged_decode_attention(q[:, :2], kc, sz, kc, sz, pt.long(), ln, 4, 32, 1.0)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, device=DEV).float() / 64))
    with pytest.raises(ValueError, match="rope table"):  # 8 rows for a page table of 32 positions
        paged_decode_attention(q[:, :2], kc, sz, kc, sz, pt, ln, 4, 32, 1.0, (inv, 1.0, rope_table(inv, 1.0, 8)))


def test_rope_table_is_rope_refs_values():
    """The decode kernel's cos | sin table holds exactly the values rope_ref rotates with (bit for bit)."""
    x, pos = torch.randn(37, 2, 16), torch.arange(37)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    tab = rope_table(inv, 0.75, 40)
    c, s = tab[pos, None, :8], tab[pos, None, 8:]
    x1, x2 = x[..., :8], x[..., 8:]
    assert tab.shape == (40, 16) and torch.equal(rope_ref(x, pos, inv, 0.75),
                                                 torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))
