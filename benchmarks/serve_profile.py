"""Where the engine's time goes: one prefill step and one decode step, per weight format, under torch.profiler.

The simulator's bar analysis (bench_serving_sim) fits per-operator costs to end-to-end runs; this measures them.
For each format: a Llama-2-7B-shaped random model, an engine with static decode run eagerly (no CUDA graphs, so
every kernel of the step shows up in the trace; a graph replays the same kernels), `--seqs` requests of `--prompt`
tokens. After one warm-up prefill and decode step (Triton compiles), it profiles the next prefill step (the
scheduler packs max_tokens_per_step tokens into it) and, once every request is in, one decode step at that batch.
Printed and written: wall time, the sum of GPU kernel time, the host time that is not hidden behind kernels
(wall - GPU busy), and the kernels that take the most GPU time, grouped by name.

    python -m benchmarks.serve_profile --json benchmarks/results/serve_profile_h200.json
    python -m benchmarks.serve_profile --quick        # CPU smoke run (tiny model, interpreter)
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch

import benchmarks.bench_serving as bench
from atom_lab.serve.request import SamplingParams
import atom_lab
from benchmarks.common import write_json


def _kernel_table(prof, top: int) -> tuple[float, list[dict]]:
    """(GPU kernel ms in all, the `top` kernels by GPU ms) from a finished torch.profiler run."""
    rows = []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue  # an operator (aten::mm) would count its kernels' time a second time
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us > 0:
            rows.append({"kernel": e.key[:90], "ms": us / 1e3, "calls": e.count})
    rows.sort(key=lambda r: -r["ms"])
    return sum(r["ms"] for r in rows), rows[:top]


def _tokens(batch, prefill: bool) -> int:
    """Tokens a step computed: the prompts of a prefill step, one per sequence of a decode step."""
    return sum(len(s.prompt) for s in batch) if prefill else len(batch)


def _profiled_step(eng, cuda: bool, top: int, prefill: bool) -> dict:
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    bench._sync()
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        batch, _, _ = eng.step()
        bench._sync()
        wall = 1e3 * (time.perf_counter() - t0)
    gpu_ms, kernels = _kernel_table(prof, top) if cuda else (None, [])
    return {"batch": len(batch), "tokens": _tokens(batch, prefill), "wall_ms": wall, "gpu_kernel_ms": gpu_ms,
            "host_not_hidden_ms": None if gpu_ms is None else wall - gpu_ms, "top_kernels": kernels}


def _timed_step(eng, prefill: bool, host_top: int) -> dict:
    """One step without torch.profiler: its wall time, and (host_top > 0) cProfile's functions by own host time."""
    bench._sync()
    prof = cProfile.Profile() if host_top else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    batch, _, _ = eng.step()
    if prof:
        prof.disable()
    bench._sync()
    out = {"wall_ms": 1e3 * (time.perf_counter() - t0), "batch": len(batch), "tokens": _tokens(batch, prefill)}
    if prof:
        st = pstats.Stats(prof)
        rows = [{"function": f"{fn[0].split('/')[-1]}:{fn[1]}:{fn[2]}", "calls": v[1], "own_ms": 1e3 * v[2],
                 "cum_ms": 1e3 * v[3]} for fn, v in st.stats.items()]
        rows.sort(key=lambda r: -r["own_ms"])
        out["host_top"] = rows[:host_top]
        out["host_ms_under_cprofile"] = 1e3 * st.total_tt
    return out


