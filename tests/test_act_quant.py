"""Fused activation quantizers (plain / RMSNorm / SiLU(gate)*up, + reorder + INT4/INT8 pack) equal their references.

The same file runs under the Triton interpreter on a CPU and compiled on a GPU. reorder_quantize must equal its
reference bit for bit. So must the RMSNorm and SiLU kernels, with one allowance: an integer may differ by 1 where
the reference's value / scale lies within TIE_EPS of a rounding tie (a different summation order or exp could move
such a value across the tie); such positions must be rare and every scale must still be equal.
"""
import random
import zlib

import pytest
import torch

import atom_lab
from atom_lab.kernels import (
    PackedAtom, reorder_quantize, reorder_quantize_naive, reorder_quantize_ref, rmsnorm_quantize,
    rmsnorm_quantize_ref, rmsnorm_ref, silu_mul_quantize, silu_mul_quantize_ref, silu_mul_ref,
)
from atom_lab.kernels import act_quant as qmod
from atom_lab.kernels.pack import pack_int4_ref, unpack_int4_ref

DEV = atom_lab.default_device()
TIE_EPS = 1e-4
K_CHOICES = (256, 320, 576, 704, 1088, 1536, 4096, 11008)  # SmolLM2 576/1536, Llama-2-7B 4096/11008


@pytest.fixture(autouse=True)
def _fixed_config(monkeypatch):
    # On a GPU every new shape would time 3 configs; results do not depend on num_warps (test_autotuned_path).
    monkeypatch.setattr(qmod, "AUTOTUNE", False)


