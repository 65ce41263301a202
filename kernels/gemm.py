"""The W4A4 group GEMM of Atom: packed INT4 activations x packed INT4 weights, plus the INT8 keeper channels.

    y[m, n] = sum_g s4a[m, g] * s4w[n, g] * dot_int(q4a[m, g], q4w[n, g])     (INT4 groups of G channels)
            + s8a[m] * s8w[n] * dot_int(q8a[m], q8w[n])                       (INT8 keeper channels)
            (+ residual[m, n])

Both operands are PackedAtom (kernels/formats.py), rows = tokens for `a`, rows = output channels for `w`. The
integer dots are exact (int32 tensor-core accumulation, or FP8 products of integers in [-8, 7] whose group sums stay
below 2^13), the per-group scaling and the sum over groups are fp32.

Two ways to run it (`method=`), the same function:
  "fused"  one kernel: loads packed bytes and unpacks them in registers to INT8 for int8 tensor-core dots. Runs on
           every GPU and in the CPU interpreter. The unpack is two bit operations per byte because it keeps each
           nibble in the high half of an int8 (value * 16): `byte << 4` is the low value * 16, `byte & 0xF0` the high
           value * 16. The dot then carries a factor 256, folded into the scales (an exact power of two).
           Small M swaps the operands (weights take the 64/128-row side of the tensor-core tile, the few tokens the
           16-row side) and splits K so that every SM streams weights.
  "fp8"    for large M on GPUs with FP8 tensor cores (Hopper, Ada): a bandwidth-bound pass unpacks both operands
           once into FP8 e4m3 (exact for -8..7), then a block-scaled FP8 GEMM reads plain FP8 tiles that Triton can
           pipeline through shared memory into wgmma, and rescales its fp32 partial once per group.
`method=None` chooses per GPU and per M (`choose_method`):
    CPU interpreter                        -> "fused", one configuration with few, large tiles
    GPU without FP8 tensor cores (< sm_89) -> "fused": swapped operands + split-K for M <= 256, plain tiles above
    GPU with FP8 tensor cores (Hopper, Ada) -> "fused" for M < FP8_MIN_M, "fp8" (TMA loads) from there on
On the GPU triton.autotune picks tile shapes, split-K factor and pipeline depth per (shape, power-of-two M) among
candidates taken from the H100 sweeps (benchmarks/NOTES.md). The interpreter runs both methods (tests), and both
run compiled in tests/test_gemm.py on a GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import check_tensor, interpreting
from .formats import PackedAtom
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
# Method "fused": one kernel, in-register unpack to INT8 (every GPU, and the CPU interpreter)
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Method "fp8": unpack once to FP8 e4m3, then a block-scaled FP8 GEMM (GPUs with FP8 tensor cores)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _unpack_fp8_kernel(p, s4, out, sT, R, KB, sp, ss, so,
                       GROUP: tl.constexpr, BR: tl.constexpr, UNITS: tl.constexpr):
    # A unit is U bytes (one group, or one 64-value block when G = 32). Its low nibbles go to out[2U*u : 2U*u+U],
    # its high nibbles right after: every group of G values stays contiguous, in the same order for A and W.
    # The unit's scales go to sT [groups, R] as fp32, so the GEMM loads each group's scales as one vector.
    U: tl.constexpr = GROUP // 2 if GROUP >= 64 else 32
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    rb = tl.arange(0, U)
    for t in tl.static_range(UNITS):
        u = tl.program_id(1) * UNITS + t
        ok = rmask[:, None] & ((u * U + rb) < KB)[None, :]
        b = tl.load(p + rows[:, None] * sp + (u * U + rb)[None, :], mask=ok, other=0).to(tl.int8, bitcast=True)
        lo = ((b << 4) >> 4).to(tl.float16).to(tl.float8e4nv)
        hi = (b >> 4).to(tl.float16).to(tl.float8e4nv)
        dst = out + rows[:, None] * so + (2 * U * u + rb)[None, :]
        tl.store(dst, lo, mask=ok)
        tl.store(dst + U, hi, mask=ok)
        smask = rmask & ((rows * 0 + u * U) < KB)
        if GROUP == 32:
            for h in tl.static_range(2):
                sc = tl.load(s4 + rows * ss + 2 * u + h, mask=smask, other=0).to(tl.float32)
                tl.store(sT + (2 * u + h) * R + rows, sc, mask=smask)
        else:
            sc = tl.load(s4 + rows * ss + u, mask=smask, other=0).to(tl.float32)
            tl.store(sT + u * R + rows, sc, mask=smask)


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _keeper_tile(ka, ska, kw, skw, rml, rnl, KP, s_ka, s_ska, s_kw, s_skw,
                 BM: tl.constexpr, BN: tl.constexpr, KPC: tl.constexpr):
    # The INT8 keeper channels of one output tile: int32 dots (exact), scaled once.
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rk = tl.arange(0, KPC)
    for k0 in range(0, KP, KPC):
        kmask = (k0 + rk) < KP
        xa = tl.load(ka + rml[:, None] * s_ka + (k0 + rk)[None, :], mask=kmask[None, :], other=0)
        xw = tl.load(kw + rnl[:, None] * s_kw + (k0 + rk)[None, :], mask=kmask[None, :], other=0)
        acc += tl.dot(xa, tl.trans(xw), out_dtype=tl.int32).to(tl.float32)
    sa = tl.load(ska + rml * s_ska).to(tl.float32)
    sw = tl.load(skw + rnl * s_skw).to(tl.float32)
    return acc * (sa[:, None] * sw[None, :])


@triton.jit
def _fp8_group_gemm_kernel(
        a8, saT, ka, ska, w8, swT, kw, skw, out, res,
        M, N, NG, KP,
        s_a8, s_ka, s_ska, s_w8, s_kw, s_skw, s_om, s_rm, M_BUCKET,
        GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
        HAS_RES: tl.constexpr, KPC: tl.constexpr):
    tile_m, tile_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = tile_m * BM + tl.arange(0, BM)
    rn = tile_n * BN + tl.arange(0, BN)
    rml = rm % M
    rnl = rn % N
    acc = _keeper_tile(ka, ska, kw, skw, rml, rnl, KP, s_ka, s_ska, s_kw, s_skw, BM, BN, KPC)
    rg = tl.arange(0, GROUP)
    # Group g + 1's scales load while group g computes (Triton's pipeliner leaves these small loads in the loop).
    sa_n = tl.load(saT + rml)
    sw_n = tl.load(swT + rnl)
    for g in range(0, NG):
        sa_g = sa_n
        sw_g = sw_n
        gn = tl.minimum(g + 1, NG - 1)
        sa_n = tl.load(saT + gn * M + rml)
        sw_n = tl.load(swT + gn * N + rnl)
        a = tl.load(a8 + rml[:, None] * s_a8 + (g * GROUP + rg)[None, :])
        b = tl.load(w8 + rnl[:, None] * s_w8 + (g * GROUP + rg)[None, :])
        d = tl.dot(a, tl.trans(b))  # fp32; exact: integer products, |group sum| <= 64 * 128
        acc += d * (sa_g[:, None] * sw_g[None, :])
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_RES:
        acc += tl.load(res + rm[:, None] * s_rm + rn[None, :], mask=mask, other=0).to(tl.float32)
    tl.store(out + rm[:, None] * s_om + rn[None, :], acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_group_gemm_tma_kernel(
        a_desc, saT, ka, ska, w_desc, swT, kw, skw, out, res,
        M, N, NG, KP,
        s_ka, s_ska, s_kw, s_skw, s_om, s_rm, M_BUCKET,
        GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
        HAS_RES: tl.constexpr, KPC: tl.constexpr):
    # Same as _fp8_group_gemm_kernel, the FP8 tiles arriving through the tensor memory accelerator (TMA).
    tile_m, tile_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = tile_m * BM + tl.arange(0, BM)
    rn = tile_n * BN + tl.arange(0, BN)
    rml = rm % M
    rnl = rn % N
    acc = _keeper_tile(ka, ska, kw, skw, rml, rnl, KP, s_ka, s_ska, s_kw, s_skw, BM, BN, KPC)
    sa_n = tl.load(saT + rml)
    sw_n = tl.load(swT + rnl)
    for g in range(0, NG):
        sa_g = sa_n
        sw_g = sw_n
        gn = tl.minimum(g + 1, NG - 1)
        sa_n = tl.load(saT + gn * M + rml)
        sw_n = tl.load(swT + gn * N + rnl)
        a = a_desc.load([tile_m * BM, g * GROUP])
        b = w_desc.load([tile_n * BN, g * GROUP])
        d = tl.dot(a, tl.trans(b))
        acc += d * (sa_g[:, None] * sw_g[None, :])
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_RES:
        acc += tl.load(res + rm[:, None] * s_rm + rn[None, :], mask=mask, other=0).to(tl.float32)
    tl.store(out + rm[:, None] * s_om + rn[None, :], acc.to(out.dtype.element_ty), mask=mask)


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
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


_COUNTERS: dict = {}


def _tile_counters(device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per output tile, for the one-launch split-K (each call leaves them at zero)."""
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        c = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = c
    return c


