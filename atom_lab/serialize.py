"""Save and load a quantized model: safetensors for every tensor, a small JSON for everything else.

A directory written by save_quantized(model, path) holds
    model.safetensors   every tensor of model.state_dict(), each stored once (tied embeddings / lm_head and the
                        reorder index that q/k/v share are aliases): packed INT4 weights (uint8), INT8 keeper
                        weights, fp16 scales, int64 reorder indices, biases, and the float tensors that are not
                        quantized (embeddings, lm_head, RMSNorm weights) in the model's dtype;
    atom_lab.json       format name and version, the AtomConfig, the transformers model config (architecture),
                        the model dtype, the backend, each QuantLinear's settings (group size, clips, KV bits) and
                        the aliases;
    tokenizer files     when a tokenizer is given.
A rotated model (quarot, atom+rotation) also stores its online rotations (the down_proj input's Hadamard, not part
of state_dict): each distinct one once, under "atom_online_rotation.<i>.signs/.kron" (structured) or ".dense",
with the layers using it listed in atom_lab.json; the residual-stream rotation is already inside the weights.
load_quantized(path) builds the architecture from the saved model config with transformers (no calibration data,
no GGUF, no float checkpoint), swaps in QuantLinear layers holding the saved buffers and loads the rest. The float
w_ref cache of the reference backend is not stored: it is rebuilt exactly from the levels and scales, so the
reloaded model gives the same logits bit for bit on either backend.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from atom_lab._runtime import default_device
from atom_lab.backend import set_backend
from atom_lab.config import AtomConfig
from atom_lab.qlinear import QuantLinear
from atom_lab.rotation import KronRotation, add_online_rotation, online_rotation

FORMAT = "atom_lab.quantized"
VERSION = 1
TENSORS_FILE, META_FILE = "model.safetensors", "atom_lab.json"
ROTATION_PREFIX = "atom_online_rotation."
_LAYER_BUFFERS = ("reorder", "bias", "packed_q4", "packed_s4", "packed_q8", "packed_s8", "w_q", "w_scale", "w_zero",
                  "w_float")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_spec(m: QuantLinear) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features, "group_size": m.group_size,
            "a_clip": m.a_clip, "w_clip": m.w_clip, "out_bits": m.out_bits, "out_group": m.out_group,
            "is_packed": m.is_packed, "float_dtype": _dtype_name(m.float_dtype)}


def _kind(name: str, quantized: set[str]) -> str:
    """What a stored tensor is, for the size breakdown."""
    owner, _, leaf = name.rpartition(".")
    if owner in quantized:
        return {"reorder": "reorder indices", "bias": "biases"}.get(leaf, "quantized linear weights")
    if "embed" in name or name.startswith("lm_head"):
        return "embeddings / lm_head (float)"
    if "norm" in name:
        return "norm weights (float)"
    return "other float tensors"


@torch.no_grad()
def save_quantized(model, path, tokenizer=None) -> dict:
    """Write a model quantized by atom_lab.quantize_model to the directory `path` (created if needed).

    Args:
        model: the quantized transformers model (either backend; the stored tensors are the same).
        path: a directory; existing files of the same names are overwritten.
        tokenizer: optional; saved beside it with save_pretrained, so load_quantized returns it too.
    Returns:
        {"path", "file_bytes" (model.safetensors), "bytes_by_kind": {kind: bytes}, "tensors", "aliases"}.
    """
    config = getattr(model, "atom_config", None)
    if not isinstance(config, AtomConfig):
        raise ValueError("model was not quantized by atom_lab.quantize_model (no model.atom_config); quantize it "
                         "first: atom_lab.quantize_model(model, 'atom', calibration=..., tokenizer=...).")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError(f"model (config {config.name!r}) holds no quantized layer; save a float model with "
                         "model.save_pretrained instead.")
    if config.keeper and config.keeper_bits >= 16 and config.w_bits < 16:
        raise ValueError("config keeps float keeper columns (keeper_bits=16), which the quantized buffers do not "
                         "hold; save_quantized supports keeper_bits=8 (Atom) and configs without keepers.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, aliases, first = {}, {}, {}
    for key, t in model.state_dict().items():
        # Tensors sharing memory (tied embeddings, the reorder index of q/k/v) are stored once; safetensors
        # refuses shared tensors anyway.
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                 t.dtype)
        if ident in first:
            aliases[key] = first[ident]
            continue
        first[ident] = key
        tensors[key] = t.detach().to("cpu").contiguous()
    rotations, rotation_ids = {}, {}
    for n, m in layers.items():  # online rotations are not in state_dict: each distinct one stored once
        r = online_rotation(m)
        if r is None:
            continue
        j = rotation_ids.setdefault(id(r), len(rotation_ids))
        rotations[n] = j
        if isinstance(r, KronRotation):
            tensors[f"{ROTATION_PREFIX}{j}.signs"] = r.signs.detach().cpu().contiguous()
            tensors[f"{ROTATION_PREFIX}{j}.kron"] = r.kron.detach().cpu().contiguous()
        else:
            tensors[f"{ROTATION_PREFIX}{j}.dense"] = r.detach().cpu().contiguous()
    save_file(tensors, str(path / TENSORS_FILE), metadata={"format": FORMAT, "version": str(VERSION)})
    dtype = next(model.parameters()).dtype
    meta = {
        "format": FORMAT, "version": VERSION,
        "atom_config": config.to_dict(),
        "model_config": model.config.to_dict(),
        "model_class": type(model).__name__,
        "dtype": _dtype_name(dtype),
        "backend": getattr(model, "atom_backend", "reference"),
        "blocks_name": model.atom_blocks_name,
        "layers": {n: _layer_spec(m) for n, m in layers.items()},
        "aliases": aliases,
        "online_rotations": rotations,
        "rotation": getattr(model, "atom_rotation", None),
    }
    (path / META_FILE).write_text(json.dumps(meta, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    by_kind: dict[str, int] = {}
    for key, t in tensors.items():
        k = _kind(key, set(layers))
        by_kind[k] = by_kind.get(k, 0) + t.numel() * t.element_size()
    return {"path": str(path), "file_bytes": (path / TENSORS_FILE).stat().st_size, "bytes_by_kind": by_kind,
            "tensors": len(tensors), "aliases": len(aliases)}


def _quant_layer(name: str, spec: dict, config: AtomConfig, tensors: dict[str, torch.Tensor]) -> QuantLinear:
    """A QuantLinear holding the saved buffers of layer `name` (w_ref rebuilt from them)."""
    m = QuantLinear(spec["in_features"], spec["out_features"], config, spec["group_size"], spec["a_clip"],
                    spec["w_clip"], spec["out_bits"], spec["out_group"], "reference", name)
    m.is_packed = spec["is_packed"]
    m.float_dtype = getattr(torch, spec["float_dtype"])
    for b in _LAYER_BUFFERS:
        key = f"{name}.{b}"
        if key in tensors:
            m.register_buffer(b, tensors[key])
        elif b == "w_zero" and not m.is_packed and f"{name}.w_q" in tensors:
            m.register_buffer("w_zero", None)  # symmetric levels: no zero points
    m.w_ref = m.w_float if hasattr(m, "w_float") else m.dequantized_weight()
    return m


def _set_module(model, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _no_init():
    try:  # transformers >= 5
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return nullcontext()
    return no_init_weights()


@torch.no_grad()
def load_quantized(path, device: str | torch.device | None = None, backend: str | None = None):
    """Load a model written by save_quantized.

    Args:
        path: the directory.
        device: where to put the model (default: atom_lab.default_device()).
        backend: "reference" or "triton" (default: the backend it was saved with).
    Returns:
        (model, tokenizer): the quantized model in eval mode (model.atom_config, model.atom_backend set), and the
        tokenizer if one was saved, else None.
    """
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.exists() or not (path / TENSORS_FILE).exists():
        raise FileNotFoundError(f"{path} is not a directory written by atom_lab.save_quantized: it needs {META_FILE} "
                                f"and {TENSORS_FILE}.")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file} has format {meta.get('format')!r}, expected {FORMAT!r}.")
    if meta.get("version") != VERSION:
        raise ValueError(f"{meta_file} has format version {meta.get('version')}, this atom_lab reads version "
                         f"{VERSION}; re-save the model with this atom_lab.")
    config = AtomConfig(**meta["atom_config"])
    model_config = transformers.AutoConfig.for_model(**meta["model_config"])
    dtype = getattr(torch, meta["dtype"])
    with _no_init():  # every tensor is overwritten below: skip the random initialisation (seconds at 135M)
        model = transformers.AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    tensors = load_file(str(path / TENSORS_FILE), device="cpu")
    for alias, key in meta["aliases"].items():
        tensors[alias] = tensors[key]  # the same tensor object: sharing is restored
    rotations = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(ROTATION_PREFIX)]}
    if config.rotation is not None and config.rotate_down and not meta.get("online_rotations"):
        raise ValueError(f"{meta_file}: config {config.name!r} rotates the down_proj inputs online, but the file holds "
                         "no online rotation (written by an older atom_lab, which dropped it); re-quantize and save "
                         "the model again.")
    built = {}
    for name, spec in meta["layers"].items():
        layer = _quant_layer(name, spec, config, tensors)
        j = meta.get("online_rotations", {}).get(name)
        if j is not None:
            if j not in built:  # one object per stored rotation, shared by its layers as before saving
                p = f"{ROTATION_PREFIX}{j}."
                built[j] = (KronRotation(rotations[p + "signs"], rotations[p + "kron"]) if p + "signs" in rotations
                            else rotations[p + "dense"])
            add_online_rotation(layer, built[j])
        _set_module(model, name, layer)
    model.load_state_dict(tensors, strict=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    model.atom_config = config
    model.atom_blocks_name = meta["blocks_name"]
    if meta.get("rotation") is not None:
        model.atom_rotation = meta["rotation"]
    model.to(device or default_device()).eval()
    set_backend(model, backend or meta["backend"])
    tokenizer = None
    if (path / "tokenizer_config.json").exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer
