"""Perplexity with the protocol of GPTQ, Atom and QuaRot, so our numbers can sit next to theirs.

Protocol: join the texts with blank lines, tokenize once, cut the token stream into non-overlapping windows of
`seq_len` tokens (the ragged tail is dropped), run each window independently (no context carried over), and take
the exponential of the mean next-token NLL over every predicted token. It is not lm-eval's word-level wikitext
perplexity; always state seq_len and the token count next to a number.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def eval_windows(tokenizer, texts: Sequence[str], seq_len: int = 2048, max_windows: int | None = None) -> torch.Tensor:
    """Token windows for evaluation.

    Returns:
        LongTensor [n_windows, seq_len] on the CPU: consecutive, non-overlapping slices of the joined text.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not any(t.strip() for t in texts):
        raise ValueError("texts is empty: pass a non-empty list of strings, e.g. load_corpus()['test']['text'].")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (tokens per window), got {seq_len!r}.")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive int or None, got {max_windows!r}.")
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"The texts hold {ids.numel()} tokens, fewer than one window of seq_len={seq_len}: "
                         "pass more text or a smaller seq_len.")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, progress: bool = True, desc: str = "perplexity") -> torch.Tensor:
    """Summed next-token NLL of each window, in float64.

    Args:
        windows: LongTensor [n_windows, seq_len].
    Returns:
        float64 tensor [n_windows]; each window predicts seq_len - 1 tokens.
    """
    device = next(model.parameters()).device
    out = torch.empty(windows.shape[0], dtype=torch.float64)
    for i in tqdm(range(windows.shape[0]), desc=desc, disable=not progress, leave=False):
        ids = windows[i: i + 1].to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        out[i] = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").double().cpu()
    return out


def perplexity(model, tokenizer, texts: Sequence[str], seq_len: int = 2048, max_windows: int | None = None,
               progress: bool = True) -> float:
    """Perplexity of `model` on `texts` (protocol in this module's docstring).

    Args:
        texts: strings, e.g. load_corpus()["test"]["text"].
        seq_len: tokens per window (2048 for Llama in the papers; SmolLM2 allows up to 8192).
        max_windows: evaluate only the first N windows (a quick estimate).
    Returns:
        exp(mean NLL) over n_windows * (seq_len - 1) predicted tokens.
    """
    windows = eval_windows(tokenizer, texts, seq_len, max_windows)
    nll = window_nll(model, windows, progress=progress)
    return math.exp(nll.sum().item() / (windows.shape[0] * (seq_len - 1)))
