"""The paged KV cache: pool sizes (real allocation), page tables and their errors, quantize-and-write (kernel vs
reference, bit-exact), and a decoder run through the cache against the float simulation of the same format."""
import atom_lab  # noqa: F401

import pytest
import torch

from atom_lab.kernels.kv_cache import (dequantize_kv_ref, kv_write, kv_write_channel, kv_write_channel_ref, kv_write_ref,
                                       quantize_kv_ref, read_slots)
from atom_lab.kv_cache import KVCacheFull, KVFormat, PageError, PagePool, PageTable
from atom_lab.paged_model import PagedDecoder, simulate_kv
from atom_lab.quantizers import fake_quantize_asymmetric

DEV = atom_lab.default_device()


@pytest.mark.parametrize("bits,group,expect", [(16, None, 256), (8, None, 128 + 4), (4, None, 64 + 4),
                                               (4, 32, 64 + 16), (8, 16, 128 + 32)])
def test_bytes_per_token_is_the_allocation(bits, group, expect):
    fmt = KVFormat(bits=bits, group_size=group)
    pool = PagePool(2, 3, 128, fmt, page_size=16, budget_bytes=10_000_000, device="cpu")
    assert fmt.bytes_per_token_head(128) == expect
    assert pool.bytes_per_token == 2 * 2 * 3 * expect  # layers x (K, V) x heads x bytes
    assert pool.num_pages == 10_000_000 // pool.bytes_per_page
    assert pool.nbytes == pool.num_pages * pool.bytes_per_page <= 10_000_000


def test_page_tables_allocate_append_free():
    pool = PagePool(1, 1, 64, KVFormat(bits=4), page_size=16, num_pages=4, device="cpu")
    a, b = PageTable(pool), PageTable(pool)
    a.reserve(17)
    assert len(a.pages) == 2 and pool.free_pages == 2
    a.length = 17
    a.reserve(15)  # fits in the second page
    assert len(a.pages) == 2
    b.reserve(32)
    with pytest.raises(KVCacheFull) as e:
        a.reserve(16)
    assert (e.value.needed, e.value.free) == (1, 0) and len(a.pages) == 2  # unchanged
    b.free()
    assert pool.free_pages == 2 and b.pages == []
    with pytest.raises(PageError, match="not allocated"):
        PageTable(pool, pages=[a.pages[0], 3])  # page 3 went back to the pool with b
    with pytest.raises(PageError, match="not allocated"):
        pool.free([3])
    with pytest.raises(PageError, match="do not fit"):
        a.slots(0, 33)


def test_format_errors():
    with pytest.raises(ValueError, match="does not divide head_dim"):
        PagePool(1, 1, 96, KVFormat(bits=4, group_size=64), num_pages=1, device="cpu")
    with pytest.raises(ValueError, match="bits"):
        KVFormat(bits=3)
    with pytest.raises(ValueError, match="rope"):
        KVFormat(rope="middle")
    with pytest.raises(ValueError, match="holds no page"):
        PagePool(1, 1, 64, KVFormat(bits=4), budget_bytes=10, device="cpu")


