"""Activation quantizers for Atom: (RMSNorm | SiLU(gate) * up | nothing) + reorder + INT4/INT8 quantize + pack.

Every token row x [K] goes through, in ONE kernel:
    y = f(x)                 f = RMSNorm (input of q/k/v and gate/up), SiLU(gate) * up (input of down_proj),
                             or nothing (input of o_proj); computed in float32
    y = y[index]             Atom's channel order: normal channels first, the `keeper` outliers last
    PackedAtom               first K - keeper channels: INT4 groups of G (clip), packed per kernels/pack.py;
                             last keeper channels: INT8 with one scale per token (kernels/formats.py)
and each wrapper has a PyTorch `*_ref` beside it, built on kernels.formats.quantize_atom_ref. SiLU(gate) * up with
an online rotation before the quantization (QuaRot) is kernels/act_quant_rotate.py, built on this file's parts.

Why the kernel looks like this (benchmarks/NOTES.md has the H200 measurements):
- One program holds one whole row in registers as 1-D tensors (_atom_quantize_kernel), read with 16-byte loads and
  reordered by tl.gather, which Triton lowers for a 1-D tensor over several warps to one shared-memory store of the
  row and one shared-memory load per value. (A 2-D [rows, K] gather is laid out warp-locally, with shuffles
  quadratic in the row length: minutes to compile.) The norm weight is gathered once per (weight, index) on the
  host; an identity index (channels permuted offline) skips the gather. Programs are persistent and load the next
  row while they quantize this one (not for SiLU * up). Rows are padded to a power of two (K = 11008 -> 16384).
- The earlier kernel (_atom_quantize_chunked_kernel, USE_CHUNKED) walked each row in chunks and gathered from global
  memory; it is 2-3x slower on the H200 and kept only to be timed beside this one.
- Quantization matches atom_lab.quantizers.quantize_symmetric bit for bit: the group max is exact in any order, the
  division is IEEE (tl.math.div_rn, or on the GPU a correctly rounded reciprocal + Markstein's correction, which
  gives the same bits: _nibbles; Triton's `/` on fp32 is the approximate div.full.f32 on NVIDIA GPUs), the
  rounding is half-to-even by the 1.5 * 2^23 add/subtract trick after clamping (the interpreter has no libdevice),
  fp32 -> fp16 conversion rounds to nearest even on both sides.
- RMSNorm and SiLU involve a sum and an exp whose rounding depends on the order and the library. To keep scales
  and integers bit-exact anyway, the parts that are not plain fp32 products are computed in float64 and rounded
  once to float32: 1 / sqrt(sum(x^2) / K + eps) and g / (1 + exp(-g)). Both sides then hold the correctly
  rounded float32 value except when the float64 results straddle a float32 rounding boundary (odds ~1e-8 per
  value), and the rest (x * rstd * w, silu * up) is the same sequence of IEEE fp32 products in kernel and reference.
  The float64 work costs little for RMSNorm (one multiply-add per element) and more for SiLU (a float64 exp).
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from atom_lab.quantizers import MIN_SCALE

from ._common import check_tensor, interpreting
from .formats import PackedAtom, check_atom_shape, quantize_atom_ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODE_PLAIN, MODE_RMSNORM, MODE_SILU_MUL = 0, 1, 2
AUTOTUNE = True  # on a GPU, pick a config per shape by timing (the interpreter cannot); tests turn it off

_MIN_SCALE = tl.constexpr(MIN_SCALE)
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + M - M rounds x half-to-even for |x| < 2^22


# ---------------------------------------------------------------------------------------------------------------
# PyTorch references (float32 pre-quantization values, then the shared quantizer)
# ---------------------------------------------------------------------------------------------------------------
def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm in float32 with the kernel's arithmetic. x: float [M, K]; weight: float [K] -> float32 [M, K].

    rstd = float32(1 / sqrt(sum(x^2) / K + eps)) is computed in float64 (eps rounded to float32 first, as a Triton
    scalar argument is); y = (x * rstd) * weight in float32. Hugging Face's LlamaRMSNorm also rounds to the input
    dtype before multiplying by the weight; the fused kernel does not, so for fp16/bf16 inputs the two differ by one
    rounding of the input dtype, far below the INT4 step.
    """
    xf = x.float()
    eps32 = float(torch.tensor(eps, dtype=torch.float32))
    ms = xf.double().square().sum(dim=-1, keepdim=True) / x.shape[-1]
    rstd = (1.0 / torch.sqrt(ms + eps32)).float()
    return xf * rstd * weight.float()


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up with the kernel's arithmetic. gate, up: float [M, K] -> float32 [M, K].

    silu = float32(g / (1 + exp(-g))) computed in float64; the product with up is float32. (Llama's MLP in bf16
    rounds both to bf16; the fused kernel keeps float32, more accurate and far below the INT4 step.)
    """
    g = gate.float().double()
    return (g / (1.0 + torch.exp(-g))).float() * up.float()


def reorder_quantize_ref(x, index, group_size: int, keeper: int, clip: float = 1.0) -> PackedAtom:
    """Reference for reorder_quantize. x: float [..., K]; index: int [K] -> PackedAtom of M = x.numel() // K rows."""
    x2 = _rows(x, "x", check_finite=True)
    _check_index(index, x2.shape[1], x2.device)
    return _quantize_ref(x2.float()[:, index.long()], "x", group_size, keeper, clip)


