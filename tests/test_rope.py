"""The one-launch RoPE kernel equals Hugging Face's rotation bit for bit (kernels/rope.py says why it can)."""
import atom_lab  # noqa: F401

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from atom_lab.kernels.rope import apply_rope_, apply_rope_ref

DEV = atom_lab.default_device()


def _cos_sin(T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4096, (T,), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)
    return emb.cos().to(dtype).to(DEV), emb.sin().to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,Hq,Hk,D", [(1, 3, 1, 64), (37, 4, 2, 128), (5, 2, 2, 32)])
def test_rope_kernel_equals_hf(dtype, T, Hq, Hk, D):
    cos, sin = _cos_sin(T, D, dtype)
    g = torch.Generator().manual_seed(1)
    # q | k | v side by side, as a fused projection writes them: the kernel rotates the q and k views in place
    qkv = (torch.randn(T, (Hq + 2 * Hk) * D, generator=g) * 3).to(dtype).to(DEV)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hk) * D].view(T, Hk, D)
    v_before = qkv[:, (Hq + Hk) * D:].clone()
    # HF's function on [batch, heads, T, D] with cos/sin [batch, T, D]
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    want_q, want_k = hq[0].transpose(0, 1), hk[0].transpose(0, 1)
    assert torch.equal(apply_rope_ref(q, cos, sin), want_q)
    apply_rope_(q, k, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(qkv[:, (Hq + Hk) * D:], v_before)  # v untouched


def test_rope_q_only_and_errors():
    cos, sin = _cos_sin(4, 64, torch.float32)
    q = torch.randn(4, 2, 64, device=DEV)
    want = apply_rope_ref(q, cos, sin)
    apply_rope_(q, None, cos, sin)
    assert torch.equal(q, want)
    with pytest.raises(ValueError, match="expected"):
        apply_rope_(torch.randn(3, 2, 64, device=DEV), None, cos, sin)
    with pytest.raises(TypeError, match="cos/sin are"):
        apply_rope_(q.half(), None, cos, sin)
    with pytest.raises(ValueError, match="contiguous rows"):
        apply_rope_(torch.randn(4, 64, 2, device=DEV).transpose(1, 2), None, cos, sin)
