"""The warp-specialized Gluon W4A4 kernel (kernels/gemm_gluon_ws.py) against its twin (fused8's plain-Triton kernel)
and the reference.

Gluon has no CPU interpreter: on a CPU, method="gluon_ws" runs the twin and the test checks that no Gluon is
imported; on an H100/H200 every configuration is compiled and pinned to the twin (bitwise: the same int32 group
dots, the same fp32 scale products and the same order of the per-group multiply-adds) and to w4a4_gemm_ref.
"""
import pytest
import torch

import atom_lab
from atom_lab.kernels import PackedAtom, pack_int4_ref, w4a4_gemm
from atom_lab.kernels import gemm as G
from atom_lab.kernels import gemm_gluon_ws as W
from atom_lab.kernels import gemm_int4

from test_gemm import assert_matches, packed_pair

DEV = atom_lab.default_device()
GPU = DEV.type == "cuda"
CAP = G.device_capability(DEV)
if not GPU:
    GPU_SKIP = "no CUDA GPU: Gluon does not run in the CPU interpreter (the twin runs there, test below)"
elif not W.AVAILABLE:
    GPU_SKIP = f"this triton has no usable Gluon ({W.IMPORT_ERROR})"
elif CAP != (9, 0):
    GPU_SKIP = f"the kernel uses Hopper's wgmma and TMA (SM90); this GPU is {CAP}"
else:
    GPU_SKIP = ""
needs_gluon = pytest.mark.skipif(bool(GPU_SKIP), reason=GPU_SKIP or "runs")


@pytest.mark.skipif(GPU, reason="checks the CPU side: on a GPU, Gluon is imported on purpose")
def test_cpu_runs_the_twin_and_never_imports_gluon():
    a, w = packed_pair(5, 40, 256, 128, 64, seed=3)
    y = w4a4_gemm(a, w, torch.float32, method="gluon_ws")
    assert torch.equal(y, w4a4_gemm(a, w, torch.float32, method="fused8"))
    assert_matches(y, a, w)
    assert not W.AVAILABLE and "interpreter" in W.IMPORT_ERROR
    assert not hasattr(W, "gluon") and not hasattr(W, "_w4a4_ws_kernel")


def _twin(a, w, res, dtype, split):
    out = torch.full((a.rows, w.rows), float("nan"), device=DEV, dtype=dtype)
    gemm_int4._launch_fused8(w, a, out, res, 64, 64, split, 4, 4)
    return out


def _ws(a, w, res, dtype, cfg):
    out = torch.full((a.rows, w.rows), float("nan"), device=DEV, dtype=dtype)  # poisoned: every element written?
    W.launch(a, w, out, res, *cfg)
    return out


CASES = [(64, 1000, 3968, 128, 128), (77, 512, 1024, 64, 64), (130, 1000, 3968, 128, 128), (256, 4096, 1920, 128, 128),
         (200, 136, 128, 128, 0), (1, 64, 3968, 128, 16), (300, 264, 640, 128, 128)]


