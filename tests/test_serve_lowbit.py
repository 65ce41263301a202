"""W8A8 (torch._scaled_mm FP8) and W4A16 (torch._weight_int4pack_mm) linears of the serving benchmark
(atom_lab/serve/lowbit.py): the library kernel == the float reference on the same stored codes, the stored bytes
== the memory model's, bad shapes rejected; the same on a GPU when there is one."""
import atom_lab  # noqa: F401

import pytest
import torch

from atom_lab.serve.lowbit import (FP8_MAX, FP8Linear, FP8Unsupported, Int4Linear, convert_model, int4_levels,
                                   quantize_fp8_rows, quantize_fp8_rows_ref)
from atom_lab.serve.memory import Format, linear_weight_bytes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def layer(n=96, k=256, seed=0, device="cpu", bias=False):
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=bias).to(device)


def stored(m):
    return sum(b.numel() * b.element_size() for name, b in m.named_buffers() if name != "bias")


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_library_equals_reference(device):
    lin = layer(device=device, bias=True)
    x = torch.randn(7, 3, 256, device=device)
    real, ref = FP8Linear(lin, real=True), FP8Linear(lin, real=False)
    try:
        y = real(x)
    except FP8Unsupported as e:  # only the documented refusal of a CPU build (torch 2.11's), never on the GPU
        assert device == "cpu" and "FP8Linear(real=False)" in str(e)
        pytest.skip(f"no rowwise FP8 GEMM in this torch build: {e}")
    y_ref = ref(x)
    assert y.shape == (7, 3, 96)
    # Both sum the same exact FP8 products (at most 4 + 4 significant bits each): they differ by the accumulation,
    # bounded by K u sum|terms| (Higham), with u = 2^-24 in fp32 (CPU) and u = 2^-14 on a GPU, whose FP8 tensor
    # cores keep ~14 significant bits in their accumulator between cuBLAS's fp32 promotions (DeepSeek-V3 report,
    # section 3.3.2); plus, where the library gave its output in bf16 (rowwise scales refuse fp32 / fp16 out on
    # the GPU), that rounding: 2^-8 of |y| (and the bias added after it).
    x8, sx = quantize_fp8_rows(x.reshape(-1, 256))
    bound = ((x8.float().abs() * sx) @ (real.weight_fp8.float().abs() * real.weight_scale.T).T).reshape(7, 3, 96)
    u = 2 ** -14 if device == "cuda" else 2 ** -24
    rounded = 2 ** -8 * (y_ref - lin.bias.detach()).abs() if real._out_dtype == torch.bfloat16 else 0.0
    assert ((y - y_ref).abs() <= 256 * u * bound + rounded + 1e-6).all()
    # and the codes are the per-row e4m3 rounding: within 2^-3 relative of the float layer's weights (e4m3 has 3
    # mantissa bits) and the row's largest weight maps to 448
    w = lin.weight.detach().float()
    deq = real.weight_fp8.float() * real.weight_scale.T
    assert ((deq - w).abs() <= 2 ** -4 * w.abs() + real.weight_scale.T * 2 ** -9).all()
    assert torch.allclose(real.weight_fp8.float().abs().amax(1), torch.full((96,), FP8_MAX, device=device))
    assert stored(real) == linear_weight_bytes(96, 256, Format("w8a8", 8))


