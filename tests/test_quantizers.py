"""Every quantizer beyond the symmetric contract, on tensors small enough to check by hand."""
import pytest
import torch

import atom_lab
from atom_lab import quantizers as Q
from atom_lab.kernels import dequantize_atom_ref, quantize_atom_ref
from atom_lab.quantizers import (CLIP_GRID, dequantize_asymmetric, fake_quantize, fake_quantize_asymmetric,
                            fake_quantize_mixed, fake_quantize_symmetric, quantize_asymmetric, search_act_clip,
                            search_weight_clip)


def test_asymmetric_int2_by_hand():
    # lo = -2, hi = 4 -> scale (4 - -2) / 3 = 2, zero = round(1) = 1; 1/2 = 0.5 rounds half to even: 0
    q, s, z = quantize_asymmetric(torch.tensor([[-2.0, 0.0, 1.0, 4.0]]), bits=2)
    assert q.dtype == torch.uint8 and q.tolist() == [[0, 1, 1, 3]]
    assert s.dtype == torch.float16 and s.tolist() == [[2.0]] and z.tolist() == [[1]]
    assert dequantize_asymmetric(q, s, z).tolist() == [[-2.0, 0.0, 0.0, 4.0]]


def test_asymmetric_one_sided_groups_keep_zero_exact():
    # all >= 0: zero point 0; all <= 0: zero point at the top level 15. 1.5 -> 2 and 7.5 -> 8 (half to even)
    q, s, z = quantize_asymmetric(torch.tensor([[0.0, 3.0, 15.0, 30.0], [-30.0, -3.0, -15.0, 0.0]]), bits=4)
    assert s.tolist() == [[2.0], [2.0]] and z.tolist() == [[0], [15]]
    assert q.tolist() == [[0, 2, 8, 15], [0, 13, 7, 15]]
    assert dequantize_asymmetric(q, s, z).tolist() == [[0.0, 4.0, 16.0, 30.0], [-30.0, -4.0, -16.0, 0.0]]


def test_asymmetric_groups_and_clip():
    x = torch.tensor([[0.0, 6.0, -4.0, 2.0]])
    q, s, z = quantize_asymmetric(x, bits=2, group_size=2)  # groups [0, 6] and [-4, 2]: scales 2, 2; zeros 0, 2
    assert s.tolist() == [[2.0, 2.0]] and z.tolist() == [[0, 2]] and q.tolist() == [[0, 3, 0, 3]]
    # clip 0.5 on [0, 6]: range [0, 3] -> scale 1, and 6 saturates at level 3
    q, s, z = quantize_asymmetric(torch.tensor([[0.0, 6.0, 1.0, 2.0]]), bits=2, clip=0.5)
    assert s.item() == 1.0 and q.tolist() == [[0, 3, 1, 2]]
    with pytest.raises(ValueError, match="clip"):
        quantize_asymmetric(x, clip=0.0)
    with pytest.raises(ValueError, match=r"group_size=3.*K=4"):
        quantize_asymmetric(x, group_size=3)
    with pytest.raises(TypeError):
        quantize_asymmetric(torch.ones(2, 2, dtype=torch.int32))


X3 = torch.tensor([[6.0, -2.0], [1.0, 3.0]])


def test_granularities_by_hand():
    # 3 bits: qmax 3. Per tensor: max 6 -> scale 2: 1/2 -> 0 (half to even), 3/2 -> 2
    assert fake_quantize(X3, 3, "tensor").tolist() == [[6.0, -2.0], [0.0, 4.0]]
    # per channel (rows of a weight) and per token (rows of an activation): row 1 has scale 1 and is exact
    assert fake_quantize(X3, 3, "channel").tolist() == [[6.0, -2.0], [1.0, 3.0]]
    assert torch.equal(fake_quantize(X3, 3, "token"), fake_quantize(X3, 3, "channel"))
    # the same numbers as one row in groups of 2: the groups behave like the two rows did
    row = X3.reshape(1, 4)
    assert fake_quantize(row, 3, "group", group_size=2).tolist() == [[6.0, -2.0, 1.0, 3.0]]
    assert fake_quantize(row, 3, "channel").tolist() == [[6.0, -2.0, 0.0, 4.0]]
    # asymmetric per tensor: [-2, 6] over 7 levels: scale 8/7 in float16
    y = fake_quantize(X3, 3, "tensor", symmetric=False)
    assert torch.allclose(y, X3, atol=8 / 7 / 2 + 1e-3)
    # per token on a 3-D activation [batch, tokens, K] reduces only the last dim
    a = torch.tensor([[[1.0, 2.0, 3.0, 7.0]], [[70.0, 0.0, 0.0, 0.0]]])
    assert fake_quantize(a, 4, "token").tolist() == [[[1.0, 2.0, 3.0, 7.0]], [[70.0, 0.0, 0.0, 0.0]]]


