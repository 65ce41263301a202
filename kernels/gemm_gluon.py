"""Method "gluon" of the W4A4 GEMM (kernels/gemm.py): the INT4 bytes unpacked in-kernel into shared memory, fed to
Hopper's warpgroup MMA (wgmma) by a Gluon kernel (`triton.experimental.gluon`, triton >= 3.6, SM90 only).

Why Gluon: the FP8 paths (gemm_fp8.py, gemm_blockwise.py) first write an unpacked copy of the weights on every call
(19-50 us at Llama-2 shapes, more than a whole bf16 GEMM at M <= 256); the fused plain-Triton kernel (gemm_int4.py)
unpacks in registers but Triton waits for every dot before the per-group rescale and does not pipeline the byte
loads behind the bit operations. Here every step (one group of G channels) is written out by hand:

    cp.async ring (STAGES deep): packed bytes of A [BM, G/2] and W [BN, G/2], global -> shared, no registers held
    unpack: bytes -> registers -> value*16 in int8 (`b << 4` low nibbles, `b & 0xF0` high: two bit ops per byte,
            as gemm_int4.py) -> shared memory in the wgmma (NVMMA) layout, double-buffered
    wgmma:  int8 x int8 -> int32 of the group, issued asynchronously; step s's MMA is issued before step s - 1's
            result is waited for (`warpgroup_mma_wait(num_outstanding=2)`), so the fp32 rescale of one group
            (s_a / 256 * s_w) overlaps the tensor cores' work on the next
    keeper: the INT8 channels as int8 wgmma chunks after the groups, one rescale; epilogue (+ residual) from
            registers.
For few tokens the operands swap (the weights on wgmma's 64-row side, up to 32 tokens on the other) and K splits
over programs in one launch (fp32 partials, a counter per tile, the last program sums them in split order), as in
gemm_int4. The arithmetic is the fused kernel's: the same exact int32 group dots, the same fp32 scale products, the
groups summed in the same order, the keeper last. That plain-Triton kernel (gemm_int4._launch_fused) is this
kernel's twin: it runs under the CPU interpreter, where Gluon cannot, and tests/test_gemm_gluon.py pins Gluon ==
twin == w4a4_gemm_ref on the GPU.

Measured on the H200 (benchmarks/NOTES.md, results/gemm_h200*.json): correct, but 0.25-0.30x cuBLAS bf16 at
M >= 1024 and below the other methods almost everywhere, so the dispatch never picks it. An ablation placed the
cost: the per-step scale loads (~25%), the unpack's shared-memory round trip (~30%), the copies (~10%); the MMA
overlap above buys nothing. It is kept as a tested starting point for a warp-specialized version.

The import is guarded: without Gluon (older triton, or a triton whose Gluon API differs) `AVAILABLE` is False and
the method is simply not offered.
"""
from __future__ import annotations

import os

import torch
import triton

from . import gemm_int4
from ._common import interpreting
from .formats import PackedAtom

AVAILABLE = False
IMPORT_ERROR = "the CPU interpreter runs no Gluon (its twin gemm_int4._launch_fused runs there instead)"
if not interpreting() and os.environ.get("ATOM_LAB_GLUON", "1") == "0":
    IMPORT_ERROR = "switched off (ATOM_LAB_GLUON=0)"
elif not interpreting():  # the CPU never imports Gluon; on a GPU, any failure means: no Gluon method here
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared,
                                                                       warpgroup_mma, warpgroup_mma_wait)
        AVAILABLE = True
        IMPORT_ERROR = ""
    except Exception as e:  # noqa: BLE001  (older triton, or a Gluon API that differs)
        IMPORT_ERROR = f"{type(e).__name__}: {e}"


def gluon_supported(capability, group_size: int) -> bool:
    """Gluon imported, an SM90 GPU (wgmma), and groups of 64 or 128 channels (one step = 32 or 64 bytes)."""
    return AVAILABLE and capability == (9, 0) and group_size in (64, 128)


