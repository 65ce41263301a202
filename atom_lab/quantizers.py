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


def _div(x: torch.Tensor, d: int) -> torch.Tensor:
    """x / d correctly rounded on every device. On CUDA, PyTorch turns `tensor / python_number` into a multiply by
    the reciprocal (up to 1 ulp off); a scale 1 ulp off can round to the next float16 and move every level of its
    group, so the reference would part from the kernels' IEEE division (tl.math.div_rn). A tensor divisor on x's
    device takes the true-division path."""
    return x / torch.tensor(float(d), dtype=x.dtype, device=x.device)


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
    scale = _div(clip * xg.abs().amax(dim=-1), qmax).clamp(min=MIN_SCALE).to(torch.float16)
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


# ---------------------------------------------------------------------------------------------------------------
# Beyond the contract: asymmetric quantization, the granularities the baselines use, mixed INT4/INT8 rows, and
# clip ratios searched by output error. Everything below is built from the same rounding rules as above.
# ---------------------------------------------------------------------------------------------------------------

GRANULARITIES = ("tensor", "channel", "token", "group")


def quantize_asymmetric(x: torch.Tensor, bits: int = 4, group_size: int | None = None, clip: float = 1.0):
    """Asymmetric (min/max, "zero point") round-to-nearest quantization in groups along the last dimension.

    Per group, with maxq = 2^bits - 1 and the range widened to contain 0 (so an exact zero stays exact):
        lo = clip * min(min(x), 0),  hi = clip * max(max(x), 0)
        scale = float16( max((hi - lo) / maxq, 2^-14) )
        zero  = clamp(round_half_even(-lo / float32(scale)), 0, maxq)
        q     = clamp(round_half_even(x / float32(scale)) + zero, 0, maxq)
        x_hat = (q - zero) * scale
    Args:
        x: float [..., K]. bits: 2..8. group_size: G dividing K, or None for one group per row. clip: (0, 1].
    Returns:
        q: uint8 [..., K] in [0, 2^bits - 1]; scale: float16 [..., K // G]; zero: uint8 [..., K // G].
    """
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}.")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip must lie in (0, 1], got {clip}.")
    qmax_of(bits)
    maxq = 2 ** bits - 1
    xg = _groups(x.float(), group_size)
    lo = clip * xg.amin(dim=-1).clamp(max=0.0)
    hi = clip * xg.amax(dim=-1).clamp(min=0.0)
    scale = _div(hi - lo, maxq).clamp(min=MIN_SCALE).to(torch.float16)
    s32 = scale.float()
    zero = torch.round(-lo / s32).clamp(0, maxq)
    q = (torch.round(xg / s32.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, maxq)
    return q.to(torch.uint8).reshape(x.shape), scale, zero.to(torch.uint8)


def dequantize_asymmetric(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_asymmetric. q: uint8 [..., K]; scale: float16 [..., K // G]; zero: uint8 [..., K // G]
    -> float32 [..., K]."""
    groups = scale.shape[-1]
    qg = q.reshape(*q.shape[:-1], groups, q.shape[-1] // groups).float()
    return ((qg - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).reshape(q.shape)


def fake_quantize_asymmetric(x: torch.Tensor, bits: int = 4, group_size: int | None = None,
                             clip: float = 1.0) -> torch.Tensor:
    """quantize_asymmetric then dequantize, in x's dtype."""
    return dequantize_asymmetric(*quantize_asymmetric(x, bits, group_size, clip)).to(x.dtype)


def fake_quantize(x: torch.Tensor, bits: int = 4, granularity: str = "group", group_size: int | None = None,
                  symmetric: bool = True, clip: float = 1.0) -> torch.Tensor:
    """Round-to-nearest fake quantization at a named granularity, returned in x's dtype.

    Args:
        x: float [..., K]: a weight [N, K] (out_features x in_features) or an activation [..., tokens, K].
        granularity: "tensor"  one scale for the whole tensor;
                     "channel" one scale per output channel of a weight = per row of [N, K];
                     "token"   one scale per token of an activation = per row of [..., K] (same reduction as
                               "channel": both reduce the input dimension K, the name says what the row is);
                     "group"   one scale per `group_size` consecutive entries of the input dimension.
        group_size: required for "group" (it must divide K); ignored otherwise.
        symmetric: the contract's symmetric quantizer, or the asymmetric (zero-point) one.
        bits, clip: as in quantize_symmetric.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}.")
    if granularity == "group" and group_size is None:
        raise ValueError("granularity='group' needs group_size (e.g. 32, 64 or 128, dividing the last dimension).")
    fq = fake_quantize_symmetric if symmetric else fake_quantize_asymmetric
    if granularity == "tensor":
        return fq(x.reshape(1, -1), bits, None, clip).reshape(x.shape)
    return fq(x, bits, group_size if granularity == "group" else None, clip)


def _fake_symmetric_fast(x: torch.Tensor, bits: int, group_size: int | None, clip: float) -> torch.Tensor:
    """fake_quantize_symmetric in float32 with fewer passes over memory (no int8 round trip): the same numbers bit
    for bit, since clamped rounded values are small integers that float32 holds exactly. Used at run time."""
    qmax = qmax_of(bits)
    xg = _groups(x.float(), group_size)
    scale = _div(clip * xg.abs().amax(dim=-1, keepdim=True), qmax).clamp_(min=MIN_SCALE).half().float()
    return torch.round(xg / scale).clamp_(-qmax - 1, qmax).mul_(scale).reshape(x.shape)


def fake_quantize_mixed(x: torch.Tensor, bits: int = 4, group_size: int | None = None, keeper: int = 0,
                        keeper_bits: int = 8, clip: float = 1.0, symmetric: bool = True) -> torch.Tensor:
    """Atom's mixed-precision row quantization, simulated in float: x is already reordered (outliers last).

    The first K - keeper channels: `bits`, groups of group_size (None: one group per row), clipped by `clip`.
    The last `keeper` channels: `keeper_bits` (16 = left in float16), one scale per row, never clipped.
    With bits=4, keeper_bits=8, symmetric and a legal group size this is exactly
    dequantize_atom_ref(quantize_atom_ref(x, group_size, keeper, clip)) (a test checks it).
    Args:
        x: float [..., K]. Returns: same shape and dtype.
    """
    K = x.shape[-1]
    if not isinstance(keeper, int) or not 0 <= keeper < K:
        raise ValueError(f"keeper={keeper} must be an int in [0, K={K}) (the INT8 outlier channels); "
                         f"use a smaller keeper.")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip must lie in (0, 1], got {clip}.")
    if symmetric:
        normal = _fake_symmetric_fast(x[..., : K - keeper], bits, group_size, clip)
    else:
        normal = fake_quantize_asymmetric(x[..., : K - keeper], bits, group_size, clip).float()
    if keeper == 0:
        return normal.to(x.dtype)
    outl = x[..., K - keeper:]
    if keeper_bits >= 16:
        outl = outl.to(torch.float16).float()
    else:
        outl = _fake_symmetric_fast(outl, keeper_bits, None, 1.0)
    return torch.cat([normal, outl], dim=-1).to(x.dtype)


CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0, 0.95, ..., 0.5


@torch.no_grad()
def search_weight_clip(weight: torch.Tensor, x: torch.Tensor, quantize_weight, grid=CLIP_GRID) -> tuple[float, list]:
    """The weight clip ratio that minimises the layer's output error  || x W^T - x Q(W, clip)^T ||^2.

    Args:
        weight: float [N, K]. x: float [T, K] calibration inputs of the layer (same channel order as weight).
        quantize_weight: callable (weight, clip) -> fake-quantized weight [N, K].
        grid: candidate ratios in (0, 1].
    Returns:
        (best clip, [(clip, mse) for every candidate]).
    """
    x = x.reshape(-1, x.shape[-1]).float()
    y = x @ weight.float().T
    curve = [(c, float(((x @ quantize_weight(weight, c).float().T) - y).pow(2).mean())) for c in grid]
    return min(curve, key=lambda t: t[1])[0], curve


@torch.no_grad()
def search_act_clip(x: torch.Tensor, weight: torch.Tensor, quantize_act, grid=CLIP_GRID) -> tuple[float, list]:
    """The activation clip ratio that minimises || x W^T - Q(x, clip) W^T ||^2 over calibration tokens.

    Args:
        x: float [T, K] calibration inputs. weight: float [N, K] (the weight the layer will multiply with).
        quantize_act: callable (x, clip) -> fake-quantized x [T, K].
    Returns:
        (best clip, [(clip, mse) for every candidate]).
    """
    x = x.reshape(-1, x.shape[-1]).float()
    w = weight.float()
    y = x @ w.T
    curve = [(c, float(((quantize_act(x, c) @ w.T) - y).pow(2).mean())) for c in grid]
    return min(curve, key=lambda t: t[1])[0], curve
