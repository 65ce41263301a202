"""Requests, sequences and sampling: what the scheduler moves around and what the engine hands back.

A Sequence is one request while it is served: its prompt ids, the tokens generated so far, the KV pages it holds
and its state (WAITING -> RUNNING -> FINISHED; back to WAITING when preempted). Sampling is a pure function of
(logits, sampling params, position): the random draw for the n-th generated token of a seeded request comes from a
generator seeded with (seed, n), so a request preempted and recomputed samples exactly the same tokens again.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token.

    max_new_tokens: tokens to generate (>= 1).
    temperature:    0 = greedy (argmax); > 0 divides the logits before the softmax.
    top_p:          nucleus sampling: keep the smallest set of tokens whose probabilities sum to >= top_p.
    seed:           seeds the draws (per request, per position); None = torch's global generator.
    ignore_eos:     keep generating after the end-of-sequence token (benchmarks with random weights).
    """
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an int >= 1 (tokens to generate).")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy).")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must lie in (0, 1] (1 = no nucleus cut).")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """One request being served.

    prompt: list of token ids (non-empty). tokens = prompt + output. pages: KV page ids held (block manager).
    num_cached: how many of `tokens` have their K/V written in the pages (0 after a preemption).
    """

    def __init__(self, prompt: list[int], params: SamplingParams, eos_token_id: int | None = None,
                 request_id: int | None = None):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.reshape(-1).tolist()
        prompt = list(prompt)
        if not prompt:
            raise ValueError("prompt is empty: a request needs at least one token id (e.g. the BOS token).")
        if not all(isinstance(t, int) and t >= 0 for t in prompt):
            raise ValueError("prompt must hold non-negative int token ids (from the tokenizer).")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}.")
        self.id = next(_ids) if request_id is None else request_id
        self.prompt = prompt
        self.output: list[int] = []
        self.params = params
        self.eos_token_id = eos_token_id
        self.status = Status.WAITING
        self.pages: list[int] = []
        self.num_cached = 0
        self.preemptions = 0
        self.finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_new(self) -> int:
        """Tokens whose K/V the next step computes (the prompt, a recompute, or the newest token)."""
        return len(self) - self.num_cached

    def tokens_from(self, start: int) -> list[int]:
        """tokens[start:] without building the whole list (a decode step asks for the last one of ~1,000s)."""
        n = len(self.prompt)
        return self.prompt[start:] + self.output if start < n else self.output[start - n:]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def max_len(self) -> int:
        """The most tokens this sequence can ever hold in the cache (prompt + all new tokens but the last)."""
        return len(self.prompt) + self.params.max_new_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token: int) -> bool:
        """Add a generated token; returns True when the sequence is finished (EOS or max_new_tokens)."""
        self.output.append(int(token))
        if not self.params.ignore_eos and self.eos_token_id is not None and token == self.eos_token_id:
            self.finish_reason = "eos"
        elif len(self.output) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"Sequence(id={self.id}, prompt={len(self.prompt)}, output={len(self.output)}, "
                f"{self.status.value}, pages={len(self.pages)})")


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Pick the next token of each sequence.

    Args:
        logits: float [B, V], row i for seqs[i] (the logits of its last position).
    Returns: B token ids. Greedy rows take the argmax; the others draw from the tempered, top-p-cut softmax with a
    generator seeded by (seed, number of tokens already generated), so the draw does not depend on the batch.
    """
    if logits.dim() != 2 or logits.shape[0] != len(seqs):
        raise ValueError(f"logits must be [B={len(seqs)}, V], got {tuple(logits.shape)}.")
    out = logits.float().argmax(-1).tolist()
    for i, s in enumerate(seqs):
        p = s.params
        if p.temperature == 0:
            continue
        probs = torch.softmax(logits[i].float().cpu() / p.temperature, -1)
        if p.top_p < 1:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # the token that crosses top_p stays in
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
        gen = None
        if p.seed is not None:
            gen = torch.Generator().manual_seed(p.seed * 1_000_003 + len(s.output))
        out[i] = int(torch.multinomial(probs, 1, generator=gen))
    return out
