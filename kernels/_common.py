"""Small helpers shared by the kernel wrappers: input checks and launch sizes for compiled vs interpreted runs."""
from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (atom_lab sets this on machines without CUDA)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_tensor(t, name: str, dtype: torch.dtype | tuple[torch.dtype, ...], dim: int | None = None) -> None:
    """Raise a clear error unless `t` is a non-empty tensor of `dtype` (and `dim` dimensions, when given)."""
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {t.dtype}.")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}.")
    if t.dim() < 1 or t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}.")


def pow2_at_least(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def m_bucket(M: int) -> int:
    """Autotuning key for the token count: configurations are tuned per power of two, not per exact M."""
    return min(8192, triton.next_power_of_2(M))


def tune_bench(fn, quantiles):
    """The timing triton.autotune uses for our kernels: fewer repetitions than its default (compile time dominates)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)