@needs_gluon
@pytest.mark.parametrize("cfg", W.CONFIGS, ids=lambda c: "ncons{}-BY{}-S{}-split{}-ov{}".format(*map(int, c)))
def test_gpu_every_config_equals_twin_and_reference(cfg):
    """Ragged shapes (M, N not multiples of the tile; 1 to 31 groups; keeper 0/16/64/128; G 64/128); fp16 / bf16 out
    with a residual on the first config, fp32 on all."""
    for i, (M, N, K4, grp, kp) in enumerate(CASES):
        a, w = packed_pair(M, N, K4, grp, kp, seed=20 + i)
        split = max(1, min(cfg[3], K4 // grp))  # the launcher's clamp, so the twin splits K the same way
        dtypes = (torch.float32, torch.float16, torch.bfloat16) if cfg == W.CONFIGS[0] else (torch.float32,)
        for dtype in dtypes:
            res = None if dtype == torch.float32 else torch.randn(M, N, device=DEV, dtype=dtype)
            print("case", i, (M, N, K4, grp, kp), dtype, flush=True)  # shown on failure (a crash names no case)
            y = _ws(a, w, res, dtype, cfg)
            assert_matches(y, a, w, res)
            t = _twin(a, w, res, dtype, split)
            diff = (y.float() - t.float()).abs()
            assert torch.equal(y, t), (cfg, M, N, K4, grp, kp, dtype, f"max |gluon_ws - twin| {diff.max().item():.3e}",
                                       f"{int((diff > 0).sum())} of {diff.numel()} differ")


@needs_gluon
def test_gpu_exact_on_extreme_integers():
    """All -8 codes (the largest group dot, 64 * 128 = 8192) and 127 keepers, unit scales: exact integers out."""
    M, N, K4 = 70, 136, 512
    qa = torch.full((M, K4), -8, dtype=torch.int8)
    qw = torch.full((N, K4), -8, dtype=torch.int8)
    qw[1::2] = 7
    s = torch.ones(M, K4 // 128, dtype=torch.float16)
    a = PackedAtom(pack_int4_ref(qa), s, torch.full((M, 128), 127, dtype=torch.int8),
                   torch.ones(M, 1, dtype=torch.float16), 128).to(DEV)
    w = PackedAtom(pack_int4_ref(qw), torch.ones(N, K4 // 128, dtype=torch.float16),
                   torch.full((N, 128), -127, dtype=torch.int8), torch.ones(N, 1, dtype=torch.float16), 128).to(DEV)
    want = (qa.double() @ qw.double().T - 127 * 127 * 128).float()
    for cfg in W.CONFIGS:
        assert torch.equal(_ws(a, w, None, torch.float32, cfg).cpu(), want), cfg
    assert int(gemm_int4._tile_counters(DEV, 1).abs().sum()) == 0, "split-K counters must be left at zero"


@needs_gluon
def test_gpu_refuses_what_tma_cannot_address():
    a, w = packed_pair(64, 128, 256, 128, 100, seed=1)
    with pytest.raises(ValueError, match="keeper % 16"):
        w4a4_gemm(a, w, method="gluon_ws")
    a, w = packed_pair(64, 100, 256, 128, 128, seed=1)
    with pytest.raises(ValueError, match="N % 8"):
        w4a4_gemm(a, w, method="gluon_ws")


@needs_gluon
@pytest.mark.parametrize("M", [64, 128, 256])
def test_gpu_autotuned_method(M):
    """w4a4_gemm(method="gluon_ws") as the benchmark calls it: autotuned over CONFIGS, fp16 out, residual."""
    a, w = packed_pair(M, 1024, 3968, 128, 128, seed=M)
    res = torch.randn(M, 1024, device=DEV, dtype=torch.float16)
    G.AUTOTUNE, old = True, G.AUTOTUNE
    try:
        y = w4a4_gemm(a, w, torch.float16, residual=res, method="gluon_ws")
    finally:
        G.AUTOTUNE = old
    assert_matches(y, a, w, res)
    assert W.best_config(M, 1024, 4096, 128) in W.CONFIGS


def test_dispatch_band():
    """select_method picks "gluon_ws" on SM90 at 64-256 tokens only where the caller found it usable (gluon_ws=True),
    and the stored-FP8-weights rule keeps precedence; everything else as before."""
    new = (2, 11)
    for M in (G.GLUON_WS_MIN_M, 128, G.GLUON_WS_MAX_M):
        assert G.select_method(M, (9, 0), new, gluon_ws=True) == "gluon_ws"
        assert G.select_method(M, (9, 0), new) == ("fused8" if M >= G.FUSED8_MIN_M else "fused")
        assert G.select_method(M, (9, 0), new, fp8_weights=True, gluon_ws=True) == "blockwise"
        assert G.select_method(M, (8, 9), new, gluon_ws=True) != "gluon_ws"
        assert G.select_method(M, None, new, gluon_ws=True) == "fused"
    assert G.select_method(G.GLUON_WS_MIN_M - 1, (9, 0), new, gluon_ws=True) == "fused"
    assert G.select_method(G.GLUON_WS_MAX_M + 1, (9, 0), new, gluon_ws=True) == "fp8"
