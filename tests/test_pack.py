"""INT4 pack/unpack: the Triton kernels equal their PyTorch references (run under the interpreter on a CPU)."""
import pytest
import torch

import atom_lab
from atom_lab.kernels import pack_int4, pack_int4_ref, unpack_int4, unpack_int4_ref

DEV = atom_lab.default_device()


def test_pack_layout_by_hand():
    """Byte j of a 64-value block holds value j (low nibble) and value j+32 (high nibble)."""
    q = torch.zeros(1, 64, dtype=torch.int8)
    q[0, 0], q[0, 32] = 3, -2      # byte 0 = 0x3 | 0xE << 4 = 0xE3 = 227
    q[0, 31], q[0, 63] = -8, 7     # byte 31 = 0x8 | 0x7 << 4 = 0x78 = 120
    packed = pack_int4_ref(q)
    assert packed.shape == (1, 32) and packed.dtype == torch.uint8
    assert packed[0, 0].item() == 227 and packed[0, 31].item() == 120
    assert packed[0, 1:31].eq(0).all()
    assert torch.equal(pack_int4(q.to(DEV)).cpu(), packed)


@pytest.mark.parametrize("shape", [(1, 64), (3, 128), (17, 576), (2, 5, 192)])
@pytest.mark.parametrize("seed", [0, 1])
def test_pack_unpack_match_reference(shape, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, shape, dtype=torch.int8, generator=g)
    packed = pack_int4(q.to(DEV)).cpu()
    assert torch.equal(packed, pack_int4_ref(q))
    assert torch.equal(unpack_int4(packed.to(DEV)).cpu(), q)
    assert torch.equal(unpack_int4_ref(packed), q)


def test_pack_rejects_bad_input():
    with pytest.raises(TypeError, match="int8"):
        pack_int4(torch.zeros(2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 64"):
        pack_int4(torch.zeros(2, 96, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((2, 64), 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="non-empty"):
        pack_int4(torch.zeros(0, 64, dtype=torch.int8))
    with pytest.raises(TypeError, match="uint8"):
        unpack_int4(torch.zeros(2, 32, dtype=torch.int8))


def test_packed_atom_reference_round_trip():
    """Hand-sized row: 64 INT4 channels (one group of 64) + 2 INT8 keeper channels."""
    from atom_lab.kernels import dequantize_atom_ref, quantize_atom_ref

    x = torch.zeros(1, 66)
    x[0, :64] = torch.arange(64) % 8 - 3.5 + 0.5   # -3..4 integers: scale = 4/7
    x[0, 64:] = torch.tensor([254.0, -1.0])        # keeper scale = 2: q8 = [127, 0] (-0.5 rounds to even 0)
    p = quantize_atom_ref(x, group_size=64, keeper=2)
    assert (p.q4.shape, p.s4.shape, p.q8.shape, p.s8.shape) == ((1, 32), (1, 1), (1, 2), (1, 1))
    assert p.q8.tolist() == [[127, 0]] and p.s8.item() == 2.0
    assert p.in_features == 66 and p.nbytes() == 32 + 2 + 2 + 2
    err = (dequantize_atom_ref(p)[0, :64] - x[0, :64]).abs().max().item()
    assert err <= p.s4.float().item() / 2 + 1e-6


def test_packed_atom_shape_errors():
    from atom_lab.kernels import check_atom_shape

    with pytest.raises(ValueError, match="group_size=48"):
        check_atom_shape(576, 128, 48)
    with pytest.raises(ValueError, match="keeper=600"):
        check_atom_shape(576, 600, 64)
    with pytest.raises(ValueError, match="multiple of group_size=128"):
        check_atom_shape(576, 128, 128)
