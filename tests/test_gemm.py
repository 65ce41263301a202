"""W4A4 group GEMM: the Triton kernels equal the PyTorch reference, for random shapes, group sizes and keeper counts.

On a CPU the kernels run in Triton's interpreter (few, large tiles). On a GPU the same tests run compiled, plus the
GPU-only configurations (split-K in one launch, swapped operands for small M, FP8 through TMA) and an exactness
check of the FP8 tensor-core accumulation on worst-case integers.
"""
import random

import pytest
import torch

import atom_lab
from atom_lab.kernels import PackedAtom, pack_int4_ref, quantize_atom_ref, w4a4_gemm, w4a4_gemm_ref
from atom_lab.kernels.pack import unpack_int4_ref
from atom_lab.kernels import gemm as G
from atom_lab.kernels import gemm_blockwise, gemm_fp8, gemm_int4

DEV = atom_lab.default_device()
GPU = DEV.type == "cuda"
FP8_OK = not GPU or G.has_fp8_tensor_cores(DEV)
BLOCKWISE_OK = not GPU or gemm_blockwise.blockwise_supported(G.device_capability(DEV), gemm_blockwise.torch_version())
# "gluon" joins on a GPU that runs it (tests/test_gemm_gluon.py); under the interpreter it is the fused kernel itself.
METHODS = (["fused", "fused8"] + (["fp8"] if FP8_OK else []) + (["blockwise"] if BLOCKWISE_OK else [])
           + (["gluon"] if GPU and G.gluon_ok(DEV, 128) else []) + ["gemv"])


@pytest.fixture(autouse=True)
def _untuned(monkeypatch, request):
    """On a GPU, triton.autotune would compile and time every candidate for every random shape here: the property
    tests use each family's default configuration; test_gpu_autotuned_dispatch covers the tuned path."""
    if "autotuned" not in request.node.name:
        monkeypatch.setattr(G, "AUTOTUNE", False)


def packed_pair(M, N, K4, group, keeper, seed, outliers=True):
    """Random activations [M, K] and weights [N, K] (K = K4 + keeper), quantized to PackedAtom on DEV."""
    g = torch.Generator().manual_seed(seed)
    K = K4 + keeper
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.05
    if outliers and keeper:
        x[:, K4:] *= 20  # the keeper channels are the outliers in Atom's order
    return (quantize_atom_ref(x.to(DEV), group, keeper, clip=0.9), quantize_atom_ref(w.to(DEV), group, keeper))


def gemm_or_refused(a, w, out_dtype, method, **kw):
    """w4a4_gemm; None where cuBLASLt refuses the shape for method='blockwise' on a GPU (the refusal names the
    shape and the library's words; under method=None such shapes run 'fp8', test_dispatch_falls_back)."""
    try:
        return w4a4_gemm(a, w, out_dtype, method=method, **kw)
    except ValueError as e:
        if GPU and method == "blockwise" and "refused" in str(e):
            return None
        raise


def digit_bound(a, w):
    """sum|terms| of the "blockwise" method's keeper part: each int8 code q is split into 16 h + l with
    |16 h| <= |q| + 8 and |l| <= 8 (kernels/gemm_blockwise.py), so a keeper pair's four products sum to at most
    (|qa| + 16)(|qw| + 16) in magnitude, instead of |qa qw|."""
    ka, kw = a.q8.double().abs().cpu() + 16, w.q8.double().abs().cpu() + 16
    return ((ka @ kw.T) * (a.s8.double().abs().cpu() * w.s8.double().abs().cpu().T)).float()


def assert_matches(out, a, w, residual=None, rel=1e-5, method=None):
    """|out - ref| <= rel * sum|terms| elementwise (fp32 summation-order rounding), plus fp16/bf16 output rounding.
    rel = 1e-5 = 168 ulp of fp32 relative to sum|terms|: the sum runs over <= 86 group terms here (K <= 11008),
    each rounded at most twice (scale product, accumulation)."""
    ref = w4a4_gemm_ref(a, w, torch.float32, residual).cpu()
    bound = w4a4_gemm_ref(a, w, torch.float32, residual, absolute=True).cpu()
    if method == "blockwise" and a.keeper:
        bound = bound + digit_bound(a, w)
    o = out.float().cpu()
    assert torch.isfinite(o).all(), "non-finite output (an element left unwritten?)"
    tol = rel * bound + 1e-30
    if out.dtype != torch.float32:
        tol = tol + ref.abs() * (2.0 ** -8 if out.dtype == torch.bfloat16 else 2.0 ** -11)
    err = (o - ref).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements off; worst |err| {err.max().item():.3e} "
                           f"where tol {tol.flatten()[err.argmax()].item():.3e}")


