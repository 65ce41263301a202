"""A paged KV cache that stores packed INT4/INT8 codes (or fp16/bf16), as Atom's serving system does.

Public API (stable; the serving engine, atom_lab/serve/, builds on it):

    fmt   = KVFormat(bits=4, group_size=None, rope="pre", dtype=torch.float16)
              bits 16 (float, `dtype`), 8 or 4: asymmetric, one float16 (scale, zero) per token per KV head
              (group_size None = head_dim, Atom) or per sub-head group of group_size channels;
              rope "pre": K stored BEFORE RoPE and rotated on read (Atom), "post": after RoPE (QServe, KIVI, vLLM).
              KVFormat.from_config(atom_config) maps AtomConfig.kv_bits / kv_group_size / kv_rope.
              KIVI's two options (bits 4/8): key_tokens=Tg quantizes each key CHANNEL over groups of Tg consecutive
              tokens (values stay per token); window=R keeps the newest >= R tokens in float (fmt.dtype). The
              newest incomplete key group waits in float too: tokens [0, fmt.quantized_length(n)) are codes, the
              rest (at most R + Tg - 1) a per-sequence float ring. Everything entering such a cache is rounded to
              fmt.dtype first, so a token's codes do not depend on how long it waited in the ring.
    pool  = PagePool(num_layers, num_kv_heads, head_dim, fmt, page_size=32, budget_bytes=... | num_pages=...)
              one allocation per layer for K and V (+ scales); capacity = the pages that fit in budget_bytes.
              pool.num_pages, pool.page_size, pool.free_pages (count), pool.bytes_per_token (= allocated bytes /
              (num_pages * page_size), the real allocation), pool.bytes_per_page, pool.nbytes.
              pool.allocate(n) -> list[int] page ids (raises KVCacheFull, allocating nothing, when fewer are free);
              pool.free(pages); pool.is_allocated(page).
              PagePool.for_model(model, fmt, page_size, budget_bytes=..., num_pages=...) reads the model's shapes.
              max_seqs=S (formats with a window only): S float rings, counted in nbytes and the budget;
              pool.allocate_window() / free_window(w) (PageTable does it for you); KVCacheFull when all are taken.
    table = PageTable(pool)        one sequence: table.pages (list[int]), table.length (tokens written)
              table.reserve(n): make room for n more tokens (allocates pages; KVCacheFull leaves it unchanged);
              table.free(): give every page back. Tables made by an engine's own block manager may pass their own
              page lists: PageTable(pool, pages=[...], length=L) (pages must be allocated in the pool; with a
              float window also window=w, its ring id). table.window, table.quantized_length.
    run   = PagedDecoder(model, pool)   a float HF Llama-architecture causal LM (llama / mistral / qwen2), or one
              quantized by atom_lab.quantize_model on backend "reference" or "triton".
              run.step(tables, token_ids, all_logits=False) -> list of logits
                  tables: list[PageTable], one per sequence of the batch; token_ids: list of LongTensor [T_i] (a
                  prompt chunk for prefill, one token for decode; sequences of any lengths in one batch).
                  Writes the new K/V into the pages (reserving them first: KVCacheFull before anything is
                  written), advances each table.length by T_i, and returns per sequence float32 logits [V] of the
                  last position, or [T_i, V] of every position with all_logits=True (teacher-forced perplexity).
              run.generate(prompts, max_new_tokens, eos_token_id=None) -> list[list[int]] greedy, batched.
              run.perplexity(windows, chunk=None) -> float, teacher-forced through the cache.
    KVCacheFull(RuntimeError): pool has too few free pages or float windows (.needed, .free).
    PageError(ValueError): a table names pages the pool did not hand out, or a sequence longer than its pages.

Kernels: on backend "triton" (or kernels="triton") the new rows go through kernels/kv_cache.py kv_write and decode
attention through kernels/attention.py paged_decode_attention (split-KV, dequantization in registers); on
"reference" through their PyTorch twins (KIVI keys: kv_write_channel / kv_write_channel_ref; the float ring is a
second launch of the decode kernel, merged by LSE). Prefill attention is SDPA over the sequence's K/V as read back
from the cache (so teacher-forced perplexity equals the float simulation of the same KV format); prefill="fresh" uses the
chunk's own float K/V instead, as Atom's prefill does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from atom_lab.kernels.kv_cache import code_bytes

ROPE_MODES = ("pre", "post")


class KVCacheFull(RuntimeError):
    """The pool has fewer free pages than a reservation needs. Catch it to preempt or queue a sequence."""

    def __init__(self, needed: int, free: int, what: str | None = None):
        what = what or f"{needed} page(s) needed, {free} free"
        super().__init__(f"KV cache full: {what}. Free finished sequences (PageTable.free), preempt one, or build "
                         "the PagePool with a larger budget_bytes (or max_seqs).")
        self.needed, self.free = needed, free


class PageError(ValueError):
    """A page table that does not fit the pool: foreign or freed pages, or more tokens than its pages hold."""


@dataclass(frozen=True)
class KVFormat:
    """How K and V are stored. See the module docstring."""
    bits: int = 4
    group_size: int | None = None
    rope: str = "pre"
    dtype: torch.dtype = torch.float16
    key_tokens: int | None = None
    window: int = 0

    def __post_init__(self):
        if self.bits not in (4, 8, 16):
            raise ValueError(f"KVFormat bits={self.bits!r}: use 16 (float), 8 or 4.")
        if self.rope not in ROPE_MODES:
            raise ValueError(f"KVFormat rope={self.rope!r}: use 'pre' (quantize K before RoPE, Atom) or 'post'.")
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"KVFormat dtype={self.dtype}: use torch.float16 or torch.bfloat16 (float32 for tests).")
        g = self.group_size
        if g is not None and (not isinstance(g, int) or g < 2 or g & (g - 1)):
            raise ValueError(f"KVFormat group_size={g!r}: use None (= head_dim) or a power of two >= 2 dividing it.")
        kt = self.key_tokens
        if kt is not None and (not isinstance(kt, int) or isinstance(kt, bool) or kt < 2 or kt & (kt - 1)):
            raise ValueError(f"KVFormat key_tokens={kt!r}: use None (keys per token) or a power of two >= 2 (KIVI: "
                             "one (scale, zero) per channel per key_tokens tokens, e.g. 16 or 32), at most the "
                             "page size.")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise ValueError(f"KVFormat window={self.window!r}: use an int >= 0 (the newest tokens kept in "
                             "full precision; 0 = none).")
        if self.bits == 16 and (kt is not None or self.window):
            raise ValueError("KVFormat bits=16 stores everything in float: key_tokens and window only apply to a "
                             "quantized cache (bits 4 or 8).")

    @classmethod
    def from_config(cls, config, dtype: torch.dtype = torch.float16) -> KVFormat:
        """The KV format of an AtomConfig (kv_bits 16 -> float cache)."""
        bits = config.kv_bits if config.kv_bits in (4, 8) else 16
        if config.kv_bits not in (4, 8, 16):
            raise ValueError(f"kv_bits={config.kv_bits} has no cache format; the paged cache stores 4, 8 or 16 bits.")
        return cls(bits=bits, group_size=config.kv_group_size, rope=getattr(config, "kv_rope", "pre"), dtype=dtype)

    def group(self, head_dim: int) -> int:
        G = self.group_size or head_dim
        if head_dim % G:
            raise ValueError(f"KVFormat group_size={G} does not divide head_dim={head_dim}; use a divisor of "
                             f"{head_dim} or None (one (scale, zero) per token per head).")
        return G

    # --- KIVI: per-channel keys over token groups, and the full-precision window -----------------------------------
    @property
    def token_group(self) -> int:
        """Tokens that share one key (scale, zero): key_tokens for KIVI keys, 1 for keys per token."""
        return self.key_tokens or 1

    @property
    def has_window(self) -> bool:
        """True when the newest tokens stay in float (a window, or the incomplete group of KIVI keys)."""
        return self.window > 0 or self.key_tokens is not None

    @property
    def window_capacity(self) -> int:
        """Float slots per sequence: at most window + token_group - 1 tokens are unquantized at any time."""
        return self.window + self.token_group - 1 if self.has_window else 0

    def quantized_length(self, n):
        """How many of a sequence's first n tokens are stored quantized: the largest multiple of token_group that
        leaves at least `window` newest tokens in float (n an int, or an int tensor)."""
        tg = self.token_group
        q = (n - self.window) // tg * tg
        return max(q, 0) if isinstance(q, int) else q.clamp(min=0)

    def bytes_per_token_head(self, head_dim: int, which: str = "v") -> float:
        """Bytes of K (which="k") or V (which="v") of one quantized token of one head: codes + float16
        (scale, zero) pairs (KIVI keys: head_dim pairs per key_tokens tokens). The float window is extra."""
        if self.bits == 16:
            return head_dim * torch.tensor([], dtype=self.dtype).element_size()
        if which == "k" and self.key_tokens:
            return code_bytes(self.bits, head_dim) + 4 * head_dim / self.key_tokens
        return code_bytes(self.bits, head_dim) + 4 * (head_dim // self.group(head_dim))

    @property
    def name(self) -> str:
        if self.bits == 16:
            return str(self.dtype).replace("torch.", "")
        g = f", groups of {self.group_size}" if self.group_size else ", per head"
        k = f", KIVI keys/{self.key_tokens} tok" if self.key_tokens else ""
        w = f", window {self.window}" if self.window else ""
        return f"int{self.bits}{g}{k}{w}, {self.rope}-RoPE"


class PagePool:
    """Fixed-size pages of K/V for every layer. Page p holds tokens [p*page_size, (p+1)*page_size) of slots.

    Storage per layer l (tensors on `device`), head-major pages: page p of head h is one contiguous block, and
    slot s = p * page_size + offset of head h is row (s // page_size, h, s % page_size) (kernels/kv_cache.py
    read_slots / write_slots / page_row: the one place that rule lives):
        k_codes[l], v_codes[l]: uint8 [num_pages, num_kv_heads, page_size, code_bytes] (bits 4/8) or
                                fmt.dtype [num_pages, num_kv_heads, page_size, head_dim] (bits 16);
        k_sz[l], v_sz[l]:       float16 [num_pages, num_kv_heads, page_size, head_dim / G, 2] (scale, zero),
                                None for bits 16; KIVI keys (fmt.key_tokens = Tg): k_sz[l] is float16
                                [num_pages, num_kv_heads, page_size / Tg, head_dim, 2], one pair per channel per
                                group of Tg consecutive slots (group row slot // Tg; a group never straddles a page:
                                Tg divides page_size).
    Why head-major: a decode program reads one head; token-major pages ([slot, head, bytes]) gave it 64-byte pieces
    at a num_kv_heads x 64-byte stride, which capped any INT4 kernel near 3 TB/s on the H200 (benchmarks/NOTES.md,
    KV section, v8). One rule for every format (bf16 rows too), so every kernel addresses the pool one way.
        k_win[l], v_win[l]:     fmt.dtype [max_seqs * W, num_kv_heads, head_dim], W = fmt.window_capacity: each
                                sequence's float window (its newest, not yet quantized tokens) as a ring, token p
                                at row window_id * W + p % W. Only when fmt.has_window (else empty lists).
                                Token-major: a ring is at most W rows per sequence, read once per step.
    max_seqs: the number of float windows (sequences that can hold pages at once); needed when fmt.has_window.
    Their bytes count in nbytes and bytes_per_token and come out of budget_bytes before the pages.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, fmt: KVFormat, page_size: int = 32,
                 budget_bytes: int | None = None, num_pages: int | None = None, device=None,
                 max_seqs: int | None = None):
        if not isinstance(fmt, KVFormat):
            raise TypeError(f"fmt must be an atom_lab.KVFormat, got {type(fmt).__name__}.")
        for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("page_size", page_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int.")
        if page_size & (page_size - 1):
            raise ValueError(f"page_size={page_size} must be a power of two (16, 32, 64: the kernels tile by page).")
        if fmt.bits == 4 and head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for INT4 (two codes per byte).")
        G = fmt.group(head_dim)
        Tg = fmt.token_group
        if page_size % Tg:
            raise ValueError(f"KVFormat key_tokens={Tg} must divide page_size={page_size} (a key group never "
                             "straddles two pages); use key_tokens <= page_size.")
        if fmt.has_window:
            if not isinstance(max_seqs, int) or isinstance(max_seqs, bool) or max_seqs < 1:
                raise ValueError(f"{fmt.name} keeps each sequence's newest tokens in float: pass max_seqs= (a "
                                 f"positive int, the sequences that hold pages at once), got {max_seqs!r}.")
        elif max_seqs is not None:
            raise ValueError(f"max_seqs={max_seqs!r} only applies to a format with a float window "
                             "(KVFormat(window=R) or key_tokens=Tg); leave it out for this format.")
        self.num_layers, self.num_kv_heads, self.head_dim, self.fmt, self.page_size = (
            num_layers, num_kv_heads, head_dim, fmt, page_size)
        self.group_size, self.key_tokens, self.max_seqs = G, fmt.key_tokens, max_seqs or 0
        self.window_capacity = fmt.window_capacity
        per_tok = fmt.bytes_per_token_head(head_dim, "k") + fmt.bytes_per_token_head(head_dim, "v")
        self.bytes_per_page = int(num_layers * num_kv_heads * page_size * per_tok)
        fbytes = torch.tensor([], dtype=fmt.dtype).element_size()
        self.window_bytes = 2 * num_layers * self.max_seqs * self.window_capacity * num_kv_heads * head_dim * fbytes
        if (budget_bytes is None) == (num_pages is None):
            raise ValueError("pass exactly one of budget_bytes= (capacity = the pages that fit) or num_pages=.")
        if num_pages is None:
            num_pages = (int(budget_bytes) - self.window_bytes) // self.bytes_per_page
            if num_pages < 1:
                raise ValueError(f"budget_bytes={budget_bytes} holds no page of {self.bytes_per_page} bytes "
                                 f"({fmt.name}, page_size={page_size}); raise the budget or shrink page_size.")
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages={num_pages!r} must be a positive int.")
        self.num_pages = num_pages
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        page = (num_pages, num_kv_heads, page_size)
        if fmt.bits == 16:
            shape, dt = (*page, head_dim), fmt.dtype
        else:
            shape, dt = (*page, code_bytes(fmt.bits, head_dim)), torch.uint8
        sz_shape = (*page, head_dim // G, 2)
        ksz_shape = (num_pages, num_kv_heads, page_size // Tg, head_dim, 2) if fmt.key_tokens else sz_shape

        def alloc(shape=shape, dt=dt):
            return [torch.zeros(shape, dtype=dt, device=self.device) for _ in range(num_layers)]

        def alloc_sz(shape):
            if fmt.bits == 16:
                return [None] * num_layers
            return alloc(shape, torch.float16)

        self.k_codes, self.v_codes, self.k_sz, self.v_sz = alloc(), alloc(), alloc_sz(ksz_shape), alloc_sz(sz_shape)
        win_shape = (self.max_seqs * self.window_capacity, num_kv_heads, head_dim)
        self.k_win, self.v_win = (alloc(win_shape, fmt.dtype), alloc(win_shape, fmt.dtype)) if fmt.has_window \
            else ([], [])
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: low ids first
        self._allocated = torch.zeros(num_pages, dtype=torch.bool)
        self._free_windows = list(range(self.max_seqs - 1, -1, -1))
        self._windows_used = torch.zeros(self.max_seqs, dtype=torch.bool)

    @classmethod
    def for_model(cls, model, fmt: KVFormat, page_size: int = 32, budget_bytes: int | None = None,
                  num_pages: int | None = None, device=None, max_seqs: int | None = None) -> PagePool:
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        device = device or next(model.parameters()).device
        return cls(c.num_hidden_layers, heads, head_dim, fmt, page_size, budget_bytes, num_pages, device, max_seqs)

    # --- sizes ---------------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes really allocated by the pool's tensors."""
        ts = self.k_codes + self.v_codes + self.k_sz + self.v_sz + self.k_win + self.v_win
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    @property
    def bytes_per_token(self) -> float:
        """Allocated bytes per token slot (all layers, K and V, codes and scales, and the float windows)."""
        return self.nbytes / (self.num_pages * self.page_size)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def free_windows(self) -> int:
        """Float-window rings not held by a sequence (formats with KVFormat.window / key_tokens)."""
        return len(self._free_windows)

    # --- pages ---------------------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """n free page ids, or KVCacheFull (nothing allocated) when fewer than n are free."""
        if n > len(self._free):
            raise KVCacheFull(n, len(self._free))
        pages = [self._free.pop() for _ in range(n)]
        self._allocated[pages] = True
        return pages

    def free(self, pages) -> None:
        pages = list(pages)
        bad = [p for p in pages if not (0 <= p < self.num_pages) or not self._allocated[p]]
        if bad:
            raise PageError(f"cannot free page(s) {bad[:4]}: not allocated in this pool (double free, or pages of "
                            "another pool).")
        self._allocated[pages] = False
        self._free.extend(reversed(pages))

    def allocate_window(self) -> int:
        """A free float-window id (formats with a window), or KVCacheFull when max_seqs sequences hold one."""
        if not self._free_windows:
            raise KVCacheFull(0, self.free_pages, f"all {self.max_seqs} float windows are in use (max_seqs)")
        w = self._free_windows.pop()
        self._windows_used[w] = True
        return w

    def free_window(self, w: int) -> None:
        if not (0 <= w < self.max_seqs) or not self._windows_used[w]:
            raise PageError(f"cannot free float window {w}: not in use in this pool.")
        self._windows_used[w] = False
        self._free_windows.append(w)

    def is_allocated(self, page: int) -> bool:
        return 0 <= page < self.num_pages and bool(self._allocated[page])

    def check_pages(self, pages, what: str = "page table") -> None:
        bad = [p for p in pages if not self.is_allocated(p)]
        if bad:
            raise PageError(f"{what} holds page(s) {bad[:4]} that this pool has not allocated (freed, or from "
                            "another pool); allocate pages with pool.allocate / PageTable.reserve.")

    def __repr__(self) -> str:
        return (f"PagePool({self.fmt.name}, {self.num_layers} layers x {self.num_kv_heads} KV heads x "
                f"{self.head_dim}, {self.num_pages} pages of {self.page_size} tokens, "
                f"{self.bytes_per_token:.0f} B/token, {self.nbytes / 2**20:.1f} MiB)")


class PageTable:
    """The pages of one sequence, in order, and how many tokens are written (table.length)."""

    def __init__(self, pool: PagePool, pages: list[int] | None = None, length: int = 0,
                 window: int | None = None):
        self.pool = pool
        self.pages = list(pages or [])
        self.length = int(length)
        self.window = window  # float-window id (formats with a window), taken on the first reserve
        if pool.fmt.has_window and self.length and window is None:
            raise PageError(f"{pool.fmt.name} keeps the newest tokens in a float window: pass window= (an id from "
                            "pool.allocate_window()) with a table of length > 0.")
        if self.pages:
            pool.check_pages(self.pages)
        if self.length > len(self.pages) * pool.page_size or self.length < 0:
            raise PageError(f"length={length} does not fit in {len(self.pages)} page(s) of {pool.page_size} tokens.")

    def pages_for(self, n_tokens: int) -> int:
        """Extra pages needed to hold n_tokens more tokens."""
        need = -(-(self.length + n_tokens) // self.pool.page_size)
        return max(0, need - len(self.pages))

    def reserve(self, n_tokens: int) -> None:
        """Allocate the pages for n_tokens more tokens (KVCacheFull leaves the table unchanged)."""
        extra = self.pages_for(n_tokens)
        took = False
        if self.pool.fmt.has_window and self.window is None and n_tokens > 0:
            if extra > self.pool.free_pages:
                raise KVCacheFull(extra, self.pool.free_pages)
            self.window, took = self.pool.allocate_window(), True
        if extra:
            try:
                self.pages += self.pool.allocate(extra)
            except KVCacheFull:
                if took:
                    self.pool.free_window(self.window)
                    self.window = None
                raise

    def slots(self, start: int, n: int) -> torch.Tensor:
        """int64 [n] slot ids of tokens start..start+n-1."""
        ps = self.pool.page_size
        if start + n > len(self.pages) * ps:
            raise PageError(f"tokens up to {start + n} do not fit in this sequence's {len(self.pages)} page(s) of "
                            f"{ps}; call reserve({start + n - self.length}) first.")
        pos = torch.arange(start, start + n)
        pages = torch.tensor(self.pages, dtype=torch.int64)
        return pages[pos // ps] * ps + pos % ps

    def free(self) -> None:
        self.pool.free(self.pages)
        if self.window is not None:
            self.pool.free_window(self.window)
        self.pages, self.length, self.window = [], 0, None

    @property
    def quantized_length(self) -> int:
        """Tokens stored as codes; the rest (length - quantized_length) sit in the float window."""
        return self.pool.fmt.quantized_length(self.length)

    def __repr__(self) -> str:
        return f"PageTable(length={self.length}, pages={self.pages})"
