"""Method "blockwise" of the W4A4 GEMM (kernels/gemm.py): torch's blockwise-scaled FP8 GEMM (cuBLASLt, SM90).

Atom's scaling is exactly the library's 1x128 recipe on both operands: one scale per token and per 128 of K for the
activations, one per output channel and per 128 of K for the weights. So with G = 128 the W4A4 GEMM is

    y = scaled_mm(A8 [M, K'], W8 [N, K']^T, 1x128 scales of A, 1x128 scales of W)      (+ residual)

where A8, W8 are the INT4 codes as FP8 e4m3 (exact for -8..7; kernels/gemm_fp8.unpack_fp8 writes them) followed by
the INT8 keeper channels as FP8 blocks. An int8 code q is not exact in e4m3, but its two "digits" are:
q = 16 h + l with h = (q + 8) >> 4 in [-8, 8] and l = q - 16 h in [-8, 7]. Then

    qa qw = 256 ha hw + 16 ha lw + 16 la hw + la lw,

four products of small integers, so the keeper part becomes four more 128-column blocks per 128 keeper channels:
A = [ha | ha | la | la] with scales [16 sa, 16 sa, sa, sa], W = [hw | lw | hw | lw] with [16 sw, sw, 16 sw, sw].
Every 128-block sum stays an integer below 64 * 128 = 2^13 (exact in the FP8 tensor cores' fp32 accumulation, like
the INT4 groups), and the keeper costs no second GEMM and no extra pass over the [M, N] output. The terms' magnitudes
grow: |16 h| <= |q| + 8 and |l| <= 8, so the fp32 rounding bound uses (|qa| + 16)(|qw| + 16) per keeper pair.

`scaled_mm_emulated` is the CPU twin of the library call (same operands, same scales, fp32 block sums in PyTorch):
the CPU tests run this method through it; tests on an H200 pin the library against it and against w4a4_gemm_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting
from .formats import PackedAtom
from .gemm_fp8 import unpack_fp8

BLOCK = 128  # the library's block of K (and the only group size this method takes)
N_ALIGN = 16  # cuBLASLt's FP8 layout: "mat2 shape (K x N) must be divisible by 16" (H200 run)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def blockwise_supported(capability, torch_ver) -> bool:
    """cuBLASLt's 1x128 x 1x128 FP8 GEMM exists on SM90 (Hopper) only, through torch >= 2.9."""
    return capability == (9, 0) and tuple(torch_ver) >= (2, 9)


@triton.jit
def _keeper_digits_kernel(q8, s8, out, sT, R, KP, s_q8, s_s8, so, col0, grp0,
                          SIDE_A: tl.constexpr, NKB: tl.constexpr, BR: tl.constexpr):
    # One launch writes the four digit blocks of BR rows (module docstring) and their 4 * NKB scale rows.
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    rk = tl.arange(0, 128)
    W: tl.constexpr = NKB * 128
    s = tl.load(s8 + rows * s_s8, mask=rmask, other=0).to(tl.float32)
    for b in tl.static_range(NKB):
        k = b * 128 + rk
        kin = rmask[:, None] & (k < KP)[None, :]
        q = tl.load(q8 + rows[:, None] * s_q8 + k[None, :], mask=kin, other=0).to(tl.int32)
        hi = (q + 8) >> 4                       # floor((q + 8) / 16) in [-8, 8]
        lo = q - 16 * hi                        # in [-8, 7]; padding columns hold 0
        hi8 = hi.to(tl.float16).to(tl.float8e4nv)
        lo8 = lo.to(tl.float16).to(tl.float8e4nv)
        dst = out + rows[:, None] * so + (col0 + k)[None, :]
        ok = rmask[:, None] & (k < W)[None, :]
        tl.store(dst, hi8, mask=ok)            # a: [h | h | l | l]   w: [h | l | h | l]
        tl.store(dst + 3 * W, lo8, mask=ok)
        if SIDE_A:
            tl.store(dst + W, hi8, mask=ok)
            tl.store(dst + 2 * W, lo8, mask=ok)
        else:
            tl.store(dst + W, lo8, mask=ok)
            tl.store(dst + 2 * W, hi8, mask=ok)
    for b in tl.static_range(NKB):  # scales: a [16 s, 16 s, s, s], w [16 s, s, 16 s, s]
        tl.store(sT + (grp0 + b) * R + rows, s * 16.0, mask=rmask)
        tl.store(sT + (grp0 + 3 * NKB + b) * R + rows, s, mask=rmask)
        if SIDE_A:
            tl.store(sT + (grp0 + NKB + b) * R + rows, s * 16.0, mask=rmask)
            tl.store(sT + (grp0 + 2 * NKB + b) * R + rows, s, mask=rmask)
        else:
            tl.store(sT + (grp0 + NKB + b) * R + rows, s, mask=rmask)
            tl.store(sT + (grp0 + 2 * NKB + b) * R + rows, s * 16.0, mask=rmask)


