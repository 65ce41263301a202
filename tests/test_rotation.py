"""Rotations (atom_lab.rotation): Hadamard constructions, orthogonality, norm folding, a rotated model's float
outputs, the online-rotation kernel against its reference, and the rotated presets on both backends."""
import copy

import pytest
import torch

import atom_lab
from atom_lab import AtomConfig, QuantLinear, kl_divergence, quantize_model, set_backend
from atom_lab.config import rotation_configs
from atom_lab.kernels import silu_mul_ref, silu_mul_rotate_quantize, silu_mul_rotate_quantize_ref, unpack_int4
from atom_lab.kernels.act_quant import silu_mul_quantize
from atom_lab.kernels.act_quant_rotate import kron_dense, silu_mul_hadamard_quantize, silu_mul_hadamard_quantize_ref
from atom_lab.rotation import (KronRotation, dense_rotation, fold_rmsnorm, hadamard, hadamard_order_ok, kron_order,
                               kron_rotation, online_rotation, random_orthogonal, random_signs, rotate_model,
                               rotation_matrix)

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
    assert len({id(online_rotation(b.mlp.down_proj)) for b in rot.model.layers}) == 1
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
    # the bound is computed on the CPU in float64 (on a GPU the kernel's inputs and index live on the device)
    v = silu_mul_ref(gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])).double().cpu()
    R, idx = dense_rotation(rotation).cpu(), index.long().cpu()
    K = v.shape[1]
    y, err = (v @ R)[:, idx], ((v.abs() @ R.abs()) * (2 * K * 2.0 ** -24))[:, idx]
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


# --- the structured (Kronecker) rotation and its fast kernel --------------------------------------------------------
def test_kron_orders():
    assert [kron_order(n) for n in (128, 256, 1536, 4096, 11008, 576, 640, 1000)] == [1, 2, 12, 32, None, None, None,
                                                                                     None]


