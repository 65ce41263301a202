"""Memory model (Atom's fixed-memory batch sizes), cost model fit, simulator on the engine's scheduler."""
import atom_lab  # noqa: F401

import importlib.util
from pathlib import Path

import pytest

from atom_lab.serve.hardware import GPUS, H200, RTX4090
from atom_lab.serve.memory import (ATOM_FORMATS, GIB, LLAMA_2_70B, LLAMA_7B, Format, ModelShape, kv_bytes_per_token,
                                   plan, weight_bytes)
from atom_lab.serve.sim import GEMM_EFFICIENCY, CostModel, atom_lognormal_workload, fit_gemm_efficiency, simulate

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_atom_fixed_memory_batch_sizes():
    # Atom (MLSys 2024), RTX 4090 figure: Llama-7B, 24 GiB, 2048 tokens reserved per request -> 8 / 16 / 32 / 64
    got = {k: plan(LLAMA_7B, f, 24 * GIB, tokens_per_request=2048).atom_batch for k, f in ATOM_FORMATS.items()}
    assert got == {"FP16": 8, "W4A16": 16, "W8A8": 32, "W4A4": 64}


def test_bytes_by_hand():
    # KV per token of Llama-7B: 2 (K, V) x 32 layers x 32 heads x per-head bytes (head_dim 128, one fp16 pair)
    assert kv_bytes_per_token(LLAMA_7B, Format("fp16", 16)) == 2 * 32 * 32 * 256
    assert kv_bytes_per_token(LLAMA_7B, Format("w8a8", 8)) == 2 * 32 * 32 * (128 + 4)
    assert kv_bytes_per_token(LLAMA_7B, Format("w4a4", 4)) == 2 * 32 * 32 * (64 + 4)
    tiny = ModelShape("t", hidden=256, intermediate=512, layers=1, heads=2, kv_heads=1, head_dim=128, vocab=10)
    # one [256, 256] W4A4 weight: 128 INT4 channels (64 bytes) + 1 fp16 scale + 128 INT8 + 1 fp16 scale per row
    from atom_lab.serve.memory import linear_weight_bytes
    assert linear_weight_bytes(256, 256, Format("w4a4", 4)) == 256 * (64 + 2 + 128 + 2)
    assert weight_bytes(tiny, Format("fp16")) == 2 * (256 * 256 + 2 * 128 * 256 + 256 * 256 + 3 * 512 * 256
                                                      + 2 * 10 * 256 + 3 * 256)


def test_budget_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="exceed the budget"):
        plan(LLAMA_7B, Format("fp16"), 8 * GIB)


def test_kv_bytes_match_the_paged_cache():
    if importlib.util.find_spec("atom_lab.kv_cache") is None:
        pytest.skip("atom_lab.kv_cache (chapter 05) is not on this branch yet")
    import torch

    from atom_lab.kv_cache import KVFormat, PagePool
    for bits in (16, 8, 4):  # the real allocation of a one-page pool of Llama-7B's shape
        pool = PagePool(32, 32, 128, KVFormat(bits=bits, dtype=torch.float16), page_size=16, num_pages=1,
                        device="cpu")
        assert pool.bytes_per_token == kv_bytes_per_token(LLAMA_7B, Format("fp16", bits))


def test_gemm_efficiency_is_the_fit_of_the_committed_json():
    fit = fit_gemm_efficiency(str(RESULTS / "h100_w4a4_gemm.json"))
    assert fit == GEMM_EFFICIENCY


def test_simulator_runs_the_engine_scheduler():
    work = atom_lognormal_workload(40, seed=1, scale=8.0)
    fmt = Format("w4a4", 4)
    r = simulate(LLAMA_7B, fmt, H200, 24 * GIB, work, max_num_seqs=64)
    assert r.tokens == sum(o for _, o in work)
    assert 1 <= r.max_running <= 64 and r.tokens_per_s > 0
    assert abs(sum(r.breakdown.values()) - r.seconds) < 1e-9 * max(1, r.seconds)
    # a tiny budget forces preemptions and still finishes every request
    small = simulate(LLAMA_7B, fmt, H200, 4.5 * GIB, work, max_num_seqs=64)
    assert small.tokens == r.tokens and small.preemptions > 0


