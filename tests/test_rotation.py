"""Rotations (atom_lab.rotation): Hadamard constructions, orthogonality, norm folding, a rotated model's float
outputs, the online-rotation kernel against its reference, and the rotated presets on both backends."""
import copy

import pytest
import torch

import atom_lab
from atom_lab import AtomConfig, QuantLinear, kl_divergence, quantize_model, set_backend
from atom_lab.config import rotation_configs
from atom_lab.kernels import silu_mul_ref, silu_mul_rotate_quantize, silu_mul_rotate_quantize_ref, unpack_int4
from atom_lab.rotation import (fold_rmsnorm, hadamard, hadamard_order_ok, online_rotation, random_orthogonal,
                               random_signs, rotate_model, rotation_matrix)

DEV = atom_lab.default_device()
TEXTS = [f"Article {i}: the {w} of {v} was measured at {i * 7} units, then again in {1900 + i}." * 6
         for i, (w, v) in enumerate([("speed", "light"), ("mass", "iron"), ("heat", "water"), ("age", "rock")] * 5)]
CHEAP = dict(calibration=TEXTS, n_tokens=256, seq_len=128, progress=False)


# --- matrices -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 28, 36, 44, 48, 60, 576, 640, 1536])
def test_hadamard_is_exact(n):
    H = hadamard(n)
    assert H.shape == (n, n) and set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))  # integers: exact in float64


