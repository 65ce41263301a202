"""The Gluon decode kernel (kernels/attention_gluon.py: mma.sync fed from registers) against the reference and the
CUDA-core kernel, on random shapes. GPU only: Gluon does not run in the Triton interpreter (the CUDA-core kernel is
its CPU twin, tests/test_attention.py pins that one under the interpreter).

Tolerance, derived from what the kernel rounds (everything else is float32, exact integer codes):
  1. q * sm_scale * log2(e) rounded to float16 (relative 2^-11 per element), then scores s_t (q16 . c_t - z_t sum q16)
     = q16 . k_t exactly in real arithmetic (the zero term uses the same rounded q): a score moves by at most
     e_s = 2^-11 * max_t sum_d |q_d k_td| * sm_scale (natural-log units; float32 accumulation adds ~2^-20 of it).
     A softmax weight then moves by a factor within exp(+-2 e_s): |d out| <= (exp(2 e_s) - 1) * max|v|.
  2. p_t * s_t rounded to float16 for the mma (relative 2^-11 per token; the zero term uses the same rounded
     value, the normaliser sum_t p_t does not): <= 2 * 2^-11 * max|v|.
So |out - ref| <= (exp(2 e_s) - 1 + 2^-10) * max|v| + float32 noise (1e-5 absolute, lengths <= 600).
The CUDA-core kernel is float32 after the codes (|core - ref| ~ 1e-7), so the same bound + 1e-5 holds between them.
"""
import atom_lab  # noqa: F401

import pytest
import torch

from atom_lab.kernels.attention import paged_decode_attention, paged_decode_attention_ref
from atom_lab.kernels.attention_gluon import _k_channel, _v_channel, gluon_ok
from atom_lab.kernels.kv_cache import dequantize_kv_ref, read_slots

from tests.test_attention import make_cache

GPU = torch.cuda.is_available() and gluon_ok(torch.device("cuda"))
gpu = pytest.mark.skipif(not GPU, reason="Gluon kernels need a CUDA GPU (sm_80+) and triton with Gluon; "
                                "the Triton interpreter cannot run them")
DEV = "cuda"