def test_granularity_errors():
    with pytest.raises(ValueError, match="granularity"):
        fake_quantize(X3, 4, "row")
    with pytest.raises(ValueError, match="group_size"):
        fake_quantize(X3, 4, "group")


def test_mixed_equals_packed_atom_format():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 576, generator=g) * torch.linspace(0.1, 30, 576)  # outliers last, as after reordering
    ref = dequantize_atom_ref(quantize_atom_ref(x, 64, 128, clip=0.9))
    assert torch.equal(fake_quantize_mixed(x, 4, 64, 128, 8, 0.9), ref)
    assert torch.equal(fake_quantize_mixed(x, 4, 64, 0, 8, 0.9), fake_quantize_symmetric(x, 4, 64, 0.9))
    # keeper at 16 bits: the outliers are only rounded to float16
    y = fake_quantize_mixed(x, 4, 64, 128, 16)
    assert torch.equal(y[:, -128:], x[:, -128:].half().float())


def test_mixed_small_by_hand():
    # 4 normal channels in 2 groups of 2 (INT4), 2 keeper channels (INT8, one scale per row: 254/127 = 2)
    x = torch.tensor([[7.0, 3.0, 14.0, -7.0, 254.0, 3.0]])
    y = fake_quantize_mixed(x, bits=4, group_size=2, keeper=2, keeper_bits=8)
    # group [14, -7]: scale 2, -3.5 rounds half to even to -4 -> -8; keeper 3/2 = 1.5 -> 2 -> 4
    assert y.tolist() == [[7.0, 3.0, 14.0, -8.0, 254.0, 4.0]]
    with pytest.raises(ValueError, match="keeper=6"):
        fake_quantize_mixed(x, keeper=6)


def test_clip_search_picks_the_minimum_output_error():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 256, generator=g), torch.randn(512, 256, generator=g)
    best, curve = search_weight_clip(w, x, lambda w, c: fake_quantize_symmetric(w, 4, None, c))
    assert [c for c, _ in curve] == list(CLIP_GRID)
    assert best == min(curve, key=lambda t: t[1])[0]
    # Gaussian rows at 4 bits per channel: the max is an outlier worth clipping, and 0.5 clips far too much
    assert best < 1.0 and dict(curve)[best] < dict(curve)[1.0] < dict(curve)[0.5]
    best_a, curve_a = search_act_clip(x, w, lambda x, c: fake_quantize_symmetric(x, 4, None, c))
    assert best_a == min(curve_a, key=lambda t: t[1])[0] and best_a < 1.0
    # at 8 bits rounding is fine enough that clipping only hurts
    assert search_weight_clip(w, x, lambda w, c: fake_quantize_symmetric(w, 8, None, c))[0] == 1.0


def test_fake_quantize_asymmetric_keeps_dtype():
    x = torch.randn(3, 64, dtype=torch.float16)
    y = fake_quantize_asymmetric(x, 4, 32)
    assert y.dtype == torch.float16 and (y.float() - x.float()).abs().max() < 0.5


def test_scale_division_is_correctly_rounded_on_the_device():
    """The scale is clip * amax / qmax divided as IEEE does (the kernels use tl.math.div_rn). On CUDA, PyTorch
    would multiply by 1/qmax instead, 1 ulp off for some inputs, which moves whole groups after float16 rounding."""
    x = torch.rand(1 << 16, generator=torch.Generator().manual_seed(0)).to(atom_lab.default_device()) * 100
    for d in (7, 127, 15):
        assert torch.equal(Q._div(x, d), (x.double() / d).float())
