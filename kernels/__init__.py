"""atom_lab.kernels: Triton kernels, each beside the PyTorch reference (`*_ref`) it must match.

This folder sits at the top of the repository and is installed as the subpackage `atom_lab.kernels`.
Import `atom_lab` first: it chooses between compiled Triton (CUDA GPU) and the CPU interpreter.
"""
if __name__ != "atom_lab.kernels":
    # Imported as a top-level `kernels`: the repository root is on sys.path and something probed for the PyPI
    # package of that name (transformers imports it to read its version). Stay an empty module then, instead of
    # pulling in triton before atom_lab could choose the interpreter; this code is `atom_lab.kernels`.
    __all__: list[str] = []
else:
    from .formats import PackedAtom, check_atom_shape, dequantize_atom_ref, quantize_atom_ref
    from .gemm import w4a4_gemm, w4a4_gemm_ref
    from .gemm_naive import w4a4_gemm_naive
    from .pack import PACK_BLOCK, pack_int4, pack_int4_ref, unpack_int4, unpack_int4_ref
    from .act_quant import (
        reorder_quantize, reorder_quantize_naive, reorder_quantize_ref, rmsnorm_quantize, rmsnorm_quantize_ref,
        rmsnorm_ref, silu_mul_quantize, silu_mul_quantize_ref, silu_mul_ref, silu_mul_rotate_quantize,
        silu_mul_rotate_quantize_ref,
    )

    __all__ = [
        "PACK_BLOCK", "pack_int4", "pack_int4_ref", "unpack_int4", "unpack_int4_ref",
        "PackedAtom", "check_atom_shape", "quantize_atom_ref", "dequantize_atom_ref",
        "w4a4_gemm", "w4a4_gemm_ref", "w4a4_gemm_naive",
        "reorder_quantize", "reorder_quantize_naive", "reorder_quantize_ref",
        "rmsnorm_quantize", "rmsnorm_quantize_ref", "rmsnorm_ref",
        "silu_mul_quantize", "silu_mul_quantize_ref", "silu_mul_ref",
        "silu_mul_rotate_quantize", "silu_mul_rotate_quantize_ref",
    ]
