"""The engine: requests in, tokens out. Scheduler + block manager + model runner, one step at a time.

    engine = Engine(model, KVFormat(bits=4), budget_bytes=2e9)
    outs = engine.generate([prompt_ids, ...], SamplingParams(max_new_tokens=32))
    for event in engine.stream(prompts, params): ...   # (request index, token id, finished) as they come
"""
from __future__ import annotations

import time
from collections.abc import Iterator

from atom_lab.kv_cache import KVFormat
from atom_lab.serve.block_manager import BlockManager
from atom_lab.serve.model_runner import ModelRunner
from atom_lab.serve.request import SamplingParams, Sequence
from atom_lab.serve.scheduler import Scheduler, SchedulerConfig


class Engine:
    """A continuous-batching engine over a Llama-architecture model (ModelRunner documents the arguments)."""

    def __init__(self, model, kv: KVFormat | None = None, budget_bytes: float | None = None,
                 num_pages: int | None = None, page_size: int = 16, max_num_seqs: int = 64,
                 max_tokens_per_step: int = 2048, kernels: str | None = None, eos_token_id: int | None = None,
                 static_decode: bool = True, cuda_graphs: bool | None = None, max_model_len: int | None = None,
                 fp8_weights: bool = False, prefill: str = "fresh", fuse_projections: bool | None = None,
                 graph_prefill: bool | None = None):
        kv = kv or KVFormat(bits=16, dtype=next(model.parameters()).dtype)
        self.runner = ModelRunner(model, kv, budget_bytes, num_pages, page_size, max_tokens_per_step,
                                  max_num_seqs, kernels, static_decode, cuda_graphs, max_model_len, fp8_weights,
                                  prefill, fuse_projections, graph_prefill)
        ids = self.runner.page_ids
        self.block_manager = BlockManager(len(ids), self.runner.pool.page_size, ids)
        # graph prefill also lets the scheduler admit short prompts into decode steps (one graph step for both)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs, max_tokens_per_step, self.runner.graph_prefill),
                                   self.block_manager)
        self.eos_token_id = model.config.eos_token_id if eos_token_id is None else eos_token_id
        if isinstance(self.eos_token_id, (list, tuple)):
            self.eos_token_id = self.eos_token_id[0]
        self.stats = {"steps": 0, "prefill_steps": 0, "tokens": 0, "seconds": 0.0}

    def add_request(self, prompt, params: SamplingParams | None = None) -> Sequence:
        """Queue one request (prompt: list of ids or a LongTensor). Raises ValueError for bad requests."""
        seq = Sequence(prompt, params or SamplingParams(), self.eos_token_id)
        vocab = self.runner.vocab
        if max(seq.prompt) >= vocab:
            raise ValueError(f"prompt holds token id {max(seq.prompt)} but the model's vocabulary has {vocab}.")
        self.scheduler.add(seq)
        return seq

    def step(self) -> tuple[list[Sequence], list[int], list[Sequence]]:
        """One scheduler step: (the batch, its new tokens, the sequences that finished)."""
        t0 = time.perf_counter()
        batch, prefill = self.scheduler.schedule()
        if not batch:
            return [], [], []
        tokens = self.runner.run(batch, prefill)
        done = self.scheduler.postprocess(batch, tokens)
        s = self.stats
        s["steps"] += 1
        s["prefill_steps"] += prefill
        s["tokens"] += len(batch)
        s["seconds"] += time.perf_counter() - t0
        return batch, tokens, done

    def stream(self, prompts, params: SamplingParams | list[SamplingParams] | None = None
               ) -> Iterator[tuple[int, int, bool]]:
        """Serve prompts together; yields (prompt index, token id, finished) for every token as it is sampled."""
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts.")
        seqs = [self.add_request(p, q) for p, q in zip(prompts, params)]
        index = {s.id: i for i, s in enumerate(seqs)}
        while not self.scheduler.is_finished:
            batch, tokens, _ = self.step()
            for s, t in zip(batch, tokens):
                yield index[s.id], t, s.is_finished

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[list[int]]:
        """Serve prompts together; returns each one's generated ids."""
        out = [[] for _ in prompts]
        for i, t, _ in self.stream(prompts, params):
            out[i].append(t)
        return out
