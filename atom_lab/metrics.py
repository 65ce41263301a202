"""Accuracy beyond perplexity: how far a quantized model's next-token distribution moves from the float model's.

On the same evaluation windows as atom_lab.eval (non-overlapping windows of seq_len tokens, each run on its own):
  ppl   exp(mean next-token NLL), exactly atom_lab.perplexity's number;
  kl    mean over predicted tokens of KL(p_float || p_quant) in nats: 0 when the distributions agree;
  top1  fraction of predicted tokens where argmax p_quant == argmax p_float.
KL and top-1 compare against the float model, not the text, so they isolate the damage quantization does.
`evaluate` runs the reference model ONCE per window and every other model on that window, so the float logits are
never stored for the whole split (51 windows x 2047 x 49152 floats would be 20 GB).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

_CHUNK = 512  # token rows per log-softmax, to bound memory at vocab 49152


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(softmax(ref_logits) || softmax(logits)) per token, in nats.

    Args:
        ref_logits, logits: float [..., V] (same shape).
        reduction: "mean" (a 0-d tensor), "sum", or "none" ([...]).
    """
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits {tuple(ref_logits.shape)} and logits {tuple(logits.shape)} must match.")
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    q = F.log_softmax(logits.float(), dim=-1)
    kl = (ref.exp() * (ref - q)).sum(-1)
    return {"mean": kl.mean, "sum": kl.sum, "none": lambda: kl}[reduction]()


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of positions where both logits pick the same top token. ref_logits, logits: [..., V]."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits {tuple(ref_logits.shape)} and logits {tuple(logits.shape)} must match.")
    return (ref_logits.argmax(-1) == logits.argmax(-1)).float().mean().item()


def _window_logits(model, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(ids.to(device), use_cache=False).logits[0, :-1].float()


@torch.no_grad()
def evaluate(models, windows: torch.Tensor, reference=None, progress: bool = True) -> dict[str, dict]:
    """ppl, KL and top-1 of one or several models over the same windows, in one pass over the windows.

    Args:
        models: a model, or {name: model}. A model may be the reference itself (its KL is 0, top-1 is 1).
        windows: LongTensor [n_windows, seq_len] from atom_lab.eval_windows.
        reference: the float model the KL / top-1 compare with; None: only ppl is computed.
        progress: a tqdm bar over windows.
    Returns:
        {name: {"ppl", "kl", "top1", "nll", "tokens"}} ("model" as the name when a single model is given);
        kl and top1 are None without a reference. nll is the mean NLL in nats.
    """
    if isinstance(models, torch.nn.Module):
        models = {"model": models}
    if not models:
        raise ValueError("models is empty: pass a model or a {name: model} dict.")
    if windows.dim() != 2 or windows.dtype != torch.long or windows.shape[1] < 2:
        raise ValueError(f"windows must be a LongTensor [n_windows, seq_len >= 2] (atom_lab.eval_windows), got "
                         f"{windows.dtype} {tuple(windows.shape)}.")
    sums = {n: {"nll": 0.0, "kl": 0.0, "agree": 0.0} for n in models}
    tokens = 0
    for w in tqdm(range(windows.shape[0]), desc="evaluate", disable=not progress, leave=False):
        ids = windows[w: w + 1]
        target = ids[0, 1:]
        ref_lp = ref_top = None
        if reference is not None:
            ref_logits = _window_logits(reference, ids)
            ref_lp = torch.cat([F.log_softmax(c, -1) for c in ref_logits.split(_CHUNK)])
            ref_top = ref_logits.argmax(-1).cpu()
            del ref_logits
        for name, model in models.items():
            logits = ref_lp if model is reference else _window_logits(model, ids)
            for r0 in range(0, logits.shape[0], _CHUNK):
                lp = F.log_softmax(logits[r0: r0 + _CHUNK], -1)
                t = target[r0: r0 + _CHUNK].to(lp.device)
                sums[name]["nll"] += -lp.gather(1, t.unsqueeze(1)).sum().item()
                if ref_lp is not None:
                    rl = ref_lp[r0: r0 + _CHUNK]
                    sums[name]["kl"] += (rl.exp() * (rl - lp)).sum().item()
                    sums[name]["agree"] += (lp.argmax(-1).cpu() == ref_top[r0: r0 + _CHUNK]).sum().item()
            del logits
        tokens += target.numel()
    out = {}
    for name, s in sums.items():
        nll = s["nll"] / tokens
        out[name] = {"ppl": math.exp(nll), "kl": s["kl"] / tokens if reference is not None else None,
                     "top1": s["agree"] / tokens if reference is not None else None, "nll": nll, "tokens": tokens}
    return out
