"""Quantizers. The symmetric group quantizer at the top is the contract every kernel in atom_lab.kernels matches
bit for bit; the reference ("fake-quant") path and the real packed path both go through these formulas.

Symmetric b-bit, groups of G along the last dimension (Atom's format for weights and activations):
    qmax  = 2^(b-1) - 1                                  (7 for INT4, 127 for INT8)
    scale = float16( max(clip * max|x_group| / qmax, 2^-14) )   one scale per group, stored as float16
    q     = clamp(round_half_even(x / float32(scale)), -qmax - 1, qmax)   int8 holding b-bit values
    x_hat = q * scale
The division is IEEE float32 (kernels must not use an approximate divide), rounding is half-to-even (torch.round),
and the floor of 2^-14 (float16's smallest normal number) keeps an all-zero group from dividing by zero.
"""
from __future__ import annotations

import torch

MIN_SCALE = 2.0 ** -14


def qmax_of(bits: int) -> int:
    """Largest positive level of a signed symmetric `bits`-bit integer (7 for 4 bits)."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}.")
    return 2 ** (bits - 1) - 1


def _groups(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    K = x.shape[-1]
    G = K if group_size is None else group_size
    if not isinstance(G, int) or G < 1 or K % G:
        raise ValueError(f"group_size={group_size} must divide the last dimension K={K}; "
                         f"choose a divisor of {K} (or None for one group per row).")
    return x.reshape(*x.shape[:-1], K // G, G)


def quantize_symmetric(x: torch.Tensor, bits: int = 4, group_size: int | None = None, clip: float = 1.0):
    """Symmetric round-to-nearest quantization in groups along the last dimension.

    Args:
        x: float tensor [..., K] (any float dtype; computed in float32).
        bits: 2..8.
        group_size: G dividing K, or None for one group per row (per-token / per-output-channel).
        clip: scale the group's max|x| by this ratio (<= 1 clips the largest values).
    Returns:
        q: int8 [..., K] with values in [-2^(bits-1), 2^(bits-1) - 1];
        scale: float16 [..., K // G].
    """
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}.")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip must lie in (0, 1], got {clip}.")
    qmax = qmax_of(bits)
    xg = _groups(x.float(), group_size)
    scale = (clip * xg.abs().amax(dim=-1) / qmax).clamp(min=MIN_SCALE).to(torch.float16)
    q = torch.round(xg / scale.float().unsqueeze(-1)).clamp(-qmax - 1, qmax).to(torch.int8)
    return q.reshape(x.shape), scale


def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_symmetric. q: int8 [..., K]; scale: float16 [..., K // G] -> float32 [..., K]."""
    groups = scale.shape[-1]
    qg = q.reshape(*q.shape[:-1], groups, q.shape[-1] // groups).float()
    return (qg * scale.float().unsqueeze(-1)).reshape(q.shape)


def fake_quantize_symmetric(x: torch.Tensor, bits: int = 4, group_size: int | None = None,
                            clip: float = 1.0) -> torch.Tensor:
    """quantize then dequantize, returned in x's dtype: what the real path computes, simulated in float."""
    q, scale = quantize_symmetric(x, bits, group_size, clip)
    return dequantize_symmetric(q, scale).to(x.dtype)
