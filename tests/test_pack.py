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
