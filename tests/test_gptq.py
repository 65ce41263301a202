"""GPTQ: exact where it must be (identity Hessian = RTN, packed format), better than RTN on a real layer."""
import pytest
import torch

import atom_lab
from atom_lab.gptq import ColumnGroup, column_groups, gptq_quantize, rtn_quantize
from atom_lab.kernels import dequantize_atom_ref, quantize_atom_ref, unpack_int4_ref
from atom_lab.quantizers import fake_quantize_asymmetric, fake_quantize_symmetric


def test_column_groups_layout():
    g = column_groups(576, bits=4, group_size=64, keeper=128, keeper_bits=8, clip=0.85)
    assert len(g) == 8 and g[0] == ColumnGroup(0, 64, 4, 0.85, True) and g[-1] == ColumnGroup(448, 576, 8, 1.0)
    assert column_groups(8, 4, None) == [ColumnGroup(0, 8, 4)]
    with pytest.raises(ValueError, match=r"group_size=128.*448"):
        column_groups(576, 4, 128, keeper=128)
    with pytest.raises(ValueError, match="keeper"):
        column_groups(64, 4, 32, keeper=64)


LAYOUTS = {
    "atom": lambda K: column_groups(K, 4, 64, keeper=128, keeper_bits=8, clip=0.85),
    "per-channel": lambda K: column_groups(K, 4, None),
    "asym-groups": lambda K: column_groups(K, 4, 32, symmetric=False),
    "fp16-keeper": lambda K: column_groups(K, 4, 64, keeper=64, keeper_bits=16),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_identity_hessian_is_rtn_bit_for_bit(layout):
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    groups = LAYOUTS[layout](256)
    g = gptq_quantize(W, torch.eye(256), groups, damp=1e-6, block_size=96)
    r = rtn_quantize(W, groups)
    assert torch.equal(g.weight, r.weight) and torch.equal(g.q, r.q) and torch.equal(g.scale, r.scale)
    assert torch.equal(g.zero, r.zero)


def test_rtn_matches_the_quantizers():
    W = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    r = rtn_quantize(W, column_groups(256, 4, 64, keeper=0, clip=0.9))
    assert torch.equal(r.weight, fake_quantize_symmetric(W, 4, 64, 0.9))
    r = rtn_quantize(W, column_groups(256, 4, 32, symmetric=False))
    assert torch.equal(r.weight, fake_quantize_asymmetric(W, 4, 32))
    r = rtn_quantize(W, LAYOUTS["atom"](256))
    assert torch.equal(r.weight, dequantize_atom_ref(quantize_atom_ref(W, 64, 128, clip=0.85)))


def _layer_inputs(name: str, tokens: int = 1024):
    """Real inputs of one linear layer of a tiny llama, over random byte text: (weight [N, K], X [T, K])."""
    model, _ = atom_lab.tiny_model("llama", seed=0)
    lin = model.get_submodule(name)
    rows = []
    h = lin.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    ids = torch.randint(0, 256, (4, tokens // 4), generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.no_grad():
        model(ids)
    h.remove()
    return lin.weight.detach(), torch.cat(rows)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"])
def test_gptq_beats_rtn_on_a_tiny_model_layer(name):
    W, X = _layer_inputs(name)
    fit, held = X[::2], X[1::2]  # calibrate on half the tokens, measure on the other half
    groups = column_groups(W.shape[1], 4, 64, keeper=128, keeper_bits=8)
    g = gptq_quantize(W, fit.T @ fit, groups)
    r = rtn_quantize(W, groups)
    err = lambda Q: ((held @ (W - Q).T) ** 2).mean().item()  # noqa: E731
    assert err(g.weight) < 0.8 * err(r.weight)


def test_gptq_output_is_the_packed_atom_format():
    W, X = _layer_inputs("model.layers.0.self_attn.q_proj", 512)
    g = gptq_quantize(W, X.T @ X, LAYOUTS["atom"](W.shape[1]))
    p = g.to_packed_atom()
    assert p.group_size == 64 and p.keeper == 128 and p.q4.dtype == torch.uint8
    assert torch.equal(unpack_int4_ref(p.q4), g.q[:, :128].to(torch.int8))  # GPTQ's levels ARE q4
    assert torch.equal(p.q8, g.q[:, 128:].to(torch.int8)) and torch.equal(p.s4, g.scale[:, :2])
    assert torch.equal(dequantize_atom_ref(p), g.weight)
    with pytest.raises(ValueError, match="to_packed_atom"):
        rtn_quantize(W, LAYOUTS["asym-groups"](W.shape[1])).to_packed_atom()


def test_gptq_input_errors():
    W = torch.randn(8, 64)
    groups = column_groups(64, 4, 32)
    with pytest.raises(ValueError, match=r"\[64, 64\]"):
        gptq_quantize(W, torch.eye(32), groups)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(W, torch.full((64, 64), float("nan")), groups)
    with pytest.raises(ValueError, match="tile"):
        gptq_quantize(W, torch.eye(64), groups[:1])
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(W, torch.eye(64), groups, damp=0.0)
    # a channel never seen in calibration gets zero weight (GPTQ's convention), and nothing breaks
    H = torch.eye(64)
    H[3, 3] = 0
    assert (gptq_quantize(W, H, groups).weight[:, 3] == 0).all()