@pytest.mark.parametrize("bits,D,G", [(4, 64, 64), (4, 128, 32), (8, 64, 16), (4, 256, 256)])
def test_write_kernel_bit_exact(bits, D, G):
    gen = torch.Generator().manual_seed(D + G)
    T, H, P, page = 37, 3, 5, 16
    S = P * page
    x = (torch.randn(T, H, D, generator=gen) * torch.rand(T, H, 1, generator=gen) * 4).to(DEV)
    x[0, 0] = 0.0  # an all-zero row: the 2^-14 scale floor
    slots = torch.randperm(S, generator=gen)[:T].to(DEV)
    cb = D // 2 if bits == 4 else D
    outs = []
    for write in (kv_write_ref, kv_write):
        codes = torch.zeros(P, H, page, cb, dtype=torch.uint8, device=DEV)
        sz = torch.zeros(P, H, page, D // G, 2, dtype=torch.float16, device=DEV)
        write(x, slots, codes, sz, bits, G)
        outs.append((codes, sz))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    # what the cache hands back is exactly the float simulation's value
    back = dequantize_kv_ref(read_slots(outs[1][0], slots), read_slots(outs[1][1], slots), bits)
    assert torch.equal(back, fake_quantize_asymmetric(x.float(), bits, G))


def test_write_errors():
    codes = torch.zeros(1, 1, 8, 32, dtype=torch.uint8)
    sz = torch.zeros(1, 1, 8, 1, 2, dtype=torch.float16)
    x = torch.randn(2, 1, 64)
    with pytest.raises(ValueError, match="one slot per row"):
        kv_write(x, torch.zeros(3, dtype=torch.long), codes, sz, 4, 64)
    x[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kv_write(x, torch.zeros(2, dtype=torch.long), codes, sz, 4, 64)
    with pytest.raises(TypeError, match="dtype"):
        kv_write(x.long(), torch.zeros(2, dtype=torch.long), codes, sz, 4, 64)
    # unchecked (the caller checks downstream, PagedDecoder its logits): the NaN row's scale is NaN, so every read
    # of it is NaN too, never finite garbage; the finite row is written as usual
    codes, sz = codes.to(DEV), sz.to(DEV)
    kv_write(x.to(DEV), torch.arange(2, device=DEV), codes, sz, 4, 64, check_finite=False)
    assert sz[0, 0, 1, 0, 0].isnan() and sz[0, 0, 0].isfinite().all()


@pytest.mark.parametrize("kernels", ["triton", "reference"])
def test_decoder_step_refuses_nan(kernels):
    """A NaN in one layer's weights is caught in the step that meets it, whether the K/V write checks its rows
    (triton kernels on the CPU) or the step checks its logits once (on a GPU, and for the reference write)."""
    model, _ = atom_lab.tiny_model("llama", seed=0)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[3, 5] = float("nan")
    pool = PagePool.for_model(model, KVFormat(bits=4), page_size=16, num_pages=4)
    dec = PagedDecoder(model, pool, kernels=kernels)
    with pytest.raises(ValueError, match="NaN or inf"):
        dec.step([PageTable(pool)], [torch.arange(20)])


def test_quantize_kv_ref_by_hand():
    # one group [0, 1, 2, 3] -> lo 0, hi 3, 4 bits: scale 3/15 = 0.2, zero 0, codes round(x / 0.2) = 0, 5, 10, 15
    codes, sz = quantize_kv_ref(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 4, 4)
    assert codes.tolist() == [[0 | 10 << 4, 5 | 15 << 4]] and sz[0, 0, 1].item() == 0.0


@pytest.mark.parametrize("fmt,kernels", [(KVFormat(bits=4), "triton"), (KVFormat(bits=4, rope="post"), "reference"),
                                         (KVFormat(bits=8, group_size=32), "triton")])
def test_decoder_matches_simulation(fmt, kernels):
    """Prefill 40 tokens + decode 8 through the cache = the HF model with the KV format fake-quantized, up to float
    noise: codes can flip where the two sides' k/v projections round differently (different matmul shapes), so a
    few logits move by one quantization step's effect; bound the mean and the max."""
    model, _ = atom_lab.tiny_model("llama", seed=1)
    ids = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(3))
    pool = PagePool.for_model(model, fmt, page_size=16, num_pages=8)
    dec = PagedDecoder(model, pool, kernels=kernels)
    t = PageTable(pool)
    logits = [dec.step([t], [ids[:40]], all_logits=True)[0]]
    logits += [dec.step([t], [ids[i: i + 1]])[0][None] for i in range(40, 48)]
    got = torch.cat(logits)
    with simulate_kv(model, fmt):
        sim = model(ids[None].to(DEV), use_cache=False).logits[0].float()
    plain = model(ids[None].to(DEV), use_cache=False).logits[0].float()
    err, quant_effect = (got - sim).abs(), (plain - sim).abs()
    assert err.mean() < 0.02 * quant_effect.mean()
    assert t.length == 48 and len(t.pages) == 3


def test_ragged_batch_generation_equals_float_model():
    """Three prompts of different lengths in one batch on a float32 cache generate exactly what HF's greedy
    generate does one prompt at a time (argmax is stable here: float32, same math up to ~1e-6)."""
    model, _ = atom_lab.tiny_model("qwen2", seed=0)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen) for n in (5, 19, 33)]
    pool = PagePool.for_model(model, KVFormat(bits=16, dtype=torch.float32), page_size=16, num_pages=12)
    out = PagedDecoder(model, pool, kernels="reference").generate(prompts, max_new_tokens=6)
    assert pool.free_pages == 12
    for p, o in zip(prompts, out):
        hf = model.generate(p[None].to(DEV), max_new_tokens=6, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, p.numel():]
        assert o == hf.tolist()


