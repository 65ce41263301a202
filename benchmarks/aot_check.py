"""Compile the GEMM kernels for sm_90a WITHOUT a GPU (Triton's bundled ptxas) and report what matters on Hopper:
registers, spills, shared memory, and which tensor-core instructions the PTX uses (wgmma = Hopper's fast path,
mma.sync = the older warp-level one). Run with the device's Triton version, e.g.
    pip install --target /tmp/t36 --no-deps triton==3.6.0
    PYTHONPATH=/tmp/t36 python benchmarks/aot_check.py
"""
import os
import re
import subprocess
import sys
import tempfile

import torch

torch.cuda.is_available = lambda: True  # let atom_lab keep compiled Triton on this GPU-less machine
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import atom_lab  # noqa: E402,F401
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from atom_lab.kernels import gemm_fp8, gemm_gluon, gemm_int4  # noqa: E402

D16 = [["tt.divisibility", 16]]


def compile_kernel(fn, sig, constexprs, div16, num_warps, num_stages, source=None):
    names = fn.arg_names
    signature = {n: ("constexpr" if n in constexprs else sig[n]) for n in names}
    attrs = {(names.index(n),): D16 for n in div16}
    src = (source or triton.compiler.ASTSource)(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def report(name, ck):
    ptx = ck.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    wg = len(re.findall(r"wgmma\.mma_async[^\n]*", ptx))
    mma = len(re.findall(r"\bmma\.sync[^\n]*", ptx))
    kinds = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+)", ptx)))[:3]
    waits = len(re.findall(r"wgmma\.wait_group", ptx))
    cpasync = len(re.findall(r"cp\.async\.(?:cg|ca)", ptx))
    tma = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    print(f"{name:44s} regs {regs.group(1) if regs else '?':>4} stack {stack.group(1) if stack else '?':>4} "
          f"smem {ck.metadata.shared:>6}  wgmma {wg:3d} waits {waits:2d} mma.sync {mma:3d} cp.async {cpasync:3d} "
          f"tma {tma} {kinds}")
    return ck


FUSED_SIG = dict(x4="*u8", xs4="*fp16", x8="*i8", xs8="*fp16", y4="*u8", ys4="*fp16", y8="*i8", ys8="*fp16",
                 out="*fp16", res="*fp16", ws="*fp32", counters="*i32", RX="i32", RY="i32", KB="i32", KP="i32",
                 sx4="i32", sxs="i32", sx8="i32", sxs8="i32", sy4="i32", sys="i32", sy8="i32", sys8="i32",
                 sxg="i32", syg="i32", so_i="i32", so_j="i32", sr_i="i32", sr_j="i32", M_BUCKET="i32")
FUSED_DIV = ["x4", "xs4", "x8", "xs8", "y4", "ys4", "y8", "ys8", "out", "res", "ws", "counters", "KB", "KP", "sx4", "sxs",
             "sx8", "sy4", "sys", "sy8", "so_j", "sr_j"]
FP8_SIG = dict(a8="*fp8e4nv", saT="*fp32", ka="*i8", ska="*fp16", w8="*fp8e4nv", swT="*fp32", kw="*i8",
               skw="*fp16", out="*fp16", res="*fp16", M="i32", N="i32", NG="i32", KP="i32", s_a8="i32",
               s_ka="i32", s_ska="i32", s_w8="i32", s_kw="i32", s_skw="i32", s_om="i32", s_rm="i32", M_BUCKET="i32")
FP8_DIV = ["a8", "saT", "ka", "ska", "w8", "swT", "kw", "skw", "out", "res", "M", "N", "KP", "s_a8", "s_ka",
           "s_w8", "s_kw", "s_om"]


def fused(BX, BY, split, nw, ns, G=128, y8=False, asm=None):
    """The fused kernel; y8=True: its "fused8" mode (y = INT8 codes, y's scales transposed: sys = 1)."""
    ce = dict(GROUP=G, BX=BX, BY=BY, GROUP_X=8, SPLIT=split, HAS_RES=False, KPC=64, Y8=y8, sxg=1,
              ASM=True if asm is None else asm)  # as the GPU launchers: the inline-PTX nibble shift
    sig, div = dict(FUSED_SIG), list(FUSED_DIV)
    if y8:
        sig["y4"] = "*i8"
        ce["sys"] = 1
        div = [d for d in div if d != "sys"] + ["syg"]
    return report(f"fused{'8' if y8 else ''}{' asm' if ce['ASM'] else ''} BX{BX} BY{BY} split{split} w{nw} s{ns} G{G}",
                  compile_kernel(gemm_int4._w4a4_fused_kernel, sig, ce, div, nw, ns))