def test_hadamard_4_by_hand_keeps_the_norm():
    H = hadamard(4)
    assert torch.equal(H, torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]).double())
    x = torch.tensor([3.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    y = x @ H / 2  # columns: (3+1-1+1)/2, (3-1-1-1)/2, (3+1+1-1)/2, (3-1+1+1)/2
    assert y.tolist() == [2.0, 0.0, 2.0, 2.0]
    assert (y * y).sum().item() == (x * x).sum().item() == 12.0


@pytest.mark.parametrize("n", [3, 6, 10, 52, 172])
def test_bad_orders_are_rejected(n):
    assert not hadamard_order_ok(n)
    with pytest.raises(ValueError, match="rotation='random'"):
        hadamard(n)
    with pytest.raises(ValueError, match=f"n={n}"):
        rotation_matrix(n, "hadamard")
    Q = rotation_matrix(n, "random", seed=1)  # the fallback exists for every order
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive int"):
        hadamard(0)
    with pytest.raises(ValueError, match="kind="):
        rotation_matrix(4, "givens")
    with pytest.raises(ValueError, match="rotation="):
        AtomConfig(rotation="spin")


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotation_is_orthogonal_and_seeded(kind):
    Q = rotation_matrix(576, kind, seed=7)
    # float64 products of 576 terms: |error| <= 576 * 2^-53 * sum|q_i q_j| <= 576 * 1.2e-16 ~ 7e-14
    assert (Q @ Q.T - torch.eye(576, dtype=torch.float64)).abs().max() < 1e-13
    assert torch.equal(Q, rotation_matrix(576, kind, seed=7))
    assert not torch.equal(Q, rotation_matrix(576, kind, seed=8))
    assert torch.equal(random_signs(64, 3), random_signs(64, 3)) and set(random_signs(64, 3).tolist()) == {-1., 1.}
    assert torch.equal(random_orthogonal(8, 2), random_orthogonal(8, 2))


def test_rotation_spreads_an_outlier():
    x = torch.zeros(1536, dtype=torch.float64)
    x[5] = 100.0  # one massive channel
    y = x @ rotation_matrix(1536, "hadamard", 0)
    assert torch.allclose(y.abs(), torch.full_like(y, 100.0 / 1536 ** 0.5))  # every channel gets |x| / sqrt(n)


# --- model folding and rotation (float64 models: the rotation is exact up to float64 rounding) --------------------
def test_fold_rmsnorm_keeps_outputs():
    model, _ = atom_lab.tiny_model("llama", dtype=torch.float64)
    b = model.model.layers[0]
    with torch.no_grad():
        b.input_layernorm.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, 5, model.config.hidden_size, dtype=torch.float64)
    lins = [b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj]
    with torch.no_grad():
        ref = [lin(b.input_layernorm(x)) for lin in lins]
        fold_rmsnorm(b.input_layernorm, lins)
        assert torch.equal(b.input_layernorm.weight, torch.ones_like(b.input_layernorm.weight))
        for r, lin in zip(ref, lins):
            assert torch.allclose(lin(b.input_layernorm(x)), r, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", list(atom_lab.TINY_ARCHS))
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotated_model_has_the_same_float_outputs(arch, tie, kind):
    model, _ = atom_lab.tiny_model(arch, dtype=torch.float64, tie_word_embeddings=tie)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        rot = rotate_model(copy.deepcopy(model), kind, seed=3)
        out = rot(ids).logits
    # float64 weights, but transformers' RMSNorm normalises in float32 whatever the dtype: each of the 5 norms
    # rounds to float32 (2^-24 ~ 6e-8 relative) differently in the two models; 1e-5 allows ~30x that grown through
    # two blocks, while a rotation that is not undone (e.g. a tied head left tied) changes logits by O(1)
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
    assert not torch.equal(rot.model.embed_tokens.weight, model.model.embed_tokens.weight)  # it did rotate
    assert rot.atom_rotation["kind"] == kind and online_rotation(rot.model.layers[0].mlp.down_proj) is not None
    # one down_proj rotation matrix for all blocks, not a copy per layer
    assert len({online_rotation(b.mlp.down_proj).data_ptr() for b in rot.model.layers}) == 1
    if tie:
        assert rot.lm_head.weight is not rot.model.embed_tokens.weight and not rot.config.tie_word_embeddings
    with pytest.raises(ValueError, match="already rotated"):
        rotate_model(rot)


# --- the online-rotation kernel against its reference --------------------------------------------------------------
def _check_within_rounding(p, gate, up, rotation, index, G, keeper, clip):
    """Every scale and code of p is one the reference could give for SOME value within the float32 summation error
    of the kernel's dot: y_kernel = y + e with |e| <= gamma * sum_k |v_k r_kj| (gamma = 2 K 2^-24: K fp32
    additions and one product rounding, a standard bound; the interpreter / tf32x3 accumulate in fp32). Returns the
    number of codes that differ from the exact reference (each is explained by the bound)."""
    v = silu_mul_ref(gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])).double()
    R = rotation.double()
    K = v.shape[1]
    y, err = (v @ R)[:, index.long()], ((v.abs() @ R.abs()) * (2 * K * 2.0 ** -24))[:, index.long()]
    y, err = y.cpu(), err.cpu()
    normal = K - keeper

    def scale_ok(s, lo, hi, qmax, c):
        def f(a):
            return torch.clamp(a * c / qmax, min=2.0 ** -14).half()
        return ((s >= f(lo)) & (s <= f(hi))).all()

    def codes_ok(q, yv, ev, s, qmax):
        lo = torch.clamp(torch.round((yv - ev) / s), -qmax - 1, qmax)
        hi = torch.clamp(torch.round((yv + ev) / s), -qmax - 1, qmax)
        assert ((q >= lo) & (q <= hi)).all()
        exact = torch.clamp(torch.round(yv / s), -qmax - 1, qmax)
        return int((q != exact).sum())

    flips = 0
    y4, e4 = y[:, :normal].reshape(y.shape[0], -1, G), err[:, :normal].reshape(y.shape[0], -1, G)
    amax, aerr = y4.abs().amax(-1), e4.amax(-1)
    s4 = p.s4.cpu().double()
    assert scale_ok(p.s4.cpu(), (amax - aerr).clamp(min=0), amax + aerr, 7, clip)
    q4 = unpack_int4(p.q4).cpu().double().reshape(y4.shape)  # unpack where q4 lives (a kernel)
    flips += codes_ok(q4, y4, e4, s4[:, :, None], 7)
    if keeper:
        yk, ek = y[:, normal:], err[:, normal:]
        am, ae = yk.abs().amax(-1), ek.amax(-1)
        assert scale_ok(p.s8.cpu()[:, 0], (am - ae).clamp(min=0), am + ae, 127, 1.0)
        flips += codes_ok(p.q8.cpu().double(), yk, ek, p.s8.cpu().double(), 127)
    return flips


@pytest.mark.parametrize("M,K,G,keeper", [(1, 256, 64, 0), (5, 640, 64, 128), (33, 1536, 64, 128),
                                          (17, 1536, 128, 0), (3, 576, 32, 128)])
