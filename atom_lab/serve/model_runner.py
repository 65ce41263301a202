"""The model runner: one scheduler step (a batch of sequences) through the decoder on the paged KV cache.

It owns the KV pool of atom_lab.kv_cache (PagePool) and runs atom_lab.paged_model.PagedDecoder, which walks the
model's own modules: a float model (torch / cuBLAS linears), or one quantized by atom_lab.quantize_model on backend
"reference" (float simulation) or "triton" (packed W4A4 through our kernels), with KV16 / KV8 / KV4 pages. The
block manager's pages are the pool's pages: the runner allocates the whole pool once and hands the ids to the
block manager, so a sequence's PageTable is just (its pages, how many tokens are written).

Memory is held to a budget: pool bytes = budget - weights (the model's parameters and buffers as stored) - the
activation reserve of the largest step (memory.activation_bytes; on a GPU the larger of that and the peak of one
profiled prefill step, plus the decode graphs' share); check_budget reports the allocator's own counters.

Decode steps (one new token per sequence) run from static buffers (serve/decode_graph.py): on a GPU they replay a
CUDA graph captured per batch-size bucket, on the CPU the same forward runs eagerly. Prefill steps, and decode steps
of a sequence longer than max_model_len, run eagerly through PagedDecoder.step, except a prefill step of at most
graph_prefill new tokens in all (128 by default on a GPU): it replays a decode graph with one row per prompt token
(its page table, its position, its token), because each row's K/V is written before any row attends, so row i of a
prompt sees exactly the tokens j <= i, as a causal prefill does. An eager step of a W4A4 model costs ~30 kernel
launches of host work per layer whatever its size, so with short prompts arriving every few steps (Atom's lognormal
workload) the eager prefill steps, not the decode steps, took ~90% of the time. One page of the pool is kept out
of the block manager as the scratch page the padding rows of a bucket write to.
"""
from __future__ import annotations

import itertools
import math

import torch

from atom_lab.kv_cache import KVFormat, PagePool, PageTable
from atom_lab.paged_model import PagedDecoder
from atom_lab.serve.decode_graph import StaticDecoder
from atom_lab.serve.fuse import fuse_projections as stack_projections
from atom_lab.serve.memory import ModelShape, activation_bytes
from atom_lab.serve.request import Sequence, sample

# A prefill step of at most this many new tokens runs from the decode graphs by default (graph_prefill=True): Atom's
# lognormal prompts average ~24 tokens, so an admission of a few requests fits, while the O(tokens^2) reads of the
# one-row-per-token attention stay small next to the step's weight reads.
GRAPH_PREFILL_TOKENS = 128


class _StoredFP8Weight:
    """forward_packed of one packed QuantLinear with its weight ALSO kept as the library's FP8 operand
    (kernels.gemm_blockwise.prepare_fp8(w, "w"), computed once here): kernels.w4a4_gemm(w_fp8=...) then picks, per
    M, the blockwise cuBLASLt GEMM without a per-call weight unpack (select_method(fp8_weights=True): M >= 64 on
    SM90), else its usual method. Costs ~1.06 bytes per weight more memory, which model_bytes counts (buffer)."""

    def __init__(self, layer):
        from atom_lab.kernels.gemm_blockwise import prepare_fp8

        w8, sT = prepare_fp8(layer.packed, "w")
        layer.register_buffer("serve_w_fp8", w8, persistent=False)
        layer.register_buffer("serve_w_fp8_scale", sT, persistent=False)
        self.layer = layer

    def __call__(self, a, lead_shape, dtype):
        from atom_lab.kernels import w4a4_gemm

        m = self.layer
        y = w4a4_gemm(a, m.packed, out_dtype=dtype, w_fp8=(m.serve_w_fp8, m.serve_w_fp8_scale))
        if m.bias is not None:
            y = y + m.bias.to(dtype)
        return m._quantize_output(y.view(*lead_shape, m.out_features))


def store_fp8_weights(model) -> int:
    """Give every packed QuantLinear on the triton backend its stored FP8 weight operand (_StoredFP8Weight);
    returns how many layers. The layer's forward_packed is replaced on the instance only (QuantLinear's own code
    and the other models are untouched)."""
    from atom_lab.qlinear import QuantLinear

    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.is_packed and m.backend == "triton" and not hasattr(m, "serve_w_fp8"):
            m.forward_packed = _StoredFP8Weight(m)
            n += 1
    return n