def gluon_bound(q, kc, ksz, vc, vsz, pt, lengths, page, sm_scale):
    """Per-sequence bound of the module docstring, [B, H] -> broadcast over channels."""
    k = dequantize_kv_ref(kc, ksz, 4)  # [P, H, page, D]
    v = dequantize_kv_ref(vc, vsz, 4)
    B, H, D = q.shape
    out = torch.zeros(B, H, device=q.device)
    for b in range(B):
        n = int(lengths[b])
        pos = torch.arange(n, device=q.device)
        slots = pt[b].long()[pos // page] * page + pos % page
        kb, vb = read_slots(k, slots), read_slots(v, slots)  # [n, H, D]
        e_s = 2.0 ** -11 * sm_scale * (q[b].float().abs()[None] * kb.abs()).sum(-1).max(0).values  # [H]
        vmax = vb.abs().amax(dim=(0, 2))
        out[b] = (torch.exp(2 * e_s) - 1 + 2.0 ** -10) * vmax + 1e-5
    return out[..., None]


def test_default_variant():  # CPU too: the dispatch rule (the Gluon kernel where it fits, then CUDA cores)
    from atom_lab.kernels.attention import _gluon_fits, default_variant
    assert default_variant(True, True) == "gluon" and default_variant(True) == "core"
    assert default_variant(False) == "dot"
    t = torch.zeros(4)
    assert not _gluon_fits(True, None, 128, 32, 4, (t,))  # batch < 8: not measured with the final options
    assert not _gluon_fits(True, None, 64, 32, 8, (t,)) and not _gluon_fits(True, (t, 1.0), 128, 32, 8, (t,))
    assert _gluon_fits(True, None, 128, 32, 8, (t,)) == (GPU and t.is_cuda)  # a CPU tensor never


def test_channel_orders_are_permutations():  # CPU too: the index algebra the kernel's stores and q load use
    assert sorted(_k_channel().tolist()) == list(range(128))
    assert sorted(_v_channel().tolist()) == list(range(128))


@gpu
@pytest.mark.parametrize("B,H,page,max_len,programs,ahead", [
    (1, 1, 16, 600, 64, 1), (3, 4, 32, 600, 4224, 1), (5, 2, 64, 457, 100, 2), (33, 2, 16, 80, 4224, 2),
    (17, 3, 32, 300, 333, 1), (8, 32, 64, 1000, 4224, 2), (2, 2, 16, 17, 4224, 1)])
def test_gluon_matches_ref_and_core(B, H, page, max_len, programs, ahead):
    gen = torch.Generator().manual_seed(B * 100 + page + ahead)
    lengths = torch.randint(1, max_len + 1, (B,), generator=gen)
    lengths[0] = max_len if max_len % page else max_len - 1  # one long sequence, not a multiple of the page
    D, sm_scale = 128, 128 ** -0.5
    kc, ksz, vc, vsz, pt = make_cache(B, H, D, 4, D, page, lengths.tolist(), gen)
    kc, ksz, vc, vsz, pt = (t.to(DEV) for t in (kc, ksz, vc, vsz, pt))
    q = torch.randn(B, H, D, generator=gen).to(DEV, torch.bfloat16)
    lens = lengths.to(torch.int32).to(DEV)
    args = (q, kc, ksz, vc, vsz, pt, lens, 4, page, sm_scale)
    out = paged_decode_attention(*args, variant="gluon", programs=programs, num_stages=ahead)
    ref = paged_decode_attention_ref(*args)
    core = paged_decode_attention(*args, variant="core")
    bound = gluon_bound(q, kc, ksz, vc, vsz, pt, lens, page, sm_scale)
    assert torch.isfinite(out).all()
    assert ((out - ref).abs() <= bound).all(), float(((out - ref).abs() - bound).max())
    assert ((out - core).abs() <= bound + 1e-5).all(), float(((out - core).abs() - bound).max())


@gpu
@pytest.mark.parametrize("opts", [dict(heads_first=False, k_chains=1, maxnreg=None), dict(k_chains=1),
                                  dict(maxnreg=None), dict(heads_first=False)])
def test_gluon_launch_options(opts, monkeypatch):
    """The grid order, the split mma chains and the register cap (OPTIONS' defaults: all three on) compute the same
    thing, within the same bound."""
    from atom_lab.kernels import attention_gluon
    monkeypatch.setattr(attention_gluon, "OPTIONS", {**attention_gluon.OPTIONS, **opts})
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, 700, (6,), generator=gen)
    D, page, sm_scale = 128, 32, 128 ** -0.5
    kc, ksz, vc, vsz, pt = (t.to(DEV) for t in make_cache(6, 3, D, 4, D, page, lengths.tolist(), gen))
    q = torch.randn(6, 3, D, generator=gen).to(DEV)
    lens = lengths.to(torch.int32).to(DEV)
    args = (q, kc, ksz, vc, vsz, pt, lens, 4, page, sm_scale)
    out = paged_decode_attention(*args, variant="gluon", programs=200)
    ref = paged_decode_attention_ref(*args)
    assert ((out - ref).abs() <= gluon_bound(q, kc, ksz, vc, vsz, pt, lens, page, sm_scale)).all()


@gpu
def test_gluon_refuses_what_it_does_not_cover():
    gen = torch.Generator().manual_seed(0)
    kc, ksz, vc, vsz, pt = (t.to(DEV) for t in make_cache(2, 2, 128, 4, 128, 16, [20, 9], gen))
    q = torch.randn(2, 2, 128, device=DEV)
    with pytest.raises(ValueError, match="1 or 2 tiles in flight"):
        paged_decode_attention(q, kc, ksz, vc, vsz, pt, torch.tensor([20, 9], dtype=torch.int32, device=DEV), 4, 16,
                               0.1, variant="gluon", num_stages=3)
    kc, ksz, vc, vsz, pt = (t.to(DEV) for t in make_cache(2, 2, 128, 4, 128, 8, [20, 9], gen))
    with pytest.raises(ValueError, match="page_size a multiple of 16"):
        paged_decode_attention(q, kc, ksz, vc, vsz, pt, torch.tensor([20, 9], dtype=torch.int32, device=DEV), 4, 8,
                               0.1, variant="gluon")
