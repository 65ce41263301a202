"""Method "gluon_ws" of the W4A4 GEMM (kernels/gemm.py): a warp-specialized Gluon kernel for batch decode (M = 64-256)
on Hopper (SM90, `triton.experimental.gluon`, triton >= 3.6).

Why: the plain-Triton "fused8" kernel (gemm_int4.py) runs this band at 0.44-0.77x cuBLAS bf16 on the H200 with
215-255 registers, 1-2 warps per scheduler and every dependent latency exposed: the scale loads, the unpack and the
fp32 per-group rescale are serialized with the tensor cores (benchmarks/NOTES.md, fourth session). Plain Triton
cannot give one warp the copies and another the math; Gluon can:

    loader partition (1 warp): per K step (one group of G channels), TMA copies of
        the packed weight bytes   [BN, G/2]  (w.q4 seen as int8)
        the token INT8 codes      [BY, G/2] twice (the step's low-nibble run and high-nibble run, fused8's operand
                                             from gemm_int4.activation_codes, so no token unpack at all)
        the weight group scales   [BN]       (from the weights' scales transposed once to [groups, N] and cached)
        the token group scales    [BY]       (activation_codes' [groups, M] scales)
      into a STAGES-deep shared-memory ring, one mbarrier "ready" per slot (TMA byte count) and one "empty" per slot
      (one arrival per consumer warpgroup). Then the INT8 keeper channels as extra steps of the same ring.
    consumer partitions (NCONS warpgroups, 64 weight rows each): per step, the weight bytes go shared -> registers
      straight in wgmma's register-A layout (no shared-memory round trip for the unpacked values), unpacked to
      value * 16 in int8 (inline PTX `(b << 4) & 0xF0F0F0F0` on 4 bytes, and `b & 0xF0`), two int8 wgmmas
      (low run, high run) against the token tiles in shared memory; with OVERLAP the MMA of step s is issued before
      the result of step s - 1 is waited for, so the fp32 rescale of one group runs while the tensor cores work on
      the next. Scales come from shared memory (the loader's copies), not per-thread global loads.
    epilogue: the keeper dots (int32 over the keeper chunks, one rescale), split-K partials as gemm_int4 (fp32, a
      counter per tile and warpgroup, the last program sums the partials in split order), residual, out dtype.

The arithmetic is fused8's, operation for operation: the same exact int32 group dots (the low and high runs summed
in int32: wgmma accumulates the second into the first), the fp32 scale product (s_w / 16) * s_a of the same fp16
scales, `acc += dot * product` per group in the same order, the keeper part last (int32 over the chunks, which is
exact and equals fused8's fp32 sum of exact chunk dots while the keeper dot stays below 2^24: keeper <= 1040
channels), then the residual. So the plain-Triton fused8 kernel at the same split-K factor is this kernel's twin:
it runs under the CPU interpreter, where Gluon cannot, and tests/test_gemm_gluon_ws.py pins Gluon == twin ==
w4a4_gemm_ref on the GPU.

Limits (checked, with a clear error): SM90, G = 64 or 128, keeper a multiple of 16 channels (TMA rows need 16-byte
strides; Atom's keeper is 128), N a multiple of 8. The import is guarded: without Gluon AVAILABLE is False.
"""
from __future__ import annotations

import os
import weakref

import torch
import triton

from . import gemm_int4
from ._common import interpreting
from .formats import PackedAtom

AVAILABLE = False
IMPORT_ERROR = "the CPU interpreter runs no Gluon (its twin, gemm_int4's fused8 kernel, runs there instead)"
if not interpreting() and os.environ.get("ATOM_LAB_GLUON", "1") == "0":
    IMPORT_ERROR = "switched off (ATOM_LAB_GLUON=0)"
elif not interpreting():  # the CPU never imports Gluon; on a GPU any failure means: no such method here
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma,
                                                                       warpgroup_mma_init, warpgroup_mma_wait)
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        AVAILABLE = True
        IMPORT_ERROR = ""
    except Exception as e:  # noqa: BLE001  (older triton, or a Gluon API that differs)
        IMPORT_ERROR = f"{type(e).__name__}: {e}"