def test_by_hand_exact():
    """One token, one output channel, K = 64 INT4 + 2 INT8 channels, unit scales: integers we can add up."""
    qa = torch.arange(64, dtype=torch.int8) % 16 - 8          # -8..7 four times
    qw = torch.full((64,), 2, dtype=torch.int8)
    qw[::2] = -1                                              # -1, 2, -1, 2, ...
    one = torch.ones(1, 1, dtype=torch.float16)
    a = PackedAtom(pack_int4_ref(qa[None]), one.clone(), torch.tensor([[100, -3]], dtype=torch.int8), one * 0.5, 64)
    w = PackedAtom(pack_int4_ref(qw[None]), one * 2, torch.tensor([[2, 5]], dtype=torch.int8), one * 4, 64)
    want = 2 * int((qa.int() * qw.int()).sum()) + 0.5 * 4 * (100 * 2 - 3 * 5)
    for method in (m for m in METHODS if m != "blockwise"):  # G = 64 here; blockwise takes G = 128 only
        y = w4a4_gemm(a.to(DEV), w.to(DEV), torch.float32, method=method)
        assert y.shape == (1, 1) and y.item() == want, (method, y.item(), want)


CASES = []
_rng = random.Random(1234)
for _i in range(18):
    _group = (32, 64, 128)[_i % 3]
    _keeper = (0, 64, 128, 100)[_i % 4]
    _unit = max(64, _group)
    CASES.append(dict(M=[1, 2, 7, 16, 33, _rng.randint(64, 300)][_i % 6], N=_rng.randint(1, 300),
                      K4=_unit * _rng.randint(1, max(1, 768 // _unit)), group=_group, keeper=_keeper, seed=_i))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{M}-N{N}-K4_{K4}-G{group}-kp{keeper}".format(**c))
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference_random(case, method):
    if method == "blockwise" and case["group"] != 128:
        pytest.skip("the library's blocks are 128 wide")
    if method == "gluon" and case["group"] == 32:
        pytest.skip("the Gluon kernel takes groups of 64 or 128")
    if method == "gemv" and case["M"] > 16:
        pytest.skip("the CUDA-core kernel is for a few tokens (slow in the interpreter at more)")
    if method == "blockwise" and GPU and case["N"] % gemm_blockwise.N_ALIGN:
        pytest.skip("cuBLASLt needs N % 16 == 0 (w4a4_gemm's dispatch keeps 'fp8' there)")
    a, w = packed_pair(case["M"], case["N"], case["K4"], case["group"], case["keeper"], case["seed"])
    out = gemm_or_refused(a, w, torch.float32, method)
    if out is None:
        pytest.skip("cuBLASLt refused this shape")
    assert out.shape == (case["M"], case["N"]) and out.dtype == torch.float32
    assert_matches(out, a, w, method=method)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("res_dtype", [None, torch.float16, torch.bfloat16, torch.float32])
def test_output_dtypes_and_residual(out_dtype, res_dtype):
    for group in (64, 128):
        a, w = packed_pair(19, 80, 256, group, 64, seed=7)
        res = None if res_dtype is None else torch.randn(19, 80, device=DEV).to(res_dtype)
        for method in METHODS:
            if method == "blockwise" and group != 128:
                continue
            out = gemm_or_refused(a, w, out_dtype, method, residual=res)
            if out is None:
                continue
            assert out.dtype == out_dtype
            assert_matches(out, a, w, res, method=method)


def test_dispatch_default_and_rows_slices():
    """method=None picks a method; row-slices of packed tensors (row stride > width) work."""
    a, w = packed_pair(40, 50, 384, 128, 128, seed=3)
    assert_matches(w4a4_gemm(a, w, torch.float32), a, w)
    sub = PackedAtom(a.q4[5:9], a.s4[5:9], a.q8[5:9], a.s8[5:9], 128)
    assert_matches(w4a4_gemm(sub, w, torch.float32), sub, w)


def test_select_method_per_gpu():
    """The dispatch as a pure function of (M, compute capability, torch version): every branch on a CPU."""
    new, old = (2, 11), (2, 8)
    for M in (1, 16, 256, 8192):
        assert G.select_method(M, None, new) == "fused"            # CPU interpreter
        assert G.select_method(M, (7, 5), new) == "fused"          # T4: int8 tensor cores only
        assert G.select_method(M, (8, 0), new) == "fused"          # A100
        assert G.select_method(M, (8, 6), new) == "fused"          # A10 / RTX 30
    assert G.select_method(G.FP8_MIN_M - 1, (8, 9), new) == "fused"
    assert G.select_method(G.FP8_MIN_M, (8, 9), new) == "fp8"      # Ada: our FP8 kernel, no blockwise library
    assert G.select_method(1, (9, 0), new) == "fused"
    assert G.select_method(G.FUSED8_MIN_M - 1, (9, 0), new) == "fused"
    assert G.select_method(G.FUSED8_MIN_M, (9, 0), new) == "fused8"  # batch decode: activation codes
    assert G.select_method(G.FUSED8_MAX_M, (9, 0), new) == "fused8"
    assert G.select_method(G.FUSED8_MAX_M + 1, (9, 0), new) == "fp8"
    assert G.select_method(128, (9, 0), old) == "fused8"             # our kernel: no library needed
    assert G.select_method(128, (8, 9), new) == "fused"              # Ada: never measured with fused8
    assert G.select_method(G.BLOCKWISE_MIN_M - 1, (9, 0), new) == "fp8"
    assert G.select_method(G.BLOCKWISE_MIN_M, (9, 0), new) == "blockwise"
    assert G.select_method(8192, (9, 0), new) == "blockwise"
    assert G.select_method(8192, (9, 0), old) == "fp8"              # torch < 2.9: no blockwise scaled_mm
    assert G.select_method(8192, (9, 0), new, group_size=64) == "fp8"  # library blocks are 128 wide
    assert G.select_method(8192, (10, 0), new) == "fp8"             # Blackwell: the SM90 recipe does not apply
    assert G.select_method(64, (9, 0), new, fp8_weights=True) == "blockwise"  # weights kept as FP8
    assert G.select_method(G.STORED_MIN_M - 1, (9, 0), new, fp8_weights=True) == "fused"
    assert G.select_method(64, (8, 9), new, fp8_weights=True) == "fused"
    assert G.choose_method(8192, torch.device("cpu")) == "fused"


def test_blockwise_with_stored_fp8_weights():
    """w_fp8 = prepare_fp8(w, "w") kept by the caller gives the same result as preparing per call."""
    a, w = packed_pair(9, 48, 512, 128, 100, seed=11)
    pw = gemm_blockwise.prepare_fp8(w, "w")
    y = gemm_or_refused(a, w, torch.float32, "blockwise", w_fp8=pw)
    if y is None:
        pytest.skip("cuBLASLt refused this shape")
    assert torch.equal(y, w4a4_gemm(a, w, torch.float32, method="blockwise"))
    assert_matches(y, a, w, method="blockwise")
    with pytest.raises(ValueError, match="w_fp8"):
        w4a4_gemm(a, w, w_fp8=(pw[0][:5], pw[1]))


def test_keeper_digits_are_exact():
    """Every int8 code equals 16 h + l with h in [-8, 8] and l in [-8, 7], both exact in FP8 e4m3."""
    q = torch.arange(-128, 128, dtype=torch.int8, device=DEV)[None]
    one = torch.ones(1, 1, dtype=torch.float16, device=DEV)
    out = torch.empty(1, 4 * 256, dtype=torch.float8_e4m3fn, device=DEV)  # 256 keepers: four digit blocks of 256
    sT = torch.empty(8, 1, device=DEV)
    gemm_blockwise._keeper_blocks(q, one, "a", out, sT, 0, 0)     # activations: [h | h | l | l]
    out, sT, q = out.cpu(), sT.cpu(), q.cpu()
    h, l = out[0, :256].float(), out[0, 512:768].float()
    assert torch.equal(16 * h + l, q[0].float()) and h.abs().max() <= 8 and l.min() >= -8 and l.max() <= 7
    assert torch.equal(out[0, 256:512].float(), h) and torch.equal(out[0, 768:].float(), l)
    assert sT.flatten().tolist() == [16.0] * 4 + [1.0] * 4


def test_fp8_path_is_exact_on_extreme_integers():
    """All -8 (group dot 64 * 128 = 8192, the largest) and mixed signs, unit scales: results are exact integers."""
    for fill in ("extreme", "mixed"):
        K4, M, N = 512, 64, 128
        if fill == "extreme":
            qa = torch.full((M, K4), -8, dtype=torch.int8)
            qw = torch.full((N, K4), -8, dtype=torch.int8)
        else:
            g = torch.Generator().manual_seed(0)
            qa = torch.randint(-8, 8, (M, K4), dtype=torch.int8, generator=g)
            qw = torch.randint(-8, 8, (N, K4), dtype=torch.int8, generator=g)
        s = torch.ones(M, K4 // 128, dtype=torch.float16)
        kp = torch.full((M, 128), 127, dtype=torch.int8)
        a = PackedAtom(pack_int4_ref(qa), s, kp, torch.ones(M, 1, dtype=torch.float16), 128).to(DEV)
        w = PackedAtom(pack_int4_ref(qw), s[:1].expand(N, -1).contiguous(), kp[:1].expand(N, -1).contiguous(),
                       torch.ones(N, 1, dtype=torch.float16), 128).to(DEV)
        want = (qa.double() @ qw.double().T + 127 * 127 * 128).float()
        for method in METHODS:
            out = gemm_or_refused(a, w, torch.float32, method)
            assert out is None or torch.equal(out.cpu(), want), (fill, method, (out.cpu() - want).abs().max().item())
        if BLOCKWISE_OK:  # the same operands through the library (or its twin) straight from the prepared FP8
            pa, pw = gemm_blockwise.prepare_fp8(a, "a"), gemm_blockwise.prepare_fp8(w, "w")
            twin = gemm_blockwise.scaled_mm_emulated(*pa, *pw).cpu()
            assert torch.equal(twin, want), (fill, "twin")


@pytest.mark.skipif(not GPU, reason="GPU-only configurations (compiled tile shapes, split-K, TMA)")
@pytest.mark.parametrize("M", [1, 5, 16, 64, 300])
def test_gpu_configurations(M):
    """Every GPU configuration the dispatcher or the benchmarks use, on a ragged Llama-like shape."""
    N, K4, keeper = 1000, 3968, 128
    a, w = packed_pair(M, N, K4, 128, keeper, seed=M)
    res = torch.randn(M, N, device=DEV, dtype=torch.float16)
    for split in (1, 3, 8):
        for BX, BY in ((64, 16), (128, 16), (64, 64)):
            out = torch.full((M, N), float("nan"), device=DEV, dtype=torch.float16)
            gemm_int4._launch_fused(w, a, out, res, True, BX, BY, split, 4, 4)
            assert_matches(out, a, w, res)
    assert int(gemm_int4._tile_counters(DEV, 1).abs().sum()) == 0, "split-K counters must be left at zero"
    for BX, BY, nw in ((64, 64, 4), (128, 128, 8)):
        out = torch.full((M, N), float("nan"), device=DEV, dtype=torch.float16)
        gemm_int4._launch_fused(a, w, out, res, False, BX, BY, 1, nw, 3)
        assert_matches(out, a, w, res)
    if FP8_OK:
        for tma in (False, True):
            out = torch.full((M, N), float("nan"), device=DEV, dtype=torch.float16)
            gemm_fp8._launch_fp8(a, w, out, res, 128, 128, 8, 3, tma=tma)
            assert_matches(out, a, w, res)


def test_activation_codes_exact():
    """The "fused8" operand: INT8 codes in channel order and the scales transposed, bit for bit (one launch)."""
    for group, M, K4 in ((128, 5, 256), (32, 17, 192), (64, 1, 128)):
        a, _ = packed_pair(M, 3, K4, group, 64, seed=M)
        codes, s4 = gemm_int4.activation_codes(a)
        assert torch.equal(codes.cpu(), gemm_int4.codes_ref(a.to("cpu")))
        if group < 128:  # steps of 32 bytes: the codes are in channel order
            assert torch.equal(codes.cpu(), unpack_int4_ref(a.q4.cpu()))
        assert s4.shape == a.s4.shape and s4.stride() == (1, M) and torch.equal(s4.cpu(), a.s4.cpu())


def test_fused8_tiles_and_split():
    """"fused8" with token tiles narrower than M, a one-launch split-K (3 splits), transposed and row-major
    scales: the same bits, within fp32 rounding of the reference."""
    a, w = packed_pair(40, 70, 384, 128, 64, seed=3)
    codes = gemm_int4.activation_codes(a)
    outs = []
    for BX, BY, split, y8 in ((64, 16, 3, codes), (64, 32, 1, codes), (64, 16, 3, (codes[0], a.s4))):
        out = torch.full((40, 70), float("nan"), device=DEV)
        gemm_int4._launch_fused8(w, a, out, None, BX, BY, split, 4, 1 if not GPU else 3, y8)
        assert_matches(out, a, w)
        outs.append(out)
    assert torch.equal(outs[0], outs[2])
    assert int(gemm_int4._tile_counters(DEV, 1).abs().sum()) == 0


@pytest.mark.skipif(not GPU, reason="GPU-only configurations (compiled tile shapes, split-K)")
@pytest.mark.parametrize("M", [5, 100])
def test_gpu_fused8_configurations(M):
    """Every candidate configuration of "fused8" (kernels/gemm_int4.FUSED8_CLASSES), ragged shape, fp16 out and
    residual; and the row-major scale layout (strides) gives the same bits as the transposed one."""
    N, K4, keeper = 1000, 3968, 128
    a, w = packed_pair(M, N, K4, 128, keeper, seed=M)
    res = torch.randn(M, N, device=DEV, dtype=torch.float16)
    codes = gemm_int4.activation_codes(a)
    first = None
    for BX, BY, split, ns in gemm_int4.FUSED8_CLASSES[gemm_int4.fused8_class(M)][1]:
        out = torch.full((M, N), float("nan"), device=DEV, dtype=torch.float16)
        gemm_int4._launch_fused8(w, a, out, res, BX, BY, split, 4, ns, codes)
        assert_matches(out, a, w, res)
        first = out if first is None else first
    out = torch.full((M, N), float("nan"), device=DEV, dtype=torch.float16)
    BX, BY, split, ns = gemm_int4.FUSED8_CLASSES[gemm_int4.fused8_class(M)][1][0]
    gemm_int4._launch_fused8(w, a, out, res, BX, BY, split, 4, ns, (codes[0], a.s4))
    assert torch.equal(out, first)
    assert int(gemm_int4._tile_counters(DEV, 1).abs().sum()) == 0, "split-K counters must be left at zero"
    assert_matches(w4a4_gemm(a, w, torch.float16, residual=res, method="fused8"), a, w, res)


@pytest.mark.skipif(not GPU, reason="triton.autotune runs on the GPU only")
@pytest.mark.parametrize("M", [1, 16, 100, 1024])
def test_gpu_autotuned_dispatch(M):
    """w4a4_gemm as the benchmarks call it: autotuned configuration, fp16 out, residual."""
    a, w = packed_pair(M, 1000, 3968, 128, 128, seed=M)
    res = torch.randn(M, 1000, device=DEV, dtype=torch.float16)
    assert_matches(w4a4_gemm(a, w, torch.float16, residual=res), a, w, res)
    assert int(gemm_int4._tile_counters(DEV, 1).abs().sum()) == 0


@pytest.mark.skipif(not (GPU and BLOCKWISE_OK), reason="the library's blockwise FP8 GEMM needs SM90 + torch >= 2.9")
@pytest.mark.parametrize("M", [1, 4, 64, 256])
def test_gpu_library_equals_twin(M):
    """The cuBLASLt blockwise GEMM against its PyTorch twin on the same prepared operands, and the whole method
    against the reference, on a Llama-like shape the library takes (the benchmark's M, N = 1024)."""
    a, w = packed_pair(M, 1024, 3968, 128, 128, seed=M)
    pa, pw = gemm_blockwise.prepare_fp8(a, "a"), gemm_blockwise.prepare_fp8(w, "w")
    lib = gemm_blockwise.blockwise_gemm(pa, pw, torch.float32)
    twin = gemm_blockwise.scaled_mm_emulated(*pa, *pw)
    assert_matches(lib, a, w, method="blockwise")
    assert_matches(twin, a, w, method="blockwise")
    for dt in (torch.bfloat16, torch.float16):
        res = torch.randn(M, 1024, device=DEV, dtype=dt)
        assert_matches(w4a4_gemm(a, w, dt, method="blockwise"), a, w, method="blockwise")
        assert_matches(w4a4_gemm(a, w, dt, residual=res, method="blockwise"), a, w, res, method="blockwise")
        assert_matches(w4a4_gemm(a, w, dt, residual=res, w_fp8=pw), a, w, res, method="blockwise")


@pytest.mark.skipif(not (GPU and BLOCKWISE_OK), reason="the library's blockwise FP8 GEMM needs SM90 + torch >= 2.9")
def test_dispatch_falls_back():
    """method=None on shapes the library may refuse (odd M, small N) still equals the reference."""
    for M, N in ((1031, 80), (1024, 1008), (2053, 48)):
        a, w = packed_pair(M, N, 512, 128, 100, seed=M)
        assert_matches(w4a4_gemm(a, w, torch.float32), a, w, method="blockwise")


def test_rejects_bad_input():
    a, w = packed_pair(4, 8, 128, 64, 64, seed=0)
    with pytest.raises(TypeError, match="PackedAtom"):
        w4a4_gemm(a.q4, w)
    with pytest.raises(ValueError, match="group_size"):
        w4a4_gemm(a, PackedAtom(w.q4, w.s4[:, :1].contiguous(), w.q8, w.s8, 128))
    b, _ = packed_pair(4, 8, 192, 64, 64, seed=0)
    with pytest.raises(ValueError, match="K=256"):
        w4a4_gemm(b, w)
    c, _ = packed_pair(4, 8, 64, 64, 128, seed=0)
    with pytest.raises(ValueError, match="keeper"):
        w4a4_gemm(c, w)
    with pytest.raises(TypeError, match="a.s4 must have dtype torch.float16"):
        w4a4_gemm(PackedAtom(a.q4, a.s4.float(), a.q8, a.s8, 64), w)
    with pytest.raises(ValueError, match=r"a.s4 has shape \(4, 1\)"):
        w4a4_gemm(PackedAtom(a.q4, a.s4[:, :1].contiguous(), a.q8, a.s8, 64), w)
    with pytest.raises(ValueError, match="residual has shape"):
        w4a4_gemm(a, w, residual=torch.zeros(8, 4, device=DEV))
    with pytest.raises(TypeError, match="residual must have dtype"):
        w4a4_gemm(a, w, residual=torch.zeros(4, 8, device=DEV, dtype=torch.int32))
    with pytest.raises(TypeError, match="out_dtype"):
        w4a4_gemm(a, w, torch.int8)
    with pytest.raises(ValueError, match="contiguous"):
        w4a4_gemm(PackedAtom(a.q4.repeat(1, 2)[:, ::2], a.s4, a.q8, a.s8, 64), w)
    with pytest.raises(ValueError, match="non-empty"):
        w4a4_gemm(PackedAtom(a.q4[:0], a.s4[:0], a.q8[:0], a.s8[:0], 64), w)
    with pytest.raises(ValueError, match="method"):
        w4a4_gemm(a, w, method="int2")
    with pytest.raises(ValueError, match="group_size=128"):
        w4a4_gemm(a, w, method="blockwise")
    bad = a.s4.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        w4a4_gemm(PackedAtom(a.q4, bad, a.q8, a.s8, 64), w, check_finite=True)
