"""Decode steps with static buffers, replayed from CUDA graphs (one graph per batch-size bucket).

A decode step gives every running sequence one new token. PagedDecoder.step builds its page table, slots and
lengths from Python lists on every call and checks each page on the host: fine for prefill and for teaching, but at
batch 64 on Llama-2-7B that host work (and ~1,000 kernel launches) costs more than the GPU's 6-23 ms of arithmetic.
Here the step reads everything from preallocated device buffers, so the whole forward can be captured once and
replayed (nano-vllm and vLLM do the same):

    ids      int32 [B]        the newest token of each sequence
    pos      int32 [B]        its position (= tokens already cached)
    slots    int32 [B]        where its K/V row goes: pages[pos // page_size] * page_size + pos % page_size
    lengths  int32 [B]        pos + 1 (the tokens attention reads, this one included)
    pages    int32 [B, P]     the page table, padded to P = max pages per sequence with the scratch page

A batch of b < B sequences runs in the smallest bucket B >= b; its padding rows decode token 0 at position 0 into a
scratch page that no sequence owns, so they can never touch a real sequence's cache. The host side of a step is one
fill of a pinned int32 array and one copy to the device; the step itself has no .item(), no host-built tensor and no
allocation outside the graph's private pool. A short prefill (or mixed) step runs here too, one row per new token
(ModelRunner's graph_prefill); longer prefills stay eager in PagedDecoder.step.

On the CPU (tests, notebooks) the same static-buffer forward runs eagerly: it must give the same tokens as
PagedDecoder.step, which tests/test_serve_graph.py checks; graph replay == eager is checked on a GPU.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import torch

from atom_lab.kernels.attention import paged_decode_attention, paged_decode_attention_ref
from atom_lab.kernels.kv_cache import kv_write, kv_write_ref
from atom_lab.paged_model import PagedDecoder, RopeAt, _kv_outputs_unquantized, check_logits


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 32, every 16 up to 128, every 32 beyond, and max_batch itself: padding a
    batch to the next bucket wastes at most ~1/4 of a step's rows."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b = b * 2 if b < 8 else b + (8 if b < 32 else 16 if b < 128 else 32)
    return sorted(set(out + [max_batch]))


class StaticDecoder:
    """decoder (a PagedDecoder) -> decode(pages, positions, tokens) -> float32 logits [b, V].

    Args:
        decoder: the PagedDecoder whose model and pool the steps use (kernels "triton" or "reference").
        max_batch: the largest batch of a decode step.
        max_pages: P, the most pages one sequence may hold in a graph step (longer ones use PagedDecoder.step).
        scratch_page: a page of the pool that no sequence owns (the padding rows write there).
        cuda_graphs: capture and replay graphs (default: on a CUDA device).
        buckets: batch sizes to pad to (default: default_buckets(max_batch)).
    """

    def __init__(self, decoder: PagedDecoder, max_batch: int, max_pages: int, scratch_page: int,
                 cuda_graphs: bool | None = None, buckets: list[int] | None = None):
        if not isinstance(decoder, PagedDecoder):
            raise TypeError(f"decoder must be an atom_lab.PagedDecoder, got {type(decoder).__name__}.")
        for name, v in (("max_batch", max_batch), ("max_pages", max_pages)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int.")
        if not decoder.pool.is_allocated(scratch_page):
            raise ValueError(f"scratch_page={scratch_page} must be a page allocated in the pool and owned by no "
                             "sequence (allocate one and keep it out of the block manager).")
        if decoder.pool.fmt.has_window:
            raise ValueError(f"KV format {decoder.pool.fmt.name} keeps a float window (or per-channel key groups), "
                             "which the static decode step does not read; use PagedDecoder.step for it.")
        self.dec, self.pool = decoder, decoder.pool
        self.device = decoder.device
        self.graphs_on = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.graphs_on and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device.")
        self.buckets = sorted(buckets or default_buckets(max_batch))
        if self.buckets[-1] < max_batch:
            raise ValueError(f"buckets {self.buckets} do not reach max_batch={max_batch}.")
        self.max_batch, self.P, self.scratch = self.buckets[-1], max_pages, scratch_page
        B, P = self.max_batch, max_pages
        # One host array and one device buffer: rows 0-3 = ids, pos, slots, lengths [B]; then pages [B, P].
        pin = self.device.type == "cuda"
        self.host = torch.zeros(4 * B + B * P, dtype=torch.int32, pin_memory=pin)
        self.host_np = self.host.numpy()
        self.buf = torch.zeros(4 * B + B * P, dtype=torch.int32, device=self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool_handle = None
        self.replays = self.eager_steps = 0
        # K before RoPE: the decode kernel's cos | sin table for every position a graph step can hold, built once
        # here and held by this object, so a captured graph never points at a table the decoder has since replaced
        # (and no graph rebuilds it on every replay)
        self.rope = decoder._rope(max_pages * decoder.pool.page_size) if decoder.pool.fmt.rope == "pre" else None
        # the pinned host array must not be rewritten while its last asynchronous copy is still pending
        self.copied = torch.cuda.Event() if pin else None

    # --- buffers -------------------------------------------------------------------------------------------------
    def _views(self, B: int):
        """Contiguous views of the first B rows (the kernels index page tables as [B, P] row-major)."""
        Bm, P, buf = self.max_batch, self.P, self.buf
        return (buf[0:B], buf[Bm: Bm + B], buf[2 * Bm: 2 * Bm + B], buf[3 * Bm: 3 * Bm + B],
                buf[4 * Bm: 4 * Bm + B * P].view(B, P))

    def bucket(self, b: int) -> int:
        for B in self.buckets:
            if B >= b:
                return B
        raise ValueError(f"batch of {b} sequences exceeds max_batch={self.max_batch}.")

    def fits(self, pages: list[list[int]]) -> bool:
        return len(pages) <= self.max_batch and all(len(p) <= self.P for p in pages)

    def _fill(self, pages: list[list[int]], positions: list[int], tokens: list[int], B: int) -> None:
        """Write the step's inputs into the host array (padding rows -> the scratch page) and copy them over."""
        Bm, P, ps, h = self.max_batch, self.P, self.pool.page_size, self.host_np
        if self.copied is not None:
            self.copied.synchronize()
        b = len(pages)
        pos = np.asarray(positions, dtype=np.int64)
        h[0:b] = tokens
        h[Bm: Bm + b] = pos
        h[3 * Bm: 3 * Bm + b] = pos + 1
        h[b:B] = 0
        h[Bm + b: Bm + B] = 0
        h[3 * Bm + b: 3 * Bm + B] = 1
        table = h[4 * Bm: 4 * Bm + B * P].reshape(B, P)
        table.fill(self.scratch)
        for i, p in enumerate(pages):
            table[i, : len(p)] = p
        h[2 * Bm: 2 * Bm + b] = table[np.arange(b), pos // ps] * ps + pos % ps
        h[2 * Bm + b: 2 * Bm + B] = self.scratch * ps
        self.buf.copy_(self.host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    # --- the step ------------------------------------------------------------------------------------------------
    def forward(self, B: int, checked: bool = False) -> torch.Tensor:
        """The decode forward of bucket B from the static buffers -> float32 logits [B, V]. checked=True runs the
        KV write with its input checks (the eager warm-up before a capture)."""
        d, pool = self.dec, self.pool
        ids, pos, slots, lengths, table = self._views(B)
        fmt, D = pool.fmt, d.D
        triton_kernels = d.kernels == "triton"
        if triton_kernels:
            # unchecked inside a graph: the NaN/inf check reads a flag back to the host, which a CUDA graph cannot
            # capture (the checked call runs in the warm-up step on the same shapes; decode() checks the logits)
            write = functools.partial(kv_write, check_finite=checked)
        else:
            write = kv_write_ref
        rope = self.rope
        x = d.inner.embed_tokens(ids)[None]  # [1, B, H]
        rope_rows = RopeAt(d.inner, x, pos, d.kernels)

        with _kv_outputs_unquantized(d.kv_linears):
            for li, layer in enumerate(d.layers):
                attn = layer.self_attn
                residual = x
                h = layer.input_layernorm(x)
                q = attn.q_proj(h).view(B, d.Hq, D)
                k = attn.k_proj(h).view(B, d.Hkv, D)
                v = attn.v_proj(h).view(B, d.Hkv, D)
                # K before RoPE: only q turns (the decode kernel rotates the keys it reads)
                pre = fmt.rope == "pre"
                q, k_rot = rope_rows.rotate(q, None if pre else k)
                kc, ksz, vc, vsz = pool.k_codes[li], pool.k_sz[li], pool.v_codes[li], pool.v_sz[li]
                write(k if pre else k_rot, slots, kc, ksz, fmt.bits, pool.group_size)
                write(v, slots, vc, vsz, fmt.bits, pool.group_size)
                if triton_kernels:  # max_length: a bound known on the host, so nothing is read back
                    out = paged_decode_attention(q, kc, ksz, vc, vsz, table, lengths, fmt.bits, pool.page_size,
                                                 d.sm_scale, rope, max_length=self.P * pool.page_size)
                else:
                    out = paged_decode_attention_ref(q, kc, ksz, vc, vsz, table, lengths, fmt.bits,
                                                     pool.page_size, d.sm_scale, rope)
                x = residual + attn.o_proj(out.to(x.dtype).view(1, B, d.Hq * D))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        return d.model.lm_head(d.inner.norm(x)[0]).float()

    def _capture(self, B: int) -> None:
        # Warm up on a side stream (compiles and autotunes the kernels for this M, checks the inputs once), then
        # capture. All graphs share one memory pool: they never run at the same time.
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            self.forward(B, checked=True)
            self.forward(B)
        torch.cuda.current_stream(self.device).wait_stream(s)
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool_handle):
            self.outputs[B] = self.forward(B)
        if self.pool_handle is None:
            self.pool_handle = g.pool()
        self.graphs[B] = g

    @torch.no_grad()
    def capture(self, batch_sizes: list[int] | None = None) -> float:
        """Capture the graphs of these batch sizes' buckets now (default: every bucket), as vLLM does at start-up,
        so that no serving step pays for a capture (or for the kernels' autotuning at a new M). Every row is a
        padding row: only the scratch page is written. Returns the seconds it took (0 without graphs)."""
        if not self.graphs_on:
            return 0.0
        t0 = time.perf_counter()
        for B in sorted({self.bucket(b) for b in (batch_sizes or self.buckets)}):
            if B not in self.graphs:
                self._fill([], [], [], B)
                self._capture(B)
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def decode(self, pages: list[list[int]], positions: list[int], tokens: list[int]) -> torch.Tensor:
        """One decode step: sequence i holds `pages[i]` (already covering position positions[i]) and feeds
        tokens[i] at positions[i]. Writes its K/V and returns float32 logits [b, V], a view of the graph's static
        output: read it before the next step. The caller advances the sequences' lengths."""
        b = len(pages)
        if not (b == len(positions) == len(tokens)) or b == 0:
            raise ValueError(f"pages, positions and tokens need one entry per sequence (got {b}, {len(positions)}, "
                             f"{len(tokens)}).")
        if not self.fits(pages):
            raise ValueError(f"{b} sequences / {max(map(len, pages))} pages exceed the static buffers "
                             f"(max_batch={self.max_batch}, max_pages={self.P}); use PagedDecoder.step.")
        B = self.bucket(b)
        self._fill(pages, positions, tokens, B)
        if not self.graphs_on:
            self.eager_steps += 1
            logits = self.forward(B)[:b]
        else:
            if B not in self.graphs:
                self._capture(B)  # its warm-up steps write this step's K/V rows too: the same values, harmless
            self.graphs[B].replay()
            self.replays += 1
            logits = self.outputs[B][:b]
        check_logits(logits)  # the K/V writes inside a graph are unchecked (no read-back can be captured)
        return logits
