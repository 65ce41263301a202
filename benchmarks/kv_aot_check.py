"""Compile the decode-attention kernels (kernels/attention.py) for sm_90 WITHOUT a GPU and count what matters:
registers, spills (stack), shared memory, and the SASS of the token loop (instructions per warp per tile, barriers,
the most frequent opcodes). The counts in benchmarks/NOTES.md's KV section (v7) come from this script.
    PYTHONPATH=/tmp/t36 python benchmarks/kv_aot_check.py           # the variants of the v7 notes
    PYTHONPATH=/tmp/t36 python benchmarks/kv_aot_check.py "core(bn=8, nw=1, ns=3, asm=True)" "gluon(ahead=2)"
"loop" counts the largest loop's instructions (every branch inside it), "main" the path of a step that takes no
branch inside it (the Gluon / CUDA-core kernels' rescale when the running max grows is such a branch).
(/tmp/t36: pip install --target /tmp/t36 --no-deps triton==3.6.0, the device's version; see benchmarks/aot_check.py.)
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.aot_check import compile_kernel  # noqa: E402  (makes atom_lab keep compiled Triton)
import triton  # noqa: E402

from atom_lab.kernels import attention as A  # noqa: E402

SIG = dict(q_ptr="*bf16", kc_ptr="*u8", ksz_ptr="*fp16", vc_ptr="*u8", vsz_ptr="*fp16", pt_ptr="*i32",
           start_ptr="*i32", len_ptr="*i32", tab_ptr="*fp32", o_ptr="*fp32", lse_ptr="*fp32", Hq="i32", Hkv="i32",
           max_pages="i32", tokens_per_split="i32", sm_scale="fp32", split0="i32")
CORE_SIG = {k: v for k, v in SIG.items() if k not in ("start_ptr", "split0")}
DIV = ["q_ptr", "kc_ptr", "ksz_ptr", "vc_ptr", "vsz_ptr", "pt_ptr", "o_ptr", "lse_ptr", "tab_ptr"]
TOOL = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")


def analyze(name, ck):
    """Print registers / stack / shared memory and the largest loop body's instruction mix (static count)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        res = subprocess.run([TOOL, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([TOOL, "--dump-sass", f.name], capture_output=True, text=True).stdout
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    body, span = [], (0, 0)
    for addr, op in ins:  # a loop = a backward branch; the token loop is the largest one
        m = re.search(r"BRA\s+0x([0-9a-f]+)", op)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            cand = [o for (x, o) in ins if lo <= x <= addr]
            body, span = (cand, (lo, addr)) if len(cand) > len(body) else (body, span)
    # the path a step takes when no branch inside the loop is taken (e.g. the rescale when the running max grows)
    skips = [(x, int(m.group(1), 16)) for x, o in ins if span[0] <= x <= span[1]
             for m in [re.search(r"BRA\s+0x([0-9a-f]+)", o)] if m and x < int(m.group(1), 16) <= span[1]]
    main = [o for x, o in ins if span[0] <= x <= span[1] and not any(a < x < b for a, b in skips)]
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", o).split()[0] for o in body)
    regs, stack = re.search(r"REG:(\d+)", res).group(1), re.search(r"STACK:(\d+)", res).group(1)
    top = " ".join(f"{k}:{v}" for k, v in ops.most_common(9))
    lds = sum(v for k, v in ops.items() if k.startswith("LDS"))
    print(f"{name:38s} regs {regs:>3} stack {stack:>3} smem {ck.metadata.shared:>6} loop {len(body):5d} "
          f"main {len(main):4d} bar {ops.get('BAR.SYNC.DEFER_BLOCKING', 0):2d} lds {lds:2d} | {top}", flush=True)


def dot(bn=64, nw=4, ns=1, qpk=1, rope=False, asm=False, bits=4):
    """The tensor-core kernel, INT4 per token-head (K_MODE/V_MODE 1) or bf16 (bits=16)."""
    ce = dict(D=128, G=128, BITS=bits, PAGE=32, QPK=qpk, BLOCK_Q=max(16, triton.next_power_of_2(qpk)), BLOCK_N=bn,
              ROPE=rope, NSPLIT=1, KEY_TG=0, RING=False, HAS_START=False, K_MODE=1 if bits == 4 else 0,
              V_MODE=1 if bits == 4 else 0, ASM=asm)
    sig = dict(SIG)
    if bits == 16:
        sig.update(kc_ptr="*bf16", vc_ptr="*bf16", ksz_ptr="*bf16", vsz_ptr="*bf16")
    analyze(f"dot b{bits} q{qpk} n{bn} w{nw} s{ns} {'pre' if rope else 'post'} asm{int(asm)}",
            compile_kernel(A._decode_split_kernel, sig, ce, DIV, nw, ns))


def core(bn=16, nw=1, ns=3, rope=False, asm=True, dd=128, tab="*fp32"):
    """The CUDA-core kernel (MHA INT4 per token-head); tab: the RoPE table's element type."""
    ce = dict(D=dd, PAGE=32, BLOCK_N=bn, ROPE=rope, NSPLIT=1, ASM=asm, STAGES=ns)
    analyze(f"core D{dd} n{bn} w{nw} s{ns} {'pre' if rope else 'post'} asm{int(asm)} {tab}",
            compile_kernel(A._decode_core_kernel, {**CORE_SIG, "tab_ptr": tab}, ce, DIV, nw, 1))


def gluon(ahead=1, hf=False, kc=1, ro=False):
    """The Gluon kernel (kernels/attention_gluon.py, MHA INT4 post-RoPE, head_dim 128): codes and pairs as int32."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from atom_lab.kernels import attention_gluon as G
    sig = {k: v for k, v in CORE_SIG.items() if k != "tab_ptr"}
    sig.update(kc_ptr="*i32", vc_ptr="*i32", ksz_ptr="*i32", vsz_ptr="*i32")
    ce = dict(PAGE=32, NSPLIT=1, VL=G.v_layout(), AHEAD=ahead, HEADS_FIRST=hf, KCHAINS=kc, READ_ONLY=ro)
    analyze(f"gluon D128 n16 w1 ahead{ahead} kchains{kc}{' read-only' if ro else ''}", compile_kernel(G._decode_gluon_kernel, sig, ce,
                                                            [d for d in DIV if d != "tab_ptr"], 1, 1, GluonASTSource))


DEFAULT = ["dot()", "dot(ns=3)", "dot(ns=3, asm=True)", "dot(qpk=4, ns=3, asm=True)", "dot(bits=16, ns=3)",
           "core(ns=1)", "core(ns=3)", "core(bn=64, nw=4)", "core(rope=True)", "core(rope=True, tab='*fp16')",
           "gluon()", "gluon(ahead=2)"]

if __name__ == "__main__":
    print("triton", triton.__version__)
    for call in sys.argv[1:] or DEFAULT:
        eval(call)