if AVAILABLE:
    @gluon.constexpr_function
    def _bytes_layout(cols, num_warps):
        # 16 bytes per thread along a row (one cp.async of 16 B), rows spread over the rest of the warp.
        tpc = cols // 16
        return gl.BlockedLayout([1, 16], [32 // tpc, tpc], [num_warps, 1], [1, 0])

    @gluon.constexpr_function
    def _instr_n(BN):
        # int8 wgmma: n in {8, 16, 24, 32, 48, ..., 224}, dividing BN (one warpgroup along M, so maxN = BN).
        for n in (128, 112, 96, 80, 64, 48, 32, 16, 8):
            if BN % n == 0:
                return n
        return 8

    @gluon.jit
    def _unpack_step(a_stage, w_stage, a_lo, a_hi, w_lo, w_hi, a_layout: gl.constexpr, w_layout: gl.constexpr):
        # Packed bytes (this thread's own cp.async writes) -> value * 16 in int8 -> the wgmma operand buffers.
        ab = a_stage.load(a_layout).to(gl.int8, bitcast=True)
        wb = w_stage.load(w_layout).to(gl.int8, bitcast=True)
        gl.thread_barrier()   # every warp is past its wait for the MMA that last read these operand buffers
        a_lo.store(ab << 4)
        a_hi.store(ab & -16)
        w_lo.store(wb << 4)
        w_hi.store(wb & -16)
        fence_async_shared()  # generic-proxy stores must be visible to the async proxy (wgmma) ...
        gl.thread_barrier()   # ... of every warp of the warpgroup

    @gluon.jit(do_not_specialize=["M", "N", "M_BUCKET"])
    def _w4a4_wgmma_kernel(
            a4, as4, a8, as8, w4, ws4, w8, ws8, out, res, ws, counters,
            M, N, KB, KP,
            s_a4, s_as4, s_a8, s_as8, s_w4, s_ws4, s_w8, s_ws8, s_om, s_on, s_rm, s_rn, M_BUCKET,
            GROUP: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr,
            STAGES: gl.constexpr, SPLIT: gl.constexpr, HAS_RES: gl.constexpr, num_warps: gl.constexpr,
            ABLATE: gl.constexpr = 0):
        # out[i, j] = sum over K of a[i] . w[j] (+ res[i, j]) at out + i * s_om + j * s_on. Rows i are tokens and
        # rows j channels, or (swapped, for few tokens) i channels and j tokens with s_om = 1: the weights then fill
        # the 64-row side of wgmma. SPLIT > 1 splits K over program_id(1) as gemm_int4 does (fp32 partials in ws,
        # a counter per tile; the last program to arrive sums the partials in split order). ABLATE > 0 removes one
        # stage of the K loop for timing only (wrong results; benchmarks/bench_gemm_gluon_ablation.py).
        SB: gl.constexpr = GROUP // 2  # bytes per step and row; its low nibbles are K run 0, high nibbles run 1
        a_layout: gl.constexpr = _bytes_layout(SB, num_warps)
        w_layout: gl.constexpr = _bytes_layout(SB, num_warps)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, _instr_n(BN), 32])
        stage_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        a_op_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, SB], gl.int8)
        w_op_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, SB], gl.int8)

        # Grouped tile order (as gemm_fp8._tile_ids): GROUP_M consecutive programs share W tiles in L2.
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        tiles_m = gl.cdiv(M, BM)
        tiles_n = gl.cdiv(N, BN)
        in_group = GROUP_M * tiles_n
        first_m = (pid // in_group) * GROUP_M
        size_m = gl.minimum(tiles_m - first_m, GROUP_M)
        off_m = (first_m + (pid % in_group) % size_m) * BM
        off_n = ((pid % in_group) // size_m) * BN

        # This program's steps [s_lo, s_lo + steps); the host makes every split non-empty.
        all_steps = KB // SB
        per_split = gl.cdiv(all_steps, SPLIT)
        s_lo = pid_k * per_split
        steps = gl.minimum(all_steps, s_lo + per_split) - s_lo
        kb = steps * SB  # bytes of this split per row

        # Out-of-range rows read a valid row (wrap-around) instead of masking; they are never stored.
        ra = (off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, a_layout))) % M
        rw = (off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, w_layout))) % N
        ca = gl.arange(0, SB, layout=gl.SliceLayout(0, a_layout))
        cw = gl.arange(0, SB, layout=gl.SliceLayout(0, w_layout))
        a_ptrs = a4 + ra[:, None] * s_a4 + (s_lo * SB + ca)[None, :]
        w_ptrs = w4 + rw[:, None] * s_w4 + (s_lo * SB + cw)[None, :]

        a_stage = gl.allocate_shared_memory(gl.uint8, [STAGES, BM, SB], stage_layout)
        w_stage = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, SB], stage_layout)
        a_lo = gl.allocate_shared_memory(gl.int8, [2, BM, SB], a_op_layout)
        a_hi = gl.allocate_shared_memory(gl.int8, [2, BM, SB], a_op_layout)
        w_lo = gl.allocate_shared_memory(gl.int8, [2, BN, SB], w_op_layout)
        w_hi = gl.allocate_shared_memory(gl.int8, [2, BN, SB], w_op_layout)

        for t in gl.static_range(STAGES - 1):  # fill the ring (steps past the end copy nothing)
            async_copy.async_copy_global_to_shared(a_stage.index(t), a_ptrs + t * SB,
                                                   mask=(t * SB + ca < kb)[None, :])
            async_copy.async_copy_global_to_shared(w_stage.index(t), w_ptrs + t * SB,
                                                   mask=(t * SB + cw < kb)[None, :])
            async_copy.commit_group()

        # Scales in the accumulator's row / column layouts (fp32; the x16 of both operands' nibbles undone here).
        rm_o = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
        rn_o = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
        rml = rm_o % M
        rnl = rn_o % N
        sa_ptrs = as4 + rml * s_as4 + s_lo
        sw_ptrs = ws4 + rnl * s_ws4 + s_lo
        acc = gl.zeros([BM, BN], gl.float32, layout=mma)

        # Step 0: refill its ring slot's successor, unpack it, issue its MMA.
        nxt = STAGES - 1
        async_copy.async_copy_global_to_shared(a_stage.index(nxt % STAGES), a_ptrs + nxt * SB,
                                               mask=(nxt * SB + ca < kb)[None, :])
        async_copy.async_copy_global_to_shared(w_stage.index(nxt % STAGES), w_ptrs + nxt * SB,
                                               mask=(nxt * SB + cw < kb)[None, :])
        async_copy.commit_group()
        async_copy.wait_group(STAGES - 1)
        _unpack_step(a_stage.index(0), w_stage.index(0), a_lo.index(0), a_hi.index(0), w_lo.index(0),
                     w_hi.index(0), a_layout, w_layout)
        spare = gl.zeros([BM, BN], gl.int32, layout=mma)  # the registers the next MMA writes (use_acc=False)
        tok = warpgroup_mma(a_lo.index(0), w_lo.index(0).permute((1, 0)), spare, use_acc=False, is_async=True)
        tok = warpgroup_mma(a_hi.index(0), w_hi.index(0).permute((1, 0)), tok, is_async=True)

        for t in range(1, steps):
            # Scales of step t - 1 (rescaled below) load while step t unpacks.
            if ABLATE == 2:  # timing ablation: constant scales (no scale loads)
                sa = gl.full([BM], 1.0, gl.float32, layout=gl.SliceLayout(1, mma))
                sw = gl.full([BN], 1.0, gl.float32, layout=gl.SliceLayout(0, mma))
            else:
                sa = gl.load(sa_ptrs + (t - 1)).to(gl.float32) * (1.0 / 256.0)
                sw = gl.load(sw_ptrs + (t - 1)).to(gl.float32)
            nxt = t + STAGES - 1
            slot = nxt % STAGES
            if ABLATE != 4:  # timing ablation 4: no copies after the prologue (the ring keeps stale bytes)
                async_copy.async_copy_global_to_shared(a_stage.index(slot), a_ptrs + nxt * SB,
                                                       mask=(nxt * SB + ca < kb)[None, :])
                async_copy.async_copy_global_to_shared(w_stage.index(slot), w_ptrs + nxt * SB,
                                                       mask=(nxt * SB + cw < kb)[None, :])
            async_copy.commit_group()
            async_copy.wait_group(STAGES - 1)  # step t's bytes have landed
            # Buffer t % 2 was last read by the MMA of step t - 2, waited for in the previous iteration.
            buf = t % 2
            if ABLATE != 1:  # timing ablation 1: no unpack (the MMA reads stale operand buffers)
                _unpack_step(a_stage.index(t % STAGES), w_stage.index(t % STAGES), a_lo.index(buf),
                             a_hi.index(buf), w_lo.index(buf), w_hi.index(buf), a_layout, w_layout)
            # Issue step t's MMA first, then wait for step t - 1's (the 2 just issued stay in flight) and rescale
            # it: the fp32 promotion of one step overlaps the tensor cores' work on the next.
            nxt_tok = warpgroup_mma(a_lo.index(buf), w_lo.index(buf).permute((1, 0)), spare, use_acc=False,
                                    is_async=True)
            nxt_tok = warpgroup_mma(a_hi.index(buf), w_hi.index(buf).permute((1, 0)), nxt_tok, is_async=True)
            if ABLATE == 3:  # timing ablation 3: no overlap (wait for this step's MMA too)
                d = warpgroup_mma_wait(num_outstanding=0, deps=[tok])
            else:
                d = warpgroup_mma_wait(num_outstanding=2, deps=[tok])
            acc += d.to(gl.float32) * (sa[:, None] * sw[None, :])
            spare = d
            tok = nxt_tok

        sa = gl.load(sa_ptrs + (steps - 1)).to(gl.float32) * (1.0 / 256.0)
        sw = gl.load(sw_ptrs + (steps - 1)).to(gl.float32)
        d = warpgroup_mma_wait(num_outstanding=0, deps=[tok])
        acc += d.to(gl.float32) * (sa[:, None] * sw[None, :])
        async_copy.wait_group(0)

        if pid_k == SPLIT - 1:
            # The INT8 keeper channels (once per tile, in the last split): SB-wide int8 chunks through buffer 0,
            # exact int32 sum, one rescale.
            gl.thread_barrier()  # every warp is done with the last MMA's operands before buffer 0 is rewritten
            kacc = gl.zeros([BM, BN], gl.int32, layout=mma)
            for k0 in range(0, KP, SB):
                xa = gl.load(a8 + ra[:, None] * s_a8 + (k0 + ca)[None, :], mask=(k0 + ca < KP)[None, :], other=0)
                xw = gl.load(w8 + rw[:, None] * s_w8 + (k0 + cw)[None, :], mask=(k0 + cw < KP)[None, :], other=0)
                a_lo.index(0).store(xa)
                w_lo.index(0).store(xw)
                fence_async_shared()
                gl.thread_barrier()
                kacc = warpgroup_mma(a_lo.index(0), w_lo.index(0).permute((1, 0)), kacc)
                gl.thread_barrier()
            s8a = gl.load(as8 + rml * s_as8).to(gl.float32)
            s8w = gl.load(ws8 + rnl * s_ws8).to(gl.float32)
            acc += kacc.to(gl.float32) * (s8a[:, None] * s8w[None, :])

        mask = (rm_o[:, None] < M) & (rn_o[None, :] < N)
        o_off = rm_o[:, None] * s_om + rn_o[None, :] * s_on
        if SPLIT > 1:
            gl.store(ws + pid_k * M * N + o_off, acc, mask=mask)
            gl.thread_barrier()  # all of this program's partial stores are issued before it signals
            arrived = gl.atomic_add(counters + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT - 1:
                acc = gl.zeros([BM, BN], gl.float32, layout=mma)
                for k in gl.static_range(SPLIT):
                    acc += gl.load(ws + k * M * N + o_off, mask=mask, other=0, cache_modifier=".cg")
                if HAS_RES:
                    acc += gl.load(res + rm_o[:, None] * s_rm + rn_o[None, :] * s_rn, mask=mask,
                                   other=0).to(gl.float32)
                gl.store(out + o_off, acc.to(out.dtype.element_ty), mask=mask)
                gl.atomic_xchg(counters + pid, 0)
        else:
            if HAS_RES:
                acc += gl.load(res + rm_o[:, None] * s_rm + rn_o[None, :] * s_rn, mask=mask, other=0).to(gl.float32)
            gl.store(out + o_off, acc.to(out.dtype.element_ty), mask=mask)


# Configurations (swap, BM, BN, stages, split). BM = 64 is one warpgroup's wgmma height. Normal (tokens on the BM
# side): 64 x 64 tiles keep >= 132 programs at mid M on 4096-wide layers and compile without spills (triton 3.6 AOT
# for sm_90a, benchmarks/aot_check.py: 254 registers, no stack, 64 KB of shared memory at 4 stages); 64 x 128 halves
# the A re-reads where N is wide but spills (~700 B of stack); 64 x 256 spills 2.5 KB and is not offered.
CONFIGS = [(False, 64, 64, 4, 1), (False, 64, 64, 3, 1), (False, 64, 64, 6, 1), (False, 64, 128, 4, 1)]
# Few tokens (M <= SWAP_MAX_M): swapped, 64 weight rows x 32 token columns (the smallest BN whose byte layout
# covers the tile without replication at G = 128; G = 64 needs 64), K split so that N / 64 tiles x split fill the
# 132 SMs several times over.
SWAP_MAX_M = 32
SWAP_CONFIGS = [(True, 64, 32, 4, sp) for sp in (1, 2, 4, 8)] + [(True, 64, 32, 6, 4)]
COMPILE_ERRORS: dict = {}  # config -> first line of the compiler's refusal (the benchmark reports it)


def _effective_split(p: PackedAtom, split: int) -> int:
    # Every split gets at least one step (the kernel issues the first step's MMA unconditionally).
    steps = p.q4.shape[1] // (p.group_size // 2)
    per = triton.cdiv(steps, max(1, min(split, steps)))
    return triton.cdiv(steps, per)


def launch(a: PackedAtom, w: PackedAtom, out: torch.Tensor, residual, swap: bool = False, BM: int = 64,
           BN: int = 64, stages: int = 4, split: int = 1, group_m: int = 8, ablate: int = 0) -> None:
    """One configuration. a: M token rows, w: N channel rows (PackedAtom, G = 64 or 128); out: [M, N] fp16/bf16/
    fp32, written in full; residual: optional [M, N] added in the epilogue. swap=True puts the weights on the
    BM side (out is written transposed through its strides); split > 1 splits K in one launch."""
    if swap and a.group_size == 64:
        BN = max(BN, 64)  # the 32-byte rows of a G = 64 step take 64 rows to cover the byte layout
    x, y = (w, a) if swap else (a, w)
    RX, RY = x.rows, y.rows
    res = residual if residual is not None else out
    so = (1, out.stride(0)) if swap else (out.stride(0), 1)
    sr = (0, 0) if residual is None else ((1, residual.stride(0)) if swap else (residual.stride(0), 1))
    split = _effective_split(x, split)
    tiles = triton.cdiv(RX, BM) * triton.cdiv(RY, BN)
    ws = counters = out
    if split > 1:
        ws = torch.empty(split, RX, RY, dtype=torch.float32, device=out.device)
        counters = gemm_int4._tile_counters(out.device, tiles)
    _w4a4_wgmma_kernel[(tiles, split)](
        x.q4, x.s4, x.q8, x.s8, y.q4, y.s4, y.q8, y.s8, out, res, ws, counters,
        RX, RY, x.q4.shape[1], x.keeper,
        x.q4.stride(0), x.s4.stride(0), max(x.q8.stride(0), 1), x.s8.stride(0),
        y.q4.stride(0), y.s4.stride(0), max(y.q8.stride(0), 1), y.s8.stride(0),
        so[0], so[1], sr[0], sr[1], min(8192, triton.next_power_of_2(a.rows)),
        GROUP=a.group_size, BM=BM, BN=BN, GROUP_M=group_m, STAGES=stages, SPLIT=split,
        HAS_RES=residual is not None, num_warps=4, ABLATE=ablate)


_BEST: dict = {}  # (M bucket, N, K, keeper, G) -> config, chosen once by timing every config that compiles


def candidates(M: int) -> list:
    return SWAP_CONFIGS + CONFIGS[:1] if M <= SWAP_MAX_M else CONFIGS


def launch_tuned(a: PackedAtom, w: PackedAtom, out: torch.Tensor, residual, autotune: bool = True) -> None:
    """Pick the fastest of candidates(M) per (power-of-two M, N, K, keeper, G) on the first call (a config that
    fails to compile is recorded in COMPILE_ERRORS and skipped), then launch it. autotune=False: the first one."""
    if not autotune:
        launch(a, w, out, residual, *candidates(a.rows)[0])
        return
    key = (min(8192, triton.next_power_of_2(a.rows)), w.rows, a.in_features, a.keeper, a.group_size)
    cfg = _BEST.get(key)
    if cfg is None:
        times = {}
        for c in candidates(a.rows):
            if c in COMPILE_ERRORS:
                continue
            try:
                times[c] = triton.testing.do_bench(lambda c=c: launch(a, w, out, residual, *c), warmup=5, rep=25)
            except Exception as e:  # noqa: BLE001  (a config the compiler refuses is skipped, not fatal)
                COMPILE_ERRORS[c] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
        if not times:
            raise RuntimeError("no Gluon configuration compiled: " + "; ".join(f"{c}: {m}" for c, m in
                                                                          COMPILE_ERRORS.items()))
        cfg = _BEST[key] = min(times, key=times.get)
    launch(a, w, out, residual, *cfg)


def best_config(a_rows: int, n: int, k: int, keeper: int, group_size: int = 128):
    return _BEST.get((min(8192, triton.next_power_of_2(a_rows)), n, k, keeper, group_size))