def test_rotate_kernel_equals_reference(M, K, G, keeper):
    g = torch.Generator().manual_seed(M + K)
    gate = (torch.randn(M, K, generator=g) * 3).to(DEV)
    up = torch.randn(M, K, generator=g).to(DEV)
    up[:, 7] *= 200.0  # an outlier channel, as SmolLM2's down_proj inputs have
    R = rotation_matrix(K, "hadamard", seed=1).float().contiguous().to(DEV)
    index = torch.randperm(K, generator=g).to(DEV)
    p = silu_mul_rotate_quantize(gate, up, R, index, G, keeper, 0.9)
    ref = silu_mul_rotate_quantize_ref(gate, up, R, index, G, keeper, 0.9)
    flips = _check_within_rounding(p, gate, up, R, index, G, keeper, 0.9)
    assert flips <= max(2, M * K // 1000)  # a code flips only within ~1e-6 relative of a rounding boundary
    assert (p.q4 != ref.q4).float().mean() < 0.01


def test_rotate_kernel_catches_a_wrong_rotation():
    K = 256
    gate, up = torch.randn(4, K).to(DEV), torch.randn(4, K).to(DEV)
    R = rotation_matrix(K, "hadamard", seed=1).float().contiguous().to(DEV)
    index = torch.arange(K).to(DEV)
    p = silu_mul_rotate_quantize(gate, up, R, index, 64, 0)
    with pytest.raises(AssertionError):
        _check_within_rounding(p, gate, up, rotation_matrix(K, "hadamard", seed=2).float(), index, 64, 0, 1.0)


def test_rotate_kernel_identity_is_the_plain_kernel():
    # R = I: the rotation kernel must give exactly what silu_mul_quantize gives (1 * v + 0s is exact in fp32)
    from atom_lab.kernels import silu_mul_quantize
    K = 640
    gate, up = torch.randn(6, K).to(DEV), torch.randn(6, K).to(DEV)
    index = torch.randperm(K, generator=torch.Generator().manual_seed(0)).to(DEV)
    a = silu_mul_rotate_quantize(gate, up, torch.eye(K).to(DEV), index, 64, 128, 0.9)
    b = silu_mul_quantize(gate, up, index, 64, 128, 0.9)
    for t in ("q4", "s4", "q8", "s8"):
        assert torch.equal(getattr(a, t), getattr(b, t)), t


def test_rotate_kernel_bad_inputs():
    K = 256
    gate, up, index = torch.randn(2, K).to(DEV), torch.randn(2, K).to(DEV), torch.arange(K).to(DEV)
    with pytest.raises(ValueError, match=r"rotation must be \[K, K\]"):
        silu_mul_rotate_quantize(gate, up, torch.eye(128).to(DEV), index, 64, 0)
    with pytest.raises(TypeError, match="rotation must have dtype"):
        silu_mul_rotate_quantize(gate, up, torch.eye(K, dtype=torch.float64).to(DEV), index, 64, 0)
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul_rotate_quantize(gate, up, torch.eye(K).to(DEV).t(),
                                 index, 64, 0)
    with pytest.raises(ValueError, match="NaN"):
        silu_mul_rotate_quantize(gate * float("nan"), up, torch.eye(K).to(DEV), index, 64, 0, check_finite=True)


# --- presets, recipe and backends ------------------------------------------------------------------------------------
def test_rotation_presets_and_rows():
    q, b = AtomConfig.preset("quarot"), AtomConfig.preset("atom+rotation")
    assert (q.rotation, q.keeper, q.sort_metric, q.gptq, q.kv_bits, q.group_size) == ("hadamard", 0, None, True, 4, 64)
    assert b == AtomConfig.preset("atom", rotation="hadamard", name="atom+rotation")
    names = [c.name for c in rotation_configs()]
    assert names == ["quarot W4A4", "quarot W4A4-KV4", "atom+rotation W4A4", "atom+rotation W4A4-KV4"]


@pytest.mark.parametrize("preset", ["quarot", "atom+rotation"])
def test_rotated_presets_on_both_backends(preset):
    model, tok = atom_lab.tiny_model("llama", tie_word_embeddings=True)
    model = model.to(DEV)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3)).to(DEV)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.float()
    config = AtomConfig.preset(preset, gptq=False)
    q = quantize_model(copy.deepcopy(model), config, tokenizer=tok, **CHEAP)
    downs = [b.mlp.down_proj for b in q.model.layers]
    assert all(isinstance(d, QuantLinear) and online_rotation(d) is not None for d in downs)
    with torch.no_grad():
        out_ref = q(ids, use_cache=False).logits.float()
        assert 0 < kl_divergence(ref[0], out_ref[0]).item() < 0.1
        set_backend(q, "triton")
        assert all("mlp" in f for f in q.atom_fusions.values())
        out_tri = q(ids, use_cache=False).logits.float()
    # same integers up to rare summation-order flips (test_rotate_kernel_equals_reference) and GEMM order: the two
    # backends are far closer to each other than either is to the float model
    assert kl_divergence(out_ref[0], out_tri[0]).item() < 0.1 * kl_divergence(ref[0], out_ref[0]).item()