def _m_bucket(M: int) -> int:
    """Autotuning key for the token count: configurations are tuned per power of two, not per exact M."""
    return min(8192, triton.next_power_of_2(M))


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
            so_i, so_j, sr_i, sr_j, _m_bucket(RY)]


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


def _tune_bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


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
# triton.autotune on the GPU; AUTOTUNE = False (or ATOM_LAB_AUTOTUNE=0) uses each list's first configuration, which
# keeps the number of compiled variants small (the GPU test run).
AUTOTUNE = os.environ.get("ATOM_LAB_AUTOTUNE", "1") != "0"
_SWAP_TUNERS: dict = {}


def _swap_tuner(cls: int):
    if cls not in _SWAP_TUNERS:
        configs = [triton.Config({"BX": bx, "SPLIT": sp}, num_warps=4, num_stages=ns)
                   for bx, sp, ns in SWAP_CLASSES[cls][2]]
        _SWAP_TUNERS[cls] = triton.autotune(configs, key=["RX", "KB", "KP", "M_BUCKET"], do_bench=_tune_bench,
                                            prune_configs_by={"early_config_prune": _prune_split})(_w4a4_fused_kernel)
    return _SWAP_TUNERS[cls]


def _launch_swap_tuned(a: PackedAtom, w: PackedAtom, out: torch.Tensor, residual) -> None:
    M, N = a.rows, w.rows
    cls = next(i for i, (max_m, _, _) in enumerate(SWAP_CLASSES) if M <= max_m)
    BY = SWAP_CLASSES[cls][1]
    if not AUTOTUNE:
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