def rmsnorm_quantize_ref(x, weight, eps: float, index, group_size: int, keeper: int, clip: float = 1.0) -> PackedAtom:
    """Reference for rmsnorm_quantize. x: float [..., K]; weight: float [K]; index: int [K] -> PackedAtom."""
    x2 = _rows(x, "x", check_finite=True)
    K = x2.shape[1]
    _check_weight(weight, K, x2.device, check_finite=True)
    _check_eps(eps)
    _check_index(index, K, x2.device)
    return _quantize_ref(rmsnorm_ref(x2, weight, eps)[:, index.long()], "RMSNorm(x) * weight", group_size, keeper, clip)


def silu_mul_quantize_ref(gate, up, index, group_size: int, keeper: int, clip: float = 1.0) -> PackedAtom:
    """Reference for silu_mul_quantize. gate, up: float [..., K] of one shape; index: int [K] -> PackedAtom."""
    g2, u2 = _gate_up(gate, up, check_finite=True)
    _check_index(index, g2.shape[1], g2.device)
    return _quantize_ref(silu_mul_ref(g2, u2)[:, index.long()], "SiLU(gate) * up", group_size, keeper, clip)


def _quantize_ref(y: torch.Tensor, what: str, group_size: int, keeper: int, clip: float) -> PackedAtom:
    _check_clip(clip)
    if not torch.isfinite(y).all():
        raise ValueError(f"{what} overflows float32 (inf/NaN) although the inputs are finite; rescale the inputs.")
    p = quantize_atom_ref(y, group_size, keeper, clip)
    _check_scales(p, what)
    return p


# ---------------------------------------------------------------------------------------------------------------
# The fused kernel: one program quantizes BLOCK_M whole rows
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _scale_fp16(amax, clip, QMAX: tl.constexpr):
    # float16(max(clip * amax / qmax, 2^-14)), with an IEEE division as in torch
    s = tl.math.div_rn(amax * clip, QMAX * 1.0)
    return tl.maximum(s, _MIN_SCALE).to(tl.float16)


@triton.jit
def _div_ieee(a, b, FAST: tl.constexpr):
    """The IEEE (correctly rounded) float32 quotient a / b; b may broadcast against a. FAST (the GPU): one IEEE
    reciprocal r per element of b, then y = a * r, the exact remainder e = fma(-y, b, a) and fma(e, r, y):
    Markstein's correction, which returns the correctly rounded quotient when r is the correctly rounded reciprocal
    (3 instructions per element of a instead of div.rn's ~10; checked against div_rn on the GPU,
    benchmarks/bench_gemm_quant.py). The interpreter has no fused multiply-add, so it divides."""
    if FAST:
        r = tl.math.div_rn(tl.full(b.shape, 1.0, tl.float32), b)
        y = a * r
        return tl.fma(tl.fma(-y, b, a), r, y)
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _scale_fp16_fast(amax, clip, QMAX: tl.constexpr, FAST: tl.constexpr):
    """_scale_fp16 (the same bits), its division by _div_ieee: every lane holding part of a group computes its
    scale, so this runs per 4 values."""
    a = _div_ieee(amax * clip, tl.full(amax.shape, QMAX * 1.0, tl.float32), FAST)
    return tl.maximum(a, _MIN_SCALE).to(tl.float16)


@triton.jit
def _quantize(v, scale_fp16, QMAX: tl.constexpr):
    # round_half_even(v / scale) clamped to [-qmax-1, qmax]; clamping first keeps |v| < 2^22 for the magic trick
    v = tl.math.div_rn(v, scale_fp16.to(tl.float32))
    v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX * 1.0)
    return ((v + _ROUND_MAGIC) - _ROUND_MAGIC).to(tl.int8)