def _keeper_blocks(q8: torch.Tensor, s8: torch.Tensor, side: str, out: torch.Tensor, sT: torch.Tensor,
                   col0: int, grp0: int) -> None:
    """Write the keeper channels' four digit blocks (module docstring) into out[:, col0:] and sT[grp0:]."""
    R, kp = q8.shape
    BR = min(256, triton.next_power_of_2(R)) if interpreting() else 32
    _keeper_digits_kernel[(triton.cdiv(R, BR),)](
        q8, s8, out, sT, R, kp, max(q8.stride(0), 1), s8.stride(0), out.stride(0), col0, grp0,
        SIDE_A=side == "a", NKB=-(-kp // BLOCK), BR=BR, num_warps=4)


def prepare_fp8(p: PackedAtom, side: str):
    """p as the library's operand: FP8 e4m3 [rows, K4 + 4 * 128 * ceil(keeper / 128)] and fp32 scales
    [blocks, rows] (row-major, i.e. 'outer-dim-major' once transposed). side: "a" (activations) or "w" (weights),
    which differ only in the order of the keeper's digit blocks."""
    kp = p.keeper
    nkb = -(-kp // BLOCK) if kp else 0
    out, sT = unpack_fp8(p, extra_cols=4 * nkb * BLOCK, extra_groups=4 * nkb)
    if kp:
        _keeper_blocks(p.q8, p.s8, side, out, sT, 2 * p.q4.shape[1], p.s4.shape[1])
    return out, sT


def scaled_mm_emulated(a8: torch.Tensor, saT: torch.Tensor, w8: torch.Tensor, swT: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of the library call: a8 fp8 [M, K'], saT fp32 [K'/128, M], w8 fp8 [N, K'], swT fp32
    [K'/128, N] -> fp32 [M, N] = sum over blocks b of (a8_b @ w8_b^T) * saT[b, :, None] * swT[b, None, :].
    Block sums are integer-valued and exact in fp32 (|sum| <= 2^13); the sum over blocks is fp32, in block order."""
    M, N = a8.shape[0], w8.shape[0]
    nb = saT.shape[0]
    af = a8.float().reshape(M, nb, BLOCK)
    wf = w8.float().reshape(N, nb, BLOCK)
    y = torch.zeros(M, N, dtype=torch.float32, device=a8.device)
    for b in range(nb):
        y += (af[:, b] @ wf[:, b].T) * (saT[b][:, None] * swT[b][None, :])
    return y


def _call_scaled_mm(a8, saT, w8, swT, out_dtype):
    # 1x128 scales must be "outer-dim-major" (shared/NOTES.md, "The H200"): the token / channel index has stride 1.
    # F.scaled_mm takes both as [rows, blocks] with strides (1, rows); torch._scaled_mm wants scale_b as [blocks, N].
    F = torch.nn.functional
    rec = F.ScalingType.BlockWise1x128
    return F.scaled_mm(a8, w8.t(), saT.t(), rec, swT.t(), rec, output_dtype=out_dtype)


def _call_private_scaled_mm(a8, saT, w8, swT, out_dtype):
    return torch._scaled_mm(a8, w8.t(), scale_a=saT.t(), scale_b=swT, out_dtype=out_dtype)


CALLS = [_call_scaled_mm, _call_private_scaled_mm]


class LibraryRefused(RuntimeError):
    """The library refused these operands (a layout or alignment it does not take); the message holds its words."""


def _library_mm(a8, saT, w8, swT, out_dtype):
    """The library GEMM, through the first API that accepts these operands and out_dtype. An out_dtype every API
    refuses (fp16 at M = 1 on the H200) is computed in fp32 and cast (one rounding either way). Nothing is cached:
    a refusal can depend on the shape."""
    errors = []
    for dt in (out_dtype, torch.float32) if out_dtype != torch.float32 else (out_dtype,):
        for call in CALLS:
            if call is _call_scaled_mm and not hasattr(torch.nn.functional, "scaled_mm"):
                continue
            try:
                y = call(a8, saT, w8, swT, dt)
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
                errors.append(f"{call.__name__}({dt}): {str(e).splitlines()[0][:200]}")
                continue
            return y if dt == out_dtype else y.to(out_dtype)
    raise LibraryRefused(f"the blockwise FP8 GEMM refused M={a8.shape[0]}, N={w8.shape[0]}, K'={a8.shape[1]}: "
                         + " | ".join(errors))


def blockwise_gemm(a_prep, w_prep, out_dtype: torch.dtype, residual: torch.Tensor | None = None) -> torch.Tensor:
    """a_prep, w_prep: prepare_fp8(a, "a"), prepare_fp8(w, "w") (same K) -> [M, N] of out_dtype (+ residual).
    Under the interpreter (CPU) the library call is replaced by scaled_mm_emulated."""
    (a8, saT), (w8, swT) = a_prep, w_prep
    if interpreting() or a8.device.type != "cuda":
        y = scaled_mm_emulated(a8, saT, w8, swT)
    elif residual is None:
        return _library_mm(a8, saT, w8, swT, out_dtype)
    else:
        y = _library_mm(a8, saT, w8, swT, torch.float32)
    if residual is not None:
        y = y + residual.float()
    return y.to(out_dtype)


def w4a4_gemm_blockwise(a: PackedAtom, w: PackedAtom, out_dtype: torch.dtype, residual=None,
                        w_fp8=None) -> torch.Tensor:
    """The whole layer per call: the operands prepared (the weights' too unless w_fp8 = prepare_fp8(w, "w") is
    given), then the library GEMM."""
    return blockwise_gemm(prepare_fp8(a, "a"), prepare_fp8(w, "w") if w_fp8 is None else w_fp8, out_dtype, residual)
