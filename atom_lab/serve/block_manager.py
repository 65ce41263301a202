"""The block manager: which KV pages of the pool each sequence holds.

It only does the bookkeeping (integer page ids, a free list, a reference count per page); the pages themselves
(the bytes) live in the paged KV cache of atom_lab.kv_cache, which the model runner writes and reads through the
page tables built from `Sequence.pages`. Token t of a sequence lives in page pages[t // page_size], slot
t % page_size. A page can be held by several sequences (`share`: e.g. n samples of one prompt); it returns to the
free list when its last holder frees it. The simulator uses the same class with no pool behind it.
"""
from __future__ import annotations

from collections import deque

from atom_lab.serve.request import Sequence


class OutOfPages(RuntimeError):
    """Raised when an allocation is attempted without free pages (the scheduler checks first, so this is a bug)."""


class BlockManager:
    """Pages 0..num_pages-1 of page_size tokens each."""

    def __init__(self, num_pages: int, page_size: int, page_ids: list[int] | None = None):
        """page_ids: the pool's ids of the pages this manager hands out (default 0..num_pages-1)."""
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages={num_pages!r} must be an int >= 1 (the KV pool holds no page otherwise; "
                             "raise the memory budget or shrink the model).")
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size={page_size!r} must be an int >= 1 (tokens per page, e.g. 16).")
        self.num_pages, self.page_size = num_pages, page_size
        ids = list(range(num_pages)) if page_ids is None else list(page_ids)
        if len(ids) != num_pages or len(set(ids)) != num_pages:
            raise ValueError(f"page_ids must hold num_pages={num_pages} distinct ids, got {len(ids)}.")
        self.free_pages: deque[int] = deque(ids)
        self.ref_count = dict.fromkeys(ids, 0)

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _take(self) -> int:
        if not self.free_pages:
            raise OutOfPages("no free KV page (call can_allocate / can_append before allocating)")
        page = self.free_pages.popleft()
        assert self.ref_count[page] == 0
        self.ref_count[page] = 1
        return page

    # --- prefill: pages for every token the sequence has now ------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        return self.pages_for(len(seq)) - len(seq.pages) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Give seq pages for all len(seq) tokens (it may already hold some, e.g. shared ones)."""
        need = self.pages_for(len(seq)) - len(seq.pages)
        if need > self.num_free:
            raise OutOfPages(f"sequence {seq.id} needs {need} pages, {self.num_free} are free")
        seq.pages.extend(self._take() for _ in range(need))

    # --- decode: room for one more token ---------------------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        """True when seq's newest token (not yet in the cache) has a slot: in a page it holds, or a free page."""
        return len(seq) <= len(seq.pages) * self.page_size or self.num_free >= 1

    def append(self, seq: Sequence) -> None:
        if len(seq) > len(seq.pages) * self.page_size:
            seq.pages.append(self._take())

    # --- release and sharing ---------------------------------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Drop seq's hold on its pages (a page returns to the free list when nobody holds it)."""
        for page in reversed(seq.pages):
            self.ref_count[page] -= 1
            assert self.ref_count[page] >= 0, f"page {page} freed more often than held"
            if self.ref_count[page] == 0:
                self.free_pages.append(page)
        seq.pages = []
        seq.num_cached = 0

    def share(self, src: Sequence, dst: Sequence, num_tokens: int) -> None:
        """Let dst hold src's pages for its first num_tokens tokens (full pages only: a shared page is never
        written again, so no copy-on-write is needed). dst must hold no pages yet."""
        if dst.pages:
            raise ValueError(f"sequence {dst.id} already holds pages; share() starts an empty sequence.")
        full = min(num_tokens, src.num_cached) // self.page_size
        for page in src.pages[:full]:
            self.ref_count[page] += 1
        dst.pages = list(src.pages[:full])
        dst.num_cached = full * self.page_size

    def slot(self, seq: Sequence, position: int) -> int:
        """The flat slot index (page * page_size + offset) of token `position` of seq."""
        return seq.pages[position // self.page_size] * self.page_size + position % self.page_size
