"""Serving benchmark: the engine (atom_lab.serve) on Llama-2-7B shapes with RANDOM weights (no model files travel to
the GPU machine; throughput does not depend on the weights' values, only on their shapes and formats).

    python -m benchmarks.bench_serving --json benchmarks/results/serve_h200.json      (a CUDA GPU)
    python -m benchmarks.bench_serving --quick                                         (CPU: tiny model, smoke)

Formats (weights-kvBITS): fp16 (torch / cuBLAS linears), w8a8 (FP8 e4m3 weights and per-token activations through
torch._scaled_mm, serve/lowbit.py), w4a16 (INT4 weights through torch._weight_int4pack_mm, bf16 activations),
w4a4 (Atom's packed weights through our Triton kernels; round-to-nearest with an identity reorder: random weights
have no outlier channels to sort), w4a4fp8 (the same, plus each weight kept as the library's FP8 operand, handed to
w4a4_gemm: cuBLASLt blockwise FP8 from M = 64, ~1.06 bytes per weight more); each with KV16 / KV8 / KV4 pages of the chapter-05 cache.
Decode steps replay CUDA graphs captured per batch-size bucket before the timed run (capture seconds reported
apart); prefill runs eagerly. Workloads, all requests queued at t = 0:
  sweep    `batch` requests of `--prompt` in / `--out` new tokens, pool sized to fit them all
  budget   the largest batch of `--prompt` + `--budget-out` tokens that a memory budget holds (weights + KV pool +
           activation reserve <= budget; the allocator's peak is recorded and compared with the budget)
  lognorm  Atom's seeded lognormal prompt / output lengths (scipy lognorm(0.8, -1, 18)), 4x as many requests as the
           budget holds at 2048 tokens each, that many running at most (how Atom chose its batch sizes)
Throughput = generated tokens / wall time of the whole run (prefill included); decode_tokens_per_s counts decode
steps only; latency = mean decode step time (= the per-token latency every running request sees).
--check-graphs: greedy tokens and decode-step time of PagedDecoder.step (eager), the static step without graphs, and
graph replay, on the same prompts.
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

import atom_lab
from atom_lab.config import AtomConfig
from atom_lab.kv_cache import KVFormat
from atom_lab.qlinear import QuantLinear
from atom_lab.recipe import SHARED_INPUTS
from atom_lab.serve.engine import Engine
from atom_lab.serve.lowbit import convert_model
from atom_lab.serve.request import SamplingParams
from atom_lab.serve.sim import atom_lognormal_workload

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, head_dim=128, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=128, vocab_size=260, max_position_embeddings=512)
PAGE = 16
STEP_TOKENS = 4096


def random_model(cfg: dict, dtype, device):
    import transformers

    config = transformers.LlamaConfig(**cfg, tie_word_embeddings=False)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@torch.no_grad()
def to_w4a4(model, group: int = 128, keeper: int = 128):
    """Replace every block linear by a packed W4A4 QuantLinear (RTN, identity reorder) and switch to triton."""
    cfg = AtomConfig.preset("atom", gptq=False, group_size=group, keeper=keeper, w_clip=1.0, a_clip=1.0, kv_bits=16)
    for block in model.model.layers:
        for names in SHARED_INPUTS:
            linears = [block.get_submodule(n) for n in names]
            K = linears[0].in_features
            parts = QuantLinear.from_linears(linears, cfg, names=list(names),
                                             reorder=torch.arange(K, device=linears[0].weight.device))
            for n, q in zip(names, parts):
                parent, _, child = n.rpartition(".")
                setattr(block.get_submodule(parent), child, q)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    model.atom_blocks_name = "model.layers"
    atom_lab.set_backend(model, "triton")
    return model


def build_model(weights: str, cfg: dict, cuda: bool):
    """A random Llama model with its block linears in `weights` format (fp16 and w4a4 in fp16, w4a16 in bf16: the
    INT4 library kernel takes bf16 activations; w8a8 in fp16)."""
    dtype = (torch.bfloat16 if weights == "w4a16" else torch.float16) if cuda else torch.float32
    if weights == "w4a16" and not cuda:
        dtype = torch.bfloat16
    model = random_model(cfg, dtype, "cuda" if cuda else "cpu")
    if weights in ("w4a4", "w4a4fp8"):  # w4a4fp8: also the FP8 weight operand, passed to w4a4_gemm (w_fp8=)
        model = to_w4a4(model)
        if weights == "w4a4fp8":
            from atom_lab.serve.model_runner import store_fp8_weights
            store_fp8_weights(model)
        return model
    if weights in ("w8a8", "w4a16"):
        return convert_model(model, weights)
    return model


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


KV_ROPE = "post"  # main() sets it from --kv-rope


def make_engine(model, kv_bits, max_num_seqs, num_pages=None, budget=None, graphs=True, static=True,
                graph_prefill=None):
    kv = KVFormat(bits=kv_bits, dtype=next(model.parameters()).dtype, rope=KV_ROPE)
    cuda = torch.cuda.is_available()
    before = torch.cuda.memory_allocated() if cuda else 0
    eng = Engine(model, kv, budget_bytes=budget, num_pages=num_pages, page_size=PAGE, max_num_seqs=max_num_seqs,
                 max_tokens_per_step=STEP_TOKENS, static_decode=static, cuda_graphs=graphs if cuda else False,
                 graph_prefill=graph_prefill)
    eng.bench_before = before  # live bytes before this engine existed (the model's weights, anything left over)
    return eng


def run(eng, workload, seed=0, capture_batches=None, outputs=None):
    """Serve workload [(prompt, out), ...] on a fresh engine; returns the measured row (and appends each request's
    generated ids to `outputs` when given)."""
    vocab = eng.runner.vocab
    capture_s = eng.runner.static.capture(capture_batches) if eng.runner.static is not None else 0.0
    g = torch.Generator().manual_seed(seed)
    seqs = [eng.add_request(torch.randint(0, vocab, (n,), generator=g).tolist(),
                            SamplingParams(max_new_tokens=m, ignore_eos=True)) for n, m in workload]
    dev = eng.runner.device
    _sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        live0 = torch.cuda.memory_allocated(dev)
    decode_times, prefill_times, tokens, decode_tokens, running = [], [], 0, 0, 0
    t0 = time.perf_counter()
    while not eng.scheduler.is_finished:
        t = time.perf_counter()
        p0 = eng.stats["prefill_steps"]
        batch, _, _ = eng.step()
        _sync()
        dt = time.perf_counter() - t
        tokens += len(batch)
        running = max(running, len(batch))
        if eng.stats["prefill_steps"] > p0:
            prefill_times.append(dt)
        else:
            decode_times.append(dt)
            decode_tokens += len(batch)
    wall = time.perf_counter() - t0
    if outputs is not None:
        outputs.extend(list(q.output) for q in seqs)
    mem = eng.runner.check_budget()
    if dev.type == "cuda":
        mem["cuda_live_at_start"] = live0
        mem["cuda_peak"] = torch.cuda.max_memory_allocated(dev)
        mem["cuda_reserved"] = torch.cuda.memory_reserved(dev)
        # what this engine and its model hold at the peak: the process's peak minus what was live before the engine
        # was built other than the weights (a leftover of an earlier point must not count against this one)
        mem["cuda_before_engine"] = eng.bench_before
        mem["engine_peak"] = mem["cuda_peak"] - (eng.bench_before - eng.runner.weight_bytes)
        if eng.runner.budget is not None:
            mem["budget_held"] = mem["engine_peak"] <= eng.runner.budget
            mem["budget_held_process"] = mem["cuda_peak"] <= eng.runner.budget
    dsum = sum(decode_times)
    st = eng.runner.static
    return {"requests": len(workload), "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "decode_tokens_per_s": decode_tokens / dsum if dsum else None, "prefill_seconds": sum(prefill_times),
            "prefill_steps": len(prefill_times), "prefill_step_ms": [round(1e3 * t, 2) for t in prefill_times],
            "graph_prefill_steps": eng.runner.graph_prefill_steps,
            "graph_prefill_tokens": eng.runner.graph_prefill,
            "decode_steps": len(decode_times), "decode_latency_ms": 1e3 * dsum / max(1, len(decode_times)),
            "first_decode_ms": 1e3 * decode_times[0] if decode_times else None,
            "last_decode_ms": 1e3 * decode_times[-1] if decode_times else None,
            "max_running": running, "preemptions": eng.scheduler.num_preemptions,
            "num_pages": eng.block_manager.num_pages, "capture_seconds": capture_s,
            "graph_replays": st.replays if st else 0, "static_eager_steps": st.eager_steps if st else 0,
            "fused_groups": eng.runner.fused_groups,
            "memory": mem}


def check_graphs(model, kv_bits, batch, prompt, out):
    """Eager PagedDecoder.step vs the static step without graphs vs graph replay, on the same greedy requests:
    {mode: (measured row, generated ids per request)}."""
    res = {}
    pages = batch * -(-(prompt + out) // PAGE)
    for mode, kw in (("paged_step", dict(static=False)), ("static_eager", dict(graphs=False)),
                     ("graphs", dict(graphs=True))):
        eng = make_engine(model, kv_bits, batch, num_pages=pages, **kw)
        outputs = []
        res[mode] = (run(eng, [(prompt, out)] * batch, capture_batches=[batch], outputs=outputs), outputs)
        del eng
        _free()
    return res


def main(argv=None):
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="tiny random model (CPU smoke run)")
    ap.add_argument("--formats", default="fp16-kv16,fp16-kv8,fp16-kv4,w8a8-kv8,w8a8-kv16,w8a8-kv4,"
                                         "w4a4-kv4,w4a4-kv16,w4a4-kv8,w4a16-kv16")
    ap.add_argument("--batches", default="8,32,64")
    ap.add_argument("--budgets", default="24,80", help="GB budgets for the largest-batch points")
    ap.add_argument("--lognormal", default="24", help="GB budgets for Atom's lognormal-length points ('' = none)")
    ap.add_argument("--lognormal-formats", default="fp16-kv16,w8a8-kv8,w4a4-kv4")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--out", type=int, default=128, help="new tokens per request in the batch sweep")
    ap.add_argument("--budget-out", type=int, default=512, help="new tokens per request at the budget points")
    ap.add_argument("--check-graphs", default="", help="batches for the eager / static / graph comparison")
    ap.add_argument("--check-formats", default="fp16-kv16,w4a4-kv4,w8a8-kv8,w4a16-kv16")
    ap.add_argument("--kv-rope", default="post", choices=["pre", "post"],
                    help="K stored after RoPE (post: vLLM/QServe, the fast decode kernel) or before it (pre: Atom, "
                         "rotated on every read; benchmarks/results/serve_h200.json was measured with pre)")
    ap.add_argument("--time-limit", type=float, default=520.0)
    args = ap.parse_args(argv)
    global KV_ROPE
    KV_ROPE = args.kv_rope
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    cfg = TINY if args.quick or not cuda else LLAMA2_7B
    if args.quick:
        args.prompt, args.out, args.budget_out, args.batches = 16, 4, 4, "2,4"
    res = {"environment": atom_lab.environment(), "model": ("llama-2-7b" if cfg is LLAMA2_7B else "tiny") +
           " shapes, RANDOM weights", "config": cfg, "page_size": PAGE, "max_tokens_per_step": STEP_TOKENS,
           "workload": {"prompt": args.prompt, "sweep_out": args.out, "budget_out": args.budget_out},
           "kv_rope": args.kv_rope,
           "command": "python -m benchmarks.bench_serving " + " ".join(argv if argv is not None else sys.argv[1:]),
           "graph_checks": [], "points": [], "skipped": []}
    if cuda:
        res["environment"]["int4pack_mm"] = hasattr(torch, "_weight_int4pack_mm")
        res["environment"]["capability"] = list(torch.cuda.get_device_capability())

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1, default=str)

    formats = [f for f in args.formats.split(",") if f]
    checks = [f for f in args.check_formats.split(",") if f] if args.check_graphs else []
    by_weights: dict[str, list[tuple[str, str]]] = {}
    for f in checks:
        by_weights.setdefault(f.split("-kv")[0], []).append(("check", f))
    for f in formats:
        by_weights.setdefault(f.split("-kv")[0], []).append(("bench", f))
    for weights, jobs in by_weights.items():
        if time.perf_counter() - start > args.time_limit:
            res["skipped"].append([weights, "all"])
            continue
        _free()
        t = time.perf_counter()
        try:
            model = build_model(weights, cfg, cuda)
        except Exception as e:
            res["points"].append({"format": weights, "error": f"build: {type(e).__name__}: {e}"[:500]})
            print(weights, "BUILD ERROR", e, flush=True)
            continue
        res.setdefault("build_seconds", {})[weights] = time.perf_counter() - t
        warm = False
        for kind, name in jobs:
            kvb = int(name.split("-kv")[1])
            if not warm:  # compile / autotune the prefill shapes once per model, outside every timed run
                try:
                    run(make_engine(model, kvb, 4, num_pages=4 * -(-(args.prompt + 2) // PAGE)),
                        [(args.prompt, 2)] * 4, capture_batches=[])
                    # our kernels autotune per power-of-two token count, and Triton compiles a second variant of
                    # each kernel for a token count that is not a multiple of 16: one eager prefill step of each
                    # power of two and of one less (graph_prefill off, so that small ones run eagerly too), or
                    # the lognormal workload's packed prompts (any sum of lengths) compile inside its timed run
                    # (run 6: its first prefill step took 9.9 s)
                    for p2 in ([] if args.quick else [2 ** k for k in range(4, 13) if 2 ** k < STEP_TOKENS]):
                        for n in (p2, p2 - 1):
                            run(make_engine(model, kvb, 1, num_pages=-(-(n + 2) // PAGE), graph_prefill=False),
                                [(n, 1)], capture_batches=[])
                except Exception as e:
                    print(name, "WARMUP ERROR", e, flush=True)
                warm = True
                _free()
            if kind == "check":
                for b in [int(x) for x in args.check_graphs.split(",")]:
                    if time.perf_counter() - start > args.time_limit:
                        res["skipped"].append([name, "check", b])
                        continue
                    row = {"format": name, "batch": b, "prompt": args.prompt, "out": 16}
                    try:
                        got = check_graphs(model, kvb, b, args.prompt, 16)
                        toks = {m: [t for o in v[1] for t in o] for m, v in got.items()}
                        row["graphs_equal_static_eager"] = toks["graphs"] == toks["static_eager"]
                        same = sum(x == y for x, y in zip(toks["graphs"], toks["paged_step"]))
                        row["graphs_vs_paged_step_same_tokens"] = [same, len(toks["graphs"])]
                        row["decode_ms"] = {m: v[0]["decode_latency_ms"] for m, v in got.items()}
                        row["capture_seconds"] = got["graphs"][0]["capture_seconds"]
                        row["replays"] = got["graphs"][0]["graph_replays"]
                        ms = row["decode_ms"]
                        row["speedup_graphs_vs_paged_step"] = ms["paged_step"] / ms["graphs"]
                        row["speedup_graphs_vs_static_eager"] = ms["static_eager"] / ms["graphs"]
                        print(f"check {name} B={b}: graphs==static {row['graphs_equal_static_eager']}, same as "
                              f"paged step {same}/{len(toks['graphs'])}, decode ms {ms}", flush=True)
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {e}"[:500]
                        print(name, "CHECK ERROR", row["error"], flush=True)
                    res["graph_checks"].append(row)
                    _free()
                    save()
                continue
            points = [("budget", float(g)) for g in args.budgets.split(",") if g][:1]
            points += [("sweep", int(b)) for b in args.batches.split(",") if b]
            points += [("budget", float(g)) for g in args.budgets.split(",") if g][1:]
            if name in args.lognormal_formats.split(","):
                points += [("lognormal", float(g)) for g in args.lognormal.split(",") if g]
            for kind2, v in points:
                if time.perf_counter() - start > args.time_limit:
                    res["skipped"].append([name, kind2, v])
                    continue
                row = {"format": name, "workload": kind2}
                try:
                    if kind2 == "sweep":
                        row.update(batch=v, budget_bytes=None, prompt=args.prompt, out=args.out)
                        per = -(-(args.prompt + args.out) // PAGE)
                        eng = make_engine(model, kvb, v, num_pages=v * per)
                        meas = run(eng, [(args.prompt, args.out)] * v, capture_batches=[v])
                    else:
                        budget = v * 1e9 if not args.quick else v * 1e6
                        row.update(budget_bytes=budget, prompt=args.prompt)
                        tokens_per_req = args.prompt + args.budget_out if kind2 == "budget" else 2048
                        per = -(-tokens_per_req // PAGE)
                        eng = make_engine(model, kvb, 256, budget=budget)
                        batch = min(256, eng.block_manager.num_pages // per)
                        if batch < 1:
                            raise ValueError(f"no request of {tokens_per_req} tokens fits {v} GB")
                        row["batch"] = batch
                        if kind2 == "budget":
                            row["out"] = args.budget_out
                            meas = run(eng, [(args.prompt, args.budget_out)] * batch, capture_batches=[batch])
                        else:
                            del eng
                            _free()
                            eng = make_engine(model, kvb, batch, budget=budget)
                            wl = atom_lognormal_workload(4 * batch, seed=0)
                            row["lengths"] = {"mean_prompt": sum(p for p, _ in wl) / len(wl),
                                              "mean_out": sum(o for _, o in wl) / len(wl)}
                            meas = run(eng, wl, capture_batches=None)
                    row["measured"] = meas
                    mem = meas["memory"]
                    print(f"{name:>10} {kind2:>9} B={row['batch']:>4}: {meas['tokens_per_s']:9.1f} tok/s "
                          f"(decode {meas['decode_tokens_per_s'] or 0:9.1f}), step {meas['decode_latency_ms']:.2f} ms,"
                          f" capture {meas['capture_seconds']:.1f} s, peak {mem.get('cuda_peak', 0) / 1e9:.2f} GB"
                          f" held={mem.get('budget_held')}", flush=True)
                except Exception as e:  # keep the other points
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    print(name, kind2, v, "ERROR", row["error"], flush=True)
                res["points"].append(row)
                eng = None
                _free()
                save()
        del model
        _free()
    res["total_seconds"] = time.perf_counter() - start
    save()
    return res


if __name__ == "__main__":
    main()
