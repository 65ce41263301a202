"""The simulator against the engine: every measured point of a serving JSON (benchmarks/bench_serving.py) replayed
through atom_lab.serve.simulate with the same workload, pool and batch cap; errors before and after a refit.

    python -m benchmarks.bench_serving_sim benchmarks/results/serve_h200.json --out benchmarks/results/serve_sim_validation.json

Refit, honestly split: the decode-step model is linear in (a per-step overhead, 1 / KV efficiency per KV format),
    latency = (GEMMs + other + LM head) / steps + overhead + KV bytes / bandwidth / efficiency(kv bits)
so those are fitted by least squares on the TRAIN points only (the batch sweep: batch 8 / 32 / 64, 128 new tokens),
and the errors are reported on the TEST points (largest batch at 24 and 80 GB with 512 new tokens, Atom's lognormal
lengths), which the fit never saw. Prefill steps run eagerly (PagedDecoder.step loops over the sequences of a step in
Python): their host time per prefilled sequence is fitted on the train points too (prefill compute stays the cost
model's).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from atom_lab.serve.hardware import H200
from atom_lab.serve.memory import Format, ModelShape
from atom_lab.serve.sim import atom_lognormal_workload, simulate

PAGE, STEP_TOKENS = 16, 4096
PRIOR_KV_EFFICIENCY = {16: 0.9, 8: 0.3, 4: 0.2}  # sim.KV_EFFICIENCY's post-RoPE values before the engine was measured
BAR = 0.15


def shape_of(res) -> ModelShape:
    c = res["config"]
    return ModelShape("llama-2-7b", c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                      c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"])


def workload_of(p):
    """(workload, max_num_seqs) of a measured point, as bench_serving built it."""
    if p["workload"] == "sweep":
        return [(p["prompt"], p["out"])] * p["batch"], p["batch"]
    if p["workload"] == "budget":
        return [(p["prompt"], p["out"])] * p["batch"], 256
    return atom_lognormal_workload(4 * p["batch"], seed=0), p["batch"]


def load_points(paths) -> tuple[ModelShape, list[dict]]:
    """The measured points of serving JSONs, each tagged with its file ("source") and where its K sat ("rope")."""
    points, shape = [], None
    for path in paths:
        res = json.load(open(path))
        shape = shape_of(res)
        points += [dict(p, source=str(path), rope=res.get("kv_rope", "post")) for p in res["points"]
                   if "measured" in p]
    return shape, points


def _format(p) -> Format:
    return Format.parse(p["format"].replace("w4a4fp8", "w4a4"))  # w4a4fp8: the same bytes in the cost model


def _weights(p) -> str:
    return _format(p).weights


def _kv(p) -> str:
    return f"{p['rope']}-{_format(p).kv_bits}"


def sim_point(shape, p, rope, **cost):
    work, cap = workload_of(p)
    # the engine's graph_prefill as the run recorded it (runs before it had none: 0)
    return simulate(shape, _format(p), H200, 200e9, work, max_num_seqs=cap, max_tokens_per_step=STEP_TOKENS,
                    page_size=PAGE, num_pages=p["measured"]["num_pages"], rope=rope,
                    graph_prefill=p["measured"].get("graph_prefill_tokens", 0), **cost)


def fitted_cost(params, p) -> dict:
    """The CostModel fields of a fit for point p's formats."""
    w = _weights(p)
    return dict(kv_efficiency=params["kv_efficiency"][_kv(p)], step_overhead=params["step_overhead_s"][w],
                prefill_overhead=params["prefill_overhead_s"], gemm_scale=params["gemm_scale"][w],
                prefill_scale=params["prefill_scale"][w])