def profile_format(fmt: str, cfg: dict, seqs: int, prompt: int, cuda: bool, top: int, host_top: int = 0) -> dict:
    weights, kv = fmt.split("-kv")
    model = bench.build_model(weights, cfg, cuda)
    per_seq = -(-(prompt + 8) // bench.PAGE)
    warm = max(1, bench.STEP_TOKENS // prompt) if cuda else 1  # one full prefill step
    eng = bench.make_engine(model, int(kv), seqs + warm, num_pages=(seqs + warm) * per_seq + 4, graphs=False)
    vocab = eng.runner.vocab
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    # warm-up: a prefill step of the profiled one's size, then a decode step: Triton compiles and autotunes per
    # shape (the quantizer per power-of-two M), which must not land in the profile
    for _ in range(warm):
        eng.add_request(torch.randint(0, vocab, (prompt,), generator=g).tolist(), params)
    eng.step()
    eng.step()
    for _ in range(seqs):
        eng.add_request(torch.randint(0, vocab, (prompt,), generator=g).tolist(), params)
    out = {"format": fmt, "fused_groups": eng.runner.fused_groups, "prefill": _profiled_step(eng, cuda, top, True)}
    # the next prefill steps of the same size: one timed plainly (the profiler adds host time per operator), one
    # under cProfile (which Python functions hold the host)
    if any(s.num_cached == 0 for s in eng.scheduler.waiting):
        out["prefill_plain"] = _timed_step(eng, True, 0)
    if host_top and any(s.num_cached == 0 for s in eng.scheduler.waiting):
        out["prefill_host"] = _timed_step(eng, True, host_top)
    while any(s.num_cached == 0 for s in eng.scheduler.waiting):  # prefill the rest, unprofiled
        eng.step()
    eng.step()  # first decode step at this batch (a new batch size for the static buffers)
    out["decode"] = _profiled_step(eng, cuda, top, False)
    out["decode_plain"] = _timed_step(eng, False, 0)
    del eng, model
    bench._free()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="tiny random model on the CPU (smoke run)")
    ap.add_argument("--formats", default="w4a4-kv4,fp16-kv16,w8a8-kv8")
    ap.add_argument("--seqs", type=int, default=64, help="requests (the decode batch)")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--host-top", type=int, default=0, help="also cProfile a prefill step: the N functions with "
                    "the most own host time")
    ap.add_argument("--kv-rope", default="post", choices=["pre", "post"])
    args = ap.parse_args(argv)
    bench.KV_ROPE = args.kv_rope
    cuda = torch.cuda.is_available() and not args.quick
    cfg = bench.LLAMA2_7B if cuda else bench.TINY
    seqs, prompt = (args.seqs, args.prompt) if cuda else (3, 24)
    rows = []
    for fmt in args.formats.split(","):
        r = profile_format(fmt, cfg, seqs, prompt, cuda, args.top, args.host_top)
        rows.append(r)
        for phase in ("prefill", "decode"):
            p = r[phase]
            gpu = "-" if p["gpu_kernel_ms"] is None else f"{p['gpu_kernel_ms']:.1f}"
            print(f"{fmt:10s} {phase:7s} batch {p['batch']:3d} tokens {p['tokens']:5d}: wall {p['wall_ms']:.1f} ms, "
                  f"GPU kernels {gpu} ms")
            for k in p["top_kernels"]:
                print(f"    {k['ms']:8.2f} ms {k['calls']:5d}x  {k['kernel']}")
        for key in ("prefill_plain", "prefill_host", "decode_plain"):
            if key in r:
                p = r[key]
                print(f"{fmt:10s} {key:13s} batch {p['batch']:3d} tokens {p['tokens']:5d}: wall {p['wall_ms']:.1f} ms")
                for h in p.get("host_top", []):
                    print(f"    {h['own_ms']:8.2f} ms own {h['cum_ms']:8.2f} cum {h['calls']:6d}x  {h['function']}")
    if args.json:
        model = "llama-2-7b shapes, RANDOM weights" if cuda else "tiny random llama"
        write_json(args.json, {"environment": atom_lab.environment(), "model": model, "seqs": seqs, "prompt": prompt,
                               "kv_rope": args.kv_rope, "command": "python -m benchmarks.serve_profile " +
                               " ".join(argv if argv is not None else sys.argv[1:]),
                               "rows": rows})


if __name__ == "__main__":
    main()
