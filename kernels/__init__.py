"""atom_lab.kernels: Triton kernels, each beside the PyTorch reference (`*_ref`) it must match.

This folder sits at the top of the repository and is installed as the subpackage `atom_lab.kernels`.
Import `atom_lab` first: it chooses between compiled Triton (CUDA GPU) and the CPU interpreter.
"""
if __name__ != "atom_lab.kernels":
    # Imported as a top-level `kernels`: the repository root is on sys.path (python -m from the repo root) and
    # something asked for the PyPI package of that name (Hugging Face's `kernels`, which transformers >= 5.25
    # depends on and imports names from). Hand over that package when it is installed, found on sys.path without
    # this repository; else stay an empty module. Either way this folder's code is only ever `atom_lab.kernels`
    # (and triton is not pulled in before atom_lab could choose the interpreter).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _repo = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _repo]
    _spec = _machinery.PathFinder.find_spec(__name__, _path)
    if _spec is not None and _spec.origin != _os.path.abspath(__file__):
        _module = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _module  # what `import kernels` returns once this file has run
        _spec.loader.exec_module(_module)
    __all__: list[str] = []
else:
    from .formats import PackedAtom, check_atom_shape, dequantize_atom_ref, quantize_atom_ref
    from .gemm import w4a4_gemm, w4a4_gemm_ref
    from .gemm_naive import w4a4_gemm_naive
    from .pack import PACK_BLOCK, pack_int4, pack_int4_ref, unpack_int4, unpack_int4_ref
    from .act_quant import (
        reorder_quantize, reorder_quantize_naive, reorder_quantize_ref, rmsnorm_quantize, rmsnorm_quantize_ref,
        rmsnorm_ref, silu_mul_quantize, silu_mul_quantize_ref, silu_mul_ref,
    )
    from .act_quant_rotate import silu_mul_rotate_quantize, silu_mul_rotate_quantize_ref

    __all__ = [
        "PACK_BLOCK", "pack_int4", "pack_int4_ref", "unpack_int4", "unpack_int4_ref",
        "PackedAtom", "check_atom_shape", "quantize_atom_ref", "dequantize_atom_ref",
        "w4a4_gemm", "w4a4_gemm_ref", "w4a4_gemm_naive",
        "reorder_quantize", "reorder_quantize_naive", "reorder_quantize_ref",
        "rmsnorm_quantize", "rmsnorm_quantize_ref", "rmsnorm_ref",
        "silu_mul_quantize", "silu_mul_quantize_ref", "silu_mul_ref",
        "silu_mul_rotate_quantize", "silu_mul_rotate_quantize_ref",
    ]