@pytest.mark.parametrize("device", DEVICES)
def test_int4_library_equals_reference(device):
    lin = layer(n=64, k=512, device=device)
    x = torch.randn(5, 512, device=device, dtype=torch.bfloat16)
    real, ref = Int4Linear(lin, 128, real=True), Int4Linear(lin, 128, real=False)
    y, y_ref = real(x).float(), ref(x).float()
    # The library dequantizes each weight (q - 8) * scale + zero in bf16 (the H200's tinygemm: a product and a sum,
    # each rounded to 2^-9 of its size) before its bf16 tensor-core dot (fp32 accumulation), and rounds its output to
    # bf16; the reference is exact in fp32 before its own output rounding. So per weight at most 2^-9 (|(q - 8) s|
    # + |w|) <= 2^-8 A with A = |(q - 8) s| + |z|, and 2 x 2^-9 |y| for the two output roundings.
    q, scale, zero = int4_levels(lin.weight.detach(), 128)
    A = ((q.view(64, 4, 128) - 8).abs() * scale[..., None] + zero.abs()[..., None]).view(64, 512).to(device)
    bound = 2 ** -8 * (x.float().abs() @ A.T) + 2 ** -8 * y_ref.abs() + 1e-6
    assert ((y - y_ref).abs() <= bound).all()
    # the levels: w within half a step of (q - 8) * scale + zero, q in 0..15
    assert q.min() >= 0 and q.max() <= 15
    w = lin.weight.detach().float().view(64, 4, 128)
    rebuilt = (q.view(64, 4, 128) - 8) * scale[..., None] + zero[..., None]
    assert ((rebuilt - w).abs() <= scale[..., None] / 2 * (1 + 1e-5)).all()
    assert stored(ref) == linear_weight_bytes(64, 512, Format("w4a16", 16))
    assert stored(real) == stored(ref)  # the library's packed layout holds the same 4 bits per weight


def test_bad_shapes_and_formats():
    with pytest.raises(ValueError, match="divisible by 16"):
        FP8Linear(torch.nn.Linear(24, 32))
    with pytest.raises(ValueError, match="group"):
        Int4Linear(torch.nn.Linear(256, 64), group=100)
    with pytest.raises(TypeError, match="nn.Linear"):
        FP8Linear(torch.nn.Conv1d(16, 16, 1))
    with pytest.raises(ValueError, match="expected 256"):
        FP8Linear(torch.nn.Linear(256, 32))(torch.randn(2, 128))
    with pytest.raises(ValueError, match="w4a16"):
        convert_model(None, "w4a4")


@pytest.mark.parametrize("weights", ["w8a8", "w4a16"])
def test_convert_model_runs_and_counts(weights):
    # W8A8 on the GPU when there is one (torch 2.11's CPU _scaled_mm refuses rowwise scales, later CPU builds take
    # them); W4A16 on the CPU (tinygemm's CUDA kernel wants larger shapes than the tiny model's)
    device = atom_lab.default_device() if weights == "w8a8" else "cpu"
    model = atom_lab.tiny_model("llama", seed=0, device=device)[0]
    if weights == "w4a16":
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 12), device=device)
    ref = model(ids).logits.float()
    convert_model(model, weights)
    try:
        got = model(ids).logits.float()
    except FP8Unsupported as e:  # only the documented refusal of a CPU build, never on the GPU
        assert device == "cpu"
        pytest.skip(f"no rowwise FP8 GEMM in this torch build: {e}")
    assert got.isfinite().all()
    # a 4- or 8-bit model is not the float model, but it is close to it on a random tiny model (the logits'
    # correlation), and not identical (the layers really were replaced)
    corr = torch.corrcoef(torch.stack([ref.flatten(), got.flatten()]))[0, 1]
    assert corr > 0.9 and not torch.equal(ref, got)


