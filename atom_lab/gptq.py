"""GPTQ (Frantar et al., ICLR 2023) for Atom's weight format: reordered columns, INT4 groups, INT8 keeper columns.

GPTQ quantizes a weight W [N, K] one input column at a time and pushes each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's calibration inputs, H = X^T X:
    for column k:  q_k = Q(w_k);  e = (w_k - q_k) / Hinv[k, k];  W[:, k+1:] -= e Hinv[k, k+1:]
which minimises || X W^T - X Q^T ||^2 far better than rounding each weight alone (RTN). With H = identity the
update term is zero and GPTQ is exactly RTN, which the tests use.

Group scales are computed when GPTQ reaches a group's first column, from the weights as updated so far (what the
GPTQ reference code does without static groups). Atom's layout after reordering is a list of column groups: the
first K - keeper columns in INT4 groups of G, then ONE group of the `keeper` outlier columns in INT8 with one scale
per output row. The levels and float16 scales returned here are therefore exactly the packed format's q4/s4 and
q8/s8 (GPTQResult.to_packed_atom). Act-order is left out on purpose: Atom fixes the column order by its own
outlier metric, and the packed format needs that order.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from atom_lab.quantizers import qmax_of, quantize_asymmetric, quantize_symmetric


@dataclass(frozen=True)
class ColumnGroup:
    """Columns [start, end) of a weight share one scale (and zero) per output row."""
    start: int
    end: int
    bits: int  # 16 = left in float (not quantized)
    clip: float = 1.0
    symmetric: bool = True


def column_groups(K: int, bits: int = 4, group_size: int | None = None, keeper: int = 0, keeper_bits: int = 8,
                  clip: float = 1.0, symmetric: bool = True) -> list[ColumnGroup]:
    """Atom's column layout of a reordered weight [N, K]: normal groups, then the keeper group (never clipped).

    group_size None means one group over all K - keeper columns (per output channel).
    """
    normal = K - keeper
    if not 0 <= keeper < K:
        raise ValueError(f"keeper={keeper} must lie in [0, K={K}); use a smaller keeper.")
    G = normal if group_size is None else group_size
    if G < 1 or normal % G:
        raise ValueError(f"group_size={group_size} does not divide the {normal} non-keeper columns (K={K} - keeper="
                         f"{keeper}); choose a group size dividing {normal} or change keeper.")
    groups = [ColumnGroup(s, s + G, bits, clip, symmetric) for s in range(0, normal, G)]
    if keeper:
        groups.append(ColumnGroup(normal, K, keeper_bits, 1.0, True))
    return groups


@dataclass
class GPTQResult:
    """What GPTQ produced for a weight [N, K].

    weight: float32 [N, K]  the dequantized weight (levels times scales), what the reference forward multiplies by.
    q:      int16 [N, K]    integer levels (signed for symmetric groups, 0..2^b-1 for asymmetric; float groups: 0).
    scale:  float16 [N, n_groups]; zero: uint8 [N, n_groups] (0 for symmetric groups).
    groups: the column layout.
    """
    weight: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    groups: list[ColumnGroup]

    def to_packed_atom(self):
        """The packed Atom weight (kernels/formats.py): GPTQ's INT4 levels and scales ARE q4/s4, its INT8 keeper
        levels and per-row scale ARE q8/s8. Needs equal-size symmetric 4-bit groups, then at most one 8-bit group."""
        from atom_lab.kernels import PackedAtom, check_atom_shape
        from atom_lab.kernels.pack import pack_int4_ref

        g4 = [g for g in self.groups if g.bits == 4]
        g8 = [g for g in self.groups if g.bits == 8]
        sizes = {g.end - g.start for g in g4}
        if (len(g4) + len(g8) != len(self.groups) or len(g8) > 1 or len(sizes) != 1
                or not all(g.symmetric for g in self.groups) or (g8 and g8[0].end != self.q.shape[1])):
            raise ValueError("to_packed_atom needs symmetric INT4 groups of one size followed by at most one INT8 "
                             "keeper group; this layout is " + ", ".join(f"[{g.start}:{g.end}] {g.bits}b"
                                                                          for g in self.groups))
        N, K = self.q.shape
        keeper = K - g4[-1].end
        G = sizes.pop()
        check_atom_shape(K, keeper, G)
        q4 = self.q[:, : K - keeper].to(torch.int8)
        s4 = self.scale[:, : len(g4)].contiguous()
        if keeper:
            q8 = self.q[:, K - keeper:].to(torch.int8).contiguous()
            s8 = self.scale[:, len(g4):].contiguous()
        else:
            q8 = torch.zeros(N, 0, dtype=torch.int8, device=self.q.device)
            s8 = torch.ones(N, 1, dtype=torch.float16, device=self.q.device)
        return PackedAtom(pack_int4_ref(q4), s4, q8, s8, G)


def _blocks(groups: list[ColumnGroup], block_size: int) -> list[tuple[int, int]]:
    """Lazy-update blocks made of whole groups, so a group's scale is always computed from fully updated columns.
    A group wider than block_size (per-channel) is cut into chunks; its scale is taken at its first chunk."""
    blocks, start = [], None
    for g in groups:
        if g.end - g.start > block_size:
            if start is not None:
                blocks.append((start, g.start))
                start = None
            blocks += [(s, min(s + block_size, g.end)) for s in range(g.start, g.end, block_size)]
            continue
        if start is None:
            start = g.start
        elif g.end - start > block_size:
            blocks.append((start, g.start))
            start = g.start
    if start is not None:
        blocks.append((start, groups[-1].end))
    return blocks


@contextmanager
def _one_thread():
    """The column loop runs thousands of tiny ops; intra-op threads only add synchronisation (20x slower on a
    busy 2-core machine), so it runs on one thread and restores the setting after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _inverse_hessian_chol(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian (what GPTQ's column updates read), float32 [K, K].
    float32 as in the GPTQ reference code; float64 only if float32 Cholesky fails."""
    for dtype in (torch.float32, torch.float64):
        H = hessian.to(dtype).clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        H.diagonal().add_(damp * H.diagonal().mean())
        try:
            L = torch.linalg.cholesky(H)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
        except torch.linalg.LinAlgError:
            continue
    raise ValueError(f"GPTQ: the damped Hessian is not positive definite (damp={damp}); increase damp "
                     "(e.g. 0.1) or use more calibration tokens.")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, groups: list[ColumnGroup], damp: float = 0.01,
                  block_size: int = 128) -> GPTQResult:
    """GPTQ with group-wise scales.

    Args:
        weight: float [N, K], columns already in their final (reordered) order.
        hessian: float [K, K], X^T X of the layer's calibration inputs X [T, K] in the same column order
            (any positive factor; damping is relative to its mean diagonal).
        groups: the column layout (column_groups), covering 0..K in order.
        damp: fraction of the mean Hessian diagonal added to the diagonal (the paper's 1%).
        block_size: columns per lazy-batch update (a speed knob; the result does not depend on it beyond float
            summation order).
    Returns:
        GPTQResult. Input channels never active in calibration (zero Hessian diagonal) get zero weight, as in GPTQ.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a float [N, K] matrix, got {weight.dtype} {tuple(weight.shape)}.")
    N, K = weight.shape
    if hessian.shape != (K, K):
        raise ValueError(f"hessian must be [K, K] = [{K}, {K}] for a weight [N={N}, K={K}], "
                         f"got {tuple(hessian.shape)}.")
    if not torch.isfinite(hessian).all() or not torch.isfinite(weight).all():
        raise ValueError("weight or hessian holds NaN/inf: check the calibration activations and the model dtype.")
    if not groups or groups[0].start != 0 or groups[-1].end != K or any(
            a.end != b.start for a, b in zip(groups, groups[1:])):
        raise ValueError(f"groups must tile the K={K} columns in order; build them with column_groups(K, ...).")
    if not damp > 0:
        raise ValueError(f"damp must be > 0 (e.g. 0.01), got {damp}.")

    W = weight.detach().float().clone()
    W[:, torch.diag(hessian) == 0] = 0.0
    Q = torch.zeros_like(W)
    levels = torch.zeros(N, K, dtype=torch.int16, device=W.device)
    scale = torch.ones(N, len(groups), dtype=torch.float16, device=W.device)
    zero = torch.zeros(N, len(groups), dtype=torch.uint8, device=W.device)
    with _one_thread():
        Hinv = _inverse_hessian_chol(hessian.to(W.device), damp)
        _gptq_loop(W, Hinv, Q, levels, scale, zero, groups, block_size)
    return GPTQResult(weight=Q, q=levels, scale=scale, zero=zero, groups=groups)


def _gptq_loop(W, Hinv, Q, levels, scale, zero, groups, block_size):
    group_of = {g.start: (i, g) for i, g in enumerate(groups)}
    gi = gcur = s32 = z32 = lo = hi = None  # the current group and its scale/zero, carried across a wide group's chunks
    # The column loop runs ~10 small vector ops per column and is bound by per-op overhead, so it runs in NumPy on
    # the CPU (about 3x less overhead than torch ops), on transposed blocks so each column is contiguous. Only the
    # block-to-block update, a real matmul, stays on W's device. float32 division, round-half-even (rint) and
    # clamping are IEEE operations, so the levels are bit-identical to the torch quantizers.
    for b0, b1 in _blocks(groups, block_size):
        WT = W[:, b0:b1].T.contiguous().cpu()  # [cols, N]
        QT, LT, ET = torch.empty_like(WT), torch.empty_like(WT), torch.empty_like(WT)
        wt, qt, lt, et = WT.numpy(), QT.numpy(), LT.numpy(), ET.numpy()
        h1 = Hinv[b0:b1, b0:b1].cpu().numpy()
        dinv = (1.0 / np.diag(h1)).astype(np.float32)
        for j in range(b1 - b0):
            col = b0 + j
            if col in group_of:  # the first column of a group: its scale comes from the weights as updated so far
                gi, gcur = group_of[col]
                if gcur.bits < 16:
                    cols = WT[j: j + gcur.end - col].T if gcur.end <= b1 else W[:, col: gcur.end].cpu()
                    if gcur.symmetric:
                        _, s = quantize_symmetric(cols, gcur.bits, None, gcur.clip)
                        z = torch.zeros_like(s, dtype=torch.uint8)
                        lo, hi = -qmax_of(gcur.bits) - 1, qmax_of(gcur.bits)
                    else:
                        _, s, z = quantize_asymmetric(cols, gcur.bits, None, gcur.clip)
                        lo, hi = 0, 2 ** gcur.bits - 1
                    scale[:, gi], zero[:, gi] = s[:, 0].to(scale.device), z[:, 0].to(zero.device)
                    s32, z32 = s[:, 0].float().numpy(), z[:, 0].float().numpy()
            w, q, e = wt[j], qt[j], et[j]
            if gcur.bits >= 16:
                q[:] = w
                lt[j] = 0.0
            elif gcur.symmetric:
                lev = np.rint(w / s32)
                np.clip(lev, lo, hi, out=lev)
                lt[j] = lev
                np.multiply(lev, s32, out=q)
            else:
                lev = np.rint(w / s32) + z32
                np.clip(lev, lo, hi, out=lev)
                lt[j] = lev
                np.multiply(lev - z32, s32, out=q)
            np.subtract(w, q, out=e)
            e *= dinv[j]
            wt[j + 1:] -= np.outer(h1[j, j + 1:], e)
        Q[:, b0:b1] = QT.T.to(Q.device)
        levels[:, b0:b1] = LT.T.to(torch.int16).to(levels.device)
        W[:, b1:] -= ET.T.to(W.device) @ Hinv[b0:b1, b1:]


@torch.no_grad()
def rtn_quantize(weight: torch.Tensor, groups: list[ColumnGroup]) -> GPTQResult:
    """Round-to-nearest in the same layout and result type as gptq_quantize (the baseline GPTQ improves on).
    gptq_quantize with an identity Hessian gives the same result bit for bit (a test checks it)."""
    from atom_lab.quantizers import dequantize_asymmetric, dequantize_symmetric

    W = weight.detach().float()
    N, K = W.shape
    Q = W.clone()
    levels = torch.zeros(N, K, dtype=torch.int16, device=W.device)
    scale = torch.ones(N, len(groups), dtype=torch.float16, device=W.device)
    zero = torch.zeros(N, len(groups), dtype=torch.uint8, device=W.device)
    for i, g in enumerate(groups):
        if g.bits >= 16:
            continue
        cols = W[:, g.start: g.end]
        if g.symmetric:
            q, s = quantize_symmetric(cols, g.bits, None, g.clip)
            Q[:, g.start: g.end] = dequantize_symmetric(q, s)
        else:
            q, s, z = quantize_asymmetric(cols, g.bits, None, g.clip)
            Q[:, g.start: g.end] = dequantize_asymmetric(q, s, z)
            zero[:, i] = z[:, 0]
        levels[:, g.start: g.end] = q.to(torch.int16)
        scale[:, i] = s[:, 0]
    return GPTQResult(weight=Q, q=levels, scale=scale, zero=zero, groups=groups)
