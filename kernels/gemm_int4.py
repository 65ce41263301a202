"""Method "fused" of the W4A4 GEMM (kernels/gemm.py): one kernel, the INT4 bytes unpacked in registers to INT8.

It runs on every GPU and in the CPU interpreter. The unpack is two bit operations per byte because it keeps each
nibble in the high half of an int8 (value * 16): `byte << 4` is the low value * 16, `byte & 0xF0` the high value * 16.
The int8 tensor-core dot then carries a factor 256, folded into the scales (an exact power of two).
Small M swaps the operands (weights take the 64/128-row side of the tensor-core tile, the few tokens the 16-row side)
and splits K in one launch (fp32 partials, a counter per tile, the last program to arrive sums) so that every SM
streams weights. On the GPU triton.autotune picks tile, split-K factor and stages per (shape, power-of-two M) among
candidates taken from the H100 sweeps (benchmarks/NOTES.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import m_bucket, tune_bench
from .formats import PackedAtom


@triton.jit(do_not_specialize=["RX", "RY", "KB", "KP", "M_BUCKET"])
def _w4a4_fused_kernel(
        x4, xs4, x8, xs8,            # rows i of the output tile: packed INT4 bytes, INT4 scales, INT8, INT8 scale
        y4, ys4, y8, ys8,            # rows j
        out, res, ws, counters,      # output, residual (or dummy), split-K partials fp32 [SPLIT, M, N], tile counters
        RX, RY, KB, KP,              # rows of x, rows of y, packed INT4 bytes per row, keeper channels
        sx4, sxs, sx8, sxs8, sy4, sys, sy8, sys8,   # row strides (elements)
        so_i, so_j, sr_i, sr_j,      # output / residual strides along i and j
        M_BUCKET,                    # unused by the kernel: the autotuner's key for the token count
        GROUP: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr, GROUP_X: tl.constexpr,
        SPLIT: tl.constexpr, HAS_RES: tl.constexpr, KPC: tl.constexpr):
    # A "step" is one group (G >= 64: G/2 bytes) or one 64-value block holding two groups of 32 (low and high
    # nibbles). Either way the step's bytes split into low and high nibbles that are two contiguous K runs.
    SB: tl.constexpr = GROUP // 2 if GROUP >= 64 else 32
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped ordering: GROUP_X consecutive programs share y tiles, so both operands stay in L2.
    tiles_x = tl.cdiv(RX, BX)
    tiles_y = tl.cdiv(RY, BY)
    in_group = GROUP_X * tiles_y
    first_x = (pid // in_group) * GROUP_X
    size_x = tl.minimum(tiles_x - first_x, GROUP_X)
    tile_x = first_x + (pid % in_group) % size_x
    tile_y = (pid % in_group) // size_x

    ix = tile_x * BX + tl.arange(0, BX)
    iy = tile_y * BY + tl.arange(0, BY)
    # Out-of-range rows read a valid row (wrap-around) instead of masking every load; they are never stored.
    ixl = ix % RX
    iyl = iy % RY
    rb = tl.arange(0, SB)

    acc = tl.zeros((BX, BY), dtype=tl.float32)
    steps = KB // SB
    per_split = tl.cdiv(steps, SPLIT)
    s_lo = pid_k * per_split
    s_hi = tl.minimum(steps, s_lo + per_split)
    # Scales are tiny loads that Triton's pipeliner leaves in the loop, where their latency would stall every
    # step: load step s + 1's scales while step s computes.
    NSC: tl.constexpr = 2 if GROUP == 32 else 1  # scale columns per step
    sn = tl.minimum(s_lo, steps - 1)
    px0 = tl.load(xs4 + ixl * sxs + NSC * sn)
    py0 = tl.load(ys4 + iyl * sys + NSC * sn)
    px1 = tl.load(xs4 + ixl * sxs + NSC * sn + (NSC - 1))
    py1 = tl.load(ys4 + iyl * sys + NSC * sn + (NSC - 1))
    for s in range(s_lo, s_hi):
        sx0 = px0.to(tl.float32) * (1.0 / 256.0)  # the x16 of both operands' nibbles, undone exactly
        sy0 = py0.to(tl.float32)
        sx1 = px1.to(tl.float32) * (1.0 / 256.0)
        sy1 = py1.to(tl.float32)
        sn = tl.minimum(s + 1, steps - 1)
        px0 = tl.load(xs4 + ixl * sxs + NSC * sn)
        py0 = tl.load(ys4 + iyl * sys + NSC * sn)
        if GROUP == 32:
            px1 = tl.load(xs4 + ixl * sxs + NSC * sn + 1)
            py1 = tl.load(ys4 + iyl * sys + NSC * sn + 1)
        xb = tl.load(x4 + ixl[:, None] * sx4 + (s * SB + rb)[None, :]).to(tl.int8, bitcast=True)
        yb = tl.load(y4 + iyl[:, None] * sy4 + (s * SB + rb)[None, :]).to(tl.int8, bitcast=True)
        # value * 16 in an int8: low nibble shifted up, high nibble masked in place (sign bit lands on bit 7).
        x_lo = xb << 4
        x_hi = xb & -16
        y_lo = yb << 4
        y_hi = yb & -16
        d_lo = tl.dot(x_lo, tl.trans(y_lo), out_dtype=tl.int32)
        d_hi = tl.dot(x_hi, tl.trans(y_hi), out_dtype=tl.int32)
        if GROUP == 32:  # low nibbles are group 2s, high nibbles group 2s + 1
            acc += d_lo.to(tl.float32) * (sx0[:, None] * sy0[None, :])
            acc += d_hi.to(tl.float32) * (sx1[:, None] * sy1[None, :])
        else:
            acc += (d_lo + d_hi).to(tl.float32) * (sx0[:, None] * sy0[None, :])

    if pid_k == SPLIT - 1:  # the INT8 keeper channels, once per output tile (the last split has the fewest steps)
        rk = tl.arange(0, KPC)
        kacc = tl.zeros((BX, BY), dtype=tl.float32)
        for k0 in range(0, KP, KPC):
            kmask = (k0 + rk) < KP
            xk = tl.load(x8 + ixl[:, None] * sx8 + (k0 + rk)[None, :], mask=kmask[None, :], other=0)
            yk = tl.load(y8 + iyl[:, None] * sy8 + (k0 + rk)[None, :], mask=kmask[None, :], other=0)
            kacc += tl.dot(xk, tl.trans(yk), out_dtype=tl.int32).to(tl.float32)  # exact per chunk of 64
        s8x = tl.load(xs8 + ixl * sxs8).to(tl.float32)
        s8y = tl.load(ys8 + iyl * sys8).to(tl.float32)
        acc += kacc * (s8x[:, None] * s8y[None, :])

    mask = (ix[:, None] < RX) & (iy[None, :] < RY)
    o_off = ix[:, None] * so_i + iy[None, :] * so_j
    if SPLIT > 1:
        # Split-K in one launch: every split writes its fp32 partial, the last one to arrive for this tile sums
        # them (a counter per tile, reset by that last program so the next call starts from zero).
        tl.store(ws + pid_k * RX * RY + o_off, acc, mask=mask)
        tl.debug_barrier()  # all of this program's partial stores are issued before it signals
        arrived = tl.atomic_add(counters + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            acc = tl.zeros((BX, BY), dtype=tl.float32)
            for k in tl.static_range(SPLIT):
                acc += tl.load(ws + k * RX * RY + o_off, mask=mask, other=0, cache_modifier=".cg")
            if HAS_RES:
                acc += tl.load(res + ix[:, None] * sr_i + iy[None, :] * sr_j, mask=mask, other=0).to(tl.float32)
            tl.store(out + o_off, acc.to(out.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counters + pid, 0)
    else:
        if HAS_RES:
            acc += tl.load(res + ix[:, None] * sr_i + iy[None, :] * sr_j, mask=mask, other=0).to(tl.float32)
        tl.store(out + o_off, acc.to(out.dtype.element_ty), mask=mask)



_COUNTERS: dict = {}


def _tile_counters(device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per output tile, for the one-launch split-K (each call leaves them at zero)."""
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        c = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = c
    return c


