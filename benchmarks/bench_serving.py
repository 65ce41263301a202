"""Serving benchmark: the engine (atom_lab.serve) on Llama-2-7B shapes with RANDOM weights, each measured point
beside the simulator's prediction for the same workload and pool.

    python -m benchmarks.bench_serving --json benchmarks/results/h200_serving.json     (a CUDA GPU)
    python -m benchmarks.bench_serving --quick                                          (CPU: tiny model, smoke)

Formats: fp16 (torch / cuBLAS linears), W4A4 (Atom's packed weights, our Triton kernels, round-to-nearest on
random weights with an identity reorder: random weights have no outlier channels to sort), each with KV16 / KV8 /
KV4 pages. W8A8 is simulated only: the library has no real W8A8 linear yet. Decode steps run eagerly (no CUDA
graphs: PagedDecoder.step builds its page tables on the host). Workload per point: `batch` requests of QServe's
1024-token prompt, `--out` new tokens each (512 in QServe's protocol; fewer here to fit one 10-minute run: say so).
Throughput = generated tokens / wall time of the whole run (prefill included); latency = mean decode step time.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import atom_lab
from atom_lab.config import AtomConfig
from atom_lab.kv_cache import KVFormat
from atom_lab.qlinear import QuantLinear
from atom_lab.recipe import SHARED_INPUTS
from atom_lab.serve.engine import Engine
from atom_lab.serve.hardware import H200
from atom_lab.serve.memory import GIB, Format, ModelShape
from atom_lab.serve.request import SamplingParams
from atom_lab.serve.sim import simulate

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, head_dim=128, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=128, vocab_size=260, max_position_embeddings=512)


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


def run_point(model, kv_bits, batch, prompt, out, page_size, num_pages=None, budget=None):
    kv = KVFormat(bits=kv_bits, dtype=torch.float16 if torch.cuda.is_available() else torch.float32)
    eng = Engine(model, kv, budget_bytes=budget, num_pages=num_pages, page_size=page_size, max_num_seqs=batch,
                 max_tokens_per_step=max(4096, prompt))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (prompt,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_new_tokens=out, ignore_eos=True)
    decode_times, tokens = [], 0
    for p in prompts:
        eng.add_request(p, params)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    if torch.cuda.is_available():  # the budget check's peak must be this point's, not the process's
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    while not eng.scheduler.is_finished:
        t = time.perf_counter()
        b, _, _ = eng.step()
        sync()
        if eng.stats["steps"] > eng.stats["prefill_steps"] and len(b) and all(s.num_cached > prompt for s in b):
            decode_times.append(time.perf_counter() - t)
        tokens += len(b)
    sync()
    wall = time.perf_counter() - t0
    report = eng.runner.check_budget()
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "decode_latency_ms": 1e3 * sum(decode_times) / max(1, len(decode_times)),
            "max_running": batch, "preemptions": eng.scheduler.num_preemptions,
            "num_pages": eng.runner.pool.num_pages, "memory": report}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="tiny random model (CPU smoke run)")
    ap.add_argument("--batches", default="8,32,64")
    ap.add_argument("--formats", default="fp16-kv16,w4a4-kv4,w4a4-kv16,fp16-kv4")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--out", type=int, default=32)
    ap.add_argument("--budgets", default="24", help="GB budgets for the largest-batch points")
    ap.add_argument("--time-limit", type=float, default=520.0)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    cfg = TINY if args.quick or not cuda else LLAMA2_7B
    prompt, out = (16, 4) if args.quick else (args.prompt, args.out)
    batches = [2, 4] if args.quick else [int(b) for b in args.batches.split(",")]
    shape = ModelShape("llama-2-7b" if cfg is LLAMA2_7B else "tiny", cfg["hidden_size"], cfg["intermediate_size"],
                       cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                       cfg["head_dim"], cfg["vocab_size"])
    res = {"environment": atom_lab.environment(), "model": shape.name + " shapes, RANDOM weights",
           "workload": f"{prompt} in / {out} out per request, all queued at t=0", "points": [],
           "command": "python -m benchmarks.bench_serving " + " ".join(argv or __import__("sys").argv[1:])}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1, default=str)

    page = 16
    models = {}
    for name in args.formats.split(","):
        w, kvb = name.split("-kv")
        kvb = int(kvb)
        if w not in models:
            models.clear()
            if cuda:
                torch.cuda.empty_cache()
            m = random_model(cfg, torch.float16 if cuda else torch.float32, "cuda" if cuda else "cpu")
            models[w] = to_w4a4(m) if w == "w4a4" else m
        model = models[w]
        fmt = Format(w, kvb)
        points = [(b, None) for b in batches] + [(None, float(g) * 1e9) for g in args.budgets.split(",") if g]
        for batch, budget in points:
            if time.perf_counter() - start > args.time_limit:
                res.setdefault("skipped", []).append([name, batch, budget])
                continue
            row = {"format": name, "batch": batch, "budget_bytes": budget}
            try:
                if budget is None:
                    num_pages = batch * (-(-(prompt + out) // page))
                    meas = run_point(model, kvb, batch, prompt, out, page, num_pages=num_pages)
                else:
                    from atom_lab.serve.model_runner import ModelRunner
                    probe = ModelRunner(model, KVFormat(bits=kvb, dtype=next(model.parameters()).dtype),
                                        budget_bytes=budget, page_size=page, max_tokens_per_step=max(4096, prompt),
                                        max_num_seqs=256)
                    num_pages = probe.pool.num_pages
                    del probe
                    batch = min(256, num_pages // (-(-(prompt + out) // page)))
                    row["batch"] = batch
                    meas = run_point(model, kvb, batch, prompt, out, page, budget=budget)
                row["measured"] = meas
                sim = simulate(shape, fmt, H200, 200 * GIB, [(prompt, out)] * batch, max_num_seqs=batch,
                               max_tokens_per_step=max(4096, prompt), page_size=page, num_pages=meas["num_pages"])
                row["simulated"] = sim.as_dict()
                row["sim_error"] = sim.tokens_per_s / meas["tokens_per_s"] - 1
                print(f"{name:>10} batch {batch:>4}: {meas['tokens_per_s']:9.1f} tok/s measured, "
                      f"{sim.tokens_per_s:9.1f} simulated ({100 * row['sim_error']:+.0f}%), decode step "
                      f"{meas['decode_latency_ms']:.1f} ms (sim {sim.decode_latency_s * 1e3:.1f})", flush=True)
            except Exception as e:  # keep the other points
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                print(name, batch, "ERROR", row["error"], flush=True)
            res["points"].append(row)
            save()
    save()
    if args.json:
        plot(args.json, args.json.rsplit(".", 1)[0] + ".png")
    return res


def plot(path: str, png: str) -> None:
    """Three panels from a results JSON: tokens/s vs batch, decode step latency vs batch (100 ms line), and the
    fixed-budget points; measured solid, simulated dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.load(open(path))
    pts = [p for p in res["points"] if "measured" in p]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in dict.fromkeys(p["format"] for p in pts):
        sweep = [p for p in pts if p["format"] == name and p["budget_bytes"] is None]
        b = [p["batch"] for p in sweep]
        line, = ax[0].plot(b, [p["measured"]["tokens_per_s"] for p in sweep], "o-", label=f"{name} measured")
        ax[0].plot(b, [p["simulated"]["tokens_per_s"] for p in sweep], "x--", color=line.get_color(),
                   label=f"{name} simulated")
        ax[1].plot(b, [p["measured"]["decode_latency_ms"] for p in sweep], "o-", color=line.get_color())
        ax[1].plot(b, [p["simulated"]["decode_latency_ms"] for p in sweep], "x--", color=line.get_color())
    ax[1].axhline(100, color="k", lw=0.8, ls=":", label="100 ms tolerable latency")
    fixed = [p for p in pts if p["budget_bytes"] is not None]
    labels = [f"{p['format']}\nB={p['batch']}\n{p['budget_bytes'] / 1e9:.0f} GB" for p in fixed]
    x = range(len(fixed))
    ax[2].bar([i - 0.2 for i in x], [p["measured"]["tokens_per_s"] for p in fixed], 0.4, label="measured")
    ax[2].bar([i + 0.2 for i in x], [p["simulated"]["tokens_per_s"] for p in fixed], 0.4, label="simulated")
    ax[2].set_xticks(list(x), labels, fontsize=7)
    for a, t, y in zip(ax, ["(a) throughput", "(b) per-token decode latency", "(c) fixed memory budget"],
                       ["tokens/s", "ms per decode step", "tokens/s"]):
        a.set_title(t)
        a.set_ylabel(y)
        a.legend(fontsize=7)
    ax[0].set_xlabel("batch")
    ax[1].set_xlabel("batch")
    fig.suptitle(f"{res['model']}, {res['workload']}, {res['environment']['device']} (eager engine, no CUDA graphs)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
