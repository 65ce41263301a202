"""The scheduler: continuous batching with FCFS admission, separate prefill and decode steps, preemption.

Each call to schedule() returns one step's batch:
  prefill  if waiting requests can be admitted (first come, first served; stop at the first one that does not fit
           so later, shorter ones cannot overtake it), up to max_num_seqs running and max_tokens_per_step prompt
           tokens in the step; their pages are allocated for every token they hold;
  mixed    (mixed_tokens > 0 only) when sequences are running and the request at the head of the queue fits: every
           running sequence gets one new token AND the queue's head requests are admitted, as long as the step's new
           tokens stay within mixed_tokens (the model runner replays such a step from a decode graph, one row per
           token, so admitting a short prompt costs no step of its own: vLLM's chunked prefill, without chunks);
  decode   otherwise: every running sequence gets one new token. When the pool has no page for a sequence's next
           token, the most recently admitted running sequence is preempted: its pages are freed and it goes back
           to the FRONT of the queue, to be recomputed (prompt + tokens so far) by a later prefill ("preemption by
           recompute", vLLM / nano-vllm). Nothing is swapped to host memory.
postprocess() appends the sampled tokens, finishes sequences (EOS or max_new_tokens), frees their pages and returns
the finished ones, so the engine can stream them out while the others keep running.

The engine (real model runner) and the simulator (cost model) drive this same class.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from atom_lab.serve.block_manager import BlockManager
from atom_lab.serve.request import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    """max_num_seqs: the most sequences in one step (the batch size cap; CUDA-graph buckets go up to it).
    max_tokens_per_step: the most prompt tokens one prefill step computes (caps the activation memory).
    mixed_tokens: the most new tokens of a mixed step (decode + admissions); 0 = prefill and decode apart."""
    max_num_seqs: int = 64
    max_tokens_per_step: int = 8192
    mixed_tokens: int = 0

    def __post_init__(self):
        for f, least in (("max_num_seqs", 1), ("max_tokens_per_step", 1), ("mixed_tokens", 0)):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"{f}={v!r} must be an int >= {least}.")


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a request; raises ValueError for one that could never run (longer than the pool or the step)."""
        bm, cap = self.block_manager, self.block_manager.num_pages * self.block_manager.page_size
        if seq.max_len > cap:
            raise ValueError(f"request {seq.id}: prompt ({len(seq.prompt)} tokens) + max_new_tokens "
                             f"({seq.params.max_new_tokens}) needs {seq.max_len} KV slots, but the whole pool holds "
                             f"{cap} ({bm.num_pages} pages x {bm.page_size}); shorten the prompt, lower "
                             "max_new_tokens or raise the memory budget.")
        if seq.max_len > self.config.max_tokens_per_step:
            raise ValueError(f"request {seq.id}: up to {seq.max_len} tokens may have to be prefilled in one step "
                             f"(a preempted request is recomputed whole) but max_tokens_per_step="
                             f"{self.config.max_tokens_per_step}; raise max_tokens_per_step or shorten the request.")
        seq.status = Status.WAITING
        self.waiting.append(seq)

    @property
    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool]:
        """One step's batch: (sequences, is_prefill); is_prefill is True when any sequence computes more than its
        newest token (a prefill or a mixed step). Empty when nothing is queued."""
        cfg = self.config
        if cfg.mixed_tokens and self.running and self.waiting and len(self.running) < cfg.max_num_seqs \
                and len(self.running) + self.waiting[0].num_new <= cfg.mixed_tokens:
            batch, preempted = self._decode_batch()
            if preempted:  # pages ran out: no admission in this step (it could re-admit what was just preempted)
                return batch, False
            admitted = self._admit(cfg.mixed_tokens - len(batch))
            return batch + admitted, bool(admitted)
        batch = self._admit(cfg.max_tokens_per_step)
        if batch:
            return batch, True
        return self._decode_batch()[0], False

    def _admit(self, max_tokens: int) -> list[Sequence]:
        """FCFS admission of waiting requests with at most max_tokens new tokens in all; they join the running."""
        bm, cfg = self.block_manager, self.config
        batch, tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < cfg.max_num_seqs:
            seq = self.waiting[0]
            new = seq.num_new
            if tokens + new > max_tokens or not bm.can_allocate(seq):
                break
            bm.allocate(seq)
            seq.status = Status.RUNNING
            tokens += new
            batch.append(self.waiting.popleft())
        self.running.extend(batch)
        return batch

    def _decode_batch(self) -> tuple[list[Sequence], bool]:
        """Every running sequence with a slot for its next token (preempting from the back when pages run out);
        returns (the batch, whether anything was preempted)."""
        bm, before = self.block_manager, self.num_preemptions
        batch = []
        while self.running:
            seq = self.running.popleft()
            while not bm.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                bm.append(seq)
                batch.append(seq)
        self.running.extendleft(reversed(batch))
        return batch, self.num_preemptions > before

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, batch: list[Sequence], new_tokens: list[int]) -> list[Sequence]:
        """Record one step's sampled tokens (new_tokens[i] for batch[i]); returns the sequences that finished."""
        if len(new_tokens) != len(batch):
            raise ValueError(f"{len(new_tokens)} tokens for a batch of {len(batch)} sequences.")
        done = []
        for seq, tok in zip(batch, new_tokens):
            seq.num_cached = len(seq)  # the step wrote K/V for every token the sequence had
            if seq.append(tok):
                seq.status = Status.FINISHED
                self.block_manager.free(seq)
                self.running.remove(seq)
                done.append(seq)
        return done
