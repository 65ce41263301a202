"""Decode attention on the paged INT4 cache vs SDPA on a contiguous bf16 cache, one query token per sequence.

Timed in one run on one GPU (CUDA-graph replays of each call, median of triton.testing.do_bench, L2 flushed):
  sdpa_bf16   torch.nn.functional.scaled_dot_product_attention on bf16 K/V [B, Hkv, ctx, D], contiguous, with
              the fastest of its cuDNN / flash / efficient backends for that case (the baseline every ratio divides)
  ours_bf16   kernels/attention.py paged_decode_attention on a bf16 paged cache (pages in random order)
  ours_int4_post  the same kernel on the INT4 cache, K stored after RoPE (QServe / KIVI / vLLM)
                  (best of the tensor-core, CUDA-core and Gluon kernels; core_* / gluon_* per family)
  ours_int4_pre   the same, K stored before RoPE and rotated after dequantization (Atom)
  ours_kivi       KIVI: INT4 keys per channel over groups of 32 tokens (post-RoPE), values per token per head, and
                  the newest 128 tokens in a float16 ring (a second launch, merged by LSE)
Shapes: Llama-2-7B attention (32 query heads x 128 = 32 KV heads) and GQA 32 q / 8 KV heads, head_dim 128, page
size 32 (Atom's; --page-size 16 is the serving engine's), PagePool's head-major pages, every sequence at the full
context. Random data (no model files on the GPU machine). Each of our
kernels is checked on the GPU against paged_decode_attention_ref on the batch's first sequence (err_* in the JSON).
The pre-RoPE kernel reads a cos/sin table built once (rope_table), as a decoder would.

    python benchmarks/bench_attention.py [--json out.json] [--quick] [--kivi]
    python benchmarks/bench_attention.py --smoke    # CPU (Triton interpreter): tiny shapes, every path vs its ref
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import atom_lab  # noqa: E402,F401

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from atom_lab.kernels.attention import paged_decode_attention, paged_decode_attention_ref, rope_table  # noqa: E402
from atom_lab.kernels import attention_gluon  # noqa: E402
from atom_lab.kernels.attention_gluon import gluon_ok  # noqa: E402
from benchmarks.common import GRAPH_FAILURES, bench_ms, device_facts  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

CONFIGS = {"llama2-7b 32x128": (32, 32), "gqa 32/8 x128": (32, 8)}
D, PAGE = 128, 32
BATCHES = [1, 8, 32, 128, 256]
CONTEXTS = [1024, 4096, 16384, 32768]
MAX_TOKENS = 2 ** 21  # batch x context cap: the bf16 MHA cache is then 32 GiB
BAR = 3.0  # issue 11: x the bf16 SDPA baseline at context >= 4096 and batch >= 8
KERNEL_CONFIGS = [(64, 4), (128, 8)]  # (block_n, num_warps) of the tensor-core kernel (v5's two)
# Our kernel's variants, timed in the same run; label -> paged_decode_attention keywords. "v5": the tensor-core
# kernel with the plain-Triton unpack (the library's kernel before v7); "dot_asm": the same with the inline-PTX
# unpack; "core": the CUDA-core kernel (one query head per KV head only), block_n tokens per program of num_warps
# warps, num_stages of Triton's pipeliner, `programs` the split target.
V5 = {f"v5 n{n} w{w}": dict(variant="dot", unpack_asm=False, block_n=n, num_warps=w) for n, w in KERNEL_CONFIGS}
DOT_ASM = {f"dot_asm n{n} w{w} p{p}": dict(variant="dot", unpack_asm=True, block_n=n, num_warps=w, programs=p)
           for n, w, p in [(64, 4, 528), (64, 4, 1056), (32, 4, 1056)]}
CORE = {f"core n{n} w{w} s{s} p{p}{'' if a else ' twin'}": dict(variant="core", unpack_asm=a, block_n=n, num_warps=w,
                                                             num_stages=s, programs=p)
        for n, w, s, p, a in [(16, 1, 1, 2112, True), (16, 1, 3, 2112, True), (16, 1, 3, 4224, True),
                              (8, 1, 3, 4224, True), (64, 4, 3, 528, True)]}
CORE_PRE = {k: v for k, v in CORE.items() if k.split()[1] in ("n16", "n8") and " s3 " in k}
CORE_PRE.update({f"core n{n} w1 s3 p{p} f16tab": dict(variant="core", unpack_asm=True, block_n=n, num_warps=1,
                                                    num_stages=3, programs=p, rope_fp16=True)
                 for n, p in [(16, 4224), (16, 2112), (8, 4224)]})
# "gluon": kernels/attention_gluon.py (mma.sync fed from registers; MHA post-RoPE, page % 16 == 0), a = tiles of 16
# tokens in flight per warp (num_stages), p = the split target
# (v8 second run) hf: heads-first grid, k2: the scores' mma as 2 chains, r168: maxnreg 168 (12 warps per SM)
GLUON = {f"gluon{tag} a{a} p{p}": dict(variant="gluon", num_stages=a, programs=p, gluon_opts=opts)
         for tag, a, p, opts in [
             ("", 1, 4224, {}), ("hf", 1, 4224, dict(heads_first=True)), ("hf", 1, 2112, dict(heads_first=True)),
             ("hf", 2, 4224, dict(heads_first=True)), ("hfk2", 1, 4224, dict(heads_first=True, k_chains=2)),
             ("hfr168", 1, 4224, dict(heads_first=True, maxnreg=168)),
             ("hfr168k2", 1, 4224, dict(heads_first=True, maxnreg=168, k_chains=2))]}
KIVI_TG, KIVI_WINDOW = 32, 128


def paged_cache(B, ctx, Hkv, bits, gen):
    """PagePool's layout (head-major pages [n_pages, Hkv, PAGE, ...]), pages in random order."""
    pages_per_seq = ctx // PAGE
    n_pages = B * pages_per_seq
    page = (n_pages, Hkv, PAGE)
    if bits == 16:
        kc = torch.randn(*page, D, device=DEV, dtype=torch.bfloat16, generator=gen)
        vc = torch.randn_like(kc)
        ksz = vsz = None
    else:
        kc = torch.randint(0, 256, (*page, D // 2), device=DEV, dtype=torch.uint8, generator=gen)
        vc = torch.randint(0, 256, (*page, D // 2), device=DEV, dtype=torch.uint8, generator=gen)
        ksz = torch.empty(*page, 1, 2, device=DEV, dtype=torch.float16)
        ksz[..., 0] = 0.05
        ksz[..., 1] = 8.0
        vsz = ksz.clone()
    perm = torch.randperm(n_pages, device=DEV, generator=gen).to(torch.int32)
    pt = perm.view(B, pages_per_seq).contiguous()
    lengths = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
    return kc, ksz, vc, vsz, pt, lengths


def kivi_cache(B, ctx, Hkv, gen):
    """paged_cache(bits=4) with per-channel key pairs [n_pages, Hkv, PAGE / Tg, D, 2] and a float16 ring per
    sequence."""
    kc, _, vc, vsz, pt, lengths = paged_cache(B, ctx, Hkv, 4, gen)
    ksz = torch.empty(kc.shape[0], Hkv, PAGE // KIVI_TG, D, 2, device=DEV, dtype=torch.float16)
    ksz[..., 0], ksz[..., 1] = 0.05, 8.0
    cap = KIVI_WINDOW + KIVI_TG - 1
    k_win = torch.randn(B * cap, Hkv, D, device=DEV, dtype=torch.float16, generator=gen)
    v_win = torch.randn_like(k_win)
    ids = torch.arange(B, dtype=torch.int32, device=DEV)
    qlen = torch.full((B,), (ctx - KIVI_WINDOW) // KIVI_TG * KIVI_TG, dtype=torch.int32, device=DEV)
    return (kc, ksz, vc, vsz, pt, lengths), (k_win, v_win, ids, qlen, cap)


def check_first(q, cache, bits, ctx, rope, window=None, **kw):
    """max |ours - ref| on the batch's first sequence (the reference loops over sequences in PyTorch)."""
    kc, ksz, vc, vsz, pt, lengths = cache
    kivi = dict(key_tokens=KIVI_TG, window=window) if window is not None else {}
    out = paged_decode_attention(q, kc, ksz, vc, vsz, pt, lengths, bits, PAGE, D ** -0.5, rope, max_length=ctx,
                                 **kivi, **kw)
    if window is not None:
        kivi["window"] = tuple(w[:1] if isinstance(w, torch.Tensor) and w.dim() == 1 else w for w in window)
    ref = paged_decode_attention_ref(q[:1], kc, ksz, vc, vsz, pt[:1], lengths[:1], bits, PAGE, D ** -0.5, rope,
                                     **kivi)
    return float((out[:1].float() - ref).abs().max())


def bench_ours(q, cache, bits, ctx, rope, log, window=None, configs=None, errs=None):
    """Times every config (label -> keywords); returns {label: ms}. errs: {family: max err} of each family's
    first config against the reference (a variant is only reported if it computes the right thing)."""
    kc, ksz, vc, vsz, pt, lengths = cache
    kivi = dict(key_tokens=KIVI_TG, window=window) if window is not None else {}
    times = {}
    for label, kw in (configs or V5).items():
        family = label.split()[0] + (" f16tab" if kw.get("rope_fp16") else "")
        kw = dict(kw)
        saved = dict(attention_gluon.OPTIONS)
        attention_gluon.OPTIONS.update(kw.pop("gluon_opts", {}))  # read at launch (and at graph capture)
        try:
            if errs is not None and family not in errs:
                errs[family] = check_first(q, cache, bits, ctx, rope, window, **kw)

            def fn(kw=kw):
                return paged_decode_attention(q, kc, ksz, vc, vsz, pt, lengths, bits, PAGE, D ** -0.5, rope,
                                              max_length=ctx, **kivi, **kw)
            times[label] = bench_ms(fn, graph=True)
        except Exception as e:  # a config that does not compile or run: recorded, the others stand
            log(f"    {label}: {type(e).__name__}: {str(e)[:160]}")
        finally:
            attention_gluon.OPTIONS.clear()
            attention_gluon.OPTIONS.update(saved)
    return times


def bench_read_only(cache, B, H, ctx):
    """The Gluon kernel's read-only diagnostic (same loads and splits, no math): ms per grid order."""
    kc, ksz, vc, vsz, pt, lengths = cache
    blocks = -(-ctx // 16)
    splits = min(blocks, -(-4224 // (B * H)))
    tps = -(-blocks // splits) * 16
    splits = -(-ctx // tps)
    q = torch.zeros(B, H, D, device=DEV)
    o = torch.empty(B, H, splits, D, device=DEV)
    lse = torch.empty(B, H, splits, device=DEV)
    out = {}
    for name, hf in (("batch_first", False), ("heads_first", True)):
        def fn(hf=hf):
            attention_gluon.launch_gluon(q, kc, ksz, vc, vsz, pt, lengths, o, lse, 1.0, PAGE, splits, tps,
                                         heads_first=hf, read_only=True)
        out[name] = bench_ms(fn, graph=True)
    return out


def best_of(times, prefix=None):
    """(ms, label) of the fastest config (whose label starts with prefix), or (None, None)."""
    t = {k: v for k, v in times.items() if prefix is None or k.startswith(prefix)}
    return (min(t.values()), min(t, key=t.get)) if t else (None, None)


def bench_sdpa(B, ctx, Hq, Hkv, gen):
    q = torch.randn(B, Hq, 1, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, Hkv, ctx, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    times = {}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def fn(be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)
        try:
            fn()
            torch.cuda.synchronize()
            times[name] = bench_ms(fn, graph=True)
        except Exception:
            continue
    del k, v
    return times


def smoke() -> int:
    """Every path the benchmark times, on tiny shapes under the interpreter, against the reference (no timing)."""
    torch.manual_seed(0)  # randn_like below draws from the global generator
    gen = torch.Generator(device=DEV).manual_seed(0)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=DEV).float() / D))
    B, ctx, worst = 2, 256, 0.0
    for cname, (Hq, Hkv) in (("mha 4x128", (4, 4)), ("gqa 4/2 x128", (4, 2))):
        q = torch.randn(B, Hq, D, device=DEV, dtype=torch.bfloat16, generator=gen)
        for label, bits, rope in (("bf16", 16, None), ("int4 post", 4, None),
                                  ("int4 pre", 4, (inv_freq, 1.0, rope_table(inv_freq, 1.0, ctx)))):
            cache = paged_cache(B, ctx, Hkv, bits, gen)
            for variant in (("dot", "core") if bits == 4 and Hq == Hkv else ("dot",)):
                err = check_first(q, cache, bits, ctx, rope, variant=variant)
                worst = max(worst, err)
                print(f"{cname:14s} {label:10s} {variant:5s} max|ours - ref| {err:.2e}")
        ck, win = kivi_cache(B, ctx, Hkv, gen)
        err = check_first(q, ck, 4, ctx, None, window=win)
        worst = max(worst, err)
        print(f"{cname:14s} {'kivi':10s} max|ours - ref| {err:.2e}")
    ok = worst < 2e-2  # bf16 q and float16 operands over values of |v| <= ~4: tests/test_attention.py's bound
    print("smoke", "ok" if ok else "FAILED", f"(worst {worst:.2e})")
    return 0 if ok else 1


def main(argv=None) -> int:
    global PAGE  # --page-size sets the module's page size, read by paged_cache and the calls
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="batches 8/128, contexts 4096/16384 only")
    ap.add_argument("--kivi", action="store_true", help="also time the KIVI path (ours_kivi)")
    ap.add_argument("--batches", default=None, help="comma-separated batches (default: all, or 8,128 with --quick)")
    ap.add_argument("--contexts", default=None, help="comma-separated contexts")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--read-only", action="store_true", help="also time the Gluon kernel's read-only diagnostic")
    ap.add_argument("--smoke", action="store_true", help="CPU check of every path on tiny shapes, no timing")
    ap.add_argument("--formats", default="bf16,post,pre", help="comma-separated subset of bf16, post, pre")
    ap.add_argument("--families", default=None, help="comma-separated label prefixes of our configs to time "
                    "(default all: v5, dot_asm, core, gluon)")
    ap.add_argument("--page-size", type=int, default=PAGE, help="tokens per page (the serving engine uses 16)")
    ap.add_argument("--only", default=None, help="a regular expression: time only our configs whose label matches "
                    "it (bf16 ones too), e.g. the library's defaults, to fit many cases in one run")
    args = ap.parse_args(argv)
    PAGE = args.page_size
    if args.smoke:
        return smoke()
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU (timings under the interpreter mean nothing); --smoke checks the "
              "paths on the CPU.")
        return 1
    batches, contexts = ([8, 128], [4096, 16384]) if args.quick else (BATCHES, CONTEXTS)
    batches = [int(x) for x in args.batches.split(",")] if args.batches else batches
    contexts = [int(x) for x in args.contexts.split(",")] if args.contexts else contexts
    formats = set(args.formats.split(","))
    families = set(args.families.split(",")) if args.families else None
    only = re.compile(args.only) if args.only else None

    def keep(cfgs):
        return {k: v for k, v in cfgs.items() if (families is None or k.split()[0] in families)
                and (only is None or only.search(k))}
    torch.manual_seed(0)  # randn_like below draws from the global generator
    gen = torch.Generator(device=DEV).manual_seed(0)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=DEV).float() / D))
    table = rope_table(inv_freq, 1.0, max(contexts))
    rows, t_start = [], time.time()
    print(f"{'config':18s} {'B':>4s} {'ctx':>6s} {'sdpa us':>8s} {'be':>6s} {'bf16 us':>8s} {'int4post':>8s} "
          f"{'int4pre':>8s} {'kivi':>8s} {'x post':>6s} {'x pre':>6s} {'x kivi':>6s} {'TB/s int4':>9s} {'err':>8s}")
    # the configs innermost: a run cut short by its time limit keeps both configs at the smaller sizes
    for B in batches:
        for ctx in contexts:
            for cname in args.configs.split(","):
                Hq, Hkv = CONFIGS[cname]
                if B * ctx > MAX_TOKENS:
                    continue
                sd = bench_sdpa(B, ctx, Hq, Hkv, gen)
                be = min(sd, key=sd.get)
                q = torch.randn(B, Hq, D, device=DEV, dtype=torch.bfloat16, generator=gen)
                row = dict(config=cname, Hq=Hq, Hkv=Hkv, D=D, batch=B, context=ctx, page_size=PAGE,
                           sdpa_ms=sd, sdpa_best=be, sdpa_best_ms=sd[be])
                if "bf16" in formats:
                    c16 = paged_cache(B, ctx, Hkv, 16, gen)
                    row["err_bf16"] = check_first(q, c16, 16, ctx, None)
                    times = bench_ours(q, c16, 16, ctx, None, print, configs=V5 if only is None else keep(V5))
                    row["ours_bf16_ms"], row["ours_bf16_cfg"] = best_of(times)
                    del c16
                c4 = paged_cache(B, ctx, Hkv, 4, gen)
                row["cfg_ms"], row["err_family"] = {}, {}
                for mode, rope in (("post", None), ("pre", (inv_freq, 1.0, table))):
                    if mode not in formats:
                        continue
                    cfgs = {**V5, **DOT_ASM, **((CORE if mode == "post" else CORE_PRE) if Hq == Hkv else {}),
                            **(GLUON if mode == "post" and Hq == Hkv and gluon_ok(q.device) else {})}
                    cfgs = keep(cfgs)
                    errs = {}
                    times = bench_ours(q, c4, 4, ctx, rope, print, configs=cfgs, errs=errs)
                    row["cfg_ms"][f"int4_{mode}"], row["err_family"][f"int4_{mode}"] = times, errs
                    row[f"err_int4_{mode}"] = max(errs.values()) if errs else None
                    row[f"ours_int4_{mode}_ms"], row[f"ours_int4_{mode}_cfg"] = best_of(times)
                    row[f"v5_int4_{mode}_ms"] = best_of(times, "v5")[0]
                    v5ms = row[f"v5_int4_{mode}_ms"]
                    row[f"speedup_v5_int4_{mode}"] = sd[be] / v5ms if v5ms else None
                    for fam in ("core", "gluon"):  # each kernel family's best config, same run (gluon*: all its kinds)
                        fms, fcfg = best_of(times, fam)
                        row[f"{fam}_int4_{mode}_ms"], row[f"{fam}_int4_{mode}_cfg"] = fms, fcfg
                        row[f"speedup_{fam}_int4_{mode}"] = sd[be] / fms if fms else None
                if args.read_only and Hq == Hkv and gluon_ok(q.device):
                    ro = bench_read_only(c4, B, Hkv, ctx)
                    row["gluon_read_only_ms"] = ro
                    row["gluon_read_only_tbs"] = {k: 2 * B * ctx * Hkv * (D // 2 + 4) / v / 1e9 for k, v in ro.items()}
                    print(f"    read-only TB/s {row['gluon_read_only_tbs']}", flush=True)
                del c4
                if args.kivi:
                    ck, win = kivi_cache(B, ctx, Hkv, gen)
                    errs = {}
                    cfgs = keep({**V5, **DOT_ASM})
                    times = bench_ours(q, ck, 4, ctx, None, print, window=win, configs=cfgs, errs=errs)
                    row["cfg_ms"]["kivi"], row["err_family"]["kivi"] = times, errs
                    row["err_kivi"] = max(errs.values()) if errs else None
                    row["ours_kivi_ms"], row["ours_kivi_cfg"] = best_of(times)
                    row["speedup_kivi"] = sd[be] / row["ours_kivi_ms"] if times else None
                    v5ms = best_of(times, "v5")[0]
                    row["speedup_v5_kivi"] = sd[be] / v5ms if v5ms else None
                    del ck, win
                kv_bytes_bf16 = 2 * B * ctx * Hkv * D * 2
                kv_bytes_int4 = 2 * B * ctx * Hkv * (D // 2 + 4)
                row["kv_bytes_bf16"], row["kv_bytes_int4"] = kv_bytes_bf16, kv_bytes_int4
                for k in ("post", "pre"):
                    ms = row.get(f"ours_int4_{k}_ms")
                    row[f"speedup_int4_{k}"] = sd[be] / ms if ms else None
                post_ms = row.get("ours_int4_post_ms")
                row["int4_post_tbs"] = kv_bytes_int4 / post_ms / 1e9 if post_ms else None
                row["sdpa_tbs"] = kv_bytes_bf16 / sd[be] / 1e9
                rows.append(row)
                err = max(v for k, v in row.items() if k.startswith("err_") and isinstance(v, float))

                def us(x):
                    return f"{x * 1e3:8.1f}" if x else "     n/a"
                print(f"{cname:18s} {B:4d} {ctx:6d} {us(sd[be])} {be:>6s} {us(row.get('ours_bf16_ms'))} "
                      f"{us(row.get('ours_int4_post_ms'))} {us(row.get('ours_int4_pre_ms'))} "
                      f"{us(row.get('ours_kivi_ms'))} "
                      f"{row['speedup_int4_post'] or 0:6.2f} {row['speedup_int4_pre'] or 0:6.2f} "
                      f"{row.get('speedup_kivi') or 0:6.2f} {row['int4_post_tbs'] or 0:9.2f} {err:8.1e}"
                      f"  core {row.get('speedup_core_int4_post') or 0:.2f}x gluon "
                      f"{row.get('speedup_gluon_int4_post') or 0:.2f}x ({row.get('gluon_int4_post_cfg')})", flush=True)
                torch.cuda.empty_cache()
                if args.json:  # after every case, so a run cut short by a time limit still leaves its rows
                    write_json(args.json, rows, None)
    barred = [r for r in rows if r["context"] >= 4096 and r["batch"] >= 8]

    def span(key):
        vals = [r[key] for r in barred if r.get(key)]
        return (min(vals), max(vals)) if vals else (None, None)
    summary = {"bar": BAR, "cases_in_bar_region": len(barred), "seconds": round(time.time() - t_start, 1),
               "max_err_vs_ref": max((v for r in rows for k, v in r.items() if k.startswith("err_")
                                      and isinstance(v, float)), default=None)}
    for fam in ("core", "gluon"):
        summary[f"min_speedup_{fam}_post"], summary[f"max_speedup_{fam}_post"] = span(f"speedup_{fam}_int4_post")
    for k in ("post", "pre", "kivi"):
        key = "speedup_kivi" if k == "kivi" else f"speedup_int4_{k}"
        summary[f"min_speedup_{k}"], summary[f"max_speedup_{k}"] = span(key)
        key = "speedup_v5_kivi" if k == "kivi" else f"speedup_v5_int4_{k}"
        summary[f"min_speedup_v5_{k}"], summary[f"max_speedup_v5_{k}"] = span(key)
    for cname in CONFIGS:  # per model shape and format: the spans and which config won how often
        sub = [r for r in barred if r["config"] == cname]
        for k in ("post", "pre", "kivi"):
            key = "speedup_kivi" if k == "kivi" else f"speedup_int4_{k}"
            vals = [r[key] for r in sub if r.get(key)]
            cfgk = "ours_kivi_cfg" if k == "kivi" else f"ours_int4_{k}_cfg"
            if vals:
                summary[f"{cname} {k}"] = dict(min=min(vals), max=max(vals),
                                               winners=sorted({r[cfgk] for r in sub if r.get(cfgk)}))
    print(json.dumps(summary))
    if args.json:
        write_json(args.json, rows, summary)
    return 0


def write_json(path, rows, summary):
    with open(path, "w") as f:
        json.dump({"device": device_facts(), "command": "python " + " ".join(sys.argv), "rows": rows,
                   "summary": summary, "graph_failures": GRAPH_FAILURES}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
