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


def sim_point(shape, p, rope, **cost):
    work, cap = workload_of(p)
    return simulate(shape, Format.parse(p["format"].replace("w4a4fp8", "w4a4")), H200, 200e9, work, max_num_seqs=cap,
                    max_tokens_per_step=STEP_TOKENS, page_size=PAGE, num_pages=p["measured"]["num_pages"],
                    rope=rope, **cost)


def fit(shape, train, rope):
    """Least squares of (overhead, 1/eff per kv bits) on decode latency, and a prefill scale, on `train`."""
    bits = sorted({int(p["format"].split("-kv")[1]) for p in train})
    rows, y, pre_sim, pre_meas, pre_steps = [], [], [], [], []
    for p in train:
        r = sim_point(shape, p, rope, kv_efficiency=1.0, step_overhead=0.0, prefill_overhead=0.0)
        d, steps = r.decode_breakdown, max(1, r.decode_steps)
        rest = (d["gemm"] + d["other"] + d["lm_head"]) / steps
        a = np.zeros(1 + len(bits))
        a[0] = 1.0
        a[1 + bits.index(int(p["format"].split("-kv")[1]))] = d["attention"] / steps
        rows.append(a)
        y.append(p["measured"]["decode_latency_ms"] * 1e-3 - rest)
        pre_sim.append(sum(r.breakdown.values()) - sum(d.values()))  # prefill compute, no host time
        pre_meas.append(p["measured"]["prefill_seconds"])
        pre_steps.append(r.prefill_seqs)
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(y), rcond=None)
    n, gap = np.array(pre_steps, float), np.array(pre_meas) - np.array(pre_sim)
    return {"step_overhead_s": float(coef[0]), "kv_efficiency": {b: float(1 / c) for b, c in zip(bits, coef[1:])},
            "prefill_overhead_s": float(np.dot(n, gap) / np.dot(n, n))}


def predict(shape, p, rope, params=None):
    """tokens/s and decode latency of the simulator for point p (params: a fit, or None = the prior model)."""
    if params is None:
        # what the simulator said before this data: post-RoPE kernel efficiencies, 1 ms per step, nothing for prefill
        r = sim_point(shape, p, "post", step_overhead=1e-3, prefill_overhead=None)
        return r.tokens_per_s, r.decode_latency_s * 1e3
    kb = int(p["format"].split("-kv")[1])
    r = sim_point(shape, p, rope, kv_efficiency=params["kv_efficiency"][kb], step_overhead=params["step_overhead_s"],
                  prefill_overhead=params["prefill_overhead_s"])
    return r.tokens_per_s, r.decode_latency_s * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    points, shape, rope = [], None, None
    for path in args.json:
        res = json.load(open(path))
        shape, rope = shape_of(res), res.get("kv_rope", "post")
        points += [dict(p, source=path) for p in res["points"] if "measured" in p]
    train = [p for p in points if p["workload"] == "sweep"]
    test = [p for p in points if p["workload"] != "sweep"]
    params = fit(shape, train, rope)
    rows = []
    for p in points:
        m = p["measured"]
        prior = predict(shape, p, rope)
        fitted = predict(shape, p, rope, params)
        rows.append({"format": p["format"], "workload": p["workload"], "batch": p["batch"],
                     "budget_gb": p["budget_bytes"] and p["budget_bytes"] / 1e9, "split": "train" if p in train else
                     "test", "measured_tokens_per_s": m["tokens_per_s"], "measured_decode_ms": m["decode_latency_ms"],
                     "prior_tokens_per_s": prior[0], "prior_error": prior[0] / m["tokens_per_s"] - 1,
                     "fitted_tokens_per_s": fitted[0], "fitted_error": fitted[0] / m["tokens_per_s"] - 1,
                     "fitted_decode_ms": fitted[1], "fitted_decode_error": fitted[1] / m["decode_latency_ms"] - 1})
    out = {"sources": args.json, "kv_rope": rope, "fit": params, "bar": BAR, "rows": rows,
           "train_max_abs_error": max(abs(r["fitted_error"]) for r in rows if r["split"] == "train"),
           "test_max_abs_error": max((abs(r["fitted_error"]) for r in rows if r["split"] == "test"), default=None),
           "prior_max_abs_error": max(abs(r["prior_error"]) for r in rows),
           "command": "python -m benchmarks.bench_serving_sim " + " ".join(argv or __import__("sys").argv[1:])}
    print(f"fit on {len(train)} sweep points: step overhead {params['step_overhead_s'] * 1e3:.2f} ms, KV efficiency "
          f"{ {k: round(v, 3) for k, v in params['kv_efficiency'].items()} } ({rope}-RoPE), "
          f"{params['prefill_overhead_s'] * 1e3:.0f} ms host per sequence of an eager prefill step")
    print(f"{'format':>10} {'workload':>9} {'B':>4} {'split':>5} {'measured':>9} {'prior':>7} {'fitted':>7} "
          f"{'decode ms':>9} {'fit':>6}")
    for r in rows:
        print(f"{r['format']:>10} {r['workload']:>9} {r['batch']:>4} {r['split']:>5} {r['measured_tokens_per_s']:9.1f} "
              f"{100 * r['prior_error']:+6.0f}% {100 * r['fitted_error']:+6.1f}% {r['measured_decode_ms']:9.2f} "
              f"{100 * r['fitted_decode_error']:+5.1f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