def _launch_normal_tuned(a: PackedAtom, w: PackedAtom, out: torch.Tensor, residual) -> None:
    """The fused kernel without swap or split (mid-size M on GPUs without FP8 tensor cores)."""
    global _normal_tuner
    if not AUTOTUNE:
        _launch_fused(a, w, out, residual, False, 64, 128, 1, 4, 4)
        return
    if _normal_tuner is None:
        _normal_tuner = triton.autotune(_NORMAL_CONFIGS, key=["RX", "RY", "KB", "M_BUCKET"],
                                        do_bench=_tune_bench)(_w4a4_fused_kernel)
    grid = lambda meta: (triton.cdiv(a.rows, meta["BX"]) * triton.cdiv(w.rows, meta["BY"]), 1)  # noqa: E731
    _normal_tuner[grid](*_fused_args(a, w, out, residual, False, out, out),
                        GROUP=a.group_size, GROUP_X=8, SPLIT=1, HAS_RES=residual is not None, KPC=64)


def unpack_fp8(p: PackedAtom):
    """The INT4 part of p as FP8 e4m3 [rows, K - keeper], each group of G channels contiguous (the order inside a
    group differs from unpack_int4's; A and W use the same one, so group dots are unchanged), and its scales
    transposed to fp32 [groups, rows]."""
    R, KB = p.q4.shape
    G = p.group_size
    U = G // 2 if G >= 64 else 32
    out = torch.empty(R, 2 * KB, dtype=torch.float8_e4m3fn, device=p.q4.device)
    sT = torch.empty(p.s4.shape[1], R, dtype=torch.float32, device=p.q4.device)
    if interpreting():
        BR, UNITS = min(256, triton.next_power_of_2(R)), max(1, min(64, KB // U))
    else:
        BR, UNITS = 64, max(1, min(8, KB // U))
    grid = (triton.cdiv(R, BR), triton.cdiv(KB // U, UNITS))
    _unpack_fp8_kernel[grid](p.q4, p.s4, out, sT, R, KB, p.q4.stride(0), p.s4.stride(0), out.stride(0),
                             GROUP=G, BR=BR, UNITS=UNITS, num_warps=4)
    return out, sT


def _fp8_common(a: PackedAtom, w: PackedAtom, out, residual):
    strides = (max(a.q8.stride(0), 1), a.s8.stride(0), max(w.q8.stride(0), 1), w.s8.stride(0),
               out.stride(0), residual.stride(0) if residual is not None else 0)
    return strides, (residual if residual is not None else out)


def _launch_fp8(a: PackedAtom, w: PackedAtom, out: torch.Tensor, residual, BM: int, BN: int,
                num_warps: int, num_stages: int, group_m: int = 8, tma: bool = False, a8=None, w8=None) -> None:
    """One explicit configuration. a8/w8: (fp8, scalesT) from unpack_fp8, when the caller already has them
    (benchmarks of the GEMM alone)."""
    M, N = out.shape
    G = a.group_size
    a8, saT = unpack_fp8(a) if a8 is None else a8
    w8, swT = unpack_fp8(w) if w8 is None else w8
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    strides, res = _fp8_common(a, w, out, residual)
    tail = dict(GROUP=G, BM=BM, BN=BN, GROUP_M=group_m, HAS_RES=residual is not None, KPC=64,
                num_warps=num_warps, num_stages=num_stages)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor.from_tensor(a8, [BM, G])
        w_desc = TensorDescriptor.from_tensor(w8, [BN, G])
        _fp8_group_gemm_tma_kernel[grid](a_desc, saT, a.q8, a.s8, w_desc, swT, w.q8, w.s8, out, res,
                                         M, N, a.s4.shape[1], a.keeper, *strides, _m_bucket(M), **tail)
    else:
        _fp8_group_gemm_kernel[grid](a8, saT, a.q8, a.s8, w8, swT, w.q8, w.s8, out, res,
                                     M, N, a.s4.shape[1], a.keeper, a8.stride(0), strides[0], strides[1],
                                     w8.stride(0), *strides[2:], _m_bucket(M), **tail)


def _set_tma_blocks(nargs):
    G = nargs["GROUP"]
    nargs["a_desc"].block_shape = [nargs["BM"], G]
    nargs["w_desc"].block_shape = [nargs["BN"], G]


# FP8 GEMM candidates (benchmarks/sweep_gemm.py on an H100): 128x128 tiles with 8 warps, or 64x128 / 128x64 tiles
# with 4 warps, which leave room for two programs per SM whose scaling and tensor-core phases can overlap.
FP8_CONFIGS = [(64, 128, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (64, 128, 4, 5),
               (128, 64, 4, 4)]
_fp8_tuner = None


def _launch_fp8_tuned(a: PackedAtom, w: PackedAtom, out: torch.Tensor, residual, a8=None, w8=None) -> None:
    global _fp8_tuner
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not AUTOTUNE:
        BM, BN, nw, ns = FP8_CONFIGS[0]
        _launch_fp8(a, w, out, residual, BM, BN, nw, ns, tma=True, a8=a8, w8=w8)
        return
    if _fp8_tuner is None:
        configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=nw, num_stages=ns, pre_hook=_set_tma_blocks)
                   for bm, bn, nw, ns in FP8_CONFIGS]
        _fp8_tuner = triton.autotune(configs, key=["M_BUCKET", "N", "NG", "KP"],
                                     do_bench=_tune_bench)(_fp8_group_gemm_tma_kernel)
    M, N = out.shape
    G = a.group_size
    a8, saT = unpack_fp8(a) if a8 is None else a8
    w8, swT = unpack_fp8(w) if w8 is None else w8
    a_desc = TensorDescriptor.from_tensor(a8, [64, G])  # block shapes are set per config by _set_tma_blocks
    w_desc = TensorDescriptor.from_tensor(w8, [64, G])
    strides, res = _fp8_common(a, w, out, residual)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _fp8_tuner[grid](a_desc, saT, a.q8, a.s8, w_desc, swT, w.q8, w.s8, out, res,
                     M, N, a.s4.shape[1], a.keeper, *strides, _m_bucket(M),
                     GROUP=G, GROUP_M=8, HAS_RES=residual is not None, KPC=64)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
# Set from the H100 sweeps (benchmarks/NOTES.md): below FP8_MIN_M tokens the fused kernel wins (the FP8 path must
# first write a full FP8 copy of the weights); from there on the FP8 tensor cores win.
FP8_MIN_M = 512


def has_fp8_tensor_cores(device) -> bool:
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def choose_method(M: int, device) -> str:
    """"fp8" for M >= FP8_MIN_M where the GPU has FP8 tensor cores (Hopper, Ada), "fused" otherwise; the CPU
    interpreter always gets "fused"."""
    if interpreting() or not has_fp8_tensor_cores(device):
        return "fused"
    return "fp8" if M >= FP8_MIN_M else "fused"


def _interp_tiles(M: int, N: int):
    # Every program costs ~1 ms per K step under the interpreter: few, large tiles.
    # Measured on SmolLM2's layers (K 576/1536, N 192-1536): up to 256 x 256 tiles, wider in N for few tokens,
    # run ~2x faster than 128 x 128 (the cost is interpreter overhead per operation, not arithmetic). Tile shapes
    # do not change any result: every output element sums its groups in the same order.
    BM = _pow2_at_least(M, 16, 256)
    return BM, _pow2_at_least(N, 16, max(256, 16384 // BM))


def last_config(M: int, method: str) -> str:
    """The configuration the autotuner used in the last GPU call for M tokens (for benchmark records)."""
    if not AUTOTUNE:
        return "untuned default"
    if method == "fp8":
        tuner = _fp8_tuner
    elif M <= SWAP_CLASSES[-1][0]:
        tuner = _SWAP_TUNERS.get(next(i for i, c in enumerate(SWAP_CLASSES) if M <= c[0]))
    else:
        tuner = _normal_tuner
    return str(getattr(tuner, "best_config", None))


def w4a4_gemm(a: PackedAtom, w: PackedAtom, out_dtype: torch.dtype = torch.float16,
              residual: torch.Tensor | None = None, *, method: str | None = None,
              check_finite: bool | None = None) -> torch.Tensor:
    """W4A4 group GEMM with the INT8 keeper part (formula in the module docstring).

    Args:
        a: PackedAtom of the activations, M rows (tokens): q4 uint8 [M, (K-keeper)/2], s4 fp16 [M, (K-keeper)/G],
           q8 int8 [M, keeper], s8 fp16 [M, 1].
        w: PackedAtom of the weights, N rows (output channels), same K, keeper and group size G.
        out_dtype: torch.float16, torch.bfloat16 or torch.float32.
        residual: optional [M, N] tensor (fp16/bf16/fp32) added in the epilogue.
        method: None (choose per GPU and M, see choose_method), "fused" or "fp8" (needs FP8 tensor cores, or the
            interpreter).
        check_finite: reject NaN/inf scales (one device sync); default on for CPU tensors only.
    Returns:
        [M, N] tensor of out_dtype.

    On a GPU the tile shapes (and the split-K factor) are chosen by triton.autotune per (shape, power-of-two M);
    under the interpreter one configuration with few, large tiles is used.
    """
    if check_finite is None:
        check_finite = isinstance(a, PackedAtom) and a.q4.device.type == "cpu"
    _check_inputs(a, w, out_dtype, residual, check_finite)
    M, N, device = a.rows, w.rows, a.q4.device
    method = method or choose_method(M, device)
    if method not in ("fused", "fp8"):
        raise ValueError(f"method must be None, 'fused' or 'fp8', got {method!r}.")
    if method == "fp8" and not (interpreting() or has_fp8_tensor_cores(device)):
        raise ValueError(f"method='fp8' needs a GPU with FP8 tensor cores (compute capability >= 8.9); "
                         f"{device} has none. Use method='fused'.")
    # The interpreter has no bf16 arithmetic: compute in fp32 there and cast with PyTorch.
    kernel_dtype = torch.float32 if interpreting() and out_dtype == torch.bfloat16 else out_dtype
    res = residual
    if res is not None and interpreting() and res.dtype == torch.bfloat16:
        res = res.float()
    out = torch.empty(M, N, dtype=kernel_dtype, device=device)
    if interpreting():
        BM, BN = _interp_tiles(M, N)
        if method == "fused":
            _launch_fused(a, w, out, res, False, BM, BN, 1, 4, 1)
        else:
            _launch_fp8(a, w, out, res, BM, BN, 4, 1)
    elif method == "fp8":
        _launch_fp8_tuned(a, w, out, res)
    elif M <= SWAP_CLASSES[-1][0]:
        _launch_swap_tuned(a, w, out, res)
    else:
        _launch_normal_tuned(a, w, out, res)
    return out if kernel_dtype == out_dtype else out.to(out_dtype)
