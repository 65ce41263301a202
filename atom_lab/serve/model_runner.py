"""The model runner: one scheduler step (a batch of sequences) through the decoder on the paged KV cache.

It owns the KV pool of atom_lab.kv_cache (PagePool) and runs atom_lab.paged_model.PagedDecoder, which walks the
model's own modules: a float model (torch / cuBLAS linears), or one quantized by atom_lab.quantize_model on backend
"reference" (float simulation) or "triton" (packed W4A4 through our kernels), with KV16 / KV8 / KV4 pages. The
block manager's pages are the pool's pages: the runner allocates the whole pool once and hands the ids to the
block manager, so a sequence's PageTable is just (its pages, how many tokens are written).

Memory is held to a budget: pool bytes = budget - weights (the model's parameters and buffers as stored) - the
activation reserve of the largest step (memory.activation_bytes); on a GPU the allocator's counters are checked
after the pool is built (check_budget).

Not here (yet): CUDA-graph replay of decode steps. PagedDecoder.step builds its page tables on the host every step
(Python lists -> tensors), which a captured graph cannot do; the runner runs eagerly on every device.
"""
from __future__ import annotations

import torch

from atom_lab.kv_cache import KVFormat, PagePool, PageTable
from atom_lab.paged_model import PagedDecoder
from atom_lab.serve.memory import ModelShape, activation_bytes
from atom_lab.serve.request import Sequence, sample


def model_bytes(model) -> int:
    """Bytes of what the model stores (parameters and buffers, shared tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


class ModelRunner:
    """model + KV format + budget -> run(batch, is_prefill) -> one sampled token per sequence.

    Args:
        model: a Llama-architecture causal LM (float, or quantized by atom_lab.quantize_model).
        kv: the KV pages' format (atom_lab.KVFormat).
        budget_bytes: total memory for weights + KV pool + activations (give this or num_pages).
        num_pages: the pool's size in pages instead of a budget (tests).
        page_size: tokens per page.
        max_tokens_per_step, max_num_seqs: the scheduler's caps (they size the activation reserve).
        kernels: "triton" / "reference" for the KV write and decode attention (PagedDecoder's default if None).
    """

    def __init__(self, model, kv: KVFormat, budget_bytes: float | None = None, num_pages: int | None = None,
                 page_size: int = 16, max_tokens_per_step: int = 2048, max_num_seqs: int = 64,
                 kernels: str | None = None):
        if (budget_bytes is None) == (num_pages is None):
            raise ValueError("pass exactly one of budget_bytes= (weights + KV pool + activations) or num_pages=.")
        self.model = model
        self.shape = ModelShape.from_config(model.config)
        self.device = next(model.parameters()).device
        self.weight_bytes = model_bytes(model)
        self.activation_reserve = activation_bytes(self.shape, max_tokens_per_step, max_num_seqs)
        self.budget = budget_bytes
        if budget_bytes is not None:
            pool_bytes = int(budget_bytes) - self.weight_bytes - self.activation_reserve
            if pool_bytes <= 0:
                raise ValueError(f"budget_bytes={budget_bytes:.3g} leaves no room for the KV cache: weights "
                                 f"{self.weight_bytes:.3g} B + activation reserve {self.activation_reserve:.3g} B; "
                                 "raise the budget, quantize the weights or lower max_tokens_per_step.")
            self.pool = PagePool.for_model(model, kv, page_size, budget_bytes=pool_bytes)
        else:
            self.pool = PagePool.for_model(model, kv, page_size, num_pages=num_pages)
        self.page_ids = self.pool.allocate(self.pool.num_pages)  # the block manager hands these out
        self.decoder = PagedDecoder(model, self.pool, kernels=kernels)
        self.vocab = model.config.vocab_size

    def check_budget(self) -> dict:
        """Weights + pool + reserve vs the budget; on a GPU also the allocator's own count of live bytes."""
        planned = self.weight_bytes + self.pool.nbytes + self.activation_reserve
        out = {"weights": self.weight_bytes, "kv_pool": self.pool.nbytes, "activation_reserve":
               self.activation_reserve, "planned": planned, "budget": self.budget}
        if self.device.type == "cuda":
            out["cuda_allocated"] = torch.cuda.memory_allocated(self.device)
            out["cuda_peak"] = torch.cuda.max_memory_allocated(self.device)
        if self.budget is not None and planned > self.budget:
            raise RuntimeError(f"memory plan {planned} B exceeds the budget {self.budget} B")
        return out

    @torch.no_grad()
    def run(self, batch: list[Sequence], is_prefill: bool) -> list[int]:
        """Compute the tokens of each sequence not yet in the cache (the whole prompt, or the newest token) and
        sample the next token of each. The block manager has already given every sequence its pages."""
        tables = [PageTable(self.pool, pages=list(s.pages), length=s.num_cached) for s in batch]
        ids = [torch.tensor(s.tokens[s.num_cached:], dtype=torch.long, device=self.device) for s in batch]
        logits = self.decoder.step(tables, ids)
        return sample(torch.stack(logits), batch)
