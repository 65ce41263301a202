"""Run a Hugging Face Llama-architecture decoder on the paged KV cache: batched prefill / decode steps, greedy
generation, teacher-forced perplexity, and the float simulation of a KV format to compare with.

PagedDecoder walks the model's own modules (embedding, each block's norms, q/k/v/o projections, MLP, final norm,
lm_head), so float nn.Linear layers and atom_lab QuantLinear layers on backend "reference" or "triton" (with its
fused RMSNorm + quantize) all work unchanged; only attention is replaced by the cache. A batch is flattened to
one row of N = sum(T_i) tokens: every linear layer sees all sequences at once, attention is per sequence.
The API is documented in atom_lab/kv_cache.py.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from atom_lab.kernels.attention import (gather_kv_ref, paged_decode_attention, paged_decode_attention_ref,
                                        prefill_attention, rope_ref, rope_table, sdpa_rows)
from atom_lab.kernels.kv_cache import kv_write, kv_write_channel, kv_write_channel_ref, kv_write_ref
from atom_lab.kernels.rope import apply_rope_, apply_rope_ref
from atom_lab.kv_cache import KVCacheFull, KVFormat, PagePool, PageTable
from atom_lab.qlinear import QuantLinear
from atom_lab.quantizers import fake_quantize_asymmetric

ARCHS = ("llama", "mistral", "qwen2")
PREFILL_MODES = ("cache", "fresh")


@contextlib.contextmanager
def _kv_outputs_unquantized(layers):
    """QuantLinear k_proj/v_proj with out_bits < 16 fake-quantize their output (the float simulation of the KV
    cache); through the real cache that would quantize twice, so switch it off for the step."""
    saved = []
    for m in layers:
        if isinstance(m, QuantLinear) and m.out_bits < 16:
            saved.append((m, m.out_bits))
            m.out_bits = 16
    try:
        yield
    finally:
        for m, b in saved:
            m.out_bits = b


def check_logits(logits: torch.Tensor) -> None:
    """One device-to-host read per step: NaN/inf anywhere in a step's K/V rows or activations reaches the logits of
    its sequences (through the attention of their last token), so this replaces the per-layer checks on a GPU."""
    if not torch.isfinite(logits).all():
        raise ValueError("the step produced NaN or inf logits: the model's activations (or the K/V rows written to "
                         "the cache in this step) are not finite; check the weights and the inputs.")


class RopeAt:
    """HF's apply_rotary_pos_emb for one flat batch of tokens: the cos / sin the model's rotary embedding computes
    for x [1, N, H] (its dtype/device) at positions pos int [N]; rotate(q, k) turns q [N, Hq, D] and k [N, Hk, D]
    (or None) to those positions. kernels "triton": in place, in one launch (kernels/rope.py, the same values bit
    for bit); "reference": out of place in PyTorch."""

    def __init__(self, inner, x: torch.Tensor, pos: torch.Tensor, kernels: str):
        cos, sin = inner.rotary_emb(x, pos[None])
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [N, D]
        self.in_place = kernels == "triton"

    def rotate(self, q: torch.Tensor, k: torch.Tensor | None = None):
        if self.in_place:
            apply_rope_(q, k, self.cos, self.sin)
            return q, k
        return apply_rope_ref(q, self.cos, self.sin), None if k is None else apply_rope_ref(k, self.cos, self.sin)


class PagedDecoder:
    """model + PagePool -> step(tables, token_ids) (atom_lab/kv_cache.py gives the contract).

    kernels: "triton" (kv_write + split-KV decode kernels) or "reference" (their PyTorch twins); default: "triton"
    when the model runs on atom_lab's triton backend or sits on a GPU, else "reference".
    prefill: "cache" (attend over K/V as stored, quantized) or "fresh" (the chunk's own float K/V, as Atom).
    """

    def __init__(self, model, pool: PagePool, kernels: str | None = None, prefill: str = "cache"):
        c = model.config
        if getattr(c, "model_type", None) not in ARCHS:
            raise ValueError(f"PagedDecoder runs Llama-architecture models ({', '.join(ARCHS)}); got model_type="
                             f"{getattr(c, 'model_type', None)!r}.")
        if not isinstance(pool, PagePool):
            raise TypeError(f"pool must be an atom_lab.PagePool, got {type(pool).__name__}.")
        self.model, self.pool = model, pool
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.Hq = c.num_attention_heads
        self.Hkv = getattr(c, "num_key_value_heads", None) or self.Hq
        self.D = getattr(c, "head_dim", None) or c.hidden_size // self.Hq
        if (pool.num_layers, pool.num_kv_heads, pool.head_dim) != (len(self.layers), self.Hkv, self.D):
            shape = (pool.num_layers, pool.num_kv_heads, pool.head_dim)
            raise ValueError(f"pool shape (layers, kv heads, head_dim) = {shape} does not match the model's "
                             f"{(len(self.layers), self.Hkv, self.D)}; build it with PagePool.for_model(model, fmt).")
        device = next(model.parameters()).device
        if pool.device.type != device.type:
            raise ValueError(f"pool is on {pool.device} but the model on {device}; build the pool on the model's "
                             "device.")
        if kernels is None:
            kernels = "triton" if (getattr(model, "atom_backend", None) == "triton" or device.type == "cuda") \
                else "reference"
        if kernels not in ("triton", "reference"):
            raise ValueError(f"kernels={kernels!r}: use 'triton' or 'reference'.")
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill={prefill!r}: use 'cache' or 'fresh'.")
        self.kernels, self.prefill, self.device = kernels, prefill, device
        rot = self.inner.rotary_emb
        self.inv_freq = rot.inv_freq.float().to(device)
        self.rope_scaling = float(getattr(rot, "attention_scaling", 1.0))
        self.sm_scale = float(getattr(self.layers[0].self_attn, "scaling", self.D ** -0.5))
        self.kv_linears = [m for lay in self.layers for m in (lay.self_attn.k_proj, lay.self_attn.v_proj)]
        self._rope_table = None

    # --- one step ------------------------------------------------------------------------------------------------
    def _rope(self, n: int) -> tuple:
        """RoPE for pre-RoPE keys: (inv_freq, scaling[, the kernel's cos | sin table of >= n positions, kept and
        grown in powers of two, so the layers and steps share one instead of building it per call])."""
        if self.kernels != "triton":
            return self.inv_freq, self.rope_scaling
        if self._rope_table is None or self._rope_table.shape[0] < n:
            self._rope_table = rope_table(self.inv_freq, self.rope_scaling, 1 << max(8, (n - 1).bit_length()))
        return self.inv_freq, self.rope_scaling, self._rope_table

    def _check_batch(self, tables, token_ids):
        if not isinstance(tables, (list, tuple)) or not tables:
            raise ValueError("tables must be a non-empty list of PageTable, one per sequence.")
        if not isinstance(token_ids, (list, tuple)) or len(token_ids) != len(tables):
            raise ValueError(f"token_ids must be a list with one LongTensor per table ({len(tables)}).")
        ids = []
        for i, (t, x) in enumerate(zip(tables, token_ids)):
            if not isinstance(t, PageTable) or t.pool is not self.pool:
                raise ValueError(f"tables[{i}] is not a PageTable of this decoder's pool.")
            x = torch.as_tensor(x)
            if x.dtype != torch.long or x.dim() != 1 or x.numel() == 0:
                raise ValueError(f"token_ids[{i}] must be a non-empty 1-D LongTensor, got {x.dtype} {tuple(x.shape)}.")
            self.pool.check_pages(t.pages, f"tables[{i}]")
            ids.append(x)
        if len({id(t) for t in tables}) != len(tables):
            raise ValueError("the same PageTable appears twice in one batch.")
        return ids

    @torch.no_grad()
    def step(self, tables: list[PageTable], token_ids: list[torch.Tensor], all_logits: bool = False):
        """One forward of the batch (contract in atom_lab/kv_cache.py). Returns a list of float32 logits."""
        ids = self._check_batch(tables, token_ids)
        need = sum(t.pages_for(x.numel()) for t, x in zip(tables, ids))
        if need > self.pool.free_pages:
            raise KVCacheFull(need, self.pool.free_pages)
        if self.pool.fmt.has_window:
            new_windows = sum(t.window is None for t in tables)
            if new_windows > self.pool.free_windows:
                raise KVCacheFull(0, self.pool.free_pages, f"{new_windows} float window(s) needed, "
                                  f"{self.pool.free_windows} free (max_seqs={self.pool.max_seqs})")
        for t, x in zip(tables, ids):
            t.reserve(x.numel())
        pool, dev, D = self.pool, self.device, self.D
        lens = [x.numel() for x in ids]
        starts = [t.length for t in tables]
        pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)]).to(dev)
        slots = torch.cat([t.slots(s, n) for t, s, n in zip(tables, starts, lens)]).to(dev)
        flat = torch.cat(ids).to(dev)
        N = flat.numel()
        decode = [i for i, n in enumerate(lens) if n == 1]
        prefill = [i for i, n in enumerate(lens) if n > 1]
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        new_len = [s + n for s, n in zip(starts, lens)]
        if decode:
            maxp = max(len(tables[i].pages) for i in decode)
            pt = torch.zeros(len(decode), maxp, dtype=torch.int32)
            for r, i in enumerate(decode):
                pt[r, : len(tables[i].pages)] = torch.tensor(tables[i].pages, dtype=torch.int32)
            pt = pt.to(dev)
            dlen = torch.tensor([new_len[i] for i in decode], dtype=torch.int32, device=dev)
            drows = torch.tensor([offsets[i] for i in decode], device=dev)
        # on a GPU the per-layer NaN/inf check of the K/V rows would sync twice per layer, serializing the host's
        # launches with the GPU's work (a 4096-token Llama-2-7B prefill step took host + GPU time instead of the
        # larger of the two); the logits are checked once at the end instead, which any bad row reaches (the
        # reference write has no check of its own)
        late_check = dev.type == "cuda" or self.kernels != "triton"
        if self.kernels == "triton":
            write = functools.partial(kv_write, check_finite=not late_check)
        else:
            write = kv_write_ref
        decode_attn = paged_decode_attention if self.kernels == "triton" else paged_decode_attention_ref
        fmt = pool.fmt
        rope = self._rope(max(len(t.pages) for t in tables) * pool.page_size) if fmt.rope == "pre" else None
        plan = _WindowPlan(tables, starts, lens, offsets, decode, dev) if fmt.has_window else None

        x = self.inner.embed_tokens(flat)[None]  # [1, N, H]
        rope_rows = RopeAt(self.inner, x, pos, self.kernels)

        with _kv_outputs_unquantized(self.kv_linears):
            for li, layer in enumerate(self.layers):
                attn = layer.self_attn
                residual = x
                h = layer.input_layernorm(x)
                q = attn.q_proj(h).view(N, self.Hq, D)
                k = attn.k_proj(h).view(N, self.Hkv, D)
                v = attn.v_proj(h).view(N, self.Hkv, D)
                # K before RoPE is stored as it comes, and the fresh prompt's attention still needs it rotated:
                # rotate a copy when the rotation works in place
                pre = fmt.rope == "pre"
                q, k_rot = rope_rows.rotate(q, k.clone() if pre and rope_rows.in_place else k)
                kin = k if pre else k_rot
                kc, ksz, vc, vsz = pool.k_codes[li], pool.k_sz[li], pool.v_codes[li], pool.v_sz[li]
                out = torch.empty(N, self.Hq, D, dtype=torch.float32, device=dev)
                if plan is not None:
                    self._windowed_layer(li, plan, kin, v, q, out, rope)
                else:
                    write(kin, slots, kc, ksz, fmt.bits, pool.group_size)
                    write(v, slots, vc, vsz, fmt.bits, pool.group_size)
                    if decode:
                        out[drows] = decode_attn(q[drows], kc, ksz, vc, vsz, pt, dlen, fmt.bits, pool.page_size,
                                                 self.sm_scale, rope)
                    for i in prefill:
                        a, b = offsets[i], offsets[i + 1]
                        if self.prefill == "fresh" and starts[i] == 0:
                            # a whole prompt (or a recompute after preemption): every key is fresh, so nothing is
                            # read back from the cache, and it attends in the model's dtype with SDPA's causal flag
                            # (a mask would rule out its flash / cuDNN kernels: float32 with a mask took as long as
                            # all the prefill GEMMs of Llama-2-7B on the H200, benchmarks/serve_profile.py)
                            out[a:b] = sdpa_rows(q[a:b], k_rot[a:b], v[a:b], self.sm_scale)
                            continue
                        pages = torch.tensor(tables[i].pages, dtype=torch.int64, device=dev)
                        kk = gather_kv_ref(kc, ksz, fmt.bits, pages, new_len[i], pool.page_size)
                        vv = gather_kv_ref(vc, vsz, fmt.bits, pages, new_len[i], pool.page_size)
                        if rope is not None:
                            kk = rope_ref(kk, torch.arange(new_len[i], device=dev), rope[0], rope[1])
                        if self.prefill == "fresh":
                            kk[starts[i]:], vv[starts[i]:] = k_rot[a:b].float(), v[a:b].float()
                        out[a:b] = prefill_attention(q[a:b].float(), kk, vv, self.sm_scale)
                x = residual + attn.o_proj(out.to(x.dtype).view(1, N, self.Hq * D))
                residual = x
                x = residual + layer.mlp(layer.post_attention_layernorm(x))
        for t, n in zip(tables, lens):
            t.length += n
        x = self.inner.norm(x)[0]
        if not all_logits:  # each sequence's last position only
            x = x[torch.tensor([o - 1 for o in offsets[1:]], device=dev)]
        logits = self.model.lm_head(x).float()
        if late_check:
            check_logits(logits)
        if all_logits:
            return [logits[offsets[i]: offsets[i + 1]] for i in range(len(lens))]
        return list(logits)

    def _windowed_layer(self, li, plan, kin, v, q, out, rope):
        """One layer's write + attention for a format with a float window (KVFormat.window / key_tokens).

        Tokens [0, n_q) of a sequence of n tokens are codes, [n_q, n) float rows of its ring (n_q =
        fmt.quantized_length(n)). A step moves the tokens [n_q_old, n_q_new) (some from the ring, some from the
        chunk) into codes, then writes the chunk's newest tokens into the ring: all reads happen before any write,
        because a new token can take the ring row of one that is being quantized. Everything that enters the cache
        is first rounded to fmt.dtype (the ring's dtype), so a token's codes do not depend on whether it waited in
        the ring. Prefill: query i sees tokens j < n_q(i + 1) as codes and n_q(i + 1) <= j <= i in float, exactly
        what decode would have shown it (prefill="fresh": codes only below the chunk's start, float after)."""
        pool, fmt, D, dev = self.pool, self.pool.fmt, self.D, self.device
        kc, ksz, vc, vsz = pool.k_codes[li], pool.k_sz[li], pool.v_codes[li], pool.v_sz[li]
        kw, vw = pool.k_win[li], pool.v_win[li]
        kin_r, v_r = kin.to(fmt.dtype), v.to(fmt.dtype)
        old = {i: (kw[r].float(), vw[r].float()) for i, r in plan.old_ring.items()}  # before any write
        if plan.M:
            xk = torch.empty(plan.M, self.Hkv, D, dtype=torch.float32, device=dev)
            xv = torch.empty_like(xk)
            xk[plan.q_dst_ring], xv[plan.q_dst_ring] = kw[plan.q_src_ring].float(), vw[plan.q_src_ring].float()
            xk[plan.q_dst_chunk] = kin_r[plan.q_src_chunk].float()
            xv[plan.q_dst_chunk] = v_r[plan.q_src_chunk].float()
            triton = self.kernels == "triton"
            if fmt.key_tokens:
                (kv_write_channel if triton else kv_write_channel_ref)(xk, plan.q_slots, kc, ksz, fmt.bits,
                                                                       fmt.key_tokens)
            else:
                (kv_write if triton else kv_write_ref)(xk, plan.q_slots, kc, ksz, fmt.bits, pool.group_size)
            (kv_write if triton else kv_write_ref)(xv, plan.q_slots, vc, vsz, fmt.bits, pool.group_size)
        kw[plan.ring_dst], vw[plan.ring_dst] = kin_r[plan.ring_src], v_r[plan.ring_src]
        if plan.decode:
            rows = plan.drows
            window = (kw, vw, plan.win_ids, plan.qlen, pool.window_capacity)
            attn = paged_decode_attention if self.kernels == "triton" else paged_decode_attention_ref
            out[rows] = attn(q[rows], kc, ksz, vc, vsz, plan.pt, plan.dlen, fmt.bits, pool.page_size,
                             self.sm_scale, rope, key_tokens=fmt.key_tokens, window=window)
        for i, (s, n, a, b) in plan.prefill.items():
            nq0, nq1 = fmt.quantized_length(s), fmt.quantized_length(n)
            pages = torch.tensor(plan.tables[i].pages, dtype=torch.int64, device=dev)
            kq = gather_kv_ref(kc, ksz, fmt.bits, pages, nq1, pool.page_size, fmt.key_tokens)
            vq = gather_kv_ref(vc, vsz, fmt.bits, pages, nq1, pool.page_size)
            fresh = self.prefill == "fresh"
            kf = torch.cat([old[i][0], (kin[a:b] if fresh else kin_r[a:b]).float()])  # tokens [nq0, n)
            vf = torch.cat([old[i][1], (v[a:b] if fresh else v_r[a:b]).float()])
            if rope is not None:
                kq = rope_ref(kq, torch.arange(nq1, device=dev), rope[0], rope[1])
                kf = rope_ref(kf, torch.arange(nq0, n, device=dev), rope[0], rope[1])
            qpos = torch.arange(s, n, device=dev)
            bound = torch.full_like(qpos, nq0) if fresh else fmt.quantized_length(qpos + 1)
            jq, jf = torch.arange(nq1, device=dev), torch.arange(nq0, n, device=dev)
            mask = torch.cat([jq[None] < bound[:, None], (jf[None] >= bound[:, None]) & (jf[None] <= qpos[:, None])],
                             dim=1)
            out[a:b] = prefill_attention(q[a:b].float(), torch.cat([kq, kf]), torch.cat([vq, vf]), self.sm_scale,
                                         mask=mask)

    # --- loops ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[torch.Tensor], max_new_tokens: int = 32, eos_token_id: int | None = None):
        """Greedy generation for a batch of prompts (LongTensor [T_i] each) -> list of generated ids per prompt.
        The pages are freed at the end (also on error)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int.")
        tables = [PageTable(self.pool) for _ in prompts]
        out = [[] for _ in prompts]
        try:
            logits = self.step(tables, list(prompts))
            live = list(range(len(prompts)))
            for _ in range(max_new_tokens):
                nxt = [int(lg.argmax()) for lg in logits]
                for i, tok in zip(live, nxt):
                    out[i].append(tok)
                keep = [(i, tok) for i, tok in zip(live, nxt) if tok != eos_token_id]
                if not keep or len(out[live[0]]) >= max_new_tokens:
                    break
                live = [i for i, _ in keep]
                logits = self.step([tables[i] for i in live], [torch.tensor([tok]) for _, tok in keep])
        finally:
            for t in tables:
                if t.pages:
                    t.free()
        return out

    @torch.no_grad()
    def window_nll(self, windows: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Teacher-forced summed NLL per window through the cache. windows: LongTensor [n, L]; chunk: tokens per
        prefill step (None = the whole window in one step). Returns float64 [n]."""
        out = torch.empty(windows.shape[0], dtype=torch.float64)
        L = windows.shape[1]
        chunk = chunk or L
        for w in range(windows.shape[0]):
            t = PageTable(self.pool)
            try:
                logits = torch.cat([self.step([t], [windows[w, s: s + chunk]], all_logits=True)[0]
                                    for s in range(0, L, chunk)])
            finally:
                t.free()
            tgt = windows[w, 1:].to(logits.device)
            out[w] = torch.nn.functional.cross_entropy(logits[:-1], tgt, reduction="sum").double().cpu()
        return out

    def perplexity(self, windows: torch.Tensor, chunk: int | None = None) -> float:
        nll = self.window_nll(windows, chunk)
        return math.exp(nll.sum().item() / (windows.shape[0] * (windows.shape[1] - 1)))


class _WindowPlan:
    """Host-side index plan of one step for a format with a float window (the same for every layer).

    q_*: the M rows that become codes this step (tokens [n_q_old, n_q_new) of each sequence, in order, so a KIVI
    key group is Tg consecutive rows with consecutive slots), gathered from the ring (q_src_ring -> q_dst_ring) and
    from the chunk (q_src_chunk -> q_dst_chunk), written at q_slots. ring_src -> ring_dst: chunk rows that enter
    the ring. old_ring: per prefill sequence, the ring rows of its tokens [n_q_old, start). Decode sequences:
    page table pt, lengths dlen, quantized lengths qlen and window ids win_ids for the decode kernel."""

    def __init__(self, tables, starts, lens, offsets, decode, dev):
        pool = tables[0].pool
        fmt, cap = pool.fmt, pool.window_capacity
        self.tables = tables
        lst = {k: [] for k in ("q_src_ring", "q_dst_ring", "q_src_chunk", "q_dst_chunk", "q_slots", "ring_src",
                               "ring_dst")}
        self.old_ring, self.prefill = {}, {}
        M = 0
        for i, t in enumerate(tables):
            s, T, a = starts[i], lens[i], offsets[i]
            n = s + T
            nq0, nq1 = fmt.quantized_length(s), fmt.quantized_length(n)
            base = t.window * cap
            ring = list(range(nq0, min(nq1, s)))  # waited in the ring, now quantized
            chunk = list(range(s, max(nq1, s)))  # straight from the chunk into codes
            lst["q_src_ring"] += [base + p % cap for p in ring]
            lst["q_dst_ring"] += range(M, M + len(ring))
            lst["q_src_chunk"] += [a + p - s for p in chunk]
            lst["q_dst_chunk"] += range(M + len(ring), M + len(ring) + len(chunk))
            if nq1 > nq0:
                lst["q_slots"] += t.slots(nq0, nq1 - nq0).tolist()
            M += nq1 - nq0
            newest = range(max(nq1, s), n)
            lst["ring_src"] += [a + p - s for p in newest]
            lst["ring_dst"] += [base + p % cap for p in newest]
            if T > 1:
                self.old_ring[i] = torch.tensor([base + p % cap for p in range(nq0, s)], dtype=torch.long,
                                                device=dev)
                self.prefill[i] = (s, n, a, a + T)
        for k, v in lst.items():
            setattr(self, k, torch.tensor(v, dtype=torch.long, device=dev))
        self.M = M
        self.decode = decode
        if decode:
            maxp = max(len(tables[i].pages) for i in decode)
            pt = torch.zeros(len(decode), maxp, dtype=torch.int32)
            for r, i in enumerate(decode):
                pt[r, : len(tables[i].pages)] = torch.tensor(tables[i].pages, dtype=torch.int32)
            self.pt = pt.to(dev)
            n = [starts[i] + lens[i] for i in decode]
            self.dlen = torch.tensor(n, dtype=torch.int32, device=dev)
            self.qlen = torch.tensor([fmt.quantized_length(x) for x in n], dtype=torch.int32, device=dev)
            self.win_ids = torch.tensor([tables[i].window for i in decode], dtype=torch.int32, device=dev)
            self.drows = torch.tensor([offsets[i] for i in decode], device=dev)


# ---------------------------------------------------------------------------------------------------------------
# The float simulation of a KV format (fake quantization inside the HF model), to compare the real cache with
# ---------------------------------------------------------------------------------------------------------------
def fake_quantize_kv(x: torch.Tensor, fmt: KVFormat, head_dim: int) -> torch.Tensor:
    """x: float [..., H * head_dim] or [..., head_dim] -> the values the cache would hand back (x's dtype)."""
    if fmt.bits == 16:
        return x.to(fmt.dtype).to(x.dtype)
    shape = x.shape
    y = fake_quantize_asymmetric(x.reshape(*shape[:-1], -1, head_dim), fmt.bits, fmt.group(head_dim))
    return y.reshape(shape)


def fake_quantize_keys_channel(k: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """KIVI keys in float: k [B, H, L, D] -> each channel fake-quantized over groups of fmt.key_tokens consecutive
    tokens (positions 0..Tg-1, Tg..2Tg-1, ...); the incomplete last group is left as it is (the cache never holds
    it as codes). Same values as kernels/kv_cache.py quantize_kv_channel_ref + dequantize_kv_channel_ref."""
    B, H, L, D = k.shape
    tg = fmt.key_tokens
    L0 = L // tg * tg
    g = k[:, :, :L0].reshape(B, H, L0 // tg, tg, D).transpose(-1, -2)  # [B, H, L0/Tg, D, Tg]
    q = fake_quantize_asymmetric(g, fmt.bits, tg).transpose(-1, -2).reshape(B, H, L0, D)
    return torch.cat([q, k[:, :, L0:]], dim=2)


def window_mask(fmt: KVFormat, L: int, device=None) -> torch.Tensor:
    """bool [L, 2L]: which of the keys [codes of tokens 0..L-1 ; float copies of tokens 0..L-1] query i sees in a
    format with a float window: codes of j < n_q(i + 1), float rows of n_q(i + 1) <= j <= i (n_q =
    fmt.quantized_length), as decode at length i + 1 does."""
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    bound = fmt.quantized_length(i + 1)
    return torch.cat([j < bound, (j >= bound) & (j <= i)], dim=1)


class _WindowAttention:
    """Stands in for transformers' ALL_ATTENTION_FUNCTIONS inside simulate_kv for a format with a float window:
    K arrives as [codes ; float] (2L keys, from the patched apply_rotary_pos_emb), V is doubled here the same way,
    and the window mask replaces the causal one."""

    def __init__(self, fmt: KVFormat, head_dim: int):
        self.fmt, self.D = fmt, head_dim

    def get_interface(self, name, default):
        return self

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        B, Hq, L, D = query.shape
        if key.shape[2] != 2 * L:
            raise ValueError("simulate_kv with a float window scores whole sequences in one forward (no past "
                             "cache): call model(ids, use_cache=False).")
        vr = value.to(self.fmt.dtype).to(value.dtype)
        v2 = torch.cat([fake_quantize_kv(vr, self.fmt, D), vr], dim=2)
        mask = window_mask(self.fmt, L, query.device)
        out = torch.nn.functional.scaled_dot_product_attention(query, key.to(query.dtype), v2.to(query.dtype),
                                                               attn_mask=mask, scale=scaling,
                                                               enable_gqa=Hq != key.shape[1])
        return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def simulate_kv(model, fmt: KVFormat):
    """Inside the block, model(...) fake-quantizes V and K (before RoPE for fmt.rope == "pre", after it for
    "post") exactly as the paged cache stores them. The model's own layers must not quantize K/V already.
    A format with a float window (KVFormat.window / key_tokens) also replaces the attention: each query sees the
    older tokens as codes and the newest ones in float (window_mask), for whole-sequence forwards."""
    import importlib

    c = model.config
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    mod = importlib.import_module(type(model.model.layers[0].self_attn).__module__)
    for layer in model.model.layers:
        a = layer.self_attn
        if any(isinstance(m, QuantLinear) and m.out_bits < 16 for m in (a.k_proj, a.v_proj)):
            raise ValueError("the model's k_proj/v_proj already fake-quantize K/V (kv_bits < 16): quantize it "
                             "with kv_bits=16 to simulate another KV format.")
    if fmt.has_window:
        with _simulate_window(mod, fmt, D):
            yield model
        return
    hooks = []
    for layer in model.model.layers:
        a = layer.self_attn
        hooks.append(a.v_proj.register_forward_hook(lambda m, i, o: fake_quantize_kv(o, fmt, D)))
        if fmt.rope == "pre":
            hooks.append(a.k_proj.register_forward_hook(lambda m, i, o: fake_quantize_kv(o, fmt, D)))
    original = mod.apply_rotary_pos_emb
    if fmt.rope == "post":
        def rotate_then_quantize(q, k, cos, sin, *args, **kwargs):
            q, k = original(q, k, cos, sin, *args, **kwargs)
            return q, fake_quantize_kv(k, fmt, D)
        mod.apply_rotary_pos_emb = rotate_then_quantize
    try:
        yield model
    finally:
        mod.apply_rotary_pos_emb = original
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _simulate_window(mod, fmt: KVFormat, D: int):
    """simulate_kv for a format with a float window: apply_rotary_pos_emb returns K as [codes ; float] along the
    sequence (each rounded to fmt.dtype first, as the cache does), _WindowAttention does the rest."""
    original_rope, original_attn = mod.apply_rotary_pos_emb, mod.ALL_ATTENTION_FUNCTIONS

    def quant(k):  # k [B, H, L, D] in fmt.dtype's values
        return fake_quantize_keys_channel(k, fmt) if fmt.key_tokens else fake_quantize_kv(k, fmt, D)

    def rope_two_ways(q, k, cos, sin, *args, **kwargs):
        def rnd(t):
            return t.to(fmt.dtype).to(t.dtype)
        if fmt.rope == "pre":
            kr = rnd(k)
            q2, k_float = original_rope(q, kr, cos, sin, *args, **kwargs)
            _, k_codes = original_rope(q, quant(kr), cos, sin, *args, **kwargs)
        else:
            q2, k_rot = original_rope(q, k, cos, sin, *args, **kwargs)
            k_float = rnd(k_rot)
            k_codes = quant(k_float)
        return q2, torch.cat([k_codes, k_float], dim=2)

    mod.apply_rotary_pos_emb, mod.ALL_ATTENTION_FUNCTIONS = rope_two_ways, _WindowAttention(fmt, D)
    try:
        yield
    finally:
        mod.apply_rotary_pos_emb, mod.ALL_ATTENTION_FUNCTIONS = original_rope, original_attn