def test_decoder_errors():
    model, _ = atom_lab.tiny_model("llama", seed=0)
    pool = PagePool.for_model(model, KVFormat(bits=4), page_size=16, num_pages=2)
    dec = PagedDecoder(model, pool, kernels="reference")
    t = PageTable(pool)
    with pytest.raises(KVCacheFull):
        dec.step([t], [torch.zeros(40, dtype=torch.long)])
    assert t.pages == [] and pool.free_pages == 2
    with pytest.raises(ValueError, match="LongTensor"):
        dec.step([t], [torch.zeros(3, dtype=torch.int32)])
    other = PagePool.for_model(model, KVFormat(bits=4), page_size=16, num_pages=2)
    with pytest.raises(ValueError, match="this decoder's pool"):
        dec.step([PageTable(other)], [torch.zeros(1, dtype=torch.long)])
    with pytest.raises(ValueError, match="does not match"):
        PagedDecoder(model, PagePool(1, 2, 64, KVFormat(bits=4), num_pages=1, device=pool.device))


@pytest.mark.parametrize("write", [kv_write_ref, kv_write])
def test_pages_are_head_major(write):
    """PagePool's layout pinned in raw memory: slot s = page * page_size + offset of head h lives at byte
    ((page * H + h) * page_size + offset) * code_bytes of a layer's codes, so one head's page is page_size
    consecutive rows (what the decode kernels stream). Rows of exact integers 0..15 (min 0, max 15: scale 1, zero 0,
    codes = the values) make every expected byte known."""
    H, D, ps = 3, 8, 4
    pool = PagePool(1, H, D, KVFormat(bits=4), page_size=ps, num_pages=3, device=DEV)
    slots = torch.tensor([9, 2, 5, 11, 0])  # pages 2, 0, 1, 2, 0
    s, h, j = slots[:, None, None], torch.arange(H)[None, :, None], torch.arange(D)[None, None, :]
    x = ((3 * s + 5 * h + j) % 16).float()
    x[..., 0], x[..., 1] = 0.0, 15.0
    write(x.to(DEV), slots.to(DEV), pool.k_codes[0], pool.k_sz[0], 4, D)
    flat = pool.k_codes[0].cpu().reshape(-1)
    pairs = pool.k_sz[0].cpu().reshape(-1)
    c = x.to(torch.uint8)
    for i, slot in enumerate(slots.tolist()):
        for hh in range(H):
            row = (slot // ps * H + hh) * ps + slot % ps
            want = (c[i, hh, : D // 2] | (c[i, hh, D // 2:] << 4)).tolist()
            assert flat[row * (D // 2): (row + 1) * (D // 2)].tolist() == want, (slot, hh)
            assert pairs[2 * row: 2 * row + 2].tolist() == [1.0, 0.0]
    written = {((sl // ps * H + hh) * ps + sl % ps) for sl in slots.tolist() for hh in range(H)}
    untouched = [r for r in range(3 * H * ps) if r not in written]
    assert not flat.view(-1, D // 2)[untouched].any()  # nothing else moved
    # KIVI key pairs: group row g = slot // Tg of head h at ((g // (ps / Tg) * H + h) * (ps / Tg) + g % (ps / Tg))
    tg = 2
    kpool = PagePool(1, H, D, KVFormat(bits=4, key_tokens=tg), page_size=ps, num_pages=3, device=DEV, max_seqs=1)
    gslots = torch.tensor([10, 11, 2, 3])  # groups 5 (page 2, second group) and 1 (page 0, second group)
    k = torch.tensor([1.0, 2.0])[:, None, None] * (1 + torch.arange(H)[None, :, None]) * 15.0  # scale g_i * (h+1)
    xk = torch.zeros(4, H, D)
    xk[1::2] = k.expand(2, H, D)  # token 0 of a group all 0, token 1 = 15 * scale
    (kv_write_channel_ref if write is kv_write_ref else kv_write_channel)(
        xk.to(DEV), gslots.to(DEV), kpool.k_codes[0], kpool.k_sz[0], 4, tg)
    kp = kpool.k_sz[0].cpu().reshape(-1, D, 2)
    for gi, g in enumerate((5, 1)):
        for hh in range(H):
            row = (g // (ps // tg) * H + hh) * (ps // tg) + g % (ps // tg)
            assert kp[row, :, 0].tolist() == [float((gi + 1) * (hh + 1))] * D and not kp[row, :, 1].any()
