"""The W4A4 group GEMM of Atom: packed INT4 activations x packed INT4 weights, plus the INT8 keeper channels.

    y[m, n] = sum_g s4a[m, g] * s4w[n, g] * dot_int(q4a[m, g], q4w[n, g])     (INT4 groups of G channels)
            + s8a[m] * s8w[n] * dot_int(q8a[m], q8w[n])                       (INT8 keeper channels)
            (+ residual[m, n])

Both operands are PackedAtom (kernels/formats.py), rows = tokens for `a`, rows = output channels for `w`. The
integer dots are exact (int32 tensor-core accumulation, or FP8 products of integers in [-8, 7] whose group sums stay
below 2^13), the per-group scaling and the sum over groups are fp32.

Methods (`method=`), the same function, each in its own module:
  "fused"  kernels/gemm_int4.py: one kernel that unpacks the INT4 bytes in registers to INT8 for int8 tensor-core
           dots. Runs on every GPU and in the CPU interpreter; for small M it swaps the operands and splits K.
  "fused8" kernels/gemm_int4.py too: the activations' nibbles unpacked once per call to INT8 codes (one small
           launch), then the same kernel with only the weights unpacked in registers: the token operand goes
           from the copy straight to the tensor cores. For batch decode (65-256 tokens) on the H200.
  "fp8"    kernels/gemm_fp8.py: a pass unpacks both operands once into FP8 e4m3 (exact for -8..7), then a Triton
           block-scaled FP8 GEMM (GPUs with FP8 tensor cores: Hopper, Ada; the teaching kernel and the fallback).
  "blockwise" kernels/gemm_blockwise.py: the same FP8 operands (keepers as exact FP8 digit blocks) through torch's
           blockwise-scaled FP8 GEMM (cuBLASLt, SM90, torch >= 2.9; a PyTorch twin under the interpreter).
  "gluon"  kernels/gemm_gluon.py: a Gluon (triton.experimental.gluon) kernel that unpacks the INT4 bytes in-kernel
           into shared memory for Hopper's wgmma, with the fp32 rescale of one group overlapping the next group's
           MMA (SM90 + a triton with Gluon). Its twin, the fused kernel without swap or split, runs under the
           interpreter; tests/test_gemm_gluon.py pins the two together on the GPU.
  "gluon_ws" kernels/gemm_gluon_ws.py: a warp-specialized Gluon kernel for batch decode (SM90): a TMA loader warp
           streams the packed weight bytes, fused8's token codes and both operands' group scales into a
           shared-memory ring; two consumer warpgroups unpack the weights straight into wgmma's register operand
           and rescale one group while the next group's MMA runs. fused8's arithmetic exactly; its twin is the
           fused8 kernel (the interpreter runs that), tests/test_gemm_gluon_ws.py pins the two on the GPU.
  "gemv"   kernels/gemm_gemv.py: for a few tokens, CUDA cores only: each program loads whole packed weight rows at
           once and forms the integer group dots with int32 multiply-adds (any GPU, and the CPU interpreter).
           Never picked: on the H200 it ran 0.83-1.16x bf16 at M = 1 (the fused kernel 1.16-1.64x) and far slower
           at M = 4-16 (results/gemm_h200_gemv.json, benchmarks/NOTES.md).
`method=None` chooses per GPU, torch version and M (`select_method`, a pure function; `choose_method` applies it). On the GPU triton.autotune picks tile shapes, split-K
factor and pipeline depth per (shape, power-of-two M) among candidates taken from the sweeps (benchmarks/NOTES.md).
The interpreter runs every method (tests), and every method runs compiled in tests/test_gemm.py on a GPU.
"""
from __future__ import annotations

import os

import torch

