"""Methods "fused" and "fused8" of the W4A4 GEMM (kernels/gemm.py): one kernel, the INT4 bytes unpacked in registers
to INT8.

It runs on every GPU and in the CPU interpreter. The unpack is two bit operations per byte because it keeps each
nibble in the high half of an int8 (value * 16): `byte << 4` is the low value * 16, `byte & 0xF0` the high value * 16.
The int8 tensor-core dot then carries a factor 256, folded into the scales (an exact power of two). On a GPU the
shift runs as inline PTX on four bytes per register (_lo_x16); the interpreter runs the plain shift (the same bits).
"fused8" (bottom of this file) first unpacks the activations to INT8 codes in one small launch, so that the kernel's
token operand goes from the copy straight to the tensor cores (its Y8 mode); it is the H200's choice at 65-256 tokens.
Small M swaps the operands (weights take the 64/128-row side of the tensor-core tile, the few tokens the 16-row side)
and splits K in one launch (fp32 partials, a counter per tile, the last program to arrive sums) so that every SM
streams weights. On the GPU triton.autotune picks tile, split-K factor and stages per (shape, power-of-two M) among
candidates taken from the H100 sweeps (benchmarks/NOTES.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, m_bucket, tune_bench
from .formats import PackedAtom


@triton.jit
def _lo_x16(b, ASM: tl.constexpr):
    """b << 4 per int8 (the low nibble as value * 16). ASM: on four bytes of a 32-bit register at once,
    (w << 4) & 0xF0F0F0F0 (the mask drops the bits that crossed into the next byte), 2 instructions per 4 bytes;
    LLVM lowers the int8 shift byte by byte (extract, 16-bit shift, repack: ~5 instructions per byte). The
    interpreter runs no PTX: there ASM is False and the plain shift (the same bits) runs."""
    if ASM:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }",
                                         "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
    else:
        return b << 4


@triton.jit(do_not_specialize=["RX", "RY", "KB", "KP", "M_BUCKET"])
def _w4a4_fused_kernel(
        x4, xs4, x8, xs8,            # rows i of the output tile: packed INT4 bytes, INT4 scales, INT8, INT8 scale
        y4, ys4, y8, ys8,            # rows j
        out, res, ws, counters,      # output, residual (or dummy), split-K partials fp32 [SPLIT, M, N], tile counters
        RX, RY, KB, KP,              # rows of x, rows of y, packed INT4 bytes per row, keeper channels
        sx4, sxs, sx8, sxs8, sy4, sys, sy8, sys8,   # row strides (elements)
        sxg, syg,                    # strides of the INT4 scales along the groups (1: [rows, groups]; rows: transposed)
        so_i, so_j, sr_i, sr_j,      # output / residual strides along i and j
        M_BUCKET,                    # unused by the kernel: the autotuner's key for the token count
        GROUP: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr, GROUP_X: tl.constexpr,
        SPLIT: tl.constexpr, HAS_RES: tl.constexpr, KPC: tl.constexpr, Y8: tl.constexpr = False,
        ASM: tl.constexpr = False):
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
    # Y8: the y operand holds INT8 codes (values -8..7) in the packed nibble order (activation_codes: per step,
    # the SB low nibbles, then the SB high nibbles) instead of packed bytes: its tile goes from the copy straight
    # to the tensor cores, only x is unpacked (x16), so the product carries 16 instead of 256.
    # (One K = 2 SB dot per step instead of the two chained ones, x's bytes read twice, ran 0.62-0.89x as fast on
    # the H200: benchmarks/NOTES.md, fourth session.)
    UNDO: tl.constexpr = 1.0 / 16.0 if Y8 else 1.0 / 256.0
    sn = tl.minimum(s_lo, steps - 1)
    px0 = tl.load(xs4 + ixl * sxs + (NSC * sn) * sxg)
    py0 = tl.load(ys4 + iyl * sys + (NSC * sn) * syg)
    px1 = tl.load(xs4 + ixl * sxs + (NSC * sn + (NSC - 1)) * sxg)
    py1 = tl.load(ys4 + iyl * sys + (NSC * sn + (NSC - 1)) * syg)
    for s in range(s_lo, s_hi):
        sx0 = px0.to(tl.float32) * UNDO  # the x16 of the operands' nibbles, undone exactly
        sy0 = py0.to(tl.float32)
        sx1 = px1.to(tl.float32) * UNDO
        sy1 = py1.to(tl.float32)
        sn = tl.minimum(s + 1, steps - 1)
        px0 = tl.load(xs4 + ixl * sxs + (NSC * sn) * sxg)
        py0 = tl.load(ys4 + iyl * sys + (NSC * sn) * syg)
        if GROUP == 32:
            px1 = tl.load(xs4 + ixl * sxs + (NSC * sn + 1) * sxg)
            py1 = tl.load(ys4 + iyl * sys + (NSC * sn + 1) * syg)
        xb = tl.load(x4 + ixl[:, None] * sx4 + (s * SB + rb)[None, :]).to(tl.int8, bitcast=True)
        # value * 16 in an int8: low nibble shifted up, high nibble masked in place (sign bit lands on bit 7).
        x_lo = _lo_x16(xb, ASM)
        x_hi = xb & -16
        if Y8:
            yrow = y4 + iyl[:, None] * sy4 + (2 * SB * s + rb)[None, :]
            y_lo = tl.load(yrow)
            y_hi = tl.load(yrow + SB)
        else:
            yb = tl.load(y4 + iyl[:, None] * sy4 + (s * SB + rb)[None, :]).to(tl.int8, bitcast=True)
            y_lo = _lo_x16(yb, ASM)
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


def _fused_args(x: PackedAtom, y: PackedAtom, out, residual, swap: bool, ws, counters, y8=None) -> list:
    """The kernel's arguments; y8 = (int8 codes [RY, K - keeper], INT4 scales in any layout) replaces y's nibbles
    and scales (the kernel's Y8 mode)."""
    RX, RY = x.rows, y.rows
    yq4, ys4 = (y.q4, y.s4) if y8 is None else y8
    so_i, so_j = (1, out.stride(0)) if swap else (out.stride(0), 1)
    if residual is not None:
        sr_i, sr_j = (1, residual.stride(0)) if swap else (residual.stride(0), 1)
    else:
        sr_i = sr_j = 0
    return [x.q4, x.s4, x.q8, x.s8, yq4, ys4, y.q8, y.s8,
            out, residual if residual is not None else out, ws, counters,
            RX, RY, x.q4.shape[1], x.keeper,
            x.q4.stride(0), x.s4.stride(0), max(x.q8.stride(0), 1), x.s8.stride(0),
            yq4.stride(0), ys4.stride(0), max(y.q8.stride(0), 1), y.s8.stride(0),
            x.s4.stride(1), ys4.stride(1),
            so_i, so_j, sr_i, sr_j, m_bucket(RY)]


def _steps(p: PackedAtom) -> int:
    return p.q4.shape[1] // (p.group_size // 2 if p.group_size >= 64 else 32)


def _split_k(x: PackedAtom, y: PackedAtom, out: torch.Tensor, BX: int, BY: int, split: int):
    """(split clamped to the K steps, output tiles, the fp32 split-K workspace [split, x rows, y rows] and the
    per-tile counters; both just `out` when split == 1) for a launch of _w4a4_fused_kernel."""
    split = max(1, min(split, _steps(x)))
    tiles = triton.cdiv(x.rows, BX) * triton.cdiv(y.rows, BY)
    if split == 1:
        return split, tiles, out, out
    ws = torch.empty(split, x.rows, y.rows, dtype=torch.float32, device=out.device)
    return split, tiles, ws, _tile_counters(out.device, tiles)


def _launch_fused(x: PackedAtom, y: PackedAtom, out: torch.Tensor, residual, swap: bool,
                  BX: int, BY: int, split: int, num_warps: int, num_stages: int, group_x: int = 8,
                  asm: bool | None = None) -> None:
    """One explicit configuration: out[i, j] over x rows i, y rows j; swap=True writes out[j, i] (x = weights,
    y = tokens). asm: the inline-PTX nibble shift (_lo_x16; default: on a GPU), False: LLVM's byte shifts."""
    split, tiles, ws, counters = _split_k(x, y, out, BX, BY, split)
    _w4a4_fused_kernel[(tiles, split)](
        *_fused_args(x, y, out, residual, swap, ws, counters),
        GROUP=x.group_size, BX=BX, BY=BY, GROUP_X=group_x, SPLIT=split, HAS_RES=residual is not None, KPC=64,
        ASM=(not interpreting()) if asm is None else asm, num_warps=num_warps, num_stages=num_stages)


def _prune_split(configs, named_args, **kwargs):
    # More splits than K steps would leave programs with nothing to do.
    G = kwargs.get("GROUP", named_args.get("GROUP"))
    steps = named_args["KB"] // (G // 2 if G >= 64 else 32)
    kept = [c for c in configs if c.kwargs["SPLIT"] <= max(1, steps)]
    return kept or configs[:1]


# GPU configurations of the fused kernel with swapped operands (weights on the 64/128-row side of the tensor-core
# tile, tokens on the BY side), by token count. Split-K fills the 132 SMs when N / BX tiles alone do not.
# The candidates come from benchmarks/sweep_gemm.py on an H100 (benchmarks/NOTES.md); autotune picks per shape.
# M <= 16 keeps the 8 of its 16 former candidates that ever won on the H200 or are their neighbours (splits 2-8;
# split 1 and 16, and 6 stages, never won in results/gemm_h200.json and h200_w4a4_gemm.json): half the tuning time.
SWAP_CLASSES = [  # (max M, BY, configs (BX, SPLIT, num_stages)); the first one is the untuned default
    (16, 16, [(64, 4, 4), (64, 2, 4), (64, 8, 4), (128, 4, 4), (128, 8, 4), (64, 2, 3), (64, 4, 3), (64, 8, 3)]),
    (64, 64, [(64, 2, 4)] + [(bx, sp, 4) for bx in (64, 128) for sp in (1, 4, 8)] + [(128, 2, 4), (64, 1, 3)]),
    (256, 128, [(64, 1, 4), (64, 2, 4), (128, 1, 4), (64, 1, 3)]),
]
_SWAP_TUNERS: dict = {}


def _quick_bench(fn, quantiles):
    # 5-9 candidates per shape: a shorter timing than tune_bench's (each run still follows do_bench's L2 flush).
    return triton.testing.do_bench(fn, warmup=2, rep=8, quantiles=quantiles)


def _swap_tuner(cls: int):
    if cls not in _SWAP_TUNERS:
        configs = [triton.Config({"BX": bx, "SPLIT": sp}, num_warps=4, num_stages=ns)
                   for bx, sp, ns in SWAP_CLASSES[cls][2]]
        _SWAP_TUNERS[cls] = triton.autotune(configs, key=["RX", "KB", "KP", "M_BUCKET"], do_bench=_quick_bench,
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
                           GROUP=a.group_size, BY=BY, GROUP_X=8, HAS_RES=residual is not None, KPC=64, ASM=True)


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
                        GROUP=a.group_size, GROUP_X=8, SPLIT=1, HAS_RES=residual is not None, KPC=64, ASM=True)