def test_more_memory_per_request_means_fewer_tokens_per_second_at_fixed_budget():
    work = [(512, 512)] * 160
    fp16 = simulate(LLAMA_7B, Format("fp16"), H200, 24 * GIB, work)
    w4a4 = simulate(LLAMA_7B, Format("w4a4", 4), H200, 24 * GIB, work)
    assert w4a4.max_running >= 3 * fp16.max_running  # the batch memory allows, not the model, sets the factor
    assert w4a4.tokens_per_s > fp16.tokens_per_s


def test_tensor_parallel_70b():
    work = [(1024, 32)] * 16
    one = simulate(LLAMA_2_70B, Format("fp16"), H200, 139 * GIB, work)
    two = simulate(LLAMA_2_70B, Format("fp16"), H200, 139 * GIB, work, tp=2)
    c = CostModel(LLAMA_2_70B, Format("fp16"), H200, tp=8).step([2048] * 8, [1] * 8, False)
    assert c["allreduce"] > 0 and two.tokens_per_s > one.tokens_per_s
    with pytest.raises(ValueError, match="tp=3"):
        CostModel(LLAMA_2_70B, Format("fp16"), H200, tp=3)


def test_profiles_have_what_the_chapter_says():
    assert H200.int4 is None and RTX4090.int4 is not None  # Hopper has no native INT4 MMA; Ada has
    assert set(GPUS) == {"H200", "H100 SXM", "A100 SXM 80GB", "RTX 4090"}


def test_engine_constants_are_the_fit_of_the_committed_serving_json():
    # The KV efficiencies, the engine's per-step and per-prefilled-sequence costs and W4A16's GEMM scales come from
    # benchmarks/bench_serving_sim.py's least squares on the H200 batch sweeps (train points only) of the two
    # committed serving JSONs; the committed constants must be that fit, rounded.
    from benchmarks.bench_serving_sim import fit, load_points
    from atom_lab.serve import sim
    shape, points = load_points([RESULTS / "serve_h200.json", RESULTS / "serve_h200_lowbit.json"])
    params = fit(shape, [p for p in points if p["workload"] == "sweep"])
    assert {k: round(e, 3) for k, e in params["kv_efficiency"].items()} == {
        f"{r}-{b}": e for (r, b), e in sim.KV_EFFICIENCY.items()}
    assert {w: round(v, 5) for w, v in params["step_overhead_s"].items()} == {
        w: sim.ENGINE_STEP_OVERHEAD_S[w] for w in params["step_overhead_s"]}
    assert round(params["prefill_overhead_s"], 3) == sim.PREFILL_OVERHEAD_S
    for w in params["gemm_scale"]:
        assert round(params["gemm_scale"][w], 2) == sim.ENGINE_GEMM_SCALE[w]
        assert round(params["prefill_scale"][w], 2) == sim.ENGINE_PREFILL_SCALE[w]

def test_graph_prefill_costs_a_decode_step_of_one_row_per_token():
    # the engine's graph_prefill: a short prefill step runs as decode rows, so the simulator must price it as one
    fmt = Format("w4a4", 4)
    cost = CostModel(LLAMA_7B, fmt, H200)
    one = simulate(LLAMA_7B, fmt, H200, 24 * GIB, [(3, 1), (2, 1)], max_num_seqs=8, graph_prefill=5)
    rows = cost.step([1, 2, 3, 1, 2], [1] * 5, False)  # positions 0-2 and 0-1 read 1..3 and 1..2 tokens
    assert one.seconds == pytest.approx(sum(rows.values()), rel=1e-12)
    assert one.decode_steps == 0  # still a prefill step of the scheduler: 1 new token each, nothing decoded
    eager = simulate(LLAMA_7B, fmt, H200, 24 * GIB, [(3, 1), (2, 1)], max_num_seqs=8, graph_prefill=4)
    assert eager.seconds == pytest.approx(sum(cost.step([3, 2], [3, 2], True).values()), rel=1e-12)