from . import gemm_blockwise, gemm_fp8, gemm_gemv, gemm_gluon, gemm_gluon_ws, gemm_int4
from ._common import check_tensor, interpreting, pow2_at_least
from .formats import PackedAtom
from .gemm_fp8 import unpack_fp8  # noqa: F401  (part of this module's API: benchmarks time the unpack alone)
from .pack import PACK_BLOCK, unpack_int4_ref

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------
def w4a4_gemm_ref(a: PackedAtom, w: PackedAtom, out_dtype: torch.dtype = torch.float16,
                  residual: torch.Tensor | None = None, absolute: bool = False) -> torch.Tensor:
    """PyTorch reference. a: PackedAtom of M rows, w: PackedAtom of N rows (same K, keeper, group) -> [M, N].

    The integer dot of each group is computed exactly (float64 matmul of integers: every partial sum is an integer
    far below 2^53), then scaled and summed over groups in fp32, as the kernels do. `absolute=True` replaces every
    value and scale by its magnitude: the result bounds the sum of |terms|, which sets the fp32 rounding tolerance.
    """
    M, N, G = a.rows, w.rows, a.group_size
    qa, qw = unpack_int4_ref(a.q4).double(), unpack_int4_ref(w.q4).double()
    sa, sw = a.s4.float(), w.s4.float()
    ka, kw, s8a, s8w = a.q8.double(), w.q8.double(), a.s8.float(), w.s8.float()
    if absolute:
        qa, qw, sa, sw, ka, kw, s8a, s8w = (t.abs() for t in (qa, qw, sa, sw, ka, kw, s8a, s8w))
    y = torch.zeros(M, N, dtype=torch.float32, device=qa.device)
    for g in range(sa.shape[1]):
        dot = (qa[:, g * G:(g + 1) * G] @ qw[:, g * G:(g + 1) * G].T).float()  # exact: |dot| <= 64 G
        y += dot * (sa[:, g, None] * sw[None, :, g])
    if a.keeper:
        y += (ka @ kw.T).float() * (s8a * s8w.T)
    if residual is not None:
        y += residual.float().abs() if absolute else residual.float()
    return y.to(out_dtype)




# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------
def _check_packed(p, name: str) -> None:
    if not isinstance(p, PackedAtom):
        raise TypeError(f"{name} must be a PackedAtom (kernels/formats.py), got {type(p).__name__}.")
    check_tensor(p.q4, f"{name}.q4", torch.uint8, dim=2)
    check_tensor(p.s4, f"{name}.s4", torch.float16, dim=2)
    check_tensor(p.s8, f"{name}.s8", torch.float16, dim=2)
    if not isinstance(p.q8, torch.Tensor) or p.q8.dtype != torch.int8 or p.q8.dim() != 2:
        raise TypeError(f"{name}.q8 must be an int8 tensor [rows, keeper] (keeper may be 0), got "
                        f"{getattr(p.q8, 'dtype', type(p.q8))} of shape {tuple(getattr(p.q8, 'shape', ()))}.")
    R, G = p.q4.shape[0], p.group_size
    if G not in (32, 64, 128):
        raise ValueError(f"{name}.group_size={G} is not supported; use 32, 64 or 128.")
    k4 = p.q4.shape[1] * 2
    if k4 % PACK_BLOCK:
        raise ValueError(f"{name}.q4 has {p.q4.shape[1]} bytes per row: the INT4 part must be a multiple of "
                         f"{PACK_BLOCK} channels ({PACK_BLOCK // 2} bytes); was it packed by pack_int4?")
    want = {"s4": (R, k4 // G), "q8": (R, p.q8.shape[1]), "s8": (R, 1)}
    for part, shape in want.items():
        got = tuple(getattr(p, part).shape)
        if got != shape:
            raise ValueError(f"{name}.{part} has shape {got}, expected {shape} for {R} rows, {k4} INT4 channels "
                             f"in groups of {G} and {p.q8.shape[1]} keeper channels.")
    for part in ("q4", "s4", "q8", "s8"):
        t = getattr(p, part)
        if t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}.{part} must have contiguous rows (stride 1 along the last dim); "
                             f"call .contiguous() on it.")


def _check_inputs(a, w, out_dtype, residual, check_finite):
    _check_packed(a, "a")
    _check_packed(w, "w")
    if a.group_size != w.group_size:
        raise ValueError(f"a.group_size={a.group_size} and w.group_size={w.group_size} differ; quantize both "
                         f"with the same group size.")
    if a.in_features != w.in_features or a.keeper != w.keeper:
        raise ValueError(f"a has K={a.in_features} (keeper {a.keeper}) but w has K={w.in_features} "
                         f"(keeper {w.keeper}); they must agree channel for channel.")
    devs = {t.device for p in (a, w) for t in (p.q4, p.s4, p.q8, p.s8)}
    if len(devs) != 1:
        raise ValueError(f"all packed tensors must be on one device, got {sorted(map(str, devs))}.")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}.")
    if residual is not None:
        check_tensor(residual, "residual", OUT_DTYPES, dim=2)
        if tuple(residual.shape) != (a.rows, w.rows):
            raise ValueError(f"residual has shape {tuple(residual.shape)}, expected [M, N] = "
                             f"[{a.rows}, {w.rows}].")
        if residual.device != a.q4.device:
            raise ValueError(f"residual is on {residual.device}, the packed inputs on {a.q4.device}.")
        if residual.stride(-1) != 1:
            raise ValueError("residual must have contiguous rows; call .contiguous() on it.")
    if check_finite:
        for name, p in (("a", a), ("w", w)):
            for part in ("s4", "s8"):
                if not torch.isfinite(getattr(p, part)).all():
                    raise ValueError(f"{name}.{part} holds NaN or inf scales; the input that was quantized "
                                     f"had non-finite values.")



# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------

# triton.autotune on the GPU; AUTOTUNE = False (or ATOM_LAB_AUTOTUNE=0) uses each family's first configuration, which
# keeps the number of compiled variants small (the GPU test run).
AUTOTUNE = os.environ.get("ATOM_LAB_AUTOTUNE", "1") != "0"

# Thresholds in tokens, from the H200 runs (benchmarks/NOTES.md; set from results/h200_w4a4_gemm.json, re-checked
# by results/gemm_h200.json on 12 shapes of Llama-2-7B, 13B and Qwen2.5-7B, every method in one run): at M = 64 the
# fused kernel beat every other method on 12 of 12 shapes (0.49-0.88x bf16; our FP8 0.30-0.55x, Gluon 0.31-0.82x);
# at M = 256 our Triton FP8 path beat the fused kernel on 11 of 12 (0.40-0.53x vs 0.36-0.48x; the library 0.35-0.56x
# won 4 of 12, Gluon 2); from M = 1024 the library's blockwise GEMM with its operands prepared per call beat our FP8
# kernel on 11 of 12 (0.46-0.86x vs 0.52-0.82x) and all 12 at 4096-8192. The Gluon kernel beat the dispatch in 4 of
# 96 cases, by 4-8% (M = 16 and 256 on 4096-wide layers), and ran 0.25-0.30x at M >= 1024: it is never picked.
# Re-checked with the inline-PTX unpack by results/gemm_h200_band.json: fused fastest at M <= 64 (12, 12, 8 of 12),
# the library from M = 1024 (11 of 12). Ada (8, 9) was never measured: it shares FP8_MIN_M.
FP8_MIN_M = 256
BLOCKWISE_MIN_M = 1024
# "fused8" on the H200 (results/gemm_h200_band.json, the same 12 shapes, every method in one run): the fastest method
# at M = 128 on 12 of 12 (0.52-0.77x bf16; fused 0.43-0.75x, 1.02-1.41x slower) and at M = 256 on 8 of 12 (0.44-0.65x;
# our FP8 0.40-0.54x won 3, the library 1), but the fused kernel was fastest at M = 64 on 8 of 12 (0.61-1.07x; fused8
# 0.57-1.02x) and at M <= 16 on all 12 (fused8 pays its activation-codes launch, 0.2-6 us). Both tuners key on the
# power-of-two bucket of M, so the band starts at the 128 bucket.
FUSED8_MIN_M = 65
FUSED8_MAX_M = gemm_int4.FUSED8_MAX_M  # 256
# With FP8 weights stored: blockwise beat the fused kernel at M = 64 on 12 of 12 shapes (0.60-1.12x vs 0.49-0.88x),
# at M = 16 on none.
STORED_MIN_M = 64
# "gluon_ws" (kernels/gemm_gluon_ws.py) on the H200 (results/gemm_h200_ws2.json, Llama-2-7B/13B, every method in one
# run): faster than the method above on 6 of 8 shapes at M = 64 (0.66-1.53x bf16 vs fused 0.58-1.07x; the two
# down projections lose), 7 of 8 at 128 (0.67-1.29x vs fused8 0.56-0.78x) and 7 of 8 at 256 (0.53-0.94x vs
# 0.44-0.65x). Picked where the operands suit its TMA copies (gemm_gluon_ws.refusal) and Gluon imported; M = 33-63
# (the tuners' 64 bucket) was not measured and keeps "fused".
GLUON_WS_MIN_M = 64
GLUON_WS_MAX_M = 256
METHODS = ("fused", "fused8", "fp8", "blockwise", "gluon", "gemv", "gluon_ws")
FALLBACKS: list = []  # shapes the library refused under method=None (they ran "fp8" instead)


