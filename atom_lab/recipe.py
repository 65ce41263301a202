"""quantize_model: turn every nn.Linear of a decoder's blocks into a QuantLinear, the way Atom does.

Steps (each only when the config asks for it):
  0. rotate (quarot, atom+rotation): atom_lab.rotate_model folds the norms and rotates the residual stream and
     the down_proj inputs of the float model (its float outputs do not change);
  1. calibrate: atom_lab.collect_stats on the float model (per-channel statistics of every linear's input);
  2. smooth (w8a8): SmoothQuant scales folded into the norms and the v/up projections (atom_lab.smooth);
  3. reorder: one index per ACTIVATION, not per layer: q/k/v read the same normed hidden state and gate/up read
     the same one, so they share an index (the real kernel quantizes that activation once, fused into the
     RMSNorm); o_proj and down_proj get their own;
  4. quantize weights: round-to-nearest, or GPTQ sequentially, block by block and within a block in execution
     order (q/k/v, then o, then gate/up, then down): the calibration inputs of each layer come from the already
     quantized layers before it, as in the GPTQ paper;
  5. activations are quantized at run time inside QuantLinear (per token, per group), and with kv_bits < 16 the
     k_proj / v_proj outputs are fake-quantized per token per head (before RoPE, see QuantLinear.forward);
  6. backend="triton": the model is quantized exactly as for "reference" (GPTQ's calibration inputs flow through
     the reference layers), then switched with atom_lab.set_backend, so both backends hold the same weights.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from atom_lab.backend import set_backend
from atom_lab.config import AtomConfig
from atom_lab.qlinear import TRITON_CONFIGS, QuantLinear, check_backend
from atom_lab.reorder import reorder_index
from atom_lab.rotation import add_online_rotation, online_rotation, rotate_model
from atom_lab.smooth import smooth_model
from atom_lab.stats import calibration_windows, collect_stats, decoder_layers, decoder_layers_name

# Linears that read the same activation, in execution order inside a llama/mistral/qwen2 block.
SHARED_INPUTS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
KV_LINEARS = ("self_attn.k_proj", "self_attn.v_proj")


class _Stop(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a block's forward."""


def _check_blocks(model, config: AtomConfig) -> tuple[str, torch.nn.ModuleList]:
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model is already quantized (it holds QuantLinear layers); reload the float model first "
                         "(quantize_model works in place), e.g. atom_lab.load_model() or copy.deepcopy before.")
    blocks_name = decoder_layers_name(model)
    blocks = decoder_layers(model)
    expected = {n for names in SHARED_INPUTS for n in names}
    for i, block in enumerate(blocks):
        found = {n for n, m in block.named_modules() if isinstance(m, (torch.nn.Linear, QuantLinear))}
        if found != expected:
            raise NotImplementedError(
                f"{blocks_name}.{i} has linear layers {sorted(found)}; quantize_model knows the llama/mistral/qwen2 "
                f"layout {sorted(expected)}. Quantize other layouts layer by layer with QuantLinear.from_linear.")
        for n in expected:
            m = block.get_submodule(n)
            config.layer_group_size(m.in_features, f"{blocks_name}.{i}.{n}")
    attention_types = {getattr(b, "attention_type", None) for b in blocks}
    if config.gptq and len(attention_types) > 1:
        raise NotImplementedError(f"GPTQ calibration replays block 0's attention mask in every block, but the "
                                  f"blocks mix attention types {sorted(map(str, attention_types))}.")
    return blocks_name, blocks


def _head_dim(model) -> int:
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _set(block: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, module)