@triton.jit
def _reordered_values(x_ptr, u_ptr, w_ptr, rows, src, mask, stride_x, stride_u, rstd,
                      MODE: tl.constexpr, LIBDEVICE: tl.constexpr):
    """float32 values to quantize at channels `src` (gathered from global memory) of `rows`: [BLOCK_M, n]."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + src[None, :], mask=mask, other=0.0).to(tl.float32)
    if MODE == 1:  # RMSNorm: (x * rstd) * w, both products in float32 as in the reference
        w = tl.load(w_ptr + src).to(tl.float32)  # masked positions hold src = 0, a valid address
        x = x * rstd[:, None] * w[None, :]
    elif MODE == 2:  # SiLU(gate) * up; the SiLU in float64, rounded once (module docstring)
        g = x.to(tl.float64)
        if LIBDEVICE:  # CUDA libdevice's float64 exp (__nv_exp); the interpreter has numpy's
            e = libdevice.exp(-g)
        else:
            e = tl.exp(-g)
        up = tl.load(u_ptr + rows[:, None] * stride_u + src[None, :], mask=mask, other=0.0).to(tl.float32)
        x = (g / (1.0 + e)).to(tl.float32) * up
    return x


@triton.jit
def _silu_mul(g, up, LIBDEVICE: tl.constexpr):
    """float32 SiLU(g) * up; the SiLU in float64, rounded once (module docstring)."""
    g = g.to(tl.float64)
    if LIBDEVICE:  # CUDA libdevice's float64 exp (__nv_exp); the interpreter has numpy's
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    return (g / (1.0 + e)).to(tl.float32) * up.to(tl.float32)


@triton.jit
def _nibbles(v, scale_fp16, FAST: tl.constexpr):
    """round_half_even(v / scale) clamped to [-8, 7], as its low 4 bits (int32). v: [.., G]; scale_fp16: [.., 1].

    v / scale is the IEEE quotient either way (_div_ieee: on the GPU one reciprocal per group). After the clamp,
    v + 1.5 * 2^23 holds 1.5 * 2^23 + q exactly and its low mantissa bits ARE q in two's complement: no
    float -> int conversion (16 per cycle per SM on Hopper) and no subtraction."""
    v = _div_ieee(v, scale_fp16.to(tl.float32), FAST)
    v = tl.minimum(tl.maximum(v, -8.0), 7.0)
    return (v + _ROUND_MAGIC).to(tl.int32, bitcast=True) & 0xF


@triton.jit
def _gather_rows(x, src, BLOCK_M: tl.constexpr):
    """x [BLOCK_M, n] gathered along axis 1 at src [n] -> [BLOCK_M, len(src)]. One row (the GPU) goes through a
    1-D tl.gather, which Triton lowers to one shared-memory store of the row and one load per element (a 2-D
    gather is laid out warp-locally, with shuffles quadratic in the row length); the interpreter takes 2-D."""
    if BLOCK_M == 1:
        g = tl.gather(tl.reshape(x, [x.shape[1]]), src, 0)
        return tl.reshape(g, [1, src.shape[0]])
    else:
        return tl.gather(x, tl.broadcast_to(src[None, :], [BLOCK_M, src.shape[0]]), 1)


@triton.jit
def _row_inputs(x_ptr, u_ptr, rows, M, K, NORMAL, KEEPER, stride_x, stride_u, MODE: tl.constexpr,
                K_P2: tl.constexpr, N_P2: tl.constexpr, KEEP_P2: tl.constexpr, GATHER: tl.constexpr):
    """The raw loads of `rows` (zeros past M), as 4 values (0.0 where unused): GATHER: the whole rows of x and of
    up [BLOCK_M, K_P2]; otherwise x and up at the INT4 positions [BLOCK_M, N_P2] and at the keepers [.., KEEP_P2]
    (positions are channels)."""
    row_ok = rows < M
    rows = rows.to(tl.int64)
    xr = x_ptr + rows[:, None] * stride_x
    ur = u_ptr + rows[:, None] * stride_u
    b = 0.0
    c = 0.0
    d = 0.0
    if GATHER:
        ch = tl.arange(0, K_P2)
        m = row_ok[:, None] & (ch < K)[None, :]
        a = tl.load(xr + ch[None, :], mask=m, other=0.0)
        if MODE == 2:
            b = tl.load(ur + ch[None, :], mask=m, other=0.0)
    else:
        pos = tl.arange(0, N_P2)
        m = row_ok[:, None] & (pos < NORMAL)[None, :]
        a = tl.load(xr + pos[None, :], mask=m, other=0.0)
        if MODE == 2:
            b = tl.load(ur + pos[None, :], mask=m, other=0.0)
        if KEEP_P2 > 0:
            kk = tl.arange(0, KEEP_P2)
            mk = row_ok[:, None] & (kk < KEEPER)[None, :]
            c = tl.load(xr + NORMAL + kk[None, :], mask=mk, other=0.0)
            if MODE == 2:
                d = tl.load(ur + NORMAL + kk[None, :], mask=mk, other=0.0)
    return a, b, c, d


@triton.jit
def _atom_quantize_kernel(
        x_ptr, u_ptr, w_ptr, idx_ptr,             # input rows, `up` rows (MODE 2), norm weight (MODE 1), index [K]
        q4_ptr, s4_ptr, q8_ptr, s8_ptr,           # outputs, contiguous (kernels/formats.py)
        M, K, NORMAL, KEEPER, stride_x, stride_u, eps, clip,
        MODE: tl.constexpr, G: tl.constexpr, K_P2: tl.constexpr, N_P2: tl.constexpr, KEEP_P2: tl.constexpr,
        GATHER: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK_M: tl.constexpr, PER_SM: tl.constexpr):
    """Each program walks blocks of BLOCK_M rows (1 on a GPU) pid, pid + programs, ...; the rows are held whole.

    GATHER: each row is read contiguously (K_P2 channels, 16-byte loads) and reordered in registers (_gather_rows).
    Not GATHER (index = identity, e.g. an MLP whose channels were permuted offline): positions are channels.
    w_ptr holds the norm weight in REORDERED order (the wrapper gathers it once per (weight, index)).
    PER_SM only sizes the grid (programs per SM, chosen by the autotuner)."""
    pos = tl.arange(0, N_P2)                  # INT4 positions of the reordered row
    pos_ok = pos < NORMAL
    grp = tl.arange(0, N_P2 // G)
    byte = tl.arange(0, N_P2 // 2)
    shift = (tl.arange(0, 2) * 4)[None, None, :, None]
    step = tl.num_programs(0) * BLOCK_M
    na, nb, nc, nd = 0.0, 0.0, 0.0, 0.0
    if MODE != 2:
        nxt = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        na, nb, nc, nd = _row_inputs(x_ptr, u_ptr, nxt, M, K, NORMAL, KEEPER, stride_x, stride_u, MODE, K_P2, N_P2,
                                     KEEP_P2, GATHER)
    for blk in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows = rows.to(tl.int64)              # M * K may pass 2^31
        # the next rows' loads are issued before this row's work, so their latency overlaps it (not for SiLU * up:
        # its float64 exp already spills, and the prefetch made it 1.3-1.6x slower on the H200)
        if MODE == 2:
            a, b, c, d = _row_inputs(x_ptr, u_ptr, blk * BLOCK_M + tl.arange(0, BLOCK_M), M, K, NORMAL, KEEPER,
                                     stride_x, stride_u, MODE, K_P2, N_P2, KEEP_P2, GATHER)
        else:
            a, b, c, d = na, nb, nc, nd
            nxt = blk * BLOCK_M + step + tl.arange(0, BLOCK_M)
            na, nb, nc, nd = _row_inputs(x_ptr, u_ptr, nxt, M, K, NORMAL, KEEPER, stride_x, stride_u, MODE, K_P2,
                                         N_P2, KEEP_P2, GATHER)
        # 1. the values at the INT4 positions (v) and at the keeper positions (kv), before any scaling
        if GATHER:
            x = a
            if MODE == 2:
                x = _silu_mul(x, b, LIBDEVICE)
            v = _gather_rows(x, tl.load(idx_ptr + pos, mask=pos_ok, other=0), BLOCK_M)  # padding reads channel 0
        else:
            v = a
            if MODE == 2:
                v = _silu_mul(v, b, LIBDEVICE)
        if KEEP_P2 > 0:
            kk = tl.arange(0, KEEP_P2)
            k_ok = kk < KEEPER
            m_k = row_ok[:, None] & k_ok[None, :]
            if GATHER:
                kv = _gather_rows(x, tl.load(idx_ptr + NORMAL + kk, mask=k_ok, other=0), BLOCK_M)
            else:
                kv = c
                if MODE == 2:
                    kv = _silu_mul(kv, d, LIBDEVICE)
        # 2. RMSNorm: rstd from the sum of squares in float64 (any order: the row is all there), rounded once
        if MODE == 1:
            if GATHER:
                x64 = x.to(tl.float64)
                ss = tl.sum(x64 * x64, axis=1)
            else:
                v64 = v.to(tl.float64)
                ss = tl.sum(v64 * v64, axis=1)
                if KEEP_P2 > 0:
                    k64 = kv.to(tl.float64)
                    ss += tl.sum(k64 * k64, axis=1)
            ms = ss / K + eps
            if LIBDEVICE:  # tl.sqrt is documented as a fast (approximate) sqrt; libdevice's float64 sqrt is IEEE
                root = libdevice.sqrt(ms)
            else:
                root = tl.sqrt(ms)
            rstd = (1.0 / root).to(tl.float32)[:, None]  # float64 `/` is IEEE (div.rn.f64) on NVIDIA GPUs
            v = v.to(tl.float32) * rstd * tl.load(w_ptr + pos, mask=pos_ok, other=0.0).to(tl.float32)[None, :]
            if KEEP_P2 > 0:
                wk = tl.load(w_ptr + NORMAL + kk, mask=k_ok, other=0.0).to(tl.float32)
                kv = kv.to(tl.float32) * rstd * wk[None, :]
        # 3. INT4 groups (NORMAL is a multiple of G and of 64: padded positions fill whole groups and 64-blocks,
        #    which every store masks out)
        v = tl.reshape(v.to(tl.float32), [BLOCK_M, N_P2 // G, G])
        s4 = _scale_fp16_fast(tl.max(tl.abs(v), axis=2), clip, 7, LIBDEVICE)
        tl.store(s4_ptr + rows[:, None] * (NORMAL // G) + grp[None, :], s4,
                 mask=row_ok[:, None] & (grp < NORMAL // G)[None, :])
        # pack per kernels/pack.py: in each block of 64, byte j = value j (low nibble) | value j + 32 (high)
        q = tl.reshape(_nibbles(v, s4[:, :, None], LIBDEVICE), [BLOCK_M, N_P2 // 64, 2, 32])
        packed = tl.reshape(tl.sum(q << shift, axis=2), [BLOCK_M, N_P2 // 2]).to(tl.uint8)
        tl.store(q4_ptr + rows[:, None] * (NORMAL // 2) + byte[None, :], packed,
                 mask=row_ok[:, None] & (byte < NORMAL // 2)[None, :])
        # 4. INT8 keepers: one scale per row, never clipped
        if KEEP_P2 > 0:
            kv = tl.where(m_k, kv.to(tl.float32), 0.0)  # padding must not enter the max
            s8 = _scale_fp16(tl.max(tl.abs(kv), axis=1), 1.0, 127)
            tl.store(s8_ptr + rows, s8, mask=row_ok)
            tl.store(q8_ptr + rows[:, None] * KEEPER + kk[None, :], _quantize(kv, s8[:, None], 127), mask=m_k)


# GPU configs: warps per program, chosen so that a thread holds 16-32 values of the row (more spills at K = 11008,
# fewer add per-thread overhead), and the most programs per SM (4: persistent programs walking many rows; 64: in
# effect one row per program). More programs than rows never start.
PER_SM_CHOICES = (4, 64)
_QUANTIZE_TUNERS: dict = {}
USE_CHUNKED = False  # the earlier kernel (chunked walk, gathers from global memory), kept to be timed beside it


def _warps(k_p2: int) -> list[int]:
    return [w for w in (4, 8, 16) if 16 <= k_p2 // (32 * w) <= 32] or [4 if k_p2 <= 2048 else 16]


def _atom_quantize_tuned(M: int, k_p2: int):
    """The autotuner for M rows of k_p2 (padded) channels: one per power-of-two M (the best config at M = 256 is
    not the best at M = 8192), each keyed by the shape and mode within it."""
    bucket = (min(8192, triton.next_power_of_2(M)), k_p2)
    if bucket not in _QUANTIZE_TUNERS:
        _QUANTIZE_TUNERS[bucket] = triton.autotune(
            configs=[triton.Config({"PER_SM": p, "BLOCK_M": 1}, num_warps=w)
                     for w in _warps(k_p2) for p in PER_SM_CHOICES],
            key=["K", "NORMAL", "KEEPER", "MODE", "GATHER"])(_atom_quantize_kernel)
    return _QUANTIZE_TUNERS[bucket]


_PREPARED: dict[tuple, tuple] = {}


def _prepared(index, weight, gather: bool):
    """(index as int16/int32, the norm weight in reordered order) for the kernel, made once per (index, weight) and
    remembered until either is modified in place or freed (each is a fixed per-layer tensor)."""
    key = (id(index), index._version, None if weight is None else (id(weight), weight._version), gather)
    hit = _PREPARED.get(key)
    if hit is not None and hit[0]() is index and (weight is None or hit[1]() is weight):
        return hit[2], hit[3]
    # int16 where it fits: the gathered values take the index's register layout, 8 per thread instead of 4, which
    # halves the per-group work replicated across lanes (~10% fewer instructions, compiled for sm_90); likewise the
    # weight stays in its own (16-bit) dtype
    idx = index.to(torch.int16 if index.shape[0] <= 32767 else torch.int32).contiguous()
    w = None if weight is None else (weight[index.long()].contiguous() if gather else weight)
    if len(_PREPARED) > 4096:
        _PREPARED.clear()
    _PREPARED[key] = (weakref.ref(index), None if weight is None else weakref.ref(weight), idx, w)
    return idx, w


def _empty_packed(M: int, normal: int, keeper: int, group_size: int, dev):
    """Output buffers of M packed rows (q4, s4, q8, s8); with no keeper channels s8 holds ones (kernels/formats.py)."""
    q4 = torch.empty(M, normal // 2, dtype=torch.uint8, device=dev)
    s4 = torch.empty(M, normal // group_size, dtype=torch.float16, device=dev)
    q8 = torch.empty(M, keeper, dtype=torch.int8, device=dev)
    s8 = (torch.empty if keeper else torch.ones)(M, 1, dtype=torch.float16, device=dev)
    return q4, s4, q8, s8


_IDENTITY_INDEX: dict[int, tuple] = {}


def _is_identity(index) -> bool:
    """index == arange(K), remembered per index tensor (the check needs the values on the host)."""
    seen = _IDENTITY_INDEX.get(id(index))
    if seen is not None and seen[0]() is index and seen[1] == index._version:
        return seen[2]
    same = bool(torch.equal(index.long(), torch.arange(index.shape[0], device=index.device)))
    if len(_IDENTITY_INDEX) > 4096:
        _IDENTITY_INDEX.clear()
    _IDENTITY_INDEX[id(index)] = (weakref.ref(index), index._version, same)
    return same


def _launch(mode, x2, u2, weight, index, eps, clip, group_size, keeper) -> PackedAtom:
    M, K = x2.shape
    normal = K - keeper
    if USE_CHUNKED:
        return _launch_chunked(mode, x2, u2, weight, index, eps, clip, group_size, keeper)
    q4, s4, q8, s8 = _empty_packed(M, normal, keeper, group_size, x2.device)
    gather = not _is_identity(index)
    idx, w = _prepared(index, weight, gather)
    args = (x2, x2 if u2 is None else u2, x2 if w is None else w, idx, q4, s4, q8, s8,
            M, K, normal, keeper, x2.stride(0), x2.stride(0) if u2 is None else u2.stride(0), float(eps), float(clip))
    meta = dict(MODE=mode, G=group_size, K_P2=triton.next_power_of_2(K), N_P2=triton.next_power_of_2(normal),
                KEEP_P2=triton.next_power_of_2(keeper) if keeper else 0, GATHER=gather, LIBDEVICE=not interpreting())
    if interpreting():  # the interpreter pays per program and per step, not per element: ~2^17 elements a step
        block_m = max(1, min(triton.next_power_of_2(M), (1 << 17) // meta["K_P2"]))
        _atom_quantize_kernel[(1,)](*args, BLOCK_M=block_m, PER_SM=0, **meta)
    elif AUTOTUNE:
        sms = _sm_count(x2.device)
        _atom_quantize_tuned(M, meta["K_P2"])[lambda cfg: (min(M, sms * cfg["PER_SM"]),)](*args, **meta)
    else:
        _atom_quantize_kernel[(M,)](*args, num_warps=_warps(meta["K_P2"])[-1], BLOCK_M=1, PER_SM=0, **meta)
    return PackedAtom(q4, s4, q8, s8, group_size)


def _sm_count(dev) -> int:
    return torch.cuda.get_device_properties(dev).multi_processor_count


# ---------------------------------------------------------------------------------------------------------------
# Version 1, naive (for teaching, llm.c style): one program per (row, group) gathers its channels straight from
# global memory and writes unpacked int8; pack_int4 then packs in a second kernel. No norm/SiLU fusion.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _quantize_groups_naive_kernel(x_ptr, idx_ptr, q_ptr, s_ptr, stride_x, start, width, clip,
                                  QMAX: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    j = tl.arange(0, G_P2)
    ok = j < G
    src = tl.load(idx_ptr + start + grp * G + j, mask=ok, other=0)             # reordered position -> channel
    v = tl.load(x_ptr + row * stride_x + src, mask=ok, other=0.0).to(tl.float32)
    s = _scale_fp16(tl.max(tl.abs(v), axis=0), clip, QMAX)
    tl.store(s_ptr + row * (width // G) + grp, s)
    tl.store(q_ptr + row * width + grp * G + j, _quantize(v, s, QMAX), mask=ok)


def reorder_quantize_naive(x, index, group_size: int, keeper: int, clip: float = 1.0,
                           check_finite: bool | None = None) -> PackedAtom:
    """Version 1 of reorder_quantize (same arguments and result): a program per group + a separate pack kernel.

    Slower than the fused kernel (scattered global loads, int8 written and read back, ~1 ms per program under
    the interpreter); kept to show what fusion removes.
    """
    from .pack import pack_int4

    x2 = _rows(x, "x", check_finite)
    _check_all(x2, index, group_size, keeper, clip)
    M, K = x2.shape
    normal = K - keeper
    q4 = torch.empty(M, normal, dtype=torch.int8, device=x2.device)
    s4 = torch.empty(M, normal // group_size, dtype=torch.float16, device=x2.device)
    _quantize_groups_naive_kernel[(M, normal // group_size)](x2, index, q4, s4, x2.stride(0), 0, normal, float(clip),
                                                             QMAX=7, G=group_size, G_P2=group_size)
    q8 = torch.empty(M, keeper, dtype=torch.int8, device=x2.device)
    s8 = torch.ones(M, 1, dtype=torch.float16, device=x2.device)
    if keeper:
        _quantize_groups_naive_kernel[(M, 1)](x2, index, q8, s8, x2.stride(0), normal, keeper, 1.0,
                                              QMAX=127, G=keeper, G_P2=triton.next_power_of_2(keeper))
    return _finish(PackedAtom(pack_int4(q4), s4, q8, s8, group_size), x2, check_finite, "x")


# ---------------------------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------------------------
def reorder_quantize(x, index, group_size: int, keeper: int, clip: float = 1.0,
                     check_finite: bool | None = None) -> PackedAtom:
    """Reorder channels and quantize rows into the packed Atom format (the o_proj input: no norm before it).

    Args:
        x: float32/float16/bfloat16 [..., K]; leading dimensions are flattened into M rows.
        index: int32/int64 [K], a permutation: row i of the result holds x[i, index] (outliers last).
        group_size: 32, 64 or 128 (INT4 groups); keeper: INT8 outlier channels at the end; clip in (0, 1].
        check_finite: reject NaN/inf inputs and overflowing scales; None = only on the CPU (on a GPU the check
            would synchronise every call).
    Returns:
        PackedAtom: q4 uint8 [M, (K-keeper)/2], s4 fp16 [M, (K-keeper)/G], q8 int8 [M, keeper], s8 fp16 [M, 1].
    """
    x2 = _rows(x, "x", check_finite)
    _check_all(x2, index, group_size, keeper, clip)
    return _finish(_launch(MODE_PLAIN, x2, None, None, index, 0.0, clip, group_size, keeper), x2, check_finite, "x")


def rmsnorm_quantize(x, weight, eps: float, index, group_size: int, keeper: int, clip: float = 1.0,
                     check_finite: bool | None = None) -> PackedAtom:
    """Fused RMSNorm (y = x * rsqrt(mean(x^2) + eps) * weight, float32) + reorder + quantize.

    Args:
        x: float32/float16/bfloat16 [..., K] (the residual stream; it is only read, the caller keeps it).
        weight: float [K], the norm's weight in the ORIGINAL channel order. eps: > 0.
        index, group_size, keeper, clip, check_finite: as in reorder_quantize.
    Returns:
        PackedAtom of M = x.numel() // K rows (shapes as in reorder_quantize).
    """
    x2 = _rows(x, "x", check_finite)
    _check_all(x2, index, group_size, keeper, clip)
    _check_weight(weight, x2.shape[1], x2.device, _want_check(check_finite, x2))
    _check_eps(eps)
    packed = _launch(MODE_RMSNORM, x2, None, weight.contiguous(), index, eps, clip, group_size, keeper)
    return _finish(packed, x2, check_finite, "RMSNorm(x) * weight")


def silu_mul_quantize(gate, up, index, group_size: int, keeper: int, clip: float = 1.0,
                      check_finite: bool | None = None) -> PackedAtom:
    """Fused SiLU(gate) * up (float32; Llama's MLP) + reorder + quantize: the input of down_proj.

    Args:
        gate, up: float32/float16/bfloat16 [..., K], same shape (views with a row stride, e.g. halves of a fused
            gate_up projection, are read in place).
        index, group_size, keeper, clip, check_finite: as in reorder_quantize.
    Returns:
        PackedAtom of M = gate.numel() // K rows (shapes as in reorder_quantize).
    """
    g2, u2 = _gate_up(gate, up, check_finite)
    _check_all(g2, index, group_size, keeper, clip)
    return _finish(_launch(MODE_SILU_MUL, g2, u2, None, index, 0.0, clip, group_size, keeper), g2, check_finite,
                   "SiLU(gate) * up")


# ---------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------
def _want_check(check_finite, t) -> bool:
    return t.device.type == "cpu" if check_finite is None else bool(check_finite)


def _rows(x, name: str, check_finite) -> torch.Tensor:
    """x [..., K] -> a [M, K] view (copied only if its last dimension is strided), checked."""
    check_tensor(x, name, FLOAT_DTYPES)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if _want_check(check_finite, x2) and not torch.isfinite(x2).all():
        raise ValueError(f"{name} contains NaN or inf; activations must be finite to be quantized.")
    return x2


def _gate_up(gate, up, check_finite):
    g2, u2 = _rows(gate, "gate", check_finite), _rows(up, "up", check_finite)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}.")
    if gate.device != up.device:
        raise ValueError(f"gate and up must be on one device, got {gate.device} and {up.device}.")
    return g2, u2


def _check_clip(clip) -> None:
    if not isinstance(clip, (int, float)) or not 0.0 < clip <= 1.0:
        raise ValueError(f"clip must be a number in (0, 1], got {clip!r}.")


def _check_eps(eps) -> None:
    if not isinstance(eps, (int, float)) or not 0.0 < eps < float("inf"):
        raise ValueError(f"eps must be a positive finite number (e.g. the model's rms_norm_eps), got {eps!r}.")


def _check_weight(weight, K: int, device, check_finite: bool) -> None:
    check_tensor(weight, "weight", FLOAT_DTYPES, dim=1)
    if weight.shape[0] != K:
        raise ValueError(f"weight has {weight.shape[0]} entries but x has K={K} channels.")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but x is on {device}; move it with weight.to(x.device).")
    if check_finite and not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or inf.")


_CHECKED_INDEX: dict[int, tuple] = {}


def _check_index(index, K: int, device) -> None:
    check_tensor(index, "index", (torch.int32, torch.int64), dim=1)
    if index.shape[0] != K:
        raise ValueError(f"index has {index.shape[0]} entries but x has K={K} channels; it must be a permutation "
                         f"of range({K}).")
    if index.device != device:
        raise ValueError(f"index is on {index.device} but x is on {device}; move it with index.to(x.device).")
    if not index.is_contiguous():
        raise ValueError("index must be contiguous; pass index.contiguous() (once, not per call).")
    seen = _CHECKED_INDEX.get(id(index))
    if seen is not None and seen[0]() is index and seen[1] == index._version:
        return
    counts = torch.bincount(index.long().clamp(-1, K) + 1, minlength=K + 2)
    if counts[0] or counts[-1] or not bool((counts[1:-1] == 1).all()):
        raise ValueError(f"index must be a permutation of range({K}) (each channel exactly once), e.g. "
                         f"torch.argsort of an outlier metric.")
    if len(_CHECKED_INDEX) > 4096:
        _CHECKED_INDEX.clear()
    _CHECKED_INDEX[id(index)] = (weakref.ref(index), index._version)


def _check_all(x2, index, group_size: int, keeper: int, clip) -> None:
    K = x2.shape[1]
    check_atom_shape(K, keeper, group_size)
    _check_clip(clip)
    _check_index(index, K, x2.device)


def _check_scales(p: PackedAtom, what: str) -> None:
    if not (torch.isfinite(p.s4).all() and torch.isfinite(p.s8).all()):
        raise ValueError(f"{what} has a group whose scale overflows float16 (|value| > ~458k for INT4, ~8.3M for "
                         f"INT8); rescale the inputs.")


def _finish(p: PackedAtom, x2, check_finite, what: str) -> PackedAtom:
    if _want_check(check_finite, x2):
        _check_scales(p, what)
    return p


# ---------------------------------------------------------------------------------------------------------------
# The earlier fused kernel (chunked walk, gathers from global memory): timed beside the row kernel
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _atom_quantize_chunked_kernel(
        x_ptr, u_ptr, w_ptr, idx_ptr,             # input rows, `up` rows (MODE 2), norm weight (MODE 1), index [K]
        q4_ptr, s4_ptr, q8_ptr, s8_ptr,           # outputs, contiguous (kernels/formats.py)
        M, K, NORMAL, KEEPER, stride_x, stride_u, eps, clip,
        MODE: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
        KEEP_P2: tl.constexpr, LIBDEVICE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)  # M * K may pass 2^31

    # 1. RMSNorm only: rstd from a contiguous pass over the row, in float64, rounded once (module docstring)
    rstd = tl.zeros([BLOCK_M], tl.float32)
    if MODE == 1:
        acc = tl.zeros([BLOCK_M, CHUNK], tl.float64)
        for c0 in range(0, K, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            m = row_ok[:, None] & (cols < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            x64 = x.to(tl.float64)
            acc += x64 * x64
        ms = tl.sum(acc, axis=1) / K + eps
        if LIBDEVICE:  # tl.sqrt is documented as a fast (approximate) sqrt; libdevice's float64 sqrt is IEEE
            root = libdevice.sqrt(ms)
        else:
            root = tl.sqrt(ms)
        rstd = (1.0 / root).to(tl.float32)  # float64 `/` is IEEE (div.rn.f64) on NVIDIA GPUs

    # 2. INT4 part, CHUNK reordered positions at a time (CHUNK is a multiple of G and of 64, NORMAL of both, so a
    #    chunk's ragged end covers whole groups and whole 64-blocks, which are masked out of every store)
    pos = tl.arange(0, CHUNK)
    grp = tl.arange(0, CHUNK // G)
    byte = tl.arange(0, CHUNK // 2)
    shift = (tl.arange(0, 2) * 4)[None, None, :, None]
    for c0 in range(0, NORMAL, CHUNK):
        ok = c0 + pos < NORMAL
        src = tl.load(idx_ptr + c0 + pos, mask=ok, other=0)
        v = _reordered_values(x_ptr, u_ptr, w_ptr, rows, src, row_ok[:, None] & ok[None, :], stride_x, stride_u,
                              rstd, MODE, LIBDEVICE)
        v = tl.reshape(v, [BLOCK_M, CHUNK // G, G])
        s4 = _scale_fp16(tl.max(tl.abs(v), axis=2), clip, 7)                  # [BLOCK_M, CHUNK // G]
        tl.store(s4_ptr + rows[:, None] * (NORMAL // G) + (c0 // G + grp)[None, :], s4,
                 mask=row_ok[:, None] & (c0 // G + grp < NORMAL // G)[None, :])
        q = _quantize(v, s4[:, :, None], 7)
        # pack per kernels/pack.py: in each block of 64, byte j = value j (low nibble) | value j + 32 (high
        # nibble); the two halves sit on an axis of size 2, so shifting one by 4 and summing over it packs them
        q = tl.reshape(q, [BLOCK_M, CHUNK // 64, 2, 32]).to(tl.int32) & 0xF
        packed = tl.reshape(tl.sum(q << shift, axis=2), [BLOCK_M, CHUNK // 2]).to(tl.uint8)
        tl.store(q4_ptr + rows[:, None] * (NORMAL // 2) + (c0 // 2 + byte)[None, :], packed,
                 mask=row_ok[:, None] & (c0 // 2 + byte < NORMAL // 2)[None, :])

    # 3. INT8 keeper part: the last KEEPER reordered positions, one scale per row, never clipped
    if KEEP_P2 > 0:
        kk = tl.arange(0, KEEP_P2)
        k_ok = kk < KEEPER
        ksrc = tl.load(idx_ptr + NORMAL + kk, mask=k_ok, other=0)
        km = row_ok[:, None] & k_ok[None, :]
        kv = _reordered_values(x_ptr, u_ptr, w_ptr, rows, ksrc, km, stride_x, stride_u, rstd, MODE, LIBDEVICE)
        kv = tl.where(km, kv, 0.0)  # padding must not enter the max
        s8 = _scale_fp16(tl.max(tl.abs(kv), axis=1), 1.0, 127)
        tl.store(s8_ptr + rows, s8, mask=row_ok)
        tl.store(q8_ptr + rows[:, None] * KEEPER + kk[None, :], _quantize(kv, s8[:, None], 127), mask=km)


# GPU configs: (rows per program, channels per chunk, warps). More rows per program share each read of the index.
CHUNKED_GPU_CONFIGS = [(1, 512, 4), (1, 1024, 4), (1, 1024, 8), (2, 512, 4), (4, 256, 4), (4, 512, 8)]
_CHUNKED_TUNERS: dict = {}


def _chunked_tuned(M: int):
    """The autotuner for M rows: one per power-of-two M (the best config at M = 256 is 1.4x slower at M = 8192 on
    the H200), each keyed by the shape within it."""
    bucket = min(8192, triton.next_power_of_2(M))
    if bucket not in _CHUNKED_TUNERS:
        _CHUNKED_TUNERS[bucket] = triton.autotune(
            configs=[triton.Config({"BLOCK_M": bm, "CHUNK": ch}, num_warps=w) for bm, ch, w in CHUNKED_GPU_CONFIGS],
            key=["K", "NORMAL", "KEEPER"])(_atom_quantize_chunked_kernel)
    return _CHUNKED_TUNERS[bucket]


def _launch_chunked(mode, x2, u2, weight, index, eps, clip, group_size, keeper) -> PackedAtom:
    M, K = x2.shape
    normal = K - keeper
    q4, s4, q8, s8 = _empty_packed(M, normal, keeper, group_size, x2.device)
    args = (x2, x2 if u2 is None else u2, x2 if weight is None else weight, index, q4, s4, q8, s8,
            M, K, normal, keeper, x2.stride(0), x2.stride(0) if u2 is None else u2.stride(0), float(eps), float(clip))
    meta = dict(MODE=mode, G=group_size, KEEP_P2=triton.next_power_of_2(keeper) if keeper else 0,
                LIBDEVICE=not interpreting())
    if interpreting():
        # each program and loop step costs ~1 ms whatever its size: few programs, ~2^17 elements per step
        chunk = max(128, min(4096, triton.next_power_of_2(normal)))
        block_m = max(1, min(triton.next_power_of_2(M), (1 << 17) // chunk))
        _atom_quantize_chunked_kernel[(triton.cdiv(M, block_m),)](*args, BLOCK_M=block_m, CHUNK=chunk, **meta)
    elif AUTOTUNE:
        _chunked_tuned(M)[lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]),)](*args, **meta)
    else:
        _atom_quantize_chunked_kernel[(M,)](*args, BLOCK_M=1, CHUNK=512, num_warps=4, **meta)
    return PackedAtom(q4, s4, q8, s8, group_size)
