"""Per-channel activation statistics of a decoder, gathered with forward hooks over calibration text.

Atom decides which input channels of a linear layer are outliers from calibration data: it sorts channels by the
mean of x^2 over calibration tokens (the diagonal of the layer's Hessian X^T X / T, up to a constant) and keeps the
largest ones at INT8. `collect_stats` measures that, plus max|x| and mean|x|, for the input of every nn.Linear in
the decoder blocks and for the residual stream entering each block. It streams: sums are accumulated in float64
window by window, so memory does not grow with the number of calibration tokens; only the first `keep_tokens`
token rows are kept, for per-token pictures.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class ChannelStats:
    """Statistics of one activation tensor with C channels (its last dimension), all float32 on the CPU.

    max_abs:  [C] max |x| over every calibration token.
    mean_sq:  [C] mean x^2 over tokens: the Hessian diagonal Atom sorts channels by.
    mean_abs: [C] mean |x| over tokens.
    n_tokens: how many token rows the statistics cover.
    samples:  [T, C] the first T = min(keep_tokens, n_tokens) token rows of x, signed, for per-token views.
    """
    max_abs: torch.Tensor
    mean_sq: torch.Tensor
    mean_abs: torch.Tensor
    n_tokens: int
    samples: torch.Tensor

    @property
    def channels(self) -> int:
        return self.max_abs.numel()

    def outlier_ratio(self) -> float:
        """max over channels of max|x|, divided by the median channel's max|x| (how extreme the worst channel is)."""
        return float(self.max_abs.max() / self.max_abs.median().clamp_min(torch.finfo(torch.float32).tiny))


def _contains_linear(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Linear) for m in module.modules())


def decoder_layers_name(model: torch.nn.Module) -> str:
    """Full name (as in model.named_modules()) of the ModuleList holding the decoder blocks, e.g. "model.layers".

    The blocks are found by structure, not by architecture name: the outermost nn.ModuleList whose every child
    contains an nn.Linear. That covers llama, mistral, qwen2, gemma, phi3 and most transformers decoders.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers decoder), got {type(model).__name__}.")
    candidates = [(name, mod) for name, mod in model.named_modules()
                  if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and all(map(_contains_linear, mod))]
    if not candidates:
        raise ValueError(
            f"model ({type(model).__name__}) has no decoder blocks with nn.Linear layers inside: found no "
            "nn.ModuleList whose children all contain torch.nn.Linear. Pass a transformers decoder such as "
            "LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM (GPT-2's Conv1D layers are not nn.Linear).")
    # Outermost first (fewest dots), then the longest list: MoE expert lists sit inside the blocks.
    name, _ = min(candidates, key=lambda c: (c[0].count("."), -len(c[1])))
    return name


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers decoder (e.g. model.model.layers for Llama), see decoder_layers_name."""
    name = decoder_layers_name(model)
    return model.get_submodule(name)


def linear_names(model: torch.nn.Module) -> list[str]:
    """Full names of every nn.Linear inside the decoder blocks, in model.named_modules() order."""
    prefix = decoder_layers_name(model) + "."
    return [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)]


