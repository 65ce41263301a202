"""RoPE on the query and key rows of a step, in place, in ONE launch (the serving engine's prefill and decode).

Hugging Face's apply_rotary_pos_emb, t * cos + rotate_half(t) * sin with rotate_half(t) = cat(-t2, t1), is five
elementwise kernels per tensor (two multiplies, a negation, a concatenation, an add), ten per layer for q and k.
In a Llama-2-7B decode step those are 320 launches (~1 ms of ~18 ms inside a CUDA graph on the H200); in a
4096-token prefill step their passes over [4096, 32, 128] took ~15 ms of the ~104 ms of GPU work
(benchmarks/serve_profile.py). Here one program rotates BLOCK_T rows of one head of q or of k.

Same numbers as the reference, bit for bit, in float16 and bfloat16: each product of two 16-bit floats is exact
in float32, so rounding it to the model's dtype is what the reference's multiply does; the sum of the two rounded
products is exact in float32 too (or off by far less than half a 16-bit ulp), so rounding it is the reference's
add. In float32 (CPU models) the interpreter does the reference's operations in the same order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_tensor, interpreting

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def apply_rope_ref(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotation: t [T, H, D]; cos, sin [T, D] (the rotary embedding's output, t's dtype) ->
    t * cos + rotate_half(t) * sin, [T, H, D] in t's dtype."""
    half = t.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]
    return t * c + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * s


@triton.jit
def _round(x, dt: tl.constexpr):
    """float32 x rounded to dt (to nearest, ties to even), returned as float32. For bfloat16 by its bits: Triton's
    CPU interpreter truncates float32 -> bfloat16, which would differ from the GPU and from PyTorch."""
    if dt == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(dt).to(tl.float32)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, T, Hq, sq_t, sq_h, sk_t, sk_h, sc_t,
                 D: tl.constexpr, BLOCK_T: tl.constexpr):
    # Program (i, h): rows i*BLOCK_T.. of head h, where heads [0, Hq) are q's and [Hq, Hq + Hk) are k's.
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, HALF)
    rmask = (rows < T)[:, None]
    if h < Hq:
        base = q_ptr + rows[:, None] * sq_t + h * sq_h + d[None, :]
    else:
        base = k_ptr + rows[:, None] * sk_t + (h - Hq) * sk_h + d[None, :]
    cs = rows[:, None] * sc_t + d[None, :]
    x1 = tl.load(base, mask=rmask, other=0.0)
    x2 = tl.load(base + HALF, mask=rmask, other=0.0)
    c1 = tl.load(cos_ptr + cs, mask=rmask, other=0.0)
    c2 = tl.load(cos_ptr + cs + HALF, mask=rmask, other=0.0)
    s1 = tl.load(sin_ptr + cs, mask=rmask, other=0.0)
    s2 = tl.load(sin_ptr + cs + HALF, mask=rmask, other=0.0)
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    # each product rounded to the tensor's dtype, then the sum: the reference's three roundings (module docstring)
    lo = _round(f1 * c1.to(tl.float32), dt) + _round(-(f2 * s1.to(tl.float32)), dt)
    hi = _round(f2 * c2.to(tl.float32), dt) + _round(f1 * s2.to(tl.float32), dt)
    tl.store(base, _round(lo, dt).to(dt), mask=rmask)
    tl.store(base + HALF, _round(hi, dt).to(dt), mask=rmask)


def _check_rows(t: torch.Tensor, name: str, T: int, D: int, dtype) -> None:
    check_tensor(t, name, FLOAT_DTYPES, dim=3)
    if t.shape[0] != T or t.shape[2] != D:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [T={T}, heads, D={D}] like cos/sin.")
    if t.dtype != dtype:
        raise TypeError(f"{name} is {t.dtype} but cos/sin are {dtype}; pass the rotary embedding's output for "
                        "this dtype.")
    if t.stride(2) != 1:
        raise ValueError(f"{name} must have contiguous rows of D channels (a view of a projection's output is fine).")


def apply_rope_(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q (and k) in place, = apply_rope_ref's values.

    Args:
        q: float [T, Hq, D], k: float [T, Hk, D] or None; strided views (e.g. column slices of a fused q|k|v
            projection) are fine as long as each row of D channels is contiguous.
        cos, sin: [T, D] in q's dtype, the rotary embedding's output at the rows' positions.
    """
    check_tensor(cos, "cos", FLOAT_DTYPES, dim=2)
    check_tensor(sin, "sin", FLOAT_DTYPES, dim=2)
    if cos.shape != sin.shape or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [T, D] with the same "
                         "contiguous rows.")
    T, D = cos.shape
    if D % 2 or D & (D - 1):
        raise ValueError(f"head_dim D={D} must be an even power of two for the kernel.")
    _check_rows(q, "q", T, D, cos.dtype)
    if k is not None:
        _check_rows(k, "k", T, D, cos.dtype)
        if k.device != q.device:
            raise ValueError(f"q is on {q.device} but k on {k.device}.")
    if cos.device != q.device:
        raise ValueError(f"cos/sin are on {cos.device} but q on {q.device}.")
    if T == 0:
        return
    Hk = 0 if k is None else k.shape[1]
    kk = q if k is None else k
    block_t = 64 if interpreting() else 16
    _rope_kernel[(triton.cdiv(T, block_t), q.shape[1] + Hk)](
        q, kk, cos, sin, T, q.shape[1], q.stride(0), q.stride(1), kk.stride(0), kk.stride(1), cos.stride(0),
        D=D, BLOCK_T=block_t, enable_fp_fusion=False)  # no FMA: the reference rounds each product