def select_method(M: int, capability: tuple[int, int] | None, torch_ver: tuple[int, int],
                  group_size: int = 128, fp8_weights: bool = False, gluon_ws: bool = False) -> str:
    """The method for M tokens on a GPU of compute `capability` (None: the CPU interpreter) under torch `torch_ver`.

    None         -> "fused" (the interpreter runs every method; this one is the cheapest there)
    (7, 5) T4    -> "fused" (Triton has no bf16 / FP8 dots there: the int8 tensor-core path only)
    (8, x < 9)   -> "fused" (A100 / A10: no FP8 tensor cores)
    (8, 9) Ada   -> "fused" below FP8_MIN_M, "fp8" from there on
    (9, 0) Hopper -> "fused8" for FUSED8_MIN_M <= M <= FUSED8_MAX_M (65-256 tokens, batch decode), else as Ada below
                 BLOCKWISE_MIN_M; with torch >= 2.9 and G = 128 "blockwise" (cuBLASLt) from there on (w4a4_gemm
                 keeps "fp8" where N % 16 != 0, which the library refuses); older torch: as Ada there.
    fp8_weights=True (the caller keeps the weights as the library's FP8 operand, w4a4_gemm(w_fp8=...)): on (9, 0)
                 "blockwise" from STORED_MIN_M on, since no weight unpack is paid per call.
    gluon_ws=True (the caller found the warp-specialized Gluon kernel usable for these operands): on (9, 0)
                 "gluon_ws" for GLUON_WS_MIN_M <= M <= GLUON_WS_MAX_M (64-256 tokens), unless fp8_weights applies.
    "gluon" is never picked: it was slower than the method above in 92 of 96 measured cases, and at most 8% faster
                 in the other 4 (results/gemm_h200.json; benchmarks/NOTES.md).
    A pure function (no device query), so that every branch is unit-tested on a CPU.
    """
    if capability is None or tuple(capability) < (8, 9):
        return "fused"
    if group_size == gemm_blockwise.BLOCK and gemm_blockwise.blockwise_supported(tuple(capability), torch_ver):
        if M >= (STORED_MIN_M if fp8_weights else BLOCKWISE_MIN_M):
            return "blockwise"
    if tuple(capability) == (9, 0) and gluon_ws and GLUON_WS_MIN_M <= M <= GLUON_WS_MAX_M:
        return "gluon_ws"
    if tuple(capability) == (9, 0) and FUSED8_MIN_M <= M <= FUSED8_MAX_M:
        return "fused8"
    return "fp8" if M >= FP8_MIN_M else "fused"