def nnls(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares with coefficients >= 0: refit without the most negative one until none is (a handful of
    columns here, so this simple elimination is enough)."""
    free = list(range(a.shape[1]))
    while True:
        coef = np.zeros(a.shape[1])
        coef[free] = np.linalg.lstsq(a[:, free], y, rcond=None)[0]
        if (coef >= 0).all():
            return coef, float(np.linalg.norm(a @ coef - y))
        free.remove(int(np.argmin(coef)))


# Formats whose GEMM speed no GEMM benchmark measured (W4A16: torch._weight_int4pack_mm): their decode and prefill
# GEMM scales are fitted on the engine; every other format keeps its benchmark's efficiency (scale 1), since a
# per-format scale would be collinear with the host overhead (GEMMs at M = 8-64 take about the same time).
UNBENCHMARKED = ("w4a16",)


def fit(shape, train):
    """Non-negative least squares on the TRAIN points (each carries its "rope"):
    decode latency = step_overhead[w] + gemm_scale[w] x GEMMs + KV time at efficiency 1 / kv_efficiency[rope, bits]
    + the rest (norms, quantizers, LM head, kernel launches: not fitted); prefill seconds = prefill_scale[w] x
    prefill GEMMs + prefill attention and the rest + host seconds x sequences prefilled. The GEMM scales are 1
    except for UNBENCHMARKED formats; the step overhead is per weight format (the host work and the launches a
    decode step adds beyond the cost model's kernel count: W8A8's activation quantizer is several torch ops)."""
    allw = sorted({_weights(p) for p in train})
    ws = [w for w in allw if w in UNBENCHMARKED]
    kvs = sorted({_kv(p) for p in train})
    n0, n1 = len(allw), len(allw) + len(ws)
    rows, y, prows, py = [], [], [], []
    for p in train:
        r = sim_point(shape, p, p["rope"], kv_efficiency=1.0, step_overhead=0.0, prefill_overhead=0.0,
                      gemm_scale=1.0, prefill_scale=1.0)
        d, steps, w = r.decode_breakdown, max(1, r.decode_steps), _weights(p)
        pre = {k: v - d.get(k, 0.0) for k, v in r.breakdown.items()}  # the prefill steps' share
        a = np.zeros(n1 + len(kvs))
        b = np.zeros(1 + len(ws))
        a[allw.index(w)], b[0] = 1.0, r.prefill_seqs
        a[n1 + kvs.index(_kv(p))] = d["attention"] / steps
        fixed, pfixed = (d["other"] + d["lm_head"]) / steps, sum(v for k, v in pre.items() if k != "gemm")
        if w in ws:
            a[n0 + ws.index(w)], b[1 + ws.index(w)] = d["gemm"] / steps, pre["gemm"]
        else:
            fixed, pfixed = fixed + d["gemm"] / steps, pfixed + pre["gemm"]
        rows.append(a)
        y.append(p["measured"]["decode_latency_ms"] * 1e-3 - fixed)
        prows.append(b)
        py.append(p["measured"]["prefill_seconds"] - pfixed)
    coef, _ = nnls(np.array(rows), np.array(y))
    pcoef, _ = nnls(np.array(prows), np.array(py))
    one = {w: 1.0 for w in allw}
    return {"step_overhead_s": {w: float(c) for w, c in zip(allw, coef[:n0])},
            "gemm_scale": one | {w: float(c) for w, c in zip(ws, coef[n0:n1])},
            "kv_efficiency": {k: float(1 / c) if c else None for k, c in zip(kvs, coef[n1:])},
            "prefill_overhead_s": float(pcoef[0]),
            "prefill_scale": one | {w: float(c) for w, c in zip(ws, pcoef[1:])}}


def predict(shape, p, params=None):
    """tokens/s and decode latency of the simulator for point p (params: a fit, or None = the prior model)."""
    if params is None:
        # what the simulator said before any engine data: the kernel benchmark's post-RoPE KV efficiencies, 1 ms per
        # step, no host time for prefill, every GEMM at its benchmark's efficiency
        r = sim_point(shape, p, "post", kv_efficiency=PRIOR_KV_EFFICIENCY[_format(p).kv_bits], step_overhead=1e-3,
                      prefill_overhead=None, gemm_scale=1.0, prefill_scale=1.0)
        return r.tokens_per_s, r.decode_latency_s * 1e3
    r = sim_point(shape, p, p["rope"], **fitted_cost(params, p))
    return r.tokens_per_s, r.decode_latency_s * 1e3


def bar_analysis(shape, points, params, budget_gb=24.0):
    """The fixed-memory bar (W4A4-KV4 >= 5x FP16, >= 2x W8A8 at 24 GB) from the measured budget points, and the
    simulator's decode-step breakdown of the W4A4-KV4 point with what-ifs: which operator holds the ratio back."""
    at = {(p["format"], p["rope"]): p for p in points if p["workload"] == "budget"
          and abs(p["budget_bytes"] / 1e9 - budget_gb) < 1e-6}
    rope = "post" if ("w4a4-kv4", "post") in at else "pre"
    w4, fp16, w8 = at.get(("w4a4-kv4", rope)), at.get(("fp16-kv16", rope)), at.get(("w8a8-kv8", rope))
    if w4 is None:
        return None
    tps = lambda p: p["measured"]["tokens_per_s"]  # noqa: E731
    out = {"budget_gb": budget_gb, "kv_rope": rope, "w4a4_kv4_tokens_per_s": tps(w4),
           "x_fp16": fp16 and tps(w4) / tps(fp16), "x_w8a8": w8 and tps(w4) / tps(w8), "bars": {"x_fp16": 5.0,
                                                                                               "x_w8a8": 2.0}}
    base = fitted_cost(params, w4)
    r = sim_point(shape, w4, rope, **base)
    steps = max(1, r.decode_steps)
    out["decode_step_ms"] = {k: 1e3 * v / steps for k, v in r.decode_breakdown.items()}
    out["seconds"] = {"decode": r.decode_seconds, "prefill": r.seconds - r.decode_seconds}
    whatifs = {"KV4 attention at 0.9 of the bandwidth": dict(kv_efficiency=0.9),
               "W4A4 GEMMs 2x faster": dict(gemm_scale=0.5, prefill_scale=0.5),
               "no per-step overhead": dict(step_overhead=0.0),
               "no eager-prefill host time": dict(prefill_overhead=0.0),
               "all four": dict(kv_efficiency=0.9, gemm_scale=0.5, prefill_scale=0.5, step_overhead=0.0,
                                prefill_overhead=0.0)}
    out["what_if"] = {}
    for name, kw in whatifs.items():
        t = sim_point(shape, w4, rope, **(base | kw)).tokens_per_s
        out["what_if"][name] = {"tokens_per_s": t, "x_fp16": fp16 and t / tps(fp16), "x_w8a8": w8 and t / tps(w8)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    shape, points = load_points(args.json)
    train = [p for p in points if p["workload"] == "sweep"]
    test = [p for p in points if p["workload"] != "sweep"]
    params = fit(shape, train)
    rows = []
    for p in points:
        m = p["measured"]
        prior = predict(shape, p)
        fitted = predict(shape, p, params)
        rows.append({"format": p["format"], "kv_rope": p["rope"], "source": p["source"], "workload": p["workload"], "batch": p["batch"],
                     "budget_gb": p["budget_bytes"] and p["budget_bytes"] / 1e9, "split": "train" if p in train else
                     "test", "measured_tokens_per_s": m["tokens_per_s"], "measured_decode_ms": m["decode_latency_ms"],
                     "prior_tokens_per_s": prior[0], "prior_error": prior[0] / m["tokens_per_s"] - 1,
                     "fitted_tokens_per_s": fitted[0], "fitted_error": fitted[0] / m["tokens_per_s"] - 1,
                     "fitted_decode_ms": fitted[1], "fitted_decode_error": fitted[1] / m["decode_latency_ms"] - 1})
    out = {"sources": args.json, "fit": params, "bar": BAR, "rows": rows,
           "train_max_abs_error": max(abs(r["fitted_error"]) for r in rows if r["split"] == "train"),
           "test_max_abs_error": max((abs(r["fitted_error"]) for r in rows if r["split"] == "test"), default=None),
           "prior_max_abs_error": max(abs(r["prior_error"]) for r in rows),
           "command": "python -m benchmarks.bench_serving_sim " + " ".join(argv or __import__("sys").argv[1:])}
    print(f"fit on {len(train)} sweep points: step overhead "
          f"{ {k: round(1e3 * v, 2) for k, v in params['step_overhead_s'].items()} } ms, KV efficiency "
          f"{ {k: v and round(v, 3) for k, v in params['kv_efficiency'].items()} }, GEMM scale "
          f"{ {k: round(v, 2) for k, v in params['gemm_scale'].items()} }, prefill scale "
          f"{ {k: round(v, 2) for k, v in params['prefill_scale'].items()} }, "
          f"{params['prefill_overhead_s'] * 1e3:.0f} ms host per sequence of an eager prefill step")
    print(f"{'format':>10} {'rope':>4} {'workload':>9} {'B':>4} {'split':>5} {'measured':>9} {'prior':>7} {'fitted':>7} "
          f"{'decode ms':>9} {'fit':>6}")
    for r in rows:
        print(f"{r['format']:>10} {r['kv_rope']:>4} {r['workload']:>9} {r['batch']:>4} {r['split']:>5} {r['measured_tokens_per_s']:9.1f} "
              f"{100 * r['prior_error']:+6.0f}% {100 * r['fitted_error']:+6.1f}% {r['measured_decode_ms']:9.2f} "
              f"{100 * r['fitted_decode_error']:+5.1f}%")
    out["bar_analysis"] = bar = bar_analysis(shape, points, params)
    if bar:
        print(f"24 GB ({bar['kv_rope']}-RoPE): W4A4-KV4 {bar['x_fp16']:.2f}x FP16-KV16, {bar['x_w8a8']:.2f}x "
              f"W8A8-KV8 measured (bars 5x / 2x); its decode step (simulated, ms): "
              f"{ {k: round(v, 2) for k, v in bar['decode_step_ms'].items()} }")
        for name, w in bar["what_if"].items():
            print(f"  what if {name}: {w['tokens_per_s']:.0f} tok/s = {w['x_fp16']:.2f}x FP16, {w['x_w8a8']:.2f}x W8A8")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