# ----------------------------------------------------------------------------------------------------------------
# Method "fused8": the activations' nibbles unpacked once per call to INT8 codes (plus their scales transposed to
# [groups, tokens]), then the fused kernel in its Y8 mode with the weights swapped onto the 64/128-row side.
# Why: in the swapped kernel the tokens are wgmma's B operand, which must sit in shared memory; unpacking their
# nibbles in registers costs a shared -> register -> shared round trip (and its barriers) every K step. As codes
# they go from the copy straight to the tensor cores and only the weights (the register operand) are unpacked.
# The extra pass reads M * K / 2 bytes and writes M * K: at M <= 256 under 3% of the weight bytes. The transposed
# scales turn each thread's 16 token-scale loads per step (16 rows, 16 cache lines) into one line per step.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _a_codes_kernel(q4, s4, codes, s4t, R, NB, NG, s_q, s_sr, s_sg, SB: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr):
    # codes in the packed nibble order: for each run of SB bytes (SB = 64 for G = 128, else 32), the SB low nibbles,
    # then the SB high nibbles; s4t[g, r] = s4[r, g]. One program: BLOCK_R rows x BLOCK_B bytes; the programs of
    # the first byte block also transpose their rows' scales.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    byte = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < R
    mask = rmask[:, None] & (byte[None, :] < NB)
    b = tl.load(q4 + rows[:, None] * s_q + byte[None, :], mask=mask, other=0).to(tl.int8, bitcast=True)
    col = (byte // SB) * (2 * SB) + byte % SB
    dst = codes + rows[:, None] * (2 * NB) + col[None, :]
    tl.store(dst, (b << 4) >> 4, mask=mask)
    tl.store(dst + SB, b >> 4, mask=mask)
    if tl.program_id(1) == 0:
        for g0 in range(0, NG, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G)
            gm = rmask[:, None] & (g[None, :] < NG)
            v = tl.load(s4 + rows[:, None] * s_sr + g[None, :] * s_sg, mask=gm)
            tl.store(s4t + g[None, :] * R + rows[:, None], v, mask=gm)


def step_bytes(group_size: int) -> int:
    """Bytes of a packed row per K step of the fused kernel (one group of G >= 64, or a 64-value block for G = 32)."""
    return group_size // 2 if group_size >= 64 else 32


def codes_ref(a: PackedAtom) -> torch.Tensor:
    """PyTorch reference of activation_codes' codes: per step of SB bytes, the low nibbles then the high ones."""
    b = a.q4.view(torch.int8)
    SB = step_bytes(a.group_size)
    lo, hi = (b << 4) >> 4, b >> 4
    M = b.shape[0]
    return torch.stack([lo.reshape(M, -1, SB), hi.reshape(M, -1, SB)], dim=2).reshape(M, -1)


def activation_codes(a: PackedAtom) -> tuple:
    """(codes int8 [M, K - keeper], INT4 scales [M, groups] as a view of a [groups, M] tensor): the Y8 operand of
    the fused kernel, in one launch; codes in the kernel's step order (codes_ref), scales equal to a.s4."""
    M, NB = a.q4.shape
    NG = a.s4.shape[1]
    codes = torch.empty(M, 2 * NB, dtype=torch.int8, device=a.q4.device)
    s4t = torch.empty(NG, M, dtype=a.s4.dtype, device=a.q4.device)
    br, bb = (64, 256) if interpreting() else (16, 256)
    _a_codes_kernel[(triton.cdiv(M, br), triton.cdiv(NB, bb))](
        a.q4, a.s4, codes, s4t, M, NB, NG, a.q4.stride(0), a.s4.stride(0), a.s4.stride(1),
        SB=step_bytes(a.group_size), BLOCK_R=br, BLOCK_B=bb, BLOCK_G=32)
    return codes, s4t.t()


def _launch_fused8(w: PackedAtom, a: PackedAtom, out: torch.Tensor, residual, BX: int, BY: int, split: int,
                   num_warps: int, num_stages: int, codes=None) -> None:
    """One explicit configuration of "fused8" (weights = x, tokens = y as INT8 codes, out[j, i] written)."""
    codes = activation_codes(a) if codes is None else codes
    split, tiles, ws, cnt = _split_k(w, a, out, BX, BY, split)
    _w4a4_fused_kernel[(tiles, split)](
        *_fused_args(w, a, out, residual, True, ws, cnt, y8=codes),
        GROUP=w.group_size, BX=BX, BY=BY, GROUP_X=8, SPLIT=split, HAS_RES=residual is not None, KPC=64, Y8=True,
        ASM=not interpreting(), num_warps=num_warps, num_stages=num_stages)


# GPU candidates of "fused8" by token count: (max M, [(BX, BY, SPLIT, num_stages)]), the first one the untuned
# default. The token tile BY is tuned too: for M = 64-256 a narrower token tile (BY < M) or split-K gives the 132 SMs
# 2-8x more programs than N / BX alone (the fused kernel's classes fix BY = 64 / 128 there). Offered only where the
# sm_90 compile (benchmarks/aot_check.py) shows little or no spilling: BX = 128 with BY >= 64, and BY = 128 with
# split 4, spill 88-664 B of stack. Chosen on the H200 (results/gemm_h200_band.json): BY = 16-64 with split 1-4 at
# M = 64, BY = 64-128 with split 1-2 at 128-256.
FUSED8_CLASSES = [
    (16, [(64, 16, 4, 4), (64, 16, 2, 4), (64, 16, 8, 4), (128, 16, 2, 4), (128, 16, 4, 4)]),
    (64, [(64, 64, 2, 4), (64, 64, 1, 4), (64, 64, 4, 4), (64, 32, 1, 4), (64, 32, 2, 4), (64, 32, 4, 4),
          (64, 16, 2, 4), (64, 16, 4, 4)]),
    (128, [(64, 64, 2, 4), (64, 128, 1, 4), (64, 128, 2, 4), (64, 64, 1, 4), (64, 64, 4, 4), (64, 32, 2, 4),
           (64, 32, 4, 4)]),
    (256, [(64, 128, 1, 4), (64, 128, 2, 4), (64, 64, 1, 4), (64, 64, 2, 4), (64, 32, 4, 4)]),
]
FUSED8_MAX_M = FUSED8_CLASSES[-1][0]
_FUSED8_TUNERS: dict = {}


def _fused8_tuner(cls: int):
    if cls not in _FUSED8_TUNERS:
        configs = [triton.Config({"BX": bx, "BY": by, "SPLIT": sp}, num_warps=4, num_stages=ns)
                   for bx, by, sp, ns in FUSED8_CLASSES[cls][1]]
        _FUSED8_TUNERS[cls] = triton.autotune(configs, key=["RX", "KB", "KP", "M_BUCKET", "GROUP"],
                                              do_bench=_quick_bench,
                                              prune_configs_by={"early_config_prune": _prune_split}
                                              )(_w4a4_fused_kernel)
    return _FUSED8_TUNERS[cls]


def fused8_class(M: int) -> int:
    return next((i for i, (max_m, _) in enumerate(FUSED8_CLASSES) if M <= max_m), len(FUSED8_CLASSES) - 1)


def launch_fused8_tuned(a: PackedAtom, w: PackedAtom, out: torch.Tensor, residual, autotune: bool = True,
                        codes=None) -> None:
    """Method "fused8" for M <= FUSED8_MAX_M tokens (codes: activation_codes(a), when the caller has them)."""
    M, N = a.rows, w.rows
    cls = fused8_class(M)
    if not autotune:
        BX, BY, split, ns = FUSED8_CLASSES[cls][1][0]
        _launch_fused8(w, a, out, residual, BX, BY, split, 4, ns, codes)
        return
    codes = activation_codes(a) if codes is None else codes
    max_split = max(c[2] for c in FUSED8_CLASSES[cls][1])
    ws = torch.empty(max_split, N, M, dtype=torch.float32, device=out.device)
    cnt = _tile_counters(out.device, triton.cdiv(N, 64) * triton.cdiv(M, 16))
    grid = lambda meta: (triton.cdiv(N, meta["BX"]) * triton.cdiv(M, meta["BY"]), meta["SPLIT"])  # noqa: E731
    _fused8_tuner(cls)[grid](*_fused_args(w, a, out, residual, True, ws, cnt, y8=codes),
                             GROUP=a.group_size, GROUP_X=8, HAS_RES=residual is not None, KPC=64, Y8=True,
                             ASM=not interpreting())