def device_capability(device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device; None for the CPU (interpreter) and anything else."""
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return None
    return tuple(torch.cuda.get_device_capability(device))


def has_fp8_tensor_cores(device) -> bool:
    cap = device_capability(device)
    return cap is not None and cap >= (8, 9)


def choose_method(M: int, device, group_size: int = 128, fp8_weights: bool = False, gluon_ws: bool = False) -> str:
    """select_method for this device and the running torch."""
    return select_method(M, device_capability(device), gemm_blockwise.torch_version(), group_size, fp8_weights,
                         gluon_ws)


def _interp_tiles(M: int, N: int):
    # Every program costs ~1 ms per K step under the interpreter: few, large tiles.
    # Measured on SmolLM2's layers (K 576/1536, N 192-1536): up to 256 x 256 tiles, wider in N for few tokens,
    # run ~2x faster than 128 x 128 (the cost is interpreter overhead per operation, not arithmetic). Tile shapes
    # do not change any result: every output element sums its groups in the same order.
    BM = pow2_at_least(M, 16, 256)
    return BM, pow2_at_least(N, 16, max(256, 16384 // BM))


def gluon_ok(device, group_size: int) -> bool:
    """The "gluon" method can run here: the interpreter (its twin), or an SM90 GPU with Gluon and G in (64, 128)."""
    return group_size in (64, 128) and (interpreting() or gemm_gluon.gluon_supported(device_capability(device),
                                                                                    group_size))


def last_config(M: int, method: str, shape: tuple | None = None) -> str:
    """The configuration the autotuner used in the last GPU call for M tokens (for benchmark records);
    shape = (N, K, keeper, group) for the "gluon" method."""
    if not AUTOTUNE:
        return "untuned default"
    if method == "blockwise":
        return "cuBLASLt blockwise 1x128 (torch scaled_mm)"
    if method == "gluon":
        return "(BM, BN, stages) = " + str(gemm_gluon.best_config(M, *shape) if shape else None)
    if method == "gluon_ws":
        return "(NCONS, BY, stages, split, overlap) = " + str(gemm_gluon_ws.best_config(M, *shape) if shape else None)
    if method == "fp8":
        tuner = gemm_fp8._fp8_tuner
    elif M <= gemm_int4.SWAP_CLASSES[-1][0]:
        tuner = gemm_int4._SWAP_TUNERS.get(next(i for i, c in enumerate(gemm_int4.SWAP_CLASSES) if M <= c[0]))
    else:
        tuner = gemm_int4._normal_tuner
    return str(getattr(tuner, "best_config", None))


def w4a4_gemm(a: PackedAtom, w: PackedAtom, out_dtype: torch.dtype = torch.float16,
              residual: torch.Tensor | None = None, *, method: str | None = None,
              check_finite: bool | None = None, w_fp8: tuple | None = None) -> torch.Tensor:
    """W4A4 group GEMM with the INT8 keeper part (formula in the module docstring).

    Args:
        a: PackedAtom of the activations, M rows (tokens): q4 uint8 [M, (K-keeper)/2], s4 fp16 [M, (K-keeper)/G],
           q8 int8 [M, keeper], s8 fp16 [M, 1].
        w: PackedAtom of the weights, N rows (output channels), same K, keeper and group size G.
        out_dtype: torch.float16, torch.bfloat16 or torch.float32.
        residual: optional [M, N] tensor (fp16/bf16/fp32) added in the epilogue.
        method: None (choose per GPU and M: select_method), "fused", "gemv" (CUDA cores, for a few tokens),
            "fp8" (needs FP8 tensor cores, or the
            interpreter), "blockwise" (the library's FP8 GEMM: SM90 + torch >= 2.9, or its PyTorch twin under the
            interpreter; group size 128 only) or "gluon" (SM90 + Gluon, G = 64 or 128; its plain-Triton twin
            under the interpreter).
        check_finite: reject NaN/inf scales (one device sync); default on for CPU tensors only.
        w_fp8: optional gemm_blockwise.prepare_fp8(w, "w"), kept by the caller: the "blockwise" method then skips
            the per-call weight unpack, at the cost of ~1.06 bytes per weight more memory (FP8 codes + fp32 scales,
            2.0-2.1x the packed weights).
    Returns:
        [M, N] tensor of out_dtype.

    On a GPU the tile shapes (and the split-K factor) are chosen by triton.autotune per (shape, power-of-two M);
    under the interpreter one configuration with few, large tiles is used.
    """
    if check_finite is None:
        check_finite = isinstance(a, PackedAtom) and a.q4.device.type == "cpu"
    _check_inputs(a, w, out_dtype, residual, check_finite)
    M, N, device = a.rows, w.rows, a.q4.device
    if w_fp8 is not None and (len(w_fp8) != 2 or w_fp8[0].shape[0] != N or w_fp8[1].shape[1] != N):
        raise ValueError("w_fp8 must be gemm_blockwise.prepare_fp8(w, 'w') of these weights (N rows).")
    auto = method is None
    if auto:
        ws_ok = (GLUON_WS_MIN_M <= M <= GLUON_WS_MAX_M and not interpreting()
                 and gemm_gluon_ws.supported(device_capability(device), a.group_size, a.keeper, N)
                 and gemm_gluon_ws.refusal(a, w) is None)
        method = choose_method(M, device, a.group_size, fp8_weights=w_fp8 is not None, gluon_ws=ws_ok)
        if method == "blockwise" and N % gemm_blockwise.N_ALIGN:  # the library needs N % 16 == 0
            method = "fp8"
    if method not in METHODS:
        raise ValueError(f"method must be None or one of {METHODS}, got {method!r}.")
    if method == "fp8" and not (interpreting() or has_fp8_tensor_cores(device)):
        raise ValueError(f"method='fp8' needs a GPU with FP8 tensor cores (compute capability >= 8.9); "
                         f"{device} has none. Use method='fused'.")
    if method == "blockwise":
        if a.group_size != gemm_blockwise.BLOCK:
            raise ValueError(f"method='blockwise' needs group_size={gemm_blockwise.BLOCK} (the library's 1x128 "
                             f"blocks), got {a.group_size}; use method='fp8' or 'fused'.")
        cap = device_capability(device)
        if not interpreting() and not gemm_blockwise.blockwise_supported(cap, gemm_blockwise.torch_version()):
            raise ValueError(f"method='blockwise' needs an SM90 GPU and torch >= 2.9 (got capability {cap}, torch "
                             f"{torch.__version__}); use method='fp8' or 'fused'.")
        if not interpreting() and N % gemm_blockwise.N_ALIGN:
            raise ValueError(f"method='blockwise' needs N (w.rows = {N}) divisible by {gemm_blockwise.N_ALIGN} "
                             f"(cuBLASLt FP8 layout); use method='fp8' or 'fused', or method=None.")
        try:
            return gemm_blockwise.w4a4_gemm_blockwise(a, w, out_dtype, residual, w_fp8)
        except gemm_blockwise.LibraryRefused as e:
            if not auto:
                raise ValueError(f"method='blockwise': {e}. Use method='fp8' or 'fused', or method=None.") from e
            FALLBACKS.append(str(e)[:300])  # the dispatch keeps our own FP8 kernel for such shapes
            method = "fp8"
    if method == "gluon_ws":
        if not (interpreting() or gemm_gluon_ws.supported(device_capability(device), a.group_size, a.keeper, N)):
            raise ValueError(f"method='gluon_ws' needs an SM90 GPU, a triton with Gluon, group_size 64 or 128, "
                             f"keeper % 16 == 0 and N % 8 == 0 (got capability {device_capability(device)}, "
                             f"group_size {a.group_size}, keeper {a.keeper}, N {N}"
                             f"{'; ' + gemm_gluon_ws.IMPORT_ERROR if gemm_gluon_ws.IMPORT_ERROR else ''}); "
                             f"use method='fused8'.")
    if method == "gluon" and not gluon_ok(device, a.group_size):
        raise ValueError(f"method='gluon' needs an SM90 GPU, a triton with Gluon and group_size 64 or 128 (got "
                         f"capability {device_capability(device)}, group_size {a.group_size}"
                         f"{'; ' + gemm_gluon.IMPORT_ERROR if gemm_gluon.IMPORT_ERROR else ''}); use method='fused'.")
    # The interpreter has no bf16 arithmetic: compute in fp32 there and cast with PyTorch.
    kernel_dtype = torch.float32 if interpreting() and out_dtype == torch.bfloat16 else out_dtype
    res = residual
    if res is not None and interpreting() and res.dtype == torch.bfloat16:
        res = res.float()
    out = torch.empty(M, N, dtype=kernel_dtype, device=device)
    if method == "gemv":
        gemm_gemv.launch_gemv(a, w, out, res)
    elif method in ("fused8", "gluon_ws") and interpreting():  # fused8's kernel (Y8 mode; gluon_ws's twin)
        BM, BN = _interp_tiles(M, N)
        gemm_int4._launch_fused8(w, a, out, res, BN, BM, 1, 4, 1)
    elif method == "fused8":
        gemm_int4.launch_fused8_tuned(a, w, out, res, autotune=AUTOTUNE)
    elif method == "gluon_ws":
        gemm_gluon_ws.launch_tuned(a, w, out, res, autotune=AUTOTUNE)
    elif interpreting():
        BM, BN = _interp_tiles(M, N)
        if method in ("fused", "gluon"):  # "gluon": its twin, the fused kernel without swap or split
            gemm_int4._launch_fused(a, w, out, res, False, BM, BN, 1, 4, 1)
        else:
            gemm_fp8._launch_fp8(a, w, out, res, BM, BN, 4, 1)
    elif method == "gluon":
        gemm_gluon.launch_tuned(a, w, out, res, autotune=AUTOTUNE)
    elif method == "fp8":
        gemm_fp8._launch_fp8_tuned(a, w, out, res, autotune=AUTOTUNE)
    elif M <= gemm_int4.SWAP_CLASSES[-1][0]:
        gemm_int4._launch_swap_tuned(a, w, out, res, autotune=AUTOTUNE)
    else:
        gemm_int4._launch_normal_tuned(a, w, out, res, autotune=AUTOTUNE)
    return out if kernel_dtype == out_dtype else out.to(out_dtype)
