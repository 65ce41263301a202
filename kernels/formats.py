"""The packed Atom format shared by every kernel: one matrix, rows quantized independently.

A row (one token of an activation, or one output channel of a weight) of K channels, already in Atom's reordered
channel order, is stored in two parts:
    normal channels [0, K - keeper):  INT4, symmetric, groups of `group_size`, packed two per byte (kernels/pack.py)
        q4: uint8   [R, (K - keeper) // 2]
        s4: float16 [R, (K - keeper) // group_size]
    keeper channels [K - keeper, K): the outliers, INT8, symmetric, one scale per row
        q8: int8    [R, keeper]
        s8: float16 [R, 1]
The quantizer is atom_lab.quantizers.quantize_symmetric (the contract every kernel matches bit for bit).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from atom_lab.quantizers import dequantize_symmetric, quantize_symmetric

from .pack import PACK_BLOCK, pack_int4_ref, unpack_int4_ref


@dataclass
class PackedAtom:
    q4: torch.Tensor
    s4: torch.Tensor
    q8: torch.Tensor
    s8: torch.Tensor
    group_size: int

    @property
    def rows(self) -> int:
        return self.q4.shape[0]

    @property
    def keeper(self) -> int:
        return self.q8.shape[1]

    @property
    def in_features(self) -> int:
        return self.q4.shape[1] * 2 + self.keeper

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q4, self.s4, self.q8, self.s8))

    def to(self, device) -> "PackedAtom":
        return PackedAtom(self.q4.to(device), self.s4.to(device), self.q8.to(device), self.s8.to(device),
                          self.group_size)


def check_atom_shape(K: int, keeper: int, group_size: int) -> None:
    """Raise a clear error unless (K, keeper, group_size) can be stored in the packed Atom format."""
    if keeper < 0 or keeper > K:
        raise ValueError(f"keeper={keeper} must lie in [0, K={K}] (it counts the INT8 outlier channels).")
    normal = K - keeper
    if normal == 0:
        raise ValueError(f"keeper={keeper} leaves no INT4 channels out of K={K}; use a smaller keeper.")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size={group_size} is not supported by the kernels; use 32, 64 or 128.")
    if normal % group_size or normal % PACK_BLOCK:
        raise ValueError(f"The {normal} INT4 channels (K={K} - keeper={keeper}) must be a multiple of group_size="
                         f"{group_size} and of the packing block {PACK_BLOCK}; change keeper or group_size.")


def quantize_atom_ref(x: torch.Tensor, group_size: int, keeper: int, clip: float = 1.0) -> PackedAtom:
    """PyTorch reference: quantize rows of x (already reordered, outliers last) into the packed Atom format.

    Args:
        x: float [R, K]. clip applies to the INT4 groups only (the INT8 keeper part is never clipped).
    """
    R, K = x.shape
    check_atom_shape(K, keeper, group_size)
    q4, s4 = quantize_symmetric(x[:, : K - keeper], bits=4, group_size=group_size, clip=clip)
    if keeper:
        q8, s8 = quantize_symmetric(x[:, K - keeper:], bits=8, group_size=None)
    else:  # an empty INT8 part keeps the same shapes everywhere downstream
        q8 = torch.zeros(R, 0, dtype=torch.int8, device=x.device)
        s8 = torch.ones(R, 1, dtype=torch.float16, device=x.device)
    return PackedAtom(pack_int4_ref(q4), s4, q8, s8, group_size)


def dequantize_atom_ref(p: PackedAtom) -> torch.Tensor:
    """float32 [R, K]: the values the packed tensors stand for."""
    x4 = dequantize_symmetric(unpack_int4_ref(p.q4), p.s4)
    x8 = p.q8.float() * p.s8.float()
    return torch.cat([x4, x8], dim=1)