def _fused_args(x: PackedAtom, y: PackedAtom, out, residual, swap: bool, ws, counters) -> list:
    RX, RY = x.rows, y.rows
    so_i, so_j = (1, out.stride(0)) if swap else (out.stride(0), 1)
    if residual is not None:
        sr_i, sr_j = (1, residual.stride(0)) if swap else (residual.stride(0), 1)
    else:
        sr_i = sr_j = 0
    return [x.q4, x.s4, x.q8, x.s8, y.q4, y.s4, y.q8, y.s8,
            out, residual if residual is not None else out, ws, counters,
            RX, RY, x.q4.shape[1], x.keeper,
            x.q4.stride(0), x.s4.stride(0), max(x.q8.stride(0), 1), x.s8.stride(0),
            y.q4.stride(0), y.s4.stride(0), max(y.q8.stride(0), 1), y.s8.stride(0),
            so_i, so_j, sr_i, sr_j, m_bucket(RY)]


def _steps(p: PackedAtom) -> int:
    return p.q4.shape[1] // (p.group_size // 2 if p.group_size >= 64 else 32)


def _launch_fused(x: PackedAtom, y: PackedAtom, out: torch.Tensor, residual, swap: bool,
                  BX: int, BY: int, split: int, num_warps: int, num_stages: int, group_x: int = 8) -> None:
    """One explicit configuration: out[i, j] over x rows i, y rows j; swap=True writes out[j, i] (x = weights,
    y = tokens)."""
    split = max(1, min(split, _steps(x)))
    tiles = triton.cdiv(x.rows, BX) * triton.cdiv(y.rows, BY)
    ws = counters = out
    if split > 1:
        ws = torch.empty(split, x.rows, y.rows, dtype=torch.float32, device=out.device)
        counters = _tile_counters(out.device, tiles)
    _w4a4_fused_kernel[(tiles, split)](
        *_fused_args(x, y, out, residual, swap, ws, counters),
        GROUP=x.group_size, BX=BX, BY=BY, GROUP_X=group_x, SPLIT=split, HAS_RES=residual is not None, KPC=64,
        num_warps=num_warps, num_stages=num_stages)


