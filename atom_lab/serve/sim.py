"""The serving simulator: the engine's own Scheduler and BlockManager, with a cost model in place of the model
runner, so "how many tokens/s would format F serve on GPU G with budget B" is answered by the same admission,
batching and preemption decisions the real engine makes.

Cost model, per step (one prefill or one decode step of the scheduler's batch), summed over the layers:
    GEMM       time = max(FLOPs / peak(operand), bytes / bandwidth) / efficiency(format, M)
               efficiency fitted on our measured GEMMs (benchmarks/results/h100_w4a4_gemm.json: cuBLAS bf16,
               torch._scaled_mm FP8, torch._int_mm INT8 and our W4A4 kernel at M = 1..8192 on 4 Llama-7B shapes;
               GEMM_EFFICIENCY, refit by fit_gemm_efficiency), interpolated in log2 M; on the H200 the fit of its own
               JSON (h200_w4a4_gemm.json, GEMM_EFFICIENCY_H200).
    attention  decode: bytes of the KV read / bandwidth / KV_EFFICIENCY[(rope, kv bits)] (measured / fitted, see
               there); prefill: causal FLOPs at the bf16 peak x 0.5 (ASSUMED).
    other      norms, RoPE, residual adds, activation quantizers: bytes / bandwidth / 0.05 for the fused quantizers
               (0.028-0.067 of the copy bandwidth measured on the H200), plus a launch gap per kernel (2.5 us
               under CUDA graphs, 6 us eager: ASSUMED) and the engine's own time per decode step and per prefilled
               sequence (ENGINE_STEP_OVERHEAD_S per weight format, PREFILL_OVERHEAD_S: fitted on the H200 engine's
               batch sweeps, as are KV_EFFICIENCY and W4A16's ENGINE_GEMM_SCALE / ENGINE_PREFILL_SCALE).
    tensor parallel (tp > 1): Megatron split (q/k/v, gate/up by columns, o/down by rows, heads and KV per GPU
               divided by tp) and two all-reduces of [M, hidden] per layer: 2 (tp - 1) / tp x bytes / NVLink
               bandwidth + 8 us each (ASSUMED latency).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from atom_lab.serve.block_manager import BlockManager
from atom_lab.serve.hardware import GPU
from atom_lab.serve.memory import Format, ModelShape, kv_bytes_per_token, linear_weight_bytes, plan
from atom_lab.serve.request import SamplingParams, Sequence
from atom_lab.serve.scheduler import Scheduler, SchedulerConfig

# efficiency = roofline time / measured time, median over the 4 shapes, from fit_gemm_efficiency() on
# benchmarks/results/h100_w4a4_gemm.json (tests/test_serve_sim.py refits and compares).
GEMM_M = (1, 16, 64, 256, 1024, 4096, 8192)
GEMM_EFFICIENCY = {
    "bf16": (0.628, 0.638, 0.65, 0.608, 1.001, 1.064, 1.005),
    "fp8": (0.536, 0.529, 0.565, 0.579, 1.044, 1.082, 1.078),
    "int8": (0.536, 0.529, 0.434, 0.546, 0.884, 0.888, 0.91),
    "w4a4": (0.29, 0.282, 0.177, 0.258, 0.588, 0.766, 0.752),
}
# The same fit on the H200's own GEMM JSON (benchmarks/results/h200_w4a4_gemm.json, 8 Llama-2 7B/13B shapes), relative
# to the H200 profile's measured peaks (hardware.H200): CostModel uses it on the H200, the H100 fit elsewhere.
GEMM_EFFICIENCY_H200 = {
    "bf16": (0.625, 0.63, 0.637, 0.763, 1.001, 1.026, 1.014),
    "fp8": (0.511, 0.513, 0.524, 0.664, 0.979, 0.999, 1.002),
    "int8": (0.511, 0.513, 0.37, 0.615, 0.84, 0.9, 0.854),
    "w4a4": (0.251, 0.228, 0.149, 0.265, 0.637, 0.879, 0.917),
}
# The H100 peaks the efficiencies are relative to (measured: NOTES.md "Hardware facts").
H100_MEASURED = dict(bandwidth=3.0e12, bf16=730e12, int8=870e12, fp8=1200e12)
W4A4_BYTES = 0.531  # bytes per weight of Atom's packed format at K = 4096 (memory.linear_weight_bytes)
W4A16_FACTOR = 0.62  # gpt-fast: 4-bit weights reached 863 of bf16's 1397 GB/s on an A100 (NOTES.md): ASSUMED
# Decode attention: KV bytes / bandwidth / efficiency, by (where RoPE sits, kv bits), and the engine's own costs,
# all FITTED (non-negative least squares, benchmarks/bench_serving_sim.py -> serve_sim_validation.json) on the H200
# engine's batch sweeps: fp16 weights with K stored before RoPE (serve_h200.json, KV16/8/4) and fp16 / w8a8 / w4a4 /
# w4a16 with K stored after it (serve_h200_lowbit.json). The kernel benchmark agrees for INT4 after RoPE (0.20-0.23
# of the bandwidth at batch 8-128, context 4k-16k: h200_decode_attention_v3_quick.json); for bf16 it measured
# 0.86-1.0 on its own, the engine's steps fit 0.52.
KV_EFFICIENCY = {("post", 16): 0.522, ("post", 8): 0.33, ("post", 4): 0.237,
                 ("pre", 16): 0.204, ("pre", 8): 0.094, ("pre", 4): 0.048}
QUANT_EFFICIENCY, PLAIN_EFFICIENCY = 0.05, 0.3
LAUNCH_GRAPH_S, LAUNCH_EAGER_S, ALLREDUCE_LATENCY_S = 2.5e-6, 6e-6, 8e-6
# Seconds per decode step the cost model's kernels do not explain, per weight format (host work of the step:
# sampling, scheduling, graph replay; and launches beyond KERNELS_PER_LAYER), and host seconds per sequence of an
# eager prefill step (PagedDecoder.step's per-sequence loop). W8A8's 8.1 ms is its unfused per-token FP8 quantizer:
# counted on the CPU (benchmarks/serve_kernel_count.py: a TorchDispatchMode over one static decode step), W8A8 runs
# 49 more torch kernels per layer than FP16 (abs / amax / div / clamp / casts per linear), 1,568 per Llama-7B step,
# i.e. 5.2 us each under the graph (launch gap plus a small reduction over [B, K]).
ENGINE_STEP_OVERHEAD_S = {"fp16": 0.13e-3, "bf16": 0.13e-3, "w8a8": 8.1e-3, "w4a16": 0.0, "w4a4": 5.07e-3}
PREFILL_OVERHEAD_S = 0.048
# The engine's GEMMs against the GEMM benchmark's: decode-step GEMM time and prefill GEMM time are multiplied by
# these per weight format. 1 where a GEMM benchmark measured the format (its efficiency holds); W4A16's kernel
# (torch._weight_int4pack_mm) was never benchmarked on its own (W4A16_FACTOR is an assumption), so its scales are
# fitted on the engine: its decode GEMMs run 7x and its prefill GEMMs 16x slower than that assumption (the op is
# a GEMV-style kernel, slow at large M).
ENGINE_GEMM_SCALE = {"fp16": 1.0, "bf16": 1.0, "w8a8": 1.0, "w4a16": 6.96, "w4a4": 1.0}
ENGINE_PREFILL_SCALE = {"fp16": 1.0, "bf16": 1.0, "w8a8": 1.0, "w4a16": 16.43, "w4a4": 1.0}
KERNELS_PER_LAYER = {"fp16": 11, "bf16": 11, "w8a8": 15, "w4a16": 11, "w4a4": 12}


def gemm_roofline(M: int, N: int, K: int, weight_bytes: float, act_bytes: float, peak: float,
                  bandwidth: float) -> float:
    return max(2.0 * M * N * K / peak, (weight_bytes + act_bytes * M * K + 2.0 * M * N) / bandwidth)


def fit_gemm_efficiency(path: str, gpu: GPU | None = None) -> dict[str, tuple[float, ...]]:
    """Refit GEMM_EFFICIENCY (gpu None: relative to H100_MEASURED) or GEMM_EFFICIENCY_H200 (gpu=hardware.H200)
    from a bench_gemm JSON (rows with K, N, M and times in ms per kernel)."""
    import json

    rows = json.load(open(path))["gemm"]
    peaks = H100_MEASURED if gpu is None else dict(bandwidth=gpu.bandwidth, bf16=gpu.bf16, int8=gpu.int8,
                                                     fp8=gpu.fp8)
    bw, cols = peaks["bandwidth"], {"bf16": "cublas_bf16_ms", "fp8": "scaled_mm_fp8_ms",
                                    "int8": "int_mm_int8_ms", "w4a4": "w4a4_ms"}
    specs = {"bf16": (2.0, 2.0, "bf16"), "fp8": (1.0, 1.0, "fp8"), "int8": (1.0, 1.0, "int8"),
             "w4a4": (W4A4_BYTES, W4A4_BYTES, "int8")}
    out = {}
    for fmt, col in cols.items():
        wb, ab, peak = specs[fmt]
        effs = []
        for m in GEMM_M:
            e = [gemm_roofline(m, r["N"], r["K"], wb * r["N"] * r["K"], ab, peaks[peak], bw)
                 / (r[col] * 1e-3) for r in rows if r["M"] == m and r[col]]
            effs.append(round(float(np.median(e)), 3) if e else None)
        out[fmt] = effs
    # _int_mm was not timed below M = 64 (it needs M > 16): use the FP8 library GEMM's efficiency there
    out["int8"] = tuple(f if i is None else i for i, f in zip(out["int8"], out["fp8"]))
    return {k: tuple(v) for k, v in out.items()}


def efficiency(kind: str, M: int, gpu_name: str = "") -> float:
    """GEMM efficiency of `kind` ('bf16', 'fp8', 'int8', 'w4a4') at M rows, interpolated in log2 M (the H200's own
    fit on the H200, the H100's elsewhere)."""
    table = (GEMM_EFFICIENCY_H200 if gpu_name == "H200" else GEMM_EFFICIENCY)[kind]
    x = math.log2(max(1, M))
    return float(np.interp(x, [math.log2(m) for m in GEMM_M], table))


@dataclass
class CostModel:
    """Seconds per step for `shape` in `fmt` on `gpu`, split tp ways (tensor parallel)."""
    shape: ModelShape
    fmt: Format
    gpu: GPU
    tp: int = 1
    rope: str = "post"                  # where the KV cache stores K relative to RoPE (KV_EFFICIENCY)
    kv_efficiency: float | None = None  # override KV_EFFICIENCY[(rope, kv bits)]
    step_overhead: float | None = None  # seconds per decode step beyond the kernels (ENGINE_STEP_OVERHEAD_S)
    prefill_overhead: float | None = PREFILL_OVERHEAD_S  # host seconds per sequence of an (eager) prefill step;
                                                         # None = one step_overhead per prefill step
    gemm_scale: float | None = None     # override ENGINE_GEMM_SCALE[weights] (decode-step GEMMs)
    prefill_scale: float | None = None  # override ENGINE_PREFILL_SCALE[weights] (a prefill step's compute)

    def __post_init__(self):
        s = self.shape
        if self.tp < 1 or s.heads % self.tp or s.kv_heads % self.tp and self.tp % s.kv_heads:
            raise ValueError(f"tp={self.tp} must divide the {s.heads} heads (and the {s.kv_heads} KV heads, or be "
                             "a multiple of them).")

    def _gemm_kind(self) -> tuple[str, float, float, float]:
        """(efficiency table, peak, weight bytes per weight, activation bytes per element) of this format."""
        g, w = self.gpu, self.fmt.weights
        if w in ("fp16", "bf16", "w4a16"):
            return "bf16", g.bf16, 2.0 if w != "w4a16" else 0.5 + 2.5 / self.fmt.group_size, 2.0
        if w == "w8a8":
            return ("fp8", g.fp8, 1.0, 1.0) if g.fp8 else ("int8", g.int8, 1.0, 1.0)
        return "w4a4", g.int4 or g.int8, W4A4_BYTES, W4A4_BYTES

    def gemm_time(self, M: int, N: int, K: int) -> float:
        kind, peak, wb, ab = self._gemm_kind()
        weight = linear_weight_bytes(N, K, self.fmt)
        t = gemm_roofline(M, N, K, weight, ab, peak, self.gpu.bandwidth) / efficiency(kind, M, self.gpu.name)
        return t / W4A16_FACTOR if self.fmt.weights == "w4a16" else t

    def layer_gemms(self, M: int) -> float:
        s, tp = self.shape, self.tp
        cols = [(n // tp, k) for n, k in s.linears()[:3]] + [(n // tp, k) for n, k in s.linears()[4:6]]
        rows = [(s.linears()[3][0], s.linears()[3][1] // tp), (s.linears()[6][0], s.linears()[6][1] // tp)]
        return sum(self.gemm_time(M, n, k) for n, k in cols + rows)

    def step(self, context_lens: list[int], new_tokens: list[int], prefill: bool) -> dict[str, float]:
        """Seconds per operator class for one step: context_lens[i] tokens in cache after the step for sequence i,
        new_tokens[i] of them computed in this step."""
        s, g, tp = self.shape, self.gpu, self.tp
        M, B = sum(new_tokens), len(new_tokens)
        kv_heads = max(1, s.kv_heads // tp)
        kv_layer_token = kv_bytes_per_token(s, self.fmt) / s.layers * kv_heads / s.kv_heads
        w = self.fmt.weights
        if prefill:
            scale = ENGINE_PREFILL_SCALE[w] if self.prefill_scale is None else self.prefill_scale
        else:
            scale = ENGINE_GEMM_SCALE[w] if self.gemm_scale is None else self.gemm_scale
        t = {"gemm": s.layers * self.layer_gemms(M) * scale}
        if prefill:
            flops = sum(2 * 2 * (s.heads // tp) * s.head_dim * n * (c - n / 2) for n, c in zip(new_tokens,
                                                                                          context_lens))
            t["attention"] = s.layers * (flops / (g.bf16 * 0.5) + M * kv_layer_token / g.bandwidth)
        else:
            eff = self.kv_efficiency or KV_EFFICIENCY[(self.rope, self.fmt.kv_bits)]
            t["attention"] = s.layers * sum(context_lens) * kv_layer_token / g.bandwidth / eff
        quantized = self.fmt.weights in ("w8a8", "w4a4")
        eff = QUANT_EFFICIENCY if quantized else PLAIN_EFFICIENCY
        elementwise = M * (6 * s.hidden + 3 * s.intermediate // tp) * 2
        launches = KERNELS_PER_LAYER[self.fmt.weights] * (LAUNCH_EAGER_S if prefill else LAUNCH_GRAPH_S)
        t["other"] = s.layers * (elementwise / g.bandwidth / eff + launches)
        t["lm_head"] = gemm_roofline(B, s.vocab // tp, s.hidden, 2 * s.vocab * s.hidden / tp, 2, g.bf16,
                                     g.bandwidth) / efficiency("bf16", B, g.name)
        if tp > 1:
            ar = 2 * (tp - 1) / tp * M * s.hidden * 2 / g.interconnect + ALLREDUCE_LATENCY_S
            t["allreduce"] = s.layers * 2 * ar
        step = ENGINE_STEP_OVERHEAD_S[w] if self.step_overhead is None else self.step_overhead
        t["host"] = step if not prefill or self.prefill_overhead is None else self.prefill_overhead * B
        return t


def qserve_workload(n: int, prompt: int = 1024, output: int = 512) -> list[tuple[int, int]]:
    """QServe's protocol: every request has `prompt` input and `output` new tokens."""
    return [(prompt, output)] * n


def atom_lognormal_workload(n: int, seed: int = 0, scale: float = 1.0) -> list[tuple[int, int]]:
    """Atom's synthetic lengths: prompt and output drawn from scipy's lognorm(0.8, -1.0, 18.0) (x = -1 + 18
    exp(0.8 Z)), seeded, at least 1 token; `scale` multiplies both (1 = Atom's)."""
    rng = np.random.default_rng(seed)
    draw = lambda: np.maximum(1, np.round(scale * (-1.0 + 18.0 * np.exp(0.8 * rng.standard_normal(n)))))  # noqa
    return [(int(p), int(o)) for p, o in zip(draw(), draw())]


@dataclass
class SimResult:
    tokens: int
    seconds: float
    decode_steps: int
    decode_seconds: float
    max_running: int
    preemptions: int
    breakdown: dict[str, float] = field(default_factory=dict)
    num_pages: int = 0
    decode_breakdown: dict[str, float] = field(default_factory=dict)
    prefill_seqs: int = 0  # sequences prefilled, summed over prefill steps

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def decode_latency_s(self) -> float:
        """Mean seconds per decode step (= per-token latency each running request sees)."""
        return self.decode_seconds / max(1, self.decode_steps)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "seconds": self.seconds, "tokens_per_s": self.tokens_per_s,
                "decode_latency_ms": 1e3 * self.decode_latency_s, "max_running": self.max_running,
                "preemptions": self.preemptions, "breakdown_s": self.breakdown, "num_pages": self.num_pages,
                "decode_breakdown_s": self.decode_breakdown}


def simulate(shape: ModelShape, fmt: Format, gpu: GPU, budget_bytes: float, workload: list[tuple[int, int]],
             max_num_seqs: int = 256, max_tokens_per_step: int = 8192, page_size: int = 16,
             tp: int = 1, num_pages: int | None = None, graph_prefill: int = 0, **cost) -> SimResult:
    """Serve `workload` ((prompt, output) lengths, all queued at t = 0) with the engine's scheduler and the cost
    model; the KV pool gets what the memory plan leaves of budget_bytes (per GPU: weights and KV split tp ways), or
    exactly num_pages pages when given (to mirror an engine run). graph_prefill: as the engine's (ModelRunner): a
    prefill or mixed step of at most this many new tokens costs a decode step of one row per token (its context =
    the token's position + 1), and the scheduler mixes admissions into decode steps up to it. cost: CostModel
    fields (rope, kv_efficiency, step_overhead, prefill_overhead)."""
    cost = CostModel(shape, fmt, gpu, tp, **cost)
    p = plan(shape, fmt, budget_bytes * tp, tokens_per_request=1, tokens_per_step=max_tokens_per_step,
             max_batch_rows=max_num_seqs)
    bm = BlockManager(num_pages or int(p.tokens // page_size), page_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs, max_tokens_per_step, graph_prefill), bm)
    for i, (n, m) in enumerate(workload):
        sched.add(Sequence([0] * n, SamplingParams(max_new_tokens=m, ignore_eos=True), request_id=i))
    clock = dec_time = 0.0
    steps = tokens = max_running = prefill_seqs = 0
    breakdown: dict[str, float] = {}
    dec_breakdown: dict[str, float] = {}
    while not sched.is_finished:
        batch, prefill = sched.schedule()
        new = [s.num_new for s in batch]
        if prefill and sum(new) <= graph_prefill:
            rows = [c for s, n in zip(batch, new) for c in range(len(s) - n + 1, len(s) + 1)]
            t = cost.step(rows, [1] * len(rows), False)
        else:
            t = cost.step([len(s) for s in batch], new, prefill)
        dt = sum(t.values())
        for k, v in t.items():
            breakdown[k] = breakdown.get(k, 0.0) + v
        clock += dt
        prefill_seqs += len(batch) if prefill else 0
        if not prefill:
            dec_time += dt
            steps += 1
            for k, v in t.items():
                dec_breakdown[k] = dec_breakdown.get(k, 0.0) + v
        max_running = max(max_running, len(sched.running))
        tokens += len(batch)
        sched.postprocess(batch, [0] * len(batch))
    return SimResult(tokens, clock, steps, dec_time, max_running, sched.num_preemptions, breakdown, bm.num_pages,
                     dec_breakdown, prefill_seqs)