def calibration_windows(tokenizer, texts: Sequence[str] | str, n_tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Token windows covering the first n_tokens tokens of the joined texts.

    The texts are joined with blank lines and tokenized once; the stream is cut into windows of seq_len tokens and
    the last window is shortened so exactly n_tokens tokens are used (fewer, with a warning, if the text runs out).
    Returns: a list of LongTensor [1, <= seq_len] on the CPU.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not any(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("texts is empty: pass a non-empty list of strings, "
                         "e.g. atom_lab.load_corpus()['calibration']['text'].")
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int (how many calibration tokens to run), got {n_tokens!r}.")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int (tokens per window), got {seq_len!r}.")
    # Tokenizing a 5 MB corpus takes seconds on 2 cores: tokenize a prefix of the texts that is surely long enough
    # (a token is rarely more than 16 characters), and all of them only if that prefix falls short.
    need_chars, used, chars = 16 * n_tokens + 1024, 0, 0
    while used < len(texts) and chars < need_chars:
        chars += len(texts[used]) + 2
        used += 1
    ids = tokenizer("\n\n".join(texts[:used]), return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens and used < len(texts):
        ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    if ids.numel() < seq_len:
        raise ValueError(f"texts hold {ids.numel()} tokens, fewer than one window of seq_len={seq_len}: "
                         "pass more text or a smaller seq_len.")
    if ids.numel() < n_tokens:
        warnings.warn(f"texts hold only {ids.numel()} tokens, fewer than n_tokens={n_tokens}; using all of them.",
                      stacklevel=3)
    ids = ids[:n_tokens]
    return [ids[i: i + seq_len].unsqueeze(0) for i in range(0, ids.numel(), seq_len)]


class _Accumulator:
    """Running float64 sums for one tensor; keeps the first keep_tokens rows."""

    def __init__(self, keep_tokens: int):
        self.keep = keep_tokens
        self.sum_sq = self.sum_abs = self.max_abs = None
        self.count = 0
        self.samples: list[torch.Tensor] = []
        self.kept = 0

    def add(self, rows: torch.Tensor, sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        sq, ab, mx = sums
        if self.sum_sq is None:
            self.sum_sq, self.sum_abs, self.max_abs = sq.clone(), ab.clone(), mx.clone()
        else:
            self.sum_sq += sq
            self.sum_abs += ab
            torch.maximum(self.max_abs, mx, out=self.max_abs)
        self.count += rows.shape[0]
        if self.kept < self.keep:
            take = rows[: self.keep - self.kept].float().cpu()
            self.samples.append(take)
            self.kept += take.shape[0]

    def result(self) -> ChannelStats:
        C = self.sum_sq.numel()
        samples = torch.cat(self.samples) if self.samples else torch.zeros(0, C)
        return ChannelStats(max_abs=self.max_abs.float().cpu(), mean_sq=(self.sum_sq / self.count).float().cpu(),
                            mean_abs=(self.sum_abs / self.count).float().cpu(), n_tokens=self.count,
                            samples=samples)


def _sums(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # MPS has no float64; elsewhere accumulate in float64 so a million tokens of x^2 ~ 1e6 do not lose digits.
    acc = rows.double() if rows.device.type != "mps" else rows.float().cpu().double()
    a = acc.abs()
    return (acc * acc).sum(0), a.sum(0), a.amax(0)


@torch.no_grad()
def collect_stats(model, tokenizer, texts: Sequence[str] | str, n_tokens: int = 4096, seq_len: int = 512,
                  keep_tokens: int = 256, residual: bool = True, progress: bool = True) -> dict[str, ChannelStats]:
    """Per-channel statistics of the input of every nn.Linear in the decoder blocks, over calibration text.

    Args:
        model: a transformers decoder whose blocks hold nn.Linear layers; run on its own device and dtype.
        tokenizer: its tokenizer.
        texts: strings (e.g. load_corpus()["calibration"]["text"]); joined with blank lines, tokenized once.
        n_tokens: calibration tokens to run (windows of seq_len, the last one shortened).
        seq_len: tokens per forward pass (each window is independent: no context carried over).
        keep_tokens: token rows kept as ChannelStats.samples (from the first window on).
        residual: also hook the residual stream entering each block, keyed f"{blocks}.{i}.residual".
        progress: show a tqdm bar over tokens.
    Returns:
        {module name: ChannelStats}; names as in model.named_modules(), e.g. "model.layers.0.self_attn.q_proj",
        and "model.layers.0.residual" for the residual stream (hidden_states before the block's first norm).
    """
    if not isinstance(keep_tokens, int) or keep_tokens < 0:
        raise ValueError(f"keep_tokens must be an int >= 0 (token rows kept for per-token views), got {keep_tokens!r}.")
    blocks_name = decoder_layers_name(model)
    windows = calibration_windows(tokenizer, texts, n_tokens, seq_len)
    targets = {n: m for n, m in model.named_modules()
               if n.startswith(blocks_name + ".") and isinstance(m, torch.nn.Linear)}
    if residual:
        for i, block in enumerate(model.get_submodule(blocks_name)):
            targets[f"{blocks_name}.{i}.residual"] = block
    acc = {name: _Accumulator(keep_tokens) for name in targets}
    # q/k/v (and gate/up) read the same tensor: compute its sums once per forward and share them.
    shared: dict[int, tuple[torch.Tensor, tuple]] = {}

    def hook_for(name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(x, torch.Tensor):
                raise RuntimeError(f"{name}: could not find the input tensor of {type(module).__name__} "
                                   "(expected it as the first positional argument or as hidden_states=).")
            hit = shared.get(id(x))
            if hit is None or hit[0] is not x:
                rows = x.detach().reshape(-1, x.shape[-1])
                hit = shared[id(x)] = (x, rows, _sums(rows))
            acc[name].add(hit[1], hit[2])
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in targets.items()]
    device = next(model.parameters()).device
    bar = tqdm(total=sum(w.numel() for w in windows), desc="collect_stats", unit="tok", disable=not progress,
               leave=False)
    try:
        for w in windows:
            model(w.to(device), use_cache=False)
            shared.clear()
            bar.update(w.numel())
    finally:
        bar.close()
        for h in handles:
            h.remove()
    return {name: a.result() for name, a in acc.items()}


def stats_summary(stats: dict[str, ChannelStats]) -> list[dict]:
    """One row per entry: name, channels, outlier ratio (max over median channel max|x|), max|x|, top channel."""
    rows = []
    for name, s in stats.items():
        rows.append(dict(name=name, channels=s.channels, ratio=s.outlier_ratio(), max_abs=float(s.max_abs.max()),
                         top_channel=int(s.max_abs.argmax()), n_tokens=s.n_tokens))
    return rows


def module_kind(name: str) -> str:
    """The last part of a stats key: "q_proj", "down_proj", "residual", ..."""
    return name.rsplit(".", 1)[-1]


def layer_index(name: str, blocks_name: str) -> int:
    """The block number in a stats key: layer_index("model.layers.3.mlp.down_proj", "model.layers") == 3."""
    rest = name[len(blocks_name) + 1:] if name.startswith(blocks_name + ".") else ""
    head = rest.split(".", 1)[0]
    if not head.isdigit():
        raise ValueError(f"{name!r} is not inside the decoder blocks {blocks_name!r}.")
    return int(head)