def test_stored_fp8_weights_pass_through_to_the_gemm():
    # ModelRunner(fp8_weights=True) keeps each packed W4A4 weight also as the library's FP8 operand and hands it to
    # w4a4_gemm(w_fp8=...). Same numbers as without it (the integer dots are exact either way), and the blockwise
    # method fed the stored operand equals the one that prepares it per call.
    from atom_lab.config import AtomConfig
    from atom_lab.kernels import w4a4_gemm, w4a4_gemm_ref
    from atom_lab.qlinear import QuantLinear
    from atom_lab.serve.model_runner import model_bytes, store_fp8_weights

    torch.manual_seed(0)
    dev = atom_lab.default_device()  # the compiled kernels take CUDA tensors only
    lin = torch.nn.Linear(256, 64, bias=False).to(dev)
    cfg = AtomConfig.preset("atom", gptq=False, group_size=128, keeper=128, w_clip=1.0, a_clip=1.0, kv_bits=16)
    q = QuantLinear.from_linear(lin, cfg, reorder=torch.arange(256, device=dev),
                                inputs=torch.randn(64, 256, device=dev), backend="triton")
    x = torch.randn(64, 256, device=dev)  # cuBLASLt's blockwise FP8 GEMM refuses M = 3 on the H200
    before, size0 = q(x), model_bytes(q)
    holder = torch.nn.Sequential(q)
    assert store_fp8_weights(holder) == 1 and store_fp8_weights(holder) == 0  # once per layer
    # on an H200, 64 rows now take the blockwise method (STORED_MIN_M): the same exact integer dots, summed over
    # the K / 128 + keeper blocks in another fp32 order, so within that many roundings of the sum of |terms|
    a = q.quantize_input(x)
    terms = w4a4_gemm_ref(a, q.packed, torch.float32, absolute=True)
    assert ((q(x) - before).abs() <= 2 * (256 // 128 + 4) * 2 ** -24 * terms).all()
    assert model_bytes(q) > size0 + 64 * 256  # the FP8 copy (1 byte per weight + scales) is counted
    stored = w4a4_gemm(a, q.packed, torch.float32, method="blockwise", w_fp8=(q.serve_w_fp8, q.serve_w_fp8_scale))
    assert torch.equal(stored, w4a4_gemm(a, q.packed, torch.float32, method="blockwise"))
    with pytest.raises(ValueError, match="fp8_weights"):
        from atom_lab.kv_cache import KVFormat
        from atom_lab.serve.model_runner import ModelRunner
        ModelRunner(atom_lab.tiny_model("llama", seed=0, device="cpu")[0], KVFormat(bits=16, dtype=torch.float32),
                    num_pages=4, fp8_weights=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the FP8 rows kernel runs on a GPU only (kernels/fp8_rows.py:"
                    " the interpreter rounds e4m3 subnormals to zero; the CPU uses the reference)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fp8_rows_kernel_equals_reference(dtype):
    from atom_lab.kernels.fp8_rows import quantize_fp8_rows as kernel

    torch.manual_seed(0)
    # magnitudes over 6 decades, so every row has codes in e4m3's subnormal range; K not a multiple of the block;
    # rows with a stride (a column slice); an all-zero row (scale clamped to 1e-12 / 448)
    x = (torch.randn(37, 3001, device="cuda") * torch.logspace(-3, 3, 3001, device="cuda")).to(dtype)
    x[5] = 0
    for a in (x, x[:, 1:2900]):
        q, s = kernel(a)
        q_ref, s_ref = quantize_fp8_rows_ref(a)
        assert torch.equal(s, s_ref)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="gluon_ws runs on an SM90 GPU only")
def test_gluon_ws_scales_are_built_up_front_and_counted_as_weights():
    # kernels.gemm_gluon_ws caches each weight's transposed scales on its first call: inside the first decode graph
    # that would be memory outside the plan. The runner builds them first, as buffers model_bytes counts, and the
    # kernel's cache then hands back exactly those tensors.
    from atom_lab.config import AtomConfig
    from atom_lab.kernels import gemm_gluon_ws
    from atom_lab.qlinear import QuantLinear
    from atom_lab.serve.model_runner import model_bytes, store_gluon_ws_scales

    lin = torch.nn.Linear(256, 64, bias=False).cuda()
    cfg = AtomConfig.preset("atom", gptq=False, group_size=128, keeper=128, w_clip=1.0, a_clip=1.0, kv_bits=16)
    q = QuantLinear.from_linear(lin, cfg, reorder=torch.arange(256, device="cuda"),
                                inputs=torch.randn(64, 256, device="cuda"), backend="triton")
    size0 = model_bytes(q)
    n = store_gluon_ws_scales(torch.nn.Sequential(q))
    if not gemm_gluon_ws.AVAILABLE:
        assert n == 0
        pytest.skip(f"no Gluon here: {gemm_gluon_ws.IMPORT_ERROR}")
    assert n == 1 and gemm_gluon_ws.weight_scales_t(q.packed) is q.serve_ws_scales_t
    assert model_bytes(q) == size0 + q.serve_ws_scales_t.numel() * 2
