"""atom_lab: learn and run Atom (W4A4 LLM quantization, MLSys 2024) on real 4-bit Triton kernels.

Import this package before anything that imports triton: on a machine without CUDA it switches Triton to its CPU
interpreter, which only works when chosen before triton's first import (see atom_lab/_runtime.py).
"""
from atom_lab._runtime import INTERPRET, default_device, environment  # noqa: I001  (must run first)


def _map_source_kernels() -> None:
    """Make `atom_lab.kernels` importable from a plain source checkout (a Colab clone, a GPU box without
    `pip install`): the installed package maps kernels/ there, a checkout on sys.path does not."""
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec("atom_lab.kernels") is not None:
        return
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.exists():
        raise ImportError(f"atom_lab.kernels not found (looked for {init}); reinstall with `pip install -e .`.")
    spec = importlib.util.spec_from_file_location("atom_lab.kernels", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["atom_lab.kernels"] = module
    spec.loader.exec_module(module)


_map_source_kernels()

from atom_lab.data import CORPORA, load_corpus
from atom_lab.eval import eval_windows, perplexity
from atom_lab.analysis import keeper_sweep, layer_error, matmul_error
from atom_lab.models import MODELS, TINY_ARCHS, cache_dir, load_model, tiny_model
from atom_lab.reorder import outlier_channels, reorder_activation, reorder_index, reorder_linear
from atom_lab.stats import ChannelStats, collect_stats, decoder_layers, decoder_layers_name, linear_names
from atom_lab.quantizers import (fake_quantize, fake_quantize_asymmetric, fake_quantize_mixed, fake_quantize_symmetric,
                            quantize_asymmetric, quantize_symmetric, search_act_clip, search_weight_clip)
from atom_lab.config import PRESETS, AtomConfig, ablation_configs, rotation_configs
from atom_lab.rotation import fold_rmsnorm, hadamard, rotate_model, rotation_matrix
from atom_lab.gptq import column_groups, gptq_quantize, rtn_quantize
from atom_lab.qlinear import QuantLinear, SharedInput
from atom_lab.backend import FusedMLP, RMSNormQuantize, set_backend
from atom_lab.smooth import smooth_model
from atom_lab.recipe import layer_inputs, model_size_report, quantize_model
from atom_lab.metrics import evaluate, kl_divergence, top1_agreement
from atom_lab.serialize import load_quantized, save_quantized
from atom_lab.kv_cache import KVCacheFull, KVFormat, PageError, PagePool, PageTable
from atom_lab.paged_model import PagedDecoder, simulate_kv
from atom_lab.serve import Engine, SamplingParams, simulate  # serve: above recipe / kv_cache, below cli

__version__ = "0.1.0"

__all__ = [
    "INTERPRET", "default_device", "environment",
    "CORPORA", "load_corpus",
    "eval_windows", "perplexity",
    "MODELS", "TINY_ARCHS", "cache_dir", "load_model", "tiny_model",
    "keeper_sweep", "layer_error", "matmul_error",
    "ChannelStats", "collect_stats", "decoder_layers", "decoder_layers_name", "linear_names",
    "outlier_channels", "reorder_activation", "reorder_index", "reorder_linear",
    "fake_quantize", "fake_quantize_asymmetric", "fake_quantize_mixed", "fake_quantize_symmetric",
    "quantize_asymmetric", "quantize_symmetric", "search_act_clip", "search_weight_clip",
    "KVCacheFull", "KVFormat", "PageError", "PagePool", "PageTable", "PagedDecoder", "simulate_kv",
    "PRESETS", "AtomConfig", "ablation_configs", "rotation_configs",
    "fold_rmsnorm", "hadamard", "rotate_model", "rotation_matrix", "column_groups", "gptq_quantize", "rtn_quantize",
    "QuantLinear", "smooth_model", "layer_inputs", "model_size_report", "quantize_model",
    "evaluate", "kl_divergence", "top1_agreement",
    "SharedInput", "RMSNormQuantize", "FusedMLP", "set_backend", "save_quantized", "load_quantized",
    "Engine", "SamplingParams", "simulate",
]
