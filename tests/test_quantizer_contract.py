"""The symmetric group quantizer that every kernel matches, on tensors small enough to check by hand."""
import pytest
import torch

from atom_lab.quantizers import MIN_SCALE, dequantize_symmetric, fake_quantize_symmetric, quantize_symmetric


def test_int4_group_by_hand():
    # group 0: max|x| = 7 -> scale 1; group 1: max|x| = 14 -> scale 2, and 3/2 = 1.5 rounds to even 2
    x = torch.tensor([[7.0, -3.4, 0.5, 1.5, 14.0, 3.0, -5.0, 1.0]])
    q, s = quantize_symmetric(x, bits=4, group_size=4)
    assert s.dtype == torch.float16 and s.tolist() == [[1.0, 2.0]]
    assert q.dtype == torch.int8 and q.tolist() == [[7, -3, 0, 2, 7, 2, -2, 0]]
    assert dequantize_symmetric(q, s).tolist() == [[7.0, -3.0, 0.0, 2.0, 14.0, 4.0, -4.0, 0.0]]


def test_clip_saturates_at_both_ends():
    x = torch.tensor([[-14.0, 14.0, 1.0, 0.0]])
    q, s = quantize_symmetric(x, bits=4, group_size=None, clip=0.5)  # scale = 0.5 * 14 / 7 = 1
    assert s.item() == 1.0 and q.tolist() == [[-8, 7, 1, 0]]


def test_int8_per_row_and_zero_group():
    x = torch.tensor([[0.0, 0.0], [254.0, -127.0]])
    q, s = quantize_symmetric(x, bits=8)
    assert s[0].item() == pytest.approx(MIN_SCALE) and q[0].tolist() == [0, 0]
    assert s[1].item() == 2.0 and q[1].tolist() == [127, -64]  # -63.5 rounds half to even


def test_bad_group_size_names_both_numbers():
    with pytest.raises(ValueError, match=r"group_size=128.*K=576"):
        quantize_symmetric(torch.randn(2, 576), group_size=128)
    with pytest.raises(TypeError):
        quantize_symmetric(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="bits"):
        quantize_symmetric(torch.randn(2, 4), bits=1)


def test_fake_quant_error_shrinks_with_bits():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errs = [(fake_quantize_symmetric(x, b, 64) - x).norm() / x.norm() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.01