def assert_packed_equal(p: PackedAtom, r: PackedAtom, y: torch.Tensor | None = None) -> None:
    """p (kernel) == r (reference). With y (the reference's float32 values, reordered, [M, K]), a q may differ by 1
    where y / scale is within TIE_EPS of a tie, at no more than 0.1% of the positions (and at least 2)."""
    p = p.to("cpu")
    for name in ("q4", "s4", "q8", "s8"):
        a, b = getattr(p, name), getattr(r, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
    assert p.group_size == r.group_size
    assert torch.equal(p.s4, r.s4), "INT4 scales differ"
    assert torch.equal(p.s8, r.s8), "INT8 scales differ"
    qp = torch.cat([unpack_int4_ref(p.q4), p.q8], dim=1).int()
    qr = torch.cat([unpack_int4_ref(r.q4), r.q8], dim=1).int()
    diff = qp != qr
    if not diff.any():
        return
    assert y is not None, f"{int(diff.sum())} integers differ from the reference"
    scale = torch.cat([r.s4.float().repeat_interleave(r.group_size, dim=1), r.s8.float().expand(-1, r.keeper)], 1)
    v = y.float() / scale
    near_tie = ((v.abs() % 1.0) - 0.5).abs() < TIE_EPS
    assert (qp - qr).abs().max() <= 1, "an integer differs by more than 1"
    assert near_tie[diff].all(), "an integer differs away from a rounding tie"
    assert diff.sum() <= max(2, 1e-3 * diff.numel()), f"too many tie flips: {int(diff.sum())}"


def _shape(rng: random.Random, G: int, keeper: int) -> tuple[int, int]:
    ks = [K for K in K_CHOICES if K > keeper and (K - keeper) % G == 0 and (K - keeper) % 64 == 0]
    K = rng.choice(ks)
    if K >= 4096:  # keep the interpreter affordable
        return rng.choice([1, 3, 16]), K
    return rng.choice([1, 2, 3, rng.randint(4, 64), rng.randint(65, 300)]), K


def _activation(gen: torch.Generator, M: int, K: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian rows with a few strong outlier channels, and Atom's index (outliers last) or a random one."""
    x = torch.randn(M, K, generator=gen)
    hot = torch.randperm(K, generator=gen)[: max(1, K // 64)]
    x[:, hot] *= 30.0
    if torch.rand(1, generator=gen).item() < 0.5:
        index = torch.argsort(x.abs().amax(dim=0))
    else:
        index = torch.randperm(K, generator=gen)
    return x.to(dtype), index


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())  # reproducible across runs (str hashes are salted)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keeper", [0, 64, 128])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("mode", ["plain", "rmsnorm", "silu_mul"])
def test_kernel_equals_reference(mode, G, keeper, dtype):
    seed = _seed(mode, G, keeper, dtype)  # stable within a run; different for every combination
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    M, K = _shape(rng, G, keeper)
    x, index = _activation(gen, M, K, dtype)
    index = index.to(rng.choice([torch.int32, torch.int64]))
    clip = rng.choice([1.0, 0.9])
    idx_dev = index.to(DEV)
    if mode == "plain":
        p = reorder_quantize(x.to(DEV), idx_dev, G, keeper, clip)
        r, y = reorder_quantize_ref(x, index, G, keeper, clip), None  # no allowance: exact
    elif mode == "rmsnorm":
        w = (1.0 + 0.5 * torch.randn(K, generator=gen)).to(dtype)
        eps = rng.choice([1e-5, 1e-6])
        p = rmsnorm_quantize(x.to(DEV), w.to(DEV), eps, idx_dev, G, keeper, clip)
        r = rmsnorm_quantize_ref(x, w, eps, index, G, keeper, clip)
        y = rmsnorm_ref(x, w, eps)[:, index.long()]
    else:
        up = torch.randn(M, K, generator=gen).to(dtype)
        p = silu_mul_quantize(x.to(DEV), up.to(DEV), idx_dev, G, keeper, clip)
        r = silu_mul_quantize_ref(x, up, index, G, keeper, clip)
        y = silu_mul_ref(x, up)[:, index.long()]
    assert_packed_equal(p, r, y)


def test_large_rows_many_tokens():
    """Llama-2-7B widths at tens of tokens, fp16: rows walked in several chunks with a ragged last one."""
    gen = torch.Generator().manual_seed(7)
    for K, M in ((4096, 96), (11008, 40)):
        x, index = _activation(gen, M, K, torch.float16)
        up = torch.randn(M, K, generator=gen).half()
        w = torch.rand(K, generator=gen).half() + 0.5
        p = silu_mul_quantize(x.to(DEV), up.to(DEV), index.to(DEV), 128, 128)
        assert_packed_equal(p, silu_mul_quantize_ref(x, up, index, 128, 128), silu_mul_ref(x, up)[:, index])
        p = rmsnorm_quantize(x.to(DEV), w.to(DEV), 1e-5, index.to(DEV), 64, 128, 0.9)
        assert_packed_equal(p, rmsnorm_quantize_ref(x, w, 1e-5, index, 64, 128, 0.9),
                            rmsnorm_ref(x, w, 1e-5)[:, index])


def test_autotuned_path(monkeypatch):
    """On a GPU the library times num_warps 4/8/16 per shape; the chosen config must give the same bits."""
    monkeypatch.setattr(qmod, "AUTOTUNE", True)
    gen = torch.Generator().manual_seed(3)
    x, index = _activation(gen, 17, 4096, torch.bfloat16)
    w = torch.rand(4096, generator=gen).bfloat16() + 0.5
    p = rmsnorm_quantize(x.to(DEV), w.to(DEV), 1e-5, index.to(DEV), 128, 128)
    assert_packed_equal(p, rmsnorm_quantize_ref(x, w, 1e-5, index, 128, 128), rmsnorm_ref(x, w, 1e-5)[:, index])


@pytest.mark.parametrize("G,keeper", [(32, 0), (64, 128), (128, 64)])
def test_naive_version_equals_reference(G, keeper):
    gen = torch.Generator().manual_seed(G + keeper)
    x, index = _activation(gen, 3, 576, torch.float32)
    p = reorder_quantize_naive(x.to(DEV), index.to(DEV), G, keeper, 0.9)
    assert_packed_equal(p, reorder_quantize_ref(x, index, G, keeper, 0.9))


def test_batched_and_strided_inputs():
    """[..., K] inputs are flattened to rows; row-strided views (gate/up halves of one projection) are read in
    place; a transposed x (last dimension strided) is copied first."""
    gen = torch.Generator().manual_seed(11)
    K = 576
    index = torch.randperm(K, generator=gen)
    x = torch.randn(2, 5, K, generator=gen)
    p = reorder_quantize(x.to(DEV), index.to(DEV), 64, 64)
    assert p.rows == 10
    assert_packed_equal(p, reorder_quantize_ref(x.reshape(10, K), index, 64, 64))
    gate_up = torch.randn(7, 2 * K, generator=gen)
    gu = gate_up.to(DEV)
    p = silu_mul_quantize(gu[:, :K], gu[:, K:], index.to(DEV), 64, 64)
    g, u = gate_up[:, :K].contiguous(), gate_up[:, K:].contiguous()
    assert_packed_equal(p, silu_mul_quantize_ref(g, u, index, 64, 64), silu_mul_ref(g, u)[:, index])
    xt = torch.randn(K, 9, generator=gen).t()
    assert xt.stride(1) != 1
    p = reorder_quantize(xt.to(DEV), index.to(DEV), 32, 0)
    assert_packed_equal(p, reorder_quantize_ref(xt.contiguous(), index, 32, 0))


@pytest.mark.parametrize("mode", ["plain", "rmsnorm", "silu_mul"])
def test_identity_index_reads_channels_in_place(mode):
    """An identity index (channels permuted offline, e.g. the MLP's intermediate channels) takes the kernel's
    no-gather path; the result must be the same as for any other permutation. Also the norm weight's reordered
    copy is made again when the weight is modified in place."""
    gen = torch.Generator().manual_seed(_seed("identity", mode))
    for K, keeper, G, M in ((576, 64, 64, 5), (1536, 128, 128, 33), (704, 0, 32, 2)):
        x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
        index = torch.arange(K)
        if mode == "plain":
            assert_packed_equal(reorder_quantize(x.to(DEV), index.to(DEV), G, keeper),
                                reorder_quantize_ref(x, index, G, keeper))
        elif mode == "rmsnorm":
            w = torch.rand(K, generator=gen) + 0.5
            wd, idx = w.to(DEV), torch.randperm(K, generator=gen).to(DEV)
            for _ in range(2):  # the second pass after an in-place change of the weight
                for i in (index.to(DEV), idx):
                    assert_packed_equal(rmsnorm_quantize(x.to(DEV), wd, 1e-5, i, G, keeper),
                                        rmsnorm_quantize_ref(x, wd.cpu(), 1e-5, i.cpu(), G, keeper),
                                        rmsnorm_ref(x, wd.cpu(), 1e-5)[:, i.cpu()])
                wd.mul_(1.5)
        else:
            up = torch.randn(M, K, generator=gen).to(torch.bfloat16)
            assert_packed_equal(silu_mul_quantize(x.to(DEV), up.to(DEV), index.to(DEV), G, keeper),
                                silu_mul_quantize_ref(x, up, index, G, keeper), silu_mul_ref(x, up))


# --------------------------------------------------------------------------------------------- by hand (integers)
def _scatter(reordered: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The input whose reordering by `index` is `reordered`: x[:, index] == reordered."""
    x = torch.empty_like(reordered)
    x[:, index] = reordered
    return x


def _hand_row() -> torch.Tensor:
    """One reordered row: 64 INT4 channels (groups of 32) + 64 keeper channels."""
    r = torch.zeros(1, 128)
    r[0, :8] = torch.tensor([7.0, -7.0, 0.5, 1.5, 2.5, -2.5, 3.25, -0.75])  # group 0: max 7 -> scale 1
    # group 1 (channels 32..63) stays zero: scale = 2^-14, the floor
    r[0, 64:68] = torch.tensor([254.0, -127.0, 1.0, 3.0])                   # keeper: max 254 -> scale 2
    return r


def test_reorder_quantize_by_hand():
    gen = torch.Generator().manual_seed(0)
    index = torch.randperm(128, generator=gen)
    x = _scatter(_hand_row(), index)
    p = reorder_quantize(x.to(DEV), index.to(DEV), 32, 64).to("cpu")
    assert p.s4.tolist() == [[1.0, 2.0 ** -14]] and p.s8.tolist() == [[2.0]]
    q = torch.zeros(1, 64, dtype=torch.int8)
    q[0, :8] = torch.tensor([7, -7, 0, 2, 2, -2, 3, -1])     # half-to-even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    assert torch.equal(p.q4, pack_int4_ref(q))
    assert p.q4[0, 0].item() == 7 and p.q4[0, 1].item() == 0x9  # byte j = q[j] | q[j+32] << 4; -7 -> 0x9
    assert p.q8[0, :5].tolist() == [127, -64, 0, 2, 0]       # -63.5 -> -64, 0.5 -> 0, 1.5 -> 2 (even)
    # clip 0.5 halves the INT4 scale (values saturate at -8 and 7); the keeper part is never clipped
    p = reorder_quantize(x.to(DEV), index.to(DEV), 32, 64, clip=0.5).to("cpu")
    assert p.s4[0, 0].item() == 0.5 and p.s8.item() == 2.0
    assert unpack_int4_ref(p.q4)[0, :8].tolist() == [7, -8, 1, 3, 5, -5, 6, -2]  # 6.5 -> 6, -1.5 -> -2


def test_rmsnorm_quantize_by_hand():
    """x = +-1 everywhere, so mean(x^2) = 1 and rstd = float32(1/sqrt(1 + 2^-20)) = 1 - 2^-21 exactly; with
    integer weights whose group max is 7 (127 for the keepers), every scale rounds to 1 and q = sign * weight."""
    gen = torch.Generator().manual_seed(1)
    K, keeper = 192, 64
    w = torch.randint(-7, 8, (K,), generator=gen).float()
    w[torch.arange(0, K - keeper, 64)] = 7.0
    w[K - keeper:] = torch.randint(-127, 128, (keeper,), generator=gen).float()
    w[K - 1] = -127.0
    x = torch.where(torch.rand(3, K, generator=gen) < 0.5, -1.0, 1.0)
    index = torch.arange(K)
    assert rmsnorm_ref(x, w, 2.0 ** -20)[0, 0].item() == x[0, 0].item() * w[0].item() * (1 - 2.0 ** -21)
    p = rmsnorm_quantize(x.to(DEV), w.to(DEV), 2.0 ** -20, index.to(DEV), 64, keeper).to("cpu")
    assert p.s4.eq(1.0).all() and p.s8.eq(1.0).all()
    q = (x * w).to(torch.int8)
    assert torch.equal(p.q4, pack_int4_ref(q[:, : K - keeper])) and torch.equal(p.q8, q[:, K - keeper:])


def test_silu_mul_quantize_by_hand():
    """silu(20) rounds to 20.0 in float32 and silu(-20) ~ -4e-8, so with integer `up` (group max 7, keepers 127)
    the scale is 20 and q = up where gate = 20, 0 where gate = -20."""
    gen = torch.Generator().manual_seed(2)
    K, keeper = 192, 64
    up = torch.randint(-7, 8, (4, K), generator=gen).float()
    up[:, K - keeper:] = torch.randint(-127, 128, (4, keeper), generator=gen).float()
    gate = torch.where(torch.rand(4, K, generator=gen) < 0.5, -20.0, 20.0)
    gate[:, torch.arange(0, K, 64)] = 20.0
    up[:, torch.arange(0, K - keeper, 64)] = 7.0
    up[:, K - keeper] = 127.0
    index = torch.arange(K).flip(0)                        # a reversal: undo it on the expected side
    p = silu_mul_quantize(_scatter(gate, index).to(DEV), _scatter(up, index).to(DEV), index.to(DEV), 64, keeper)
    p = p.to("cpu")
    assert p.s4.eq(20.0).all() and p.s8.eq(20.0).all()
    q = torch.where(gate > 0, up, 0.0).to(torch.int8)
    assert torch.equal(p.q4, pack_int4_ref(q[:, : K - keeper])) and torch.equal(p.q8, q[:, K - keeper:])


def test_comparison_catches_real_differences():
    """The tie allowance must not hide bugs: a q off by one away from a tie, or one changed scale, fails."""
    gen = torch.Generator().manual_seed(5)
    x, index = _activation(gen, 4, 576, torch.float32)
    r = reorder_quantize_ref(x, index, 64, 64)
    y = x[:, index]
    assert_packed_equal(r, r, y)
    v = y[:, :512] / r.s4.float().repeat_interleave(64, dim=1)
    far = (((v.abs() % 1.0) - 0.5).abs() > 0.1).nonzero()[0]    # a position far from any tie
    q = unpack_int4_ref(r.q4)
    q[far[0], far[1]] = q[far[0], far[1]] + (1 if q[far[0], far[1]] < 7 else -1)
    bad = PackedAtom(pack_int4_ref(q), r.s4, r.q8, r.s8, 64)
    with pytest.raises(AssertionError, match="away from a rounding tie"):
        assert_packed_equal(bad, r, y)
    s4 = r.s4.clone()
    s4[0, 0] = s4[0, 0] * 2
    with pytest.raises(AssertionError, match="scales differ"):
        assert_packed_equal(PackedAtom(r.q4, s4, r.q8, r.s8, 64), r, y)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's cast of x * 1e6
def test_bad_inputs_raise_clear_errors():
    K = 576
    x = torch.randn(4, K).to(DEV)
    idx = torch.randperm(K).to(DEV)
    w = torch.ones(K).to(DEV)
    with pytest.raises(TypeError, match="x must have dtype"):
        reorder_quantize(x.to(torch.int32), idx, 64, 64)
    with pytest.raises(ValueError, match="non-empty"):
        reorder_quantize(x[:0], idx, 64, 64)
    with pytest.raises(TypeError, match="index must have dtype"):
        reorder_quantize(x, idx.float(), 64, 64)
    with pytest.raises(ValueError, match="index has 575 entries"):
        reorder_quantize(x, idx[:-1], 64, 64)
    dup = idx.clone()
    dup[0] = dup[1]
    with pytest.raises(ValueError, match="permutation"):
        reorder_quantize(x, dup, 64, 64)
    with pytest.raises(ValueError, match="permutation"):
        reorder_quantize(x, torch.arange(1, K + 1).to(DEV), 64, 64)
    with pytest.raises(ValueError, match="group_size=48"):
        reorder_quantize(x, idx, 48, 64)
    with pytest.raises(ValueError, match="multiple of group_size=128"):
        reorder_quantize(x, idx, 128, 128)
    with pytest.raises(ValueError, match="clip"):
        reorder_quantize(x, idx, 64, 64, clip=0.0)
    with pytest.raises(ValueError, match="clip"):
        reorder_quantize(x, idx, 64, 64, clip=1.5)
    nan = x.clone()
    nan[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        reorder_quantize(nan, idx, 64, 64, check_finite=True)
    with pytest.raises(ValueError, match="NaN or inf"):
        reorder_quantize_ref(nan.cpu(), idx.cpu(), 64, 64)
    with pytest.raises(ValueError, match="weight has 575"):
        rmsnorm_quantize(x, w[:-1], 1e-5, idx, 64, 64)
    with pytest.raises(ValueError, match="weight contains NaN"):
        rmsnorm_quantize(x, w * float("inf"), 1e-5, idx, 64, 64, check_finite=True)
    with pytest.raises(ValueError, match="eps must be a positive"):
        rmsnorm_quantize(x, w, 0.0, idx, 64, 64)
    with pytest.raises(ValueError, match="same shape"):
        silu_mul_quantize(x, x[:3], idx, 64, 64)
    with pytest.raises(ValueError, match="overflows float16"):
        reorder_quantize(x * 1e6, idx, 64, 64, check_finite=True)
    with pytest.raises(ValueError, match="overflows float32"):
        silu_mul_quantize_ref((x * 1e20).cpu(), (x * 1e20).cpu(), idx.cpu(), 64, 64)


def test_index_is_rechecked_after_in_place_change():
    K = 256
    x = torch.randn(2, K).to(DEV)
    idx = torch.randperm(K).to(DEV)
    reorder_quantize(x, idx, 64, 0)           # validated once, then remembered
    reorder_quantize(x, idx, 64, 0)
    idx[0] = idx[1]                           # in place: its version changes, so it is checked again
    with pytest.raises(ValueError, match="permutation"):
        reorder_quantize(x, idx, 64, 0)