def _block_inputs(model, block0, windows: list[torch.Tensor], progress: bool):
    """The hidden states entering block 0 for each calibration window, with the keyword arguments the model
    passes to its blocks (position embeddings, mask): list of ([1, L, H] tensor, kwargs)."""
    device = next(model.parameters()).device
    captured = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        captured.append((x.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    h = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for w in tqdm(windows, desc="calibration inputs", disable=not progress, leave=False):
            try:
                model(w.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return captured


def _run_block(block, x, kwargs):
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quantize_model(model, config: AtomConfig | str, calibration: Sequence[str] | None = None, tokenizer=None,
                   backend: str = "reference", progress: bool = True, n_tokens: int = 8192, seq_len: int = 512,
                   stats: dict | None = None, keep_tokens: int = 512):
    """Quantize every nn.Linear in the decoder blocks of `model` IN PLACE and return the same model object.

    The model is modified: its linears are replaced by QuantLinear and, for SmoothQuant (w8a8), its norm and
    v_proj/up_proj weights are rescaled. Keep (or reload) a float copy if you need one: copy.deepcopy(model)
    before calling, or atom_lab.load_model() again. The embeddings and lm_head stay in float, as in Atom.

    Args:
        model: a transformers llama / mistral / qwen2 decoder (float32 on a CPU, float16/bfloat16 on a GPU).
        config: an AtomConfig or a preset name ("fp16", "w8a8", "w4a16", "w4a4-rtn", "atom").
        calibration: calibration texts (e.g. load_corpus()["calibration"]["text"]); needed for reordering,
            smoothing, clip search and GPTQ. Keep it disjoint from the evaluation text.
        tokenizer: the model's tokenizer.
        backend: "reference" (float simulation of the packed kernels) or "triton" (the kernels run the model:
            packed configs only, see atom_lab.set_backend, which also switches an already quantized model).
        progress: tqdm bars.
        n_tokens, seq_len: calibration tokens and window length (GPTQ papers: 128 x 2048; on a CPU 16-32 windows
            of 512 give most of the gain).
        stats: precomputed collect_stats(model, ...) of this float model, to skip step 1.
        keep_tokens: token rows kept in the stats (clip search without GPTQ uses them).
    Returns:
        model, with model.atom_config = config.
    """
    check_backend(backend)
    if isinstance(config, str):
        config = AtomConfig.preset(config)
    if not isinstance(config, AtomConfig):
        raise TypeError(f"config must be an AtomConfig or a preset name, got {type(config).__name__}.")
    if config.kv_bits < 16 and config.kv_rope != "pre":
        # the in-layer fake quantization sits on k_proj's output, i.e. before RoPE: it cannot simulate "post"
        raise ValueError(f"kv_rope={config.kv_rope!r} with kv_bits={config.kv_bits}: quantize_model's in-layer KV "
                         "fake quantization is pre-RoPE only. Quantize with kv_bits=16 and put the KV format in "
                         "the cache (PagePool with KVFormat.from_config(config), or atom_lab.paged_model."
                         "simulate_kv(model, KVFormat.from_config(config)) for the float simulation), or use "
                         "kv_rope='pre'.")
    blocks_name, blocks = _check_blocks(model, config)
    if backend == "triton":
        bad = sorted({m.in_features for b in blocks for m in b.modules()
                      if isinstance(m, torch.nn.Linear) and not config.packed(m.in_features)})
        if bad or not config.quantizes:
            raise ValueError(f"backend='triton' cannot run config {config.name!r}"
                             f"{f' on layers with in_features {bad}' if bad else ''}: {TRITON_CONFIGS}.")
    # decoder_layers_name finds the blocks by their nn.Linear children, which QuantLinear replaces: remember it.
    model.atom_blocks_name = blocks_name
    if not config.quantizes:
        model.atom_config = config
        return model
    if config.rotation is not None and getattr(model, "atom_rotation", None) is None:
        # QuaRot: rotate the float model first, so calibration, reordering and GPTQ all see rotated activations
        if stats is not None:
            raise ValueError("stats were collected on the unrotated model but config.rotation is set; pass "
                             "stats=None (or rotate the model with atom_lab.rotate_model before collect_stats).")
        rotate_model(model, config.rotation, config.rotation_seed, config.rotate_down)
    search = "search" in (config.w_clip, config.a_clip)
    need_stats = config.reorders or config.smooth_alpha is not None or (search and not config.gptq)
    if (need_stats and stats is None) or config.gptq:
        if calibration is None or tokenizer is None:
            raise ValueError(f"config {config.name!r} needs calibration data (reordering, smoothing, clip search or "
                             "GPTQ): pass calibration=texts and tokenizer=tokenizer, e.g. "
                             "calibration=atom_lab.load_corpus()['calibration']['text'].")
    if need_stats and stats is None:
        stats = collect_stats(model, tokenizer, calibration, n_tokens=n_tokens, seq_len=seq_len,
                              keep_tokens=keep_tokens, residual=False, progress=progress)
    if config.smooth_alpha is not None:
        smooth_model(model, stats, config.smooth_alpha)
        if search and not config.gptq:  # the kept samples predate smoothing
            stats = collect_stats(model, tokenizer, calibration, n_tokens=n_tokens, seq_len=seq_len,
                                  keep_tokens=keep_tokens, residual=False, progress=progress)
    head_dim = _head_dim(model)
    kv_group = config.kv_group_size or head_dim
    if config.kv_bits < 16 and head_dim % kv_group:
        raise ValueError(f"kv_group_size={kv_group} must divide head_dim={head_dim}; use a divisor of {head_dim} or "
                         "None (= head_dim).")

    def make(block, i, names, reorder, **extra):
        """Quantize the linears `names` of block i, which read one activation, together."""
        parts = QuantLinear.from_linears(
            [block.get_submodule(n) for n in names], config, names=[f"{blocks_name}.{i}.{n}" for n in names],
            out_bits=[config.kv_bits if n in KV_LINEARS else 16 for n in names], out_group=kv_group,
            reorder=reorder, **extra)
        for n, q in zip(names, parts):
            rot = online_rotation(block.get_submodule(n))
            if rot is not None:  # the weight already absorbed it (rotate_model); the input is rotated at run time
                add_online_rotation(q, rot)
            _set(block, n, q)

    def index_for(i, names):
        if not config.reorders:
            return None
        return reorder_index(stats[f"{blocks_name}.{i}.{names[0]}"], config.sort_metric)

    if not config.gptq:
        for i, block in enumerate(tqdm(blocks, desc=f"quantize {config.name}", disable=not progress, leave=False)):
            for names in SHARED_INPUTS:
                st = stats.get(f"{blocks_name}.{i}.{names[0]}") if stats is not None and search else None
                make(block, i, names, index_for(i, names), stats=st)
        model.atom_config = config
        return set_backend(model, backend)

    windows = calibration_windows(tokenizer, calibration, n_tokens, seq_len)
    inputs = _block_inputs(model, blocks[0], windows, progress)
    bar = tqdm(total=len(blocks) * len(SHARED_INPUTS), desc=f"GPTQ {config.name}", disable=not progress,
               leave=False)
    try:
        for i, block in enumerate(blocks):
            for names in SHARED_INPUTS:
                target = block.get_submodule(names[0])
                acc = {"H": None, "rows": [], "kept": 0}

                def hook(module, args, acc=acc):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    acc["H"] = x.T @ x if acc["H"] is None else acc["H"].addmm_(x.T, x)
                    if acc["kept"] < keep_tokens:
                        acc["rows"].append(x[: keep_tokens - acc["kept"]])
                        acc["kept"] += acc["rows"][-1].shape[0]
                    raise _Stop

                h = target.register_forward_pre_hook(hook)
                try:
                    for x, kw in inputs:
                        try:
                            _run_block(block, x, kw)
                        except _Stop:
                            pass
                finally:
                    h.remove()
                make(block, i, names, index_for(i, names), hessian=acc["H"], inputs=torch.cat(acc["rows"]))
                bar.update(1)
            # the next block's calibration inputs come out of this, now quantized, block
            inputs = [(_run_block(block, x, kw), kw) for x, kw in inputs]
    finally:
        bar.close()
    model.atom_config = config
    return set_backend(model, backend)


def model_size_report(model) -> dict:
    """Bytes stored by the decoder's linear layers: quantized (QuantLinear.nbytes) vs float16, and per layer."""
    layers = [m.size_report() for m in model.modules() if isinstance(m, QuantLinear)]
    prefix = (getattr(model, "atom_blocks_name", None) or decoder_layers_name(model)) + "."
    plain = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)]
    fp16 = sum(r["fp16_bytes"] for r in layers) + sum(m.weight.numel() * 2 for m in plain)
    stored = sum(r["stored_bytes"] for r in layers) + sum(m.weight.numel() * m.weight.element_size() for m in plain)
    return {"linear_layers": len(layers) + len(plain), "quantized_layers": len(layers), "stored_bytes": stored,
            "fp16_bytes": fp16, "ratio_vs_fp16": stored / fp16 if fp16 else float("nan"), "layers": layers}


@torch.no_grad()
def layer_inputs(model, tokenizer, texts: Sequence[str], names: Sequence[str], n_tokens: int = 2048,
                 seq_len: int = 512, progress: bool = False) -> dict[str, torch.Tensor]:
    """The inputs of some linear layers over calibration text, for per-layer experiments (GPTQ, clipping).

    Args:
        names: full module names, e.g. "model.layers.3.mlp.down_proj".
    Returns:
        {name: float32 [T, K] on the CPU}, T = n_tokens (or fewer if the text runs out).
    """
    modules = {n: model.get_submodule(n) for n in names}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: rows[n].append(
        args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())) for n, m in modules.items()]
    device = next(model.parameters()).device
    try:
        for w in tqdm(calibration_windows(tokenizer, texts, n_tokens, seq_len), desc="layer inputs",
                      disable=not progress, leave=False):
            model(w.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}