def store_gluon_ws_scales(model) -> int:
    """Build now, and hold as buffers, the transposed weight scales that kernels.gemm_gluon_ws caches on its first
    call with each weight (~3 MB per Llama-2-7B layer, ~0.1 GB in all): built lazily inside the first decode graph
    they would be bytes outside the memory plan. Only where that method can run (SM90, Gluon); returns how many
    layers."""
    from atom_lab.kernels import gemm_gluon_ws
    from atom_lab.kernels.gemm import device_capability
    from atom_lab.qlinear import QuantLinear

    n = 0
    for m in model.modules():
        if not (isinstance(m, QuantLinear) and m.is_packed and m.backend == "triton" and m.packed_s4.is_cuda):
            continue
        w = m.packed
        if gemm_gluon_ws.supported(device_capability(m.packed_s4.device), w.group_size, w.keeper, w.rows):
            m.register_buffer("serve_ws_scales_t", gemm_gluon_ws.weight_scales_t(w), persistent=False)
            n += 1
    return n


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
        static_decode: run decode steps from static buffers (StaticDecoder); False = PagedDecoder.step always.
        cuda_graphs: replay captured decode graphs (default: on a CUDA device, when static_decode).
        max_model_len: tokens per sequence the static buffers hold (default: the model's max_position_embeddings,
            at most the pool); longer sequences decode eagerly.
        fp8_weights: keep each packed W4A4 weight also as the library's FP8 operand and pass it to w4a4_gemm
            (w_fp8=), which then takes cuBLASLt's blockwise FP8 GEMM from M = 64 on SM90 (store_fp8_weights).
        fuse_projections: stack q/k/v and gate/up into one GEMM each, in the model itself (serve/fuse.py: the
            layers become Parts of one stacked layer, same bytes); default on a GPU, where it fills more of the
            device at decode batch sizes, off on the CPU (op for op the model as given).
        prefill: how a prompt attends (PagedDecoder's prefill=): "fresh" (default, as Atom's engine: SDPA over the
            prompt's own float K/V, which are quantized into the pages as they are written, and no read-back of a
            whole prompt's cache) or "cache" (over the K/V as stored: what teacher-forced perplexity through the
            cache uses, atom_lab/kv_cache.py).
        graph_prefill: the most new tokens of a prefill step that runs as rows of a decode graph (above); the
            graphs' buckets then reach max(max_num_seqs, graph_prefill) rows. True = GRAPH_PREFILL_TOKENS (or
            max_num_seqs if larger), False / 0 = never. Its prompts attend the K/V as stored, as a decode step does,
            i.e. prefill="cache" for those steps whatever `prefill` says (the same numbers for a 16-bit cache; with
            a quantized one the prompt's own keys are read back in its bits). The engine's scheduler then also
            admits short prompts into decode steps (SchedulerConfig.mixed_tokens), which run the same way. Default:
            on where CUDA graphs are (a GPU), off on the CPU.
    """

    def __init__(self, model, kv: KVFormat, budget_bytes: float | None = None, num_pages: int | None = None,
                 page_size: int = 16, max_tokens_per_step: int = 2048, max_num_seqs: int = 64,
                 kernels: str | None = None, static_decode: bool = True, cuda_graphs: bool | None = None,
                 max_model_len: int | None = None, fp8_weights: bool = False, prefill: str = "fresh",
                 fuse_projections: bool | None = None, graph_prefill: bool | int | None = None):
        if (budget_bytes is None) == (num_pages is None):
            raise ValueError("pass exactly one of budget_bytes= (weights + KV pool + activations) or num_pages=.")
        self.model = model
        if fuse_projections is None:
            fuse_projections = next(model.parameters()).device.type == "cuda"
        self.fused_groups = stack_projections(model) if fuse_projections else 0  # first: the FP8 copies below
        self.fp8_weight_layers = store_fp8_weights(model) if fp8_weights else 0  # are then of the stacked weights
        self.gluon_ws_layers = store_gluon_ws_scales(model)  # counted as weights below
        if fp8_weights and not self.fp8_weight_layers:
            raise ValueError("fp8_weights=True needs packed W4A4 layers on the triton backend (atom_lab.quantize_model "
                             "with backend='triton'); this model has none.")
        self.shape = ModelShape.from_config(model.config)
        self.device = next(model.parameters()).device
        self.weight_bytes = model_bytes(model)
        graphs_on = static_decode and (self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs))
        if graph_prefill is None:
            graph_prefill = graphs_on
        if isinstance(graph_prefill, bool):
            graph_prefill = max(max_num_seqs, GRAPH_PREFILL_TOKENS) if graph_prefill else 0
        if not isinstance(graph_prefill, int) or graph_prefill < 0:
            raise ValueError(f"graph_prefill={graph_prefill!r}: pass a bool or the most tokens (an int >= 0).")
        if graph_prefill and not static_decode:
            raise ValueError("graph_prefill runs prefill steps through the static decode buffers: it needs "
                             "static_decode=True (or pass graph_prefill=False).")
        self.graph_prefill, self.graph_prefill_steps = graph_prefill, 0
        self.graph_rows = max(max_num_seqs, graph_prefill)  # the static buffers' (and the largest graph's) rows
        self.activation_reserve = activation_bytes(self.shape, max_tokens_per_step, max_num_seqs)
        self.measured_activations = None
        if budget_bytes is not None and self.device.type == "cuda":
            # The formula misses what the kernels allocate on the side (FP8 operand copies, attention workspaces,
            # the decode graphs' pool): measure the largest prefill step with the allocator's counters instead and
            # reserve the larger of the two, plus the decode graphs' share (their pool and static logits).
            self.measured_activations = self._profile_prefill(kv, page_size, max_tokens_per_step, max_model_len,
                                                              kernels, prefill)
            graphs = self.graph_rows * (2 * self.shape.vocab * 4 + 8 * self.shape.intermediate * 2)
            self.activation_reserve = max(self.activation_reserve, self.measured_activations) + graphs
        self.budget = budget_bytes
        if budget_bytes is not None:
            pool_bytes = int(budget_bytes) - self.weight_bytes - self.activation_reserve
            if pool_bytes <= 0:
                raise ValueError(f"budget_bytes={budget_bytes:.3g} leaves no room for the KV cache: weights "
                                 f"{self.weight_bytes:.3g} B + activation reserve {self.activation_reserve:.3g} B; "
                                 "raise the budget, quantize the weights or lower max_tokens_per_step.")
            self.pool = PagePool.for_model(model, kv, page_size, budget_bytes=pool_bytes)
        else:  # num_pages for the sequences, plus the scratch page
            self.pool = PagePool.for_model(model, kv, page_size, num_pages=num_pages + bool(static_decode))
        self.page_ids = self.pool.allocate(self.pool.num_pages)  # the block manager hands these out
        self.decoder = PagedDecoder(model, self.pool, kernels=kernels, prefill=prefill)
        self.vocab = model.config.vocab_size
        self.static = None
        if static_decode:
            if len(self.page_ids) < 2:
                raise ValueError("the KV pool holds one page: static decode needs a second one as scratch page; "
                                 "raise the budget or pass static_decode=False.")
            scratch = self.page_ids.pop()
            cap = self.pool.capacity_tokens - page_size
            max_len = max_model_len or min(cap, getattr(model.config, "max_position_embeddings", cap) or cap)
            self.static = StaticDecoder(self.decoder, self.graph_rows, math.ceil(max_len / page_size), scratch,
                                        cuda_graphs=cuda_graphs)

    @torch.no_grad()
    def _profile_prefill(self, kv, page_size, tokens, max_model_len, kernels, prefill) -> int:
        """CUDA: bytes the largest prefill step (`tokens` tokens, in sequences of at most max_model_len) allocates
        above what is live before it, by torch.cuda.max_memory_allocated, on a pool just big enough for it."""
        cfg = self.model.config
        max_len = max_model_len or getattr(cfg, "max_position_embeddings", None) or tokens
        lens = [min(max_len, tokens - s) for s in range(0, tokens, max_len)]
        pool = PagePool.for_model(self.model, kv, page_size, num_pages=sum(-(-n // page_size) for n in lens))
        dec = PagedDecoder(self.model, pool, kernels=kernels, prefill=prefill)
        tables = [PageTable(pool) for _ in lens]
        ids = [torch.zeros(n, dtype=torch.long, device=self.device) for n in lens]
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        dec.step(tables, ids)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del dec, tables, pool
        torch.cuda.empty_cache()
        return int(peak)

    def check_budget(self) -> dict:
        """Weights + pool + reserve vs the budget; on a GPU also the allocator's own count of live bytes."""
        planned = self.weight_bytes + self.pool.nbytes + self.activation_reserve
        out = {"weights": self.weight_bytes, "kv_pool": self.pool.nbytes, "activation_reserve":
               self.activation_reserve, "measured_prefill_activations": self.measured_activations,
               "planned": planned, "budget": self.budget}
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
        if self.static is not None and (not is_prefill or self.graph_prefill):
            new = [s.num_new for s in batch]
            rows = sum(new)
            if (rows <= self.graph_prefill if is_prefill else rows == len(batch)) \
                    and self.static.fits([s.pages for s in batch]):
                # one row per new token: (the sequence's pages, the token's position, the token)
                pages = [s.pages for s, n in zip(batch, new) for _ in range(n)]
                positions = [p for s in batch for p in range(s.num_cached, len(s))]
                tokens = [t for s in batch for t in s.tokens_from(s.num_cached)]
                logits = self.static.decode(pages, positions, tokens)
                if rows > len(batch):  # each sequence samples from its last row
                    self.graph_prefill_steps += 1
                    logits = logits[torch.tensor(list(itertools.accumulate(new)), device=logits.device) - 1]
                return sample(logits, batch)
        tables = [PageTable(self.pool, pages=list(s.pages), length=s.num_cached) for s in batch]
        ids = [torch.tensor(s.tokens_from(s.num_cached), dtype=torch.long, device=self.device) for s in batch]
        logits = self.decoder.step(tables, ids)
        return sample(torch.stack(logits), batch)