def fp8(BM, BN, nw, ns, G=128, tma=False):
    ce = dict(GROUP=G, BM=BM, BN=BN, GROUP_M=8, HAS_RES=False, KPC=64)
    if tma:
        sig = {k: v for k, v in FP8_SIG.items() if k not in ("s_a8", "s_w8")}
        sig["a_desc"] = f"tensordesc<fp8e4nv[{BM}, {G}]>"
        sig["w_desc"] = f"tensordesc<fp8e4nv[{BN}, {G}]>"
        div = [d for d in FP8_DIV if d not in ("a8", "w8", "s_a8", "s_w8")]
        return report(f"fp8-tma BM{BM} BN{BN} w{nw} s{ns} G{G}",
                      compile_kernel(gemm_fp8._fp8_group_gemm_tma_kernel, sig, ce, div, nw, ns))
    return report(f"fp8 BM{BM} BN{BN} w{nw} s{ns} G{G}",
                  compile_kernel(gemm_fp8._fp8_group_gemm_kernel, FP8_SIG, ce, FP8_DIV, nw, ns))


GLUON_SIG = dict(a4="*u8", as4="*fp16", a8="*i8", as8="*fp16", w4="*u8", ws4="*fp16", w8="*i8", ws8="*fp16",
                 out="*fp16", res="*fp16", ws="*fp32", counters="*i32", M="i32", N="i32", KB="i32", KP="i32",
                 s_a4="i32", s_as4="i32", s_a8="i32", s_as8="i32", s_w4="i32", s_ws4="i32", s_w8="i32", s_ws8="i32",
                 s_om="i32", s_on="i32", s_rm="i32", s_rn="i32", M_BUCKET="i32")
GLUON_DIV = ["a4", "as4", "a8", "as8", "w4", "ws4", "w8", "ws8", "out", "res", "ws", "counters", "KB", "KP", "s_a4",
             "s_as4", "s_a8", "s_w4", "s_ws4", "s_w8", "s_on"]


def gluon(swap, BM, BN, stages, split, G=128, ablate=0):
    """The Gluon kernel (kernels/gemm_gluon.py) with one of its configurations."""
    from triton.experimental.gluon._runtime import GluonASTSource
    ce = dict(GROUP=G, BM=BM, BN=BN, GROUP_M=8, STAGES=stages, SPLIT=split, HAS_RES=False, num_warps=4, ABLATE=ablate)
    return report(f"gluon swap{int(swap)} BM{BM} BN{BN} S{stages} split{split} G{G} ablate{ablate}",
                  compile_kernel(gemm_gluon._w4a4_wgmma_kernel, GLUON_SIG, ce, GLUON_DIV, 4, 1, GluonASTSource))


if __name__ == "__main__":
    print("triton", triton.__version__)
    if gemm_gluon.AVAILABLE:
        for cfg in gemm_gluon.CONFIGS + gemm_gluon.SWAP_CONFIGS:
            gluon(*cfg)
        gluon(False, 64, 64, 4, 1, G=64)
    else:
        print("no Gluon in this triton:", gemm_gluon.IMPORT_ERROR)
    fused(64, 16, 4, 4, 4)
    fused(128, 16, 4, 4, 4)
    fused(64, 16, 4, 4, 4, G=32)
    fused(64, 64, 1, 4, 4)
    fused(64, 128, 1, 4, 4)
    for bx, by, sp, ns in sorted({c for _, cs in gemm_int4.FUSED8_CLASSES for c in cs}):
        fused(bx, by, sp, 4, ns, y8=True)
    fp8(128, 128, 8, 4)
    fp8(128, 128, 8, 4, tma=True)
    fp8(64, 128, 4, 4, tma=True)
    fp8(128, 64, 4, 4, tma=True)
    fp8(128, 128, 8, 3, G=64)
