"""atom_lab: learn and run Atom (W4A4 LLM quantization, MLSys 2024) on real 4-bit Triton kernels.

Import this package before anything that imports triton: on a machine without CUDA it switches Triton to its CPU
interpreter, which only works when chosen before triton's first import (see atom_lab/_runtime.py).
"""
from atom_lab._runtime import INTERPRET, default_device, environment  # noqa: I001  (must run first)
from atom_lab.data import CORPORA, load_corpus
from atom_lab.eval import eval_windows, perplexity
from atom_lab.models import MODELS, TINY_ARCHS, cache_dir, load_model, tiny_model

__version__ = "0.1.0"

__all__ = [
    "INTERPRET", "default_device", "environment",
    "CORPORA", "load_corpus",
    "eval_windows", "perplexity",
    "MODELS", "TINY_ARCHS", "cache_dir", "load_model", "tiny_model",
]
