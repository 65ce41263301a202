"""The Gluon W4A4 kernel (kernels/gemm_gluon.py) against its plain-Triton twin and the reference.

Gluon compiles for SM90 GPUs only and has no CPU interpreter. On a CPU, method="gluon" runs the twin (the fused
kernel without swap or split-K, gemm_int4._launch_fused) and these tests check that no Gluon module is imported; on an
H100/H200 every configuration of the Gluon kernel is compiled and pinned to the twin and to w4a4_gemm_ref.
"""
import pytest
import torch

import atom_lab
from atom_lab.kernels import PackedAtom, pack_int4_ref, w4a4_gemm, w4a4_gemm_ref
from atom_lab.kernels import gemm as G
from atom_lab.kernels import gemm_gluon, gemm_int4

from test_gemm import assert_matches, packed_pair

DEV = atom_lab.default_device()
GPU = DEV.type == "cuda"
CAP = G.device_capability(DEV)
if not GPU:
    GPU_SKIP = "no CUDA GPU: Gluon does not run in the CPU interpreter (the twin runs there, tests below)"
elif not gemm_gluon.AVAILABLE:
    GPU_SKIP = f"this triton has no usable Gluon ({gemm_gluon.IMPORT_ERROR})"
elif CAP != (9, 0):
    GPU_SKIP = f"the Gluon kernel uses Hopper's wgmma (SM90); this GPU is {CAP}"
else:
    GPU_SKIP = ""
needs_gluon = pytest.mark.skipif(bool(GPU_SKIP), reason=GPU_SKIP or "runs")


@pytest.mark.skipif(GPU, reason="checks the CPU side: on a GPU, Gluon is imported on purpose")
def test_cpu_runs_the_twin_and_never_imports_gluon():
    a, w = packed_pair(5, 40, 256, 128, 64, seed=2)
    y = w4a4_gemm(a, w, torch.float32, method="gluon")
    assert torch.equal(y, w4a4_gemm(a, w, torch.float32, method="fused"))
    assert_matches(y, a, w)
    # Our module neither imported Gluon nor defined a Gluon kernel. (triton >= 3.7's interpreter loads parts of
    # triton.experimental itself when it launches any kernel, so sys.modules cannot tell us apart from it.)
    assert not gemm_gluon.AVAILABLE and "interpreter" in gemm_gluon.IMPORT_ERROR
    assert not hasattr(gemm_gluon, "gluon") and not hasattr(gemm_gluon, "_w4a4_wgmma_kernel")
    with pytest.raises(ValueError, match="group_size 64 or 128"):
        b, v = packed_pair(2, 8, 64, 32, 0, seed=0)
        w4a4_gemm(b, v, method="gluon")


def _twin(a, w, res, dtype):
    out = torch.full((a.rows, w.rows), float("nan"), device=DEV, dtype=dtype)
    gemm_int4._launch_fused(a, w, out, res, False, 64, 64, 1, 4, 3)
    return out


def _gluon(a, w, res, dtype, cfg):
    out = torch.full((a.rows, w.rows), float("nan"), device=DEV, dtype=dtype)  # poisoned: every element written?
    gemm_gluon.launch(a, w, out, res, *cfg)
    return out


@needs_gluon
@pytest.mark.parametrize("cfg", gemm_gluon.CONFIGS + gemm_gluon.SWAP_CONFIGS,
                         ids=lambda c: "swap{}-BM{}-BN{}-S{}-split{}".format(int(c[0]), *c[1:]))
def test_gpu_every_config_equals_twin_and_reference(cfg):
    """Ragged shapes (M, N not multiples of the tile, 1 to 31 steps of K, keeper 0/100/128), both groups; fp16 /
    bf16 out with a residual on the first configuration of each kind (the epilogue does not depend on the tile)."""
    cases = [(1, 1000, 3968, 128, 128), (5, 77, 256, 128, 100), (64, 512, 1024, 64, 64), (300, 1000, 3968, 128, 128),
             (129, 200, 128, 128, 0), (1031, 4096, 1920, 128, 128)]
    for i, (M, N, K4, grp, kp) in enumerate(cases):
        a, w = packed_pair(M, N, K4, grp, kp, seed=10 + i)
        first = cfg in (gemm_gluon.CONFIGS[0], gemm_gluon.SWAP_CONFIGS[-2])
        dtypes = (torch.float32, torch.float16, torch.bfloat16) if first else (torch.float32,)
        for dtype in dtypes:
            res = None if dtype == torch.float32 else torch.randn(M, N, device=DEV, dtype=dtype)
            y = _gluon(a, w, res, dtype, cfg)
            assert_matches(y, a, w, res)
            t = _twin(a, w, res, dtype)
            # Same integer dots, same fp32 scale products, groups summed in the same order: equal up to the
            # contraction of a multiply-add (rounding of one fp32 operation per group at most).
            bound = w4a4_gemm_ref(a, w, torch.float32, res, absolute=True)
            diff = (y.float() - t.float()).abs()
            tol = 1e-5 * bound + (t.float().abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10)
                                  if dtype != torch.float32 else 0)
            assert (diff <= tol + 1e-30).all(), (cfg, M, N, K4, dtype, diff.max().item())


@needs_gluon
def test_gpu_exact_on_extreme_integers():
    """All -8 codes (the largest group dot, 64 * 128 = 8192) and 127 keepers, unit scales: exact integers out."""
    M, N, K4 = 70, 130, 512
    qa = torch.full((M, K4), -8, dtype=torch.int8)
    qw = torch.full((N, K4), -8, dtype=torch.int8)
    qw[1::2] = 7
    s = torch.ones(M, K4 // 128, dtype=torch.float16)
    a = PackedAtom(pack_int4_ref(qa), s, torch.full((M, 128), 127, dtype=torch.int8),
                   torch.ones(M, 1, dtype=torch.float16), 128).to(DEV)
    w = PackedAtom(pack_int4_ref(qw), torch.ones(N, K4 // 128, dtype=torch.float16),
                   torch.full((N, 128), -127, dtype=torch.int8), torch.ones(N, 1, dtype=torch.float16), 128).to(DEV)
    want = (qa.double() @ qw.double().T - 127 * 127 * 128).float()
    for cfg in gemm_gluon.CONFIGS + gemm_gluon.SWAP_CONFIGS:
        assert torch.equal(_gluon(a, w, None, torch.float32, cfg).cpu(), want), cfg
    assert int(gemm_int4._tile_counters(DEV, 1).abs().sum()) == 0, "split-K counters must be left at zero"


@needs_gluon
@pytest.mark.parametrize("M", [1, 16, 64, 256])
def test_gpu_autotuned_method(M):
    """w4a4_gemm(method="gluon") as the benchmark calls it: autotuned over CONFIGS, fp16 out, residual."""
    a, w = packed_pair(M, 1024, 3968, 128, 128, seed=M)
    res = torch.randn(M, 1024, device=DEV, dtype=torch.float16)
    G.AUTOTUNE, old = True, G.AUTOTUNE
    try:
        y = w4a4_gemm(a, w, torch.float16, residual=res, method="gluon")
    finally:
        G.AUTOTUNE = old
    assert_matches(y, a, w, res)
    assert gemm_gluon.best_config(M, 1024, 4096, 128) in gemm_gluon.candidates(M)
