"""atom_lab.serve: a small continuous-batching engine (chapter 06), nano-vllm-shaped.

    request.py        requests, sequences, sampling
    block_manager.py  KV pages per sequence, ref counts
    scheduler.py      FCFS continuous batching, prefill / decode steps, preemption by recompute
    memory.py         bytes of weights, KV and activations per format; the largest batch for a budget
    hardware.py       GPU profiles (H200 measured; H100, A100, RTX 4090 datasheet peaks)
    sim.py            the same scheduler over a cost model instead of a model runner
    model_runner.py   runs a Llama-architecture decoder on the paged KV cache (atom_lab.kv_cache)
    decode_graph.py   decode steps from static buffers, replayed as CUDA graphs per batch-size bucket
    lowbit.py         W8A8 (torch._scaled_mm FP8) and W4A16 (torch._weight_int4pack_mm) linears for the benchmark
    engine.py         requests in, tokens out
"""
from atom_lab.serve.block_manager import BlockManager, OutOfPages
from atom_lab.serve.request import SamplingParams, Sequence, Status, sample
from atom_lab.serve.scheduler import Scheduler, SchedulerConfig
from atom_lab.serve.memory import Format, ModelShape, plan
from atom_lab.serve.hardware import GPUS
from atom_lab.serve.sim import simulate
from atom_lab.serve.model_runner import ModelRunner
from atom_lab.serve.engine import Engine

__all__ = ["BlockManager", "OutOfPages", "SamplingParams", "Sequence", "Status", "sample", "Scheduler",
           "SchedulerConfig", "Format", "ModelShape", "plan", "GPUS", "simulate", "ModelRunner", "Engine"]