@pytest.mark.parametrize("n,kind", [(256, "hadamard"), (1536, "hadamard"), (640, "random"), (1024, "random")])
def test_kron_rotation_is_orthogonal_and_equals_its_dense_matrix(n, kind):
    r = kron_rotation(n, kind, seed=5)
    R = r.dense()
    # the factors are stored in float32 (what the kernel reads), so R is orthogonal to float32 rounding
    assert (R @ R.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-6
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert (r.apply(x) - x @ R).abs().max() < 1e-12 * x.abs().max() * n
    assert torch.equal(R, kron_dense(r.signs, r.kron))  # the kernels' reference builds the same matrix
    if kind == "hadamard":  # randomised Hadamard: diag(signs) @ kron(H_m, H_128) / sqrt(n), entries +-1/sqrt(n)
        H = torch.round(R * n ** 0.5)
        assert (R * n ** 0.5 - H).abs().max() < 1e-6 and torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
        assert torch.equal(H, r.signs.double()[:, None] * torch.kron(hadamard(n // 128), hadamard(128)))
    assert not torch.equal(kron_rotation(n, kind, seed=6).dense(), R)  # seeded


def test_kron_rotation_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 128"):
        kron_rotation(576)
    with pytest.raises(ValueError, match="no Hadamard matrix of order 86"):
        kron_rotation(11008)  # 86 is not a multiple of 4: no Hadamard matrix of that order exists at all
    with pytest.raises(ValueError, match="kind="):
        kron_rotation(256, "dct")
    with pytest.raises(ValueError, match="rotates 2 x 128"):
        KronRotation(torch.ones(128), torch.eye(2))


@pytest.mark.parametrize("M,K,G,keeper,kind", [(1, 256, 64, 0, "hadamard"), (6, 1536, 64, 0, "hadamard"),
                                               (7, 1536, 64, 128, "hadamard"), (3, 1536, 128, 0, "hadamard"),
                                               (4, 512, 32, 0, "random"), (5, 384, 64, 128, "random")])
def test_hadamard_kernel_equals_reference(M, K, G, keeper, kind):
    g = torch.Generator().manual_seed(M * K)
    gate = (torch.randn(M, K, generator=g) * 3).to(DEV)
    up = torch.randn(M, K, generator=g).to(DEV)
    up[:, 7] *= 200.0  # an outlier channel, which the rotation spreads over all channels
    r = kron_rotation(K, kind, seed=1).to(DEV)
    index = (torch.randperm(K, generator=g) if keeper else torch.arange(K)).to(DEV)  # keeper 0: the fused path
    p = silu_mul_hadamard_quantize(gate, up, r.signs, r.kron, index, G, keeper, 0.9)
    ref = silu_mul_hadamard_quantize_ref(gate, up, r.signs, r.kron, index, G, keeper, 0.9)
    flips = _check_within_rounding(p, gate, up, r, index, G, keeper, 0.9)
    assert flips <= max(2, M * K // 1000)
    assert (p.q4 != ref.q4).float().mean() < 0.01 and (p.s4 != ref.s4).float().mean() < 0.01
    # the same rotation as a dense matrix through the dense kernel: the same codes up to the same rare flips
    dense = silu_mul_rotate_quantize(gate, up, r.dense(torch.float32).to(DEV), index, G, keeper, 0.9)
    assert (p.q4 != dense.q4).float().mean() < 0.01
    # and silu_mul_rotate_quantize dispatches a KronRotation to the fast kernel
    via = silu_mul_rotate_quantize(gate, up, r, index, G, keeper, 0.9)
    assert torch.equal(via.q4, p.q4) and torch.equal(via.s4, p.s4)


def test_hadamard_kernel_catches_wrong_signs_and_an_unrotated_input():
    K = 512
    gate, up = torch.randn(4, K).to(DEV), torch.randn(4, K).to(DEV)
    r = kron_rotation(K, "hadamard", seed=1).to(DEV)
    index = torch.arange(K).to(DEV)
    p = silu_mul_hadamard_quantize(gate, up, r.signs, r.kron, index, 64, 0)
    with pytest.raises(AssertionError):
        _check_within_rounding(p, gate, up, kron_rotation(K, "hadamard", seed=2), index, 64, 0, 1.0)
    plain = silu_mul_quantize(gate, up, index, 64, 0)
    assert (plain.q4 != p.q4).float().mean() > 0.5


def test_hadamard_kernel_bad_inputs():
    gate, up = torch.randn(2, 576).to(DEV), torch.randn(2, 576).to(DEV)
    r = kron_rotation(512, seed=0).to(DEV)
    with pytest.raises(ValueError, match="not a multiple of 128"):
        silu_mul_hadamard_quantize(gate, up, torch.ones(576).to(DEV), torch.eye(4).to(DEV), torch.arange(576).to(DEV),
                                   64, 0)
    gate, up, index = torch.randn(2, 512).to(DEV), torch.randn(2, 512).to(DEV), torch.arange(512).to(DEV)
    with pytest.raises(ValueError, match=r"kron must be \[m, m\] = \[4, 4\]"):
        silu_mul_hadamard_quantize(gate, up, r.signs, torch.eye(3).to(DEV), index, 64, 0)
    with pytest.raises(ValueError, match="signs must have K=512"):
        silu_mul_hadamard_quantize(gate, up, r.signs[:256], r.kron, index, 64, 0)
    with pytest.raises(TypeError, match="KronRotation"):
        silu_mul_rotate_quantize(gate, up, object(), index, 64, 0)


def test_rotate_model_uses_the_structured_rotation_where_it_exists():
    # MLP 512 = 4 x 128: structured; the default tiny MLP 640 = 5 x 128 has no Hadamard factor of order 5: dense
    for inter, structured in ((512, True), (640, False)):
        model, _ = atom_lab.tiny_model("llama", intermediate_size=inter)
        ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0)).to(DEV)
        with torch.no_grad():
            ref = model(ids).logits
            rot = rotate_model(copy.deepcopy(model), "hadamard", seed=1)
            out = rot(ids).logits
        assert isinstance(online_rotation(rot.model.layers[0].mlp.down_proj), KronRotation) == structured
        assert rot.atom_rotation["down_structured"] == structured
        assert (out - ref).abs().max() < 1e-4 * ref.abs().max()


# --- presets, recipe and backends ------------------------------------------------------------------------------------
def test_rotation_presets_and_rows():
    q, b = AtomConfig.preset("quarot"), AtomConfig.preset("atom+rotation")
    assert (q.rotation, q.keeper, q.sort_metric, q.gptq, q.kv_bits, q.group_size) == ("hadamard", 0, None, True, 4, 64)
    assert b == AtomConfig.preset("atom", rotation="hadamard", name="atom+rotation")
    names = [c.name for c in rotation_configs()]
    assert names == ["quarot W4A4", "quarot W4A4-KV4", "atom+rotation W4A4", "atom+rotation W4A4-KV4", "atom-g32 W4A4"]
    assert rotation_configs()[-1] == AtomConfig.preset("atom", group_size=32, kv_bits=16, name="atom-g32 W4A4")


@pytest.mark.parametrize("preset", ["quarot", "atom+rotation"])
@pytest.mark.parametrize("inter", [640, 512])  # dense online rotation (5 x 128) / structured (4 x 128)
def test_rotated_presets_on_both_backends(preset, inter):
    model, tok = atom_lab.tiny_model("llama", tie_word_embeddings=True, intermediate_size=inter)
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


# --- save / load ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inter", [512, 640])  # structured / dense online rotation
def test_save_load_keeps_the_online_rotation(tmp_path, inter):
    import json

    from atom_lab.serialize import META_FILE, load_quantized, save_quantized
    model, tok = atom_lab.tiny_model("llama", intermediate_size=inter, tie_word_embeddings=True)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(4)).to(DEV)
    q = quantize_model(copy.deepcopy(model), AtomConfig.preset("quarot", gptq=False), tokenizer=tok, **CHEAP)
    save_quantized(q, tmp_path)
    back, _ = load_quantized(tmp_path, device=DEV, backend="reference")
    assert all(online_rotation(b.mlp.down_proj) is not None for b in back.model.layers)
    assert len({id(online_rotation(b.mlp.down_proj)) for b in back.model.layers}) == 1  # shared, as before saving
    r0, r1 = online_rotation(q.model.layers[0].mlp.down_proj), online_rotation(back.model.layers[0].mlp.down_proj)
    assert isinstance(r1, KronRotation) == (inter == 512) and torch.equal(dense_rotation(r0), dense_rotation(r1))
    assert back.atom_rotation == q.atom_rotation
    with torch.no_grad():
        assert torch.equal(q(ids, use_cache=False).logits, back(ids, use_cache=False).logits)
    # a file without its online rotation (as older versions wrote) is refused instead of loading a wrong model
    meta = json.loads((tmp_path / META_FILE).read_text())
    del meta["online_rotations"]
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no online rotation"):
        load_quantized(tmp_path, device=DEV)


def test_rotation_analysis_on_a_tiny_model():
    from atom_lab.rotation_analysis import compare
    model, tok = atom_lab.tiny_model("llama", intermediate_size=512)
    rows = compare(model, tok, TEXTS, blocks=[1], linears=("self_attn.q_proj", "mlp.down_proj"), n_tokens=256)
    assert [r["layer"] for r in rows] == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    for r in rows:
        assert all(0 < e < 1 for k in ("a4", "w4 gptq", "w4a4", "w4a4 k128") for e in r[k])
    q = rows[0]  # the tiny model's norms carry outlier channels (x20): the rotation spreads them
    assert q["max_over_median"][1] < q["max_over_median"][0] and q["a4"][1] < q["a4"][0]


@pytest.mark.parametrize("inter", [512, 640])
def test_calibration_sees_the_rotated_inputs(inter):
    # Statistics, keeper choice and GPTQ Hessians all come from forward pre-hooks registered AFTER rotate_model's
    # OnlineRotation hook, so they must see rotated inputs: down_proj's input is the unrotated one times R, and the
    # residual readers' input is the normed stream times Q (with the RMSNorm weight folded out of it).
    from atom_lab.recipe import layer_inputs
    from atom_lab.stats import collect_stats
    model, tok = atom_lab.tiny_model("llama", dtype=torch.float64, intermediate_size=inter)
    rot = rotate_model(copy.deepcopy(model), "hadamard", seed=2)
    names = ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    x0, x1 = (layer_inputs(m, tok, TEXTS, names, n_tokens=128, seq_len=64) for m in (model, rot))
    R = dense_rotation(online_rotation(rot.model.layers[1].mlp.down_proj))
    Q = rotation_matrix(256, "hadamard", seed=2)
    d, q = names
    assert (x1[d].double() - x0[d].double() @ R).abs().max() < 1e-4 * x0[d].abs().max()
    gamma = model.model.layers[1].input_layernorm.weight.double()
    assert (x1[q].double() @ Q.T * gamma - x0[q].double()).abs().max() < 1e-4 * x0[q].abs().max()
    st = collect_stats(rot, tok, TEXTS, n_tokens=128, seq_len=64, progress=False)[d]
    assert torch.allclose(st.mean_sq.double(), x1[d].double().square().mean(0), rtol=1e-4, atol=1e-9)


# --- issue 15's W4A4 layers: the atom preset with groups of 32 -------------------------------------------------------
def test_atom_g32_preset_on_both_backends():
    """atom-g32 (chosen on calibration windows, benchmarks/ablation_w4a4_select.py) is a packed preset: every block of
    a tiny llama on the kernels agrees with the reference backend teacher-forced (tests/agreement.py: each code
    difference a counted one-step boundary crossing), and the two backends' logits are far closer to each other than
    either is to the float model."""
    from agreement import check_block, flip_bound

    model, tok = atom_lab.tiny_model("llama")
    model = model.to(DEV)
    q = quantize_model(copy.deepcopy(model), AtomConfig.preset("atom-g32", gptq=False), tokenizer=tok, **CHEAP)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.is_packed and m.packed.group_size == 32 and m.keeper == 128 for m in layers)
    assert all(m.out_bits == 16 for m in layers)  # the KV format belongs to the cache (KIVI keys in the recipe)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3)).to(DEV)
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: inputs.append((a[0] if a else kw["hidden_states"], kw)),
                                         with_kwargs=True) for b in q.model.layers]
    with torch.no_grad():
        try:
            out_ref = q(ids, use_cache=False).logits.float()
        finally:
            for h in hooks:
                h.remove()
        ref = model(ids, use_cache=False).logits.float()
        tri = set_backend(copy.deepcopy(q), "triton")
        totals = {}
        for rb, tb, (x, kw) in zip(q.model.layers, tri.model.layers, inputs):
            totals = {k: totals.get(k, 0) + v for k, v in check_block(rb, tb, x, kw).items()}
        assert totals["flips"] <= flip_bound(totals["expected"]), totals
        out_tri = tri(ids, use_cache=False).logits.float()
    rel = ((out_tri - out_ref).norm() / out_ref.norm()).item()
    assert ((ref - out_ref).norm() / out_ref.norm()).item() > 3 * rel, rel
