"""Compile the warp-specialized Gluon W4A4 kernel (kernels/gemm_gluon_ws.py) for sm_90a WITHOUT a GPU and report
registers, spills, shared memory and the PTX's wgmma / TMA / mbarrier counts (as benchmarks/aot_check.py does for
the other kernels). Run with the device's triton:
    PYTHONPATH=/tmp/t36 python benchmarks/bench_gemm_ws_aot.py [--ptx DIR]
"""
import os
import sys

import torch

torch.cuda.is_available = lambda: True  # keep compiled Triton (and Gluon) on this GPU-less machine
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import atom_lab  # noqa: E402,F401
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from atom_lab.kernels import gemm_gluon_ws as W  # noqa: E402
from benchmarks.aot_check import report  # noqa: E402


def desc(dtype, block, swizzle):
    from triton.experimental.gluon import language as gl
    bits = {"i8": 8, "fp16": 16}[dtype]
    lay = (gl.NVMMASharedLayout.get_default_for(block, gl.int8) if swizzle else
           gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=bits, rank=len(block)))
    return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{lay!r}>"


def compile_ws(ncons, BY, stages, split, overlap, G=128, has_res=False, out="fp16", ptx_dir=None):
    from triton.experimental.gluon._runtime import GluonASTSource
    SB, BN = G // 2, 64 * ncons
    r = W._regs(ncons)
    sig = dict(wq_desc=desc("i8", [BN, SB], True), tc_desc=desc("i8", [BY, SB], True),
               wk_desc=desc("i8", [BN, SB], True), ak_desc=desc("i8", [BY, SB], True),
               wsc_desc=desc("fp16", [BN], False), asc_desc=desc("fp16", [BY], False),
               ws8="*fp16", as8="*fp16", out=f"*{out}", res=f"*{out}", ws="*fp32", counters="*i32",
               N="i32", M="i32", NP="i32", MP="i32", STEPS="i32", KP="i32", s_om="i32", s_rm="i32", M_BUCKET="i32")
    ce = dict(GROUP=G, NCONS=ncons, BY=BY, STAGES=stages, SPLIT=split, HAS_RES=has_res, OVERLAP=overlap,
              CONS_REGS=r["cons"], LOAD_REGS=r["load"])
    fn = W._w4a4_ws_kernel
    signature = {n: ("constexpr" if n in ce else sig[n]) for n in fn.arg_names}
    D16 = [["tt.divisibility", 16]]
    attrs = {(fn.arg_names.index(n),): D16 for n in ("ws8", "as8", "out", "res", "ws", "counters", "N", "s_om")}
    src = GluonASTSource(fn=fn, signature=signature, constexprs=ce, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": 4, "num_stages": 1, "maxnreg": r["maxnreg"]})
    name = f"gluon_ws ncons{ncons} BY{BY} S{stages} split{split} ov{int(overlap)} G{G}"
    report(name, ck)
    if ptx_dir:
        os.makedirs(ptx_dir, exist_ok=True)
        with open(os.path.join(ptx_dir, name.replace(" ", "_") + ".ptx"), "w") as f:
            f.write(ck.asm["ptx"])
    return ck


if __name__ == "__main__":
    ptx = sys.argv[sys.argv.index("--ptx") + 1] if "--ptx" in sys.argv else None
    print("triton", triton.__version__, "gluon_ws available:", W.AVAILABLE, W.IMPORT_ERROR)
    for cfg in W.CONFIGS:
        try:
            compile_ws(*cfg, ptx_dir=ptx)
        except Exception as e:  # noqa: BLE001
            print("FAILED", cfg, type(e).__name__, str(e)[:3000])
    compile_ws(2, 128, 4, 1, False, G=64, ptx_dir=ptx)
    compile_ws(2, 64, 4, 2, 2, has_res=True, out="bf16", ptx_dir=ptx)