def supported(capability, group_size: int, keeper: int, n: int) -> bool:
    """Gluon imported, an SM90 GPU, G in (64, 128), keeper % 16 == 0 and N % 8 == 0 (TMA's 16-byte strides)."""
    return (AVAILABLE and capability == (9, 0) and group_size in (64, 128) and keeper % 16 == 0 and n % 8 == 0)


if AVAILABLE:
    @gluon.jit
    def _lo_x16(b):
        # low nibble * 16 on four bytes of a 32-bit register at once (gemm_int4._lo_x16's PTX)
        return gl.inline_asm_elementwise("{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }",
                                         "=r,r", [b], dtype=gl.int8, is_pure=True, pack=4)

    @gluon.jit
    def _loader(wq_desc, tc_desc, wk_desc, ak_desc, wsc_desc, asc_desc, wbuf, lobuf, hibuf, wsc, asc, ready, empty,
                n0, m0, s_lo, nsteps, nkeep, NP, MP,
                SB: gl.constexpr, STAGES: gl.constexpr):
        STEP_BYTES: gl.constexpr = (wq_desc.block_type.nbytes + 2 * tc_desc.block_type.nbytes +
                                    wsc_desc.block_type.nbytes + asc_desc.block_type.nbytes)
        KEEP_BYTES: gl.constexpr = wk_desc.block_type.nbytes + ak_desc.block_type.nbytes
        for i in range(nsteps + nkeep):
            slot = i % STAGES
            # an mbarrier starts in phase 0 "completed" for the waiter on phase 1: the first STAGES waits pass
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            bar = ready.index(slot)
            if i < nsteps:
                s = s_lo + i
                mbarrier.expect(bar, STEP_BYTES)
                tma.async_copy_global_to_shared(wq_desc, [n0, s * SB], bar, wbuf.index(slot))
                tma.async_copy_global_to_shared(tc_desc, [m0, 2 * SB * s], bar, lobuf.index(slot))
                tma.async_copy_global_to_shared(tc_desc, [m0, 2 * SB * s + SB], bar, hibuf.index(slot))
                # flat views of [groups, NP] / [groups, MP] (rows padded to multiples of 8: every box starts on 16
                # bytes): row n of group s is element s * NP + n (columns past N or M read padding, the next
                # group's scales or TMA's zero fill; they are never stored)
                tma.async_copy_global_to_shared(wsc_desc, [s * NP + n0], bar, wsc.index(slot))
                tma.async_copy_global_to_shared(asc_desc, [s * MP + m0], bar, asc.index(slot))
            else:
                k0 = (i - nsteps) * SB
                mbarrier.expect(bar, KEEP_BYTES)
                tma.async_copy_global_to_shared(wk_desc, [n0, k0], bar, wbuf.index(slot))
                tma.async_copy_global_to_shared(ak_desc, [m0, k0], bar, lobuf.index(slot))

    @gluon.jit
    def _vec(ring, slot, W: gl.constexpr, start: gl.constexpr, L: gl.constexpr, layout: gl.constexpr):
        # scales [start, start + L) of ring slot `slot` as fp32 in `layout`: the TMA rows are unswizzled, so the
        # slot is read as a plain vector
        flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        return ring.index(slot)._reinterpret(gl.float16, [W], flat).slice(start, L).load(layout).to(gl.float32)

    @gluon.jit
    def _consume(wbuf, lobuf, hibuf, wsc, asc, ready, empty, ws8, as8, out, res, ws, counters,
                 n0, m0, nsteps, nkeep, N, M, s_om, s_rm, pid, pid_k,
                 WG: gl.constexpr, NCONS: gl.constexpr, BY: gl.constexpr, SB: gl.constexpr, STAGES: gl.constexpr,
                 SPLIT: gl.constexpr, HAS_RES: gl.constexpr, OVERLAP: gl.constexpr):
        # One warpgroup: weight rows [n0 + 64 WG, +64) x tokens [m0, m0 + BY); acc[row, token] in wgmma's layout.
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BY, 32])
        a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
        row_l: gl.constexpr = gl.SliceLayout(1, mma)
        col_l: gl.constexpr = gl.SliceLayout(0, mma)
        acc = gl.zeros([64, BY], gl.float32, layout=mma)
        spare = gl.zeros([64, BY], gl.int32, layout=mma)  # registers the next use_acc=False MMA overwrites
        UNDO: gl.constexpr = 1.0 / 16.0  # the weights' nibbles carry x16, undone exactly in their scale

        if OVERLAP == 2:
            # Pairs of groups: issue both groups' MMAs (two accumulators), wait for the first and rescale it while
            # the second runs, then the second. No MMA is in flight across the loop's back edge, so no register
            # copies of an in-flight accumulator (OVERLAP = 1's loop has them: ptxas serializes its wgmmas, C7514).
            spare2 = gl.zeros([64, BY], gl.int32, layout=mma)
            for j in range(nsteps // 2):
                i = 2 * j
                slot = i % STAGES
                mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
                wb = wbuf.index(slot).slice(64 * WG, 64, dim=0).load(a_op)
                ta = warpgroup_mma(_lo_x16(wb), lobuf.index(slot).permute((1, 0)), spare, use_acc=False,
                                   is_async=True)
                ta = warpgroup_mma(wb & -16, hibuf.index(slot).permute((1, 0)), ta, is_async=True)
                sw = _vec(wsc, slot, 64 * NCONS, 64 * WG, 64, row_l) * UNDO
                sa = _vec(asc, slot, BY, 0, BY, col_l)
                slot2 = (i + 1) % STAGES
                mbarrier.wait(ready.index(slot2), ((i + 1) // STAGES) & 1)
                wb2 = wbuf.index(slot2).slice(64 * WG, 64, dim=0).load(a_op)
                tb = warpgroup_mma(_lo_x16(wb2), lobuf.index(slot2).permute((1, 0)), spare2, use_acc=False,
                                   is_async=True)
                tb = warpgroup_mma(wb2 & -16, hibuf.index(slot2).permute((1, 0)), tb, is_async=True)
                sw2 = _vec(wsc, slot2, 64 * NCONS, 64 * WG, 64, row_l) * UNDO
                sa2 = _vec(asc, slot2, BY, 0, BY, col_l)
                d = warpgroup_mma_wait(num_outstanding=2, deps=[ta])
                gl.thread_barrier()
                mbarrier.arrive(empty.index(slot), count=1)
                acc += d.to(gl.float32) * (sw[:, None] * sa[None, :])
                d2 = warpgroup_mma_wait(num_outstanding=0, deps=[tb])
                gl.thread_barrier()
                mbarrier.arrive(empty.index(slot2), count=1)
                acc += d2.to(gl.float32) * (sw2[:, None] * sa2[None, :])
                spare = d
                spare2 = d2
            if nsteps % 2 == 1:
                i = nsteps - 1
                slot = i % STAGES
                mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
                wb = wbuf.index(slot).slice(64 * WG, 64, dim=0).load(a_op)
                t = warpgroup_mma(_lo_x16(wb), lobuf.index(slot).permute((1, 0)), spare, use_acc=False,
                                  is_async=True)
                t = warpgroup_mma(wb & -16, hibuf.index(slot).permute((1, 0)), t, is_async=True)
                sw = _vec(wsc, slot, 64 * NCONS, 64 * WG, 64, row_l) * UNDO
                sa = _vec(asc, slot, BY, 0, BY, col_l)
                d = warpgroup_mma_wait(num_outstanding=0, deps=[t])
                gl.thread_barrier()
                mbarrier.arrive(empty.index(slot), count=1)
                acc += d.to(gl.float32) * (sw[:, None] * sa[None, :])
        elif OVERLAP == 1:
            sw_p = gl.zeros([64], gl.float32, layout=row_l)
            sa_p = gl.zeros([BY], gl.float32, layout=col_l)
            tok = warpgroup_mma_init(spare)
            for i in range(nsteps):
                slot = i % STAGES
                mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
                wb = wbuf.index(slot).slice(64 * WG, 64, dim=0).load(a_op)
                nxt = warpgroup_mma(_lo_x16(wb), lobuf.index(slot).permute((1, 0)), spare, use_acc=False,
                                    is_async=True)
                nxt = warpgroup_mma(wb & -16, hibuf.index(slot).permute((1, 0)), nxt, is_async=True)
                sw = _vec(wsc, slot, 64 * NCONS, 64 * WG, 64, row_l) * UNDO
                sa = _vec(asc, slot, BY, 0, BY, col_l)
                if i > 0:
                    # step i - 1's MMAs (the two issued before these two) are done: rescale them while step i's run
                    d = warpgroup_mma_wait(num_outstanding=2, deps=[tok])
                    gl.thread_barrier()  # all four warps are past their wait before the slot is handed back
                    mbarrier.arrive(empty.index((i - 1) % STAGES), count=1)
                    acc += d.to(gl.float32) * (sw_p[:, None] * sa_p[None, :])
                    spare = d
                tok = nxt
                sw_p = sw
                sa_p = sa
            if nsteps > 0:
                d = warpgroup_mma_wait(num_outstanding=0, deps=[tok])
                gl.thread_barrier()
                mbarrier.arrive(empty.index((nsteps - 1) % STAGES), count=1)
                acc += d.to(gl.float32) * (sw_p[:, None] * sa_p[None, :])
        else:
            for i in range(nsteps):
                slot = i % STAGES
                mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
                wb = wbuf.index(slot).slice(64 * WG, 64, dim=0).load(a_op)
                t = warpgroup_mma(_lo_x16(wb), lobuf.index(slot).permute((1, 0)), spare, use_acc=False,
                                  is_async=True)
                t = warpgroup_mma(wb & -16, hibuf.index(slot).permute((1, 0)), t, is_async=True)
                sw = _vec(wsc, slot, 64 * NCONS, 64 * WG, 64, row_l) * UNDO
                sa = _vec(asc, slot, BY, 0, BY, col_l)
                d = warpgroup_mma_wait(num_outstanding=0, deps=[t])
                gl.thread_barrier()
                mbarrier.arrive(empty.index(slot), count=1)
                acc += d.to(gl.float32) * (sw[:, None] * sa[None, :])
                spare = d

        rows = n0 + 64 * WG + gl.arange(0, 64, layout=row_l)
        toks = m0 + gl.arange(0, BY, layout=col_l)
        if nkeep > 0:
            # INT8 keeper channels: SB-channel chunks through the same ring, exact int32 sum, one rescale
            kacc = gl.zeros([64, BY], gl.int32, layout=mma)
            for j in range(nkeep):
                i = nsteps + j
                slot = i % STAGES
                mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
                kb = wbuf.index(slot).slice(64 * WG, 64, dim=0).load(a_op)
                kt = warpgroup_mma(kb, lobuf.index(slot).permute((1, 0)), kacc, is_async=True)
                kacc = warpgroup_mma_wait(num_outstanding=0, deps=[kt])
                gl.thread_barrier()
                mbarrier.arrive(empty.index(slot), count=1)
            s8w = gl.load(ws8 + rows % N).to(gl.float32)
            s8a = gl.load(as8 + toks % M).to(gl.float32)
            acc += kacc.to(gl.float32) * (s8w[:, None] * s8a[None, :])

        mask = (rows[:, None] < N) & (toks[None, :] < M)
        o_off = toks[None, :] * s_om + rows[:, None]
        if SPLIT > 1:
            p_off = toks[None, :] * N + rows[:, None]
            gl.store(ws + pid_k * M * N + p_off, acc, mask=mask)
            gl.thread_barrier()  # all of this warpgroup's partial stores are issued before it signals
            cnt = counters + pid * NCONS + WG
            arrived = gl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT - 1:
                acc = gl.zeros([64, BY], gl.float32, layout=mma)
                for k in gl.static_range(SPLIT):
                    acc += gl.load(ws + k * M * N + p_off, mask=mask, other=0, cache_modifier=".cg")
                if HAS_RES:
                    acc += gl.load(res + toks[None, :] * s_rm + rows[:, None], mask=mask, other=0).to(gl.float32)
                gl.store(out + o_off, acc.to(out.dtype.element_ty), mask=mask)
                gl.atomic_xchg(cnt, 0)
        else:
            if HAS_RES:
                acc += gl.load(res + toks[None, :] * s_rm + rows[:, None], mask=mask, other=0).to(gl.float32)
            gl.store(out + o_off, acc.to(out.dtype.element_ty), mask=mask)

    @gluon.jit
    def _consume0(wbuf, lobuf, hibuf, wsc, asc, ready, empty, ws8, as8, out, res, ws, counters,
                  n0, m0, nsteps, nkeep, N, M, s_om, s_rm, pid, pid_k,
                  NCONS: gl.constexpr, BY: gl.constexpr, SB: gl.constexpr, STAGES: gl.constexpr,
                  SPLIT: gl.constexpr, HAS_RES: gl.constexpr, OVERLAP: gl.constexpr):
        _consume(wbuf, lobuf, hibuf, wsc, asc, ready, empty, ws8, as8, out, res, ws, counters,
                 n0, m0, nsteps, nkeep, N, M, s_om, s_rm, pid, pid_k, 0, NCONS, BY, SB, STAGES, SPLIT, HAS_RES,
                 OVERLAP)

    @gluon.jit
    def _consume1(wbuf, lobuf, hibuf, wsc, asc, ready, empty, ws8, as8, out, res, ws, counters,
                  n0, m0, nsteps, nkeep, N, M, s_om, s_rm, pid, pid_k,
                  NCONS: gl.constexpr, BY: gl.constexpr, SB: gl.constexpr, STAGES: gl.constexpr,
                  SPLIT: gl.constexpr, HAS_RES: gl.constexpr, OVERLAP: gl.constexpr):
        _consume(wbuf, lobuf, hibuf, wsc, asc, ready, empty, ws8, as8, out, res, ws, counters,
                 n0, m0, nsteps, nkeep, N, M, s_om, s_rm, pid, pid_k, 1, NCONS, BY, SB, STAGES, SPLIT, HAS_RES,
                 OVERLAP)

    @gluon.jit(do_not_specialize=["M", "MP", "M_BUCKET"])
    def _w4a4_ws_kernel(wq_desc, tc_desc, wk_desc, ak_desc, wsc_desc, asc_desc,
                        ws8, as8, out, res, ws, counters,
                        N, M, NP, MP, STEPS, KP, s_om, s_rm, M_BUCKET,
                        GROUP: gl.constexpr, NCONS: gl.constexpr, BY: gl.constexpr, STAGES: gl.constexpr,
                        SPLIT: gl.constexpr, HAS_RES: gl.constexpr, OVERLAP: gl.constexpr,
                        CONS_REGS: gl.constexpr, LOAD_REGS: gl.constexpr):
        # out[m, n] (row stride s_om) for weight rows n in [n0, n0 + 64 NCONS) and tokens m in [m0, m0 + BY);
        # program_id(1) = the split of K. M_BUCKET: only the tuner's key.
        SB: gl.constexpr = GROUP // 2
        BN: gl.constexpr = 64 * NCONS
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        tiles_m = gl.cdiv(M, BY)
        # tokens vary fastest: the programs that share a weight tile run together (it is read once from DRAM)
        n0 = (pid // tiles_m) * BN
        m0 = (pid % tiles_m) * BY
        per_split = gl.cdiv(STEPS, SPLIT)
        s_lo = pid_k * per_split
        nsteps = gl.maximum(gl.minimum(STEPS, s_lo + per_split) - s_lo, 0)
        # the keeper once per tile, in the last split (the one with the fewest steps), as gemm_int4
        nkeep = gl.where(pid_k == SPLIT - 1, gl.cdiv(KP, SB), 0)

        wbuf = gl.allocate_shared_memory(gl.int8, [STAGES, BN, SB], wq_desc.layout)
        lobuf = gl.allocate_shared_memory(gl.int8, [STAGES, BY, SB], tc_desc.layout)
        hibuf = gl.allocate_shared_memory(gl.int8, [STAGES, BY, SB], tc_desc.layout)
        wsc = gl.allocate_shared_memory(gl.float16, [STAGES, BN], wsc_desc.layout)
        asc = gl.allocate_shared_memory(gl.float16, [STAGES, BY], asc_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=NCONS)

        # (the argument tuples are written inline: a tuple held in a variable turns its constexprs into tensors)
        if NCONS == 2:
            gl.warp_specialize([
                (_consume0, (wbuf, lobuf, hibuf, wsc, asc, ready, empty, ws8, as8, out, res, ws, counters, n0, m0,
                             nsteps, nkeep, N, M, s_om, s_rm, pid, pid_k, NCONS, BY, SB, STAGES, SPLIT, HAS_RES,
                             OVERLAP)),
                (_consume1, (wbuf, lobuf, hibuf, wsc, asc, ready, empty, ws8, as8, out, res, ws, counters, n0, m0,
                             nsteps, nkeep, N, M, s_om, s_rm, pid, pid_k, NCONS, BY, SB, STAGES, SPLIT, HAS_RES,
                             OVERLAP)),
                (_loader, (wq_desc, tc_desc, wk_desc, ak_desc, wsc_desc, asc_desc, wbuf, lobuf, hibuf, wsc, asc, ready,
                           empty, n0, m0, s_lo, nsteps, nkeep, NP, MP, SB, STAGES)),
            ], [4, 1], [CONS_REGS, LOAD_REGS])
        else:
            gl.warp_specialize([
                (_consume0, (wbuf, lobuf, hibuf, wsc, asc, ready, empty, ws8, as8, out, res, ws, counters, n0, m0,
                             nsteps, nkeep, N, M, s_om, s_rm, pid, pid_k, NCONS, BY, SB, STAGES, SPLIT, HAS_RES,
                             OVERLAP)),
                (_loader, (wq_desc, tc_desc, wk_desc, ak_desc, wsc_desc, asc_desc, wbuf, lobuf, hibuf, wsc, asc, ready,
                           empty, n0, m0, s_lo, nsteps, nkeep, NP, MP, SB, STAGES)),
            ], [1], [LOAD_REGS])


# (NCONS, BY, STAGES, SPLIT, OVERLAP). NCONS = 2: 128 weight rows per program (two consumer warpgroups + the loader
# warp, 12 warps, one program per SM by registers); NCONS = 1: 64 rows, two programs per SM. Split-K (2, 4) gives
# the 132 SMs enough programs where N / BN x M / BY alone does not (N = 4096, M = 128: 32-64 tiles). OVERLAP 2 (pairs
# of groups, the first rescaled under the second's MMA) keeps two int32 results live: BY = 64 only (BY = 128 spills
# 400-512 B). OVERLAP 1 (one group in flight across the loop edge) is kept in the code but not offered: ptxas
# serializes its wgmmas (C7514: the loop's register copies read an in-flight accumulator), the first H200 run
# measured it among the slowest.
CONFIGS = [(2, 64, 4, 2, 2), (2, 64, 4, 1, 2), (1, 64, 4, 1, 2), (1, 64, 4, 2, 2), (1, 64, 4, 4, 2),
           (2, 64, 4, 4, 2), (1, 128, 4, 1, 0), (1, 128, 4, 2, 0), (2, 128, 4, 1, 0), (2, 128, 4, 2, 0)]
COMPILE_ERRORS: dict = {}


def _regs(ncons: int):
    # setmaxnreg budgets (multiples of 8): the loader warp needs few; with 2 consumers one program takes the SM
    # (12 warps x 32 lanes x 168 = 64512 of the 65536 registers), with 1 consumer two programs fit (8 warps x 128).
    return (dict(maxnreg=168, cons=232, load=40) if ncons == 2 else dict(maxnreg=128, cons=128, load=40))


_WST: dict = {}  # id(w.s4) -> (weakref to it, its version, the padded transposed copy)
_MIN_FLAT = 256  # flat scale buffers hold at least one whole box (BN, BY <= 128 elements) past any start


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def _flat_rows(s_t: torch.Tensor, rows: int) -> torch.Tensor:
    """[groups, rows] -> a flat zero-padded copy [groups * pad8(rows)] (>= _MIN_FLAT elements)."""
    g, r = s_t.shape
    rp = _pad8(rows)
    flat = torch.zeros(max(g * rp, _MIN_FLAT), dtype=s_t.dtype, device=s_t.device)
    flat[:g * rp].view(g, rp)[:, :r] = s_t
    return flat


def weight_scales_t(w: PackedAtom) -> torch.Tensor:
    """w.s4 [N, groups] fp16 -> flat [groups * pad8(N)] (transposed, rows padded to 16 bytes), cached per tensor:
    the weights do not change. The cache is keyed on the tensor itself (a weak reference and its version counter),
    never on its address alone, which a freed and re-allocated tensor can reuse."""
    s = w.s4
    hit = _WST.get(id(s))
    if hit is not None and hit[0]() is s and hit[1] == s._version:
        return hit[2]
    t = _flat_rows(s.t(), s.shape[0])
    _WST[id(s)] = (weakref.ref(s), s._version, t)
    weakref.finalize(s, _WST.pop, id(s), None)
    return t


def token_scales_flat(s4t: torch.Tensor) -> tuple:
    """activation_codes' scales [groups, M] -> (flat view or padded copy, padded row length): no copy when
    M % 8 == 0 (the serving engine's CUDA-graph buckets)."""
    g, m = s4t.shape
    if m % 8 == 0 and s4t.is_contiguous() and g * m >= _MIN_FLAT:
        return s4t.reshape(-1), m
    return _flat_rows(s4t, m), _pad8(m)


def _desc(t: torch.Tensor, block, bits: int, swizzle: bool = True):
    layout = (gl.NVMMASharedLayout.get_default_for(block, gl.int8) if swizzle else
              gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=bits, rank=len(block)))
    return TensorDescriptor.from_tensor(t, block, layout)


def refusal(a: PackedAtom, w: PackedAtom) -> str | None:
    """Why this kernel cannot run on these operands (None: it can); the caller has checked the PackedAtom contract."""
    if a.group_size not in (64, 128):
        return f"method='gluon_ws' needs group_size 64 or 128, got {a.group_size}."
    if a.keeper % 16:
        return (f"method='gluon_ws' needs keeper % 16 == 0 (TMA rows need 16-byte strides), got keeper {a.keeper}; "
                f"use method='fused8'.")
    if w.rows % 8:
        return f"method='gluon_ws' needs N % 8 == 0 (TMA), got N = {w.rows}; use method='fused8'."
    for name, t in (("w.q4", w.q4), ("w.q8", w.q8), ("a.q8", a.q8)):
        if t.numel() and (t.data_ptr() % 16 or (t.dim() == 2 and t.shape[0] > 1 and t.stride(0) % 16)):
            return (f"method='gluon_ws' needs {name} 16-byte aligned with 16-byte row strides (TMA); "
                    f"use method='fused8' or a .contiguous() copy.")
    return None


def check(a: PackedAtom, w: PackedAtom) -> None:
    """Raise ValueError where this kernel cannot run (refusal's reason)."""
    why = refusal(a, w)
    if why:
        raise ValueError(why)


def launch(a: PackedAtom, w: PackedAtom, out: torch.Tensor, residual, ncons: int = 2, BY: int = 128,
           stages: int = 4, split: int = 1, overlap: int = 0, codes=None) -> None:
    """One configuration. a: M token rows, w: N weight rows (PackedAtom, G = 64/128, keeper % 16 == 0, N % 8 == 0);
    out: [M, N] fp16/bf16/fp32 with contiguous rows, written in full; residual: optional [M, N] (contiguous rows);
    codes: gemm_int4.activation_codes(a) when the caller has them."""
    check(a, w)
    M, N, G = a.rows, w.rows, a.group_size
    SB = G // 2
    BN = 64 * ncons
    codes, s4 = gemm_int4.activation_codes(a) if codes is None else codes
    asc, MP = token_scales_flat(s4.t())  # activation_codes' scales: a [groups, M] tensor seen as [M, groups]
    wsc = weight_scales_t(w)
    NP = _pad8(N)
    steps = w.q4.shape[1] // SB
    split = max(1, min(split, steps))  # as gemm_int4._split_k: the same partition of K as fused8's twin
    wq = w.q4.view(torch.int8)
    wq_desc = _desc(wq, [BN, SB], 8)
    tc_desc = _desc(codes, [BY, SB], 8)
    wk_desc = _desc(w.q8, [BN, SB], 8) if a.keeper else wq_desc
    ak_desc = _desc(a.q8, [BY, SB], 8) if a.keeper else tc_desc
    wsc_desc = _desc(wsc, [BN], 16, swizzle=False)
    asc_desc = _desc(asc, [BY], 16, swizzle=False)
    tiles = triton.cdiv(N, BN) * triton.cdiv(M, BY)
    ws = cnt = out
    if split > 1:
        ws = torch.empty(split, M, N, dtype=torch.float32, device=out.device)
        cnt = gemm_int4._tile_counters(out.device, tiles * ncons)
    res = residual if residual is not None else out
    r = _regs(ncons)
    _w4a4_ws_kernel[(tiles, split)](
        wq_desc, tc_desc, wk_desc, ak_desc, wsc_desc, asc_desc, w.s8, a.s8, out, res, ws, cnt,
        N, M, NP, MP, steps, a.keeper, out.stride(0), res.stride(0), min(8192, triton.next_power_of_2(M)),
        GROUP=G, NCONS=ncons, BY=BY, STAGES=stages, SPLIT=split, HAS_RES=residual is not None, OVERLAP=int(overlap),
        CONS_REGS=r["cons"], LOAD_REGS=r["load"], num_warps=4, maxnreg=r["maxnreg"])


_BEST: dict = {}


def launch_tuned(a: PackedAtom, w: PackedAtom, out: torch.Tensor, residual, autotune: bool = True) -> None:
    """Pick the fastest of CONFIGS per (power-of-two M, N, K, keeper, G) on the first call (configs that fail to
    compile are recorded in COMPILE_ERRORS and skipped), then launch it. autotune=False: the first one."""
    if not autotune:
        launch(a, w, out, residual, *CONFIGS[0])
        return
    key = (min(8192, triton.next_power_of_2(a.rows)), w.rows, a.in_features, a.keeper, a.group_size)
    cfg = _BEST.get(key)
    if cfg is None:
        codes = gemm_int4.activation_codes(a)
        times = {}
        for c in CONFIGS:
            if c in COMPILE_ERRORS:
                continue
            try:
                times[c] = triton.testing.do_bench(lambda c=c: launch(a, w, out, residual, *c, codes=codes),
                                                   warmup=3, rep=10)
            except Exception as e:  # noqa: BLE001  (a config the compiler refuses is skipped, not fatal)
                COMPILE_ERRORS[c] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
        if not times:
            raise RuntimeError("no gluon_ws configuration compiled: " + "; ".join(f"{c}: {m}" for c, m in
                                                                              COMPILE_ERRORS.items()))
        cfg = _BEST[key] = min(times, key=times.get)
    launch(a, w, out, residual, *cfg)


def best_config(a_rows: int, n: int, k: int, keeper: int, group_size: int = 128):
    return _BEST.get((min(8192, triton.next_power_of_2(a_rows)), n, k, keeper, group_size))