def _prune_split(configs, named_args, **kwargs):
    # More splits than K steps would leave programs with nothing to do.
    G = kwargs.get("GROUP", named_args.get("GROUP"))
    steps = named_args["KB"] // (G // 2 if G >= 64 else 32)
    kept = [c for c in configs if c.kwargs["SPLIT"] <= max(1, steps)]
    return kept or configs[:1]


# GPU configurations of the fused kernel with swapped operands (weights on the 64/128-row side of the tensor-core
# tile, tokens on the BY side), by token count. Split-K fills the 132 SMs when N / BX tiles alone do not.
# The candidates come from benchmarks/sweep_gemm.py on an H100 (benchmarks/NOTES.md); autotune picks per shape.
SWAP_CLASSES = [  # (max M, BY, configs (BX, SPLIT, num_stages)); the first one is the untuned default
    (16, 16, [(64, 4, 4)] + [(bx, sp, 4) for bx in (64, 128) for sp in (1, 2, 8, 16)] + [(128, 4, 4)]
     + [(64, sp, ns) for sp in (1, 4, 8) for ns in (3, 6)]),
    (64, 64, [(64, 2, 4)] + [(bx, sp, 4) for bx in (64, 128) for sp in (1, 4, 8)] + [(128, 2, 4), (64, 1, 3)]),
    (256, 128, [(64, 1, 4), (64, 2, 4), (128, 1, 4), (64, 1, 3)]),
]
_SWAP_TUNERS: dict = {}


def _swap_tuner(cls: int):
    if cls not in _SWAP_TUNERS:
        configs = [triton.Config({"BX": bx, "SPLIT": sp}, num_warps=4, num_stages=ns)
                   for bx, sp, ns in SWAP_CLASSES[cls][2]]
        _SWAP_TUNERS[cls] = triton.autotune(configs, key=["RX", "KB", "KP", "M_BUCKET"], do_bench=tune_bench,
                                            prune_configs_by={"early_config_prune": _prune_split})(_w4a4_fused_kernel)
    return _SWAP_TUNERS[cls]


def _launch_swap_tuned(a: PackedAtom, w: PackedAtom, out: torch.Tensor, residual,
                       autotune: bool = True) -> None:
    M, N = a.rows, w.rows
    cls = next(i for i, (max_m, _, _) in enumerate(SWAP_CLASSES) if M <= max_m)
    BY = SWAP_CLASSES[cls][1]
    if not autotune:
        BX, split, ns = SWAP_CLASSES[cls][2][0]
        _launch_fused(w, a, out, residual, True, BX, BY, split, 4, ns)
        return
    max_split = max(sp for _, sp, _ in SWAP_CLASSES[cls][2])
    ws = torch.empty(max_split, N, M, dtype=torch.float32, device=out.device) if max_split > 1 else out
    counters = _tile_counters(out.device, triton.cdiv(N, 64) * triton.cdiv(M, BY))
    grid = lambda meta: (triton.cdiv(N, meta["BX"]) * triton.cdiv(M, BY), meta["SPLIT"])  # noqa: E731
    _swap_tuner(cls)[grid](*_fused_args(w, a, out, residual, True, ws, counters),
                           GROUP=a.group_size, BY=BY, GROUP_X=8, HAS_RES=residual is not None, KPC=64)


_NORMAL_CONFIGS = [triton.Config({"BX": bx, "BY": by}, num_warps=nw, num_stages=ns)
                   for bx, by, nw, ns in ((64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3))]
_normal_tuner = None


def _launch_normal_tuned(a: PackedAtom, w: PackedAtom, out: torch.Tensor, residual,
                         autotune: bool = True) -> None:
    """The fused kernel without swap or split (mid-size M on GPUs without FP8 tensor cores)."""
    global _normal_tuner
    if not autotune:
        _launch_fused(a, w, out, residual, False, 64, 128, 1, 4, 4)
        return
    if _normal_tuner is None:
        _normal_tuner = triton.autotune(_NORMAL_CONFIGS, key=["RX", "RY", "KB", "M_BUCKET"],
                                        do_bench=tune_bench)(_w4a4_fused_kernel)
    grid = lambda meta: (triton.cdiv(a.rows, meta["BX"]) * triton.cdiv(w.rows, meta["BY"]), 1)  # noqa: E731
    _normal_tuner[grid](*_fused_args(a, w, out, residual, False, out, out),
                        GROUP=a.group_size, GROUP_X=8, SPLIT=1, HAS_RES=residual is not None, KPC=64)
