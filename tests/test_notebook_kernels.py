"""The kernels notebook 04 writes by hand are the library's, and the naive W4A4 GEMM equals its reference.

Notebook 04 teaches by writing kernels in cells; the library keeps the same code (kernels/act_quant.py's naive
quantizer and its helpers, kernels/gemm_naive.py). These tests compare the notebook's cells with the library's source
(as parsed Python, so comments and formatting may differ), and check the naive GEMM like every other kernel.
"""
import ast
import inspect
import json
import random
from pathlib import Path

import pytest
import torch

import atom_lab
from atom_lab.kernels import gemm_naive, quantize_atom_ref, w4a4_gemm_naive, w4a4_gemm_ref
from atom_lab.kernels import act_quant as qmod

DEV = atom_lab.default_device()
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "04_kernel_writing.ipynb"
TAUGHT = {  # function name in the notebook -> the library function it must equal
    "_scale_fp16": qmod._scale_fp16,
    "_quantize": qmod._quantize,
    "_quantize_groups_naive_kernel": qmod._quantize_groups_naive_kernel,
    "w4a4_naive_kernel": gemm_naive.w4a4_naive_kernel,
}


def _functions(source: str) -> dict[str, str]:
    return {n.name: ast.dump(n) for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}


def test_notebook_kernels_are_the_library_kernels():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    defined = {}
    for c in cells:
        if c["cell_type"] == "code":
            src = "".join(c["source"])
            src = "\n".join(line for line in src.split("\n") if not line.lstrip().startswith(("%", "!")))
            defined.update(_functions(src))
    for name, fn in TAUGHT.items():
        assert name in defined, f"notebook 04 no longer defines {name}"
        lib = _functions(inspect.getsource(getattr(fn, "fn", fn)))[name]
        assert defined[name] == lib, f"notebook 04's {name} differs from the library's; keep them equal"


@pytest.mark.parametrize("seed", range(10))
def test_naive_gemm_matches_the_reference(seed):
    r = random.Random(seed)
    G, keeper = r.choice([32, 64, 128]), r.choice([0, 64, 128])
    M, N, K4 = r.choice([1, 3, 17, 64, 130]), r.choice([1, 16, 40, 200]), r.choice([1, 2, 3]) * 128
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K4 + keeper, generator=g) * (torch.rand(K4 + keeper, generator=g) * 10)
    w = torch.randn(N, K4 + keeper, generator=g) * 0.05
    a, b = quantize_atom_ref(x.to(DEV), G, keeper, 0.9), quantize_atom_ref(w.to(DEV), G, keeper, 0.85)
    out_dtype = r.choice([torch.float32, torch.float16, torch.bfloat16])
    y = w4a4_gemm_naive(a, b, out_dtype)
    ref = w4a4_gemm_ref(a, b, torch.float32)
    assert y.dtype == out_dtype and y.shape == (M, N)
    if DEV.type == "cpu":  # the interpreter does the reference's very operations
        assert torch.equal(y, ref.to(out_dtype))
    else:  # compiled: FMA contraction may round differently
        bound = w4a4_gemm_ref(a, b, torch.float32, absolute=True)
        tol = 1e-5 * bound + ref.abs() * (2.0 ** -8 if out_dtype == torch.bfloat16 else 2.0 ** -11)
        assert ((y.float() - ref).abs() <= tol).all()


def test_naive_gemm_checks_its_inputs():
    a = quantize_atom_ref(torch.randn(4, 192, device=DEV), 64, 128)
    w = quantize_atom_ref(torch.randn(8, 256, device=DEV), 64, 128)
    with pytest.raises(ValueError, match="K="):
        w4a4_gemm_naive(a, w)
    with pytest.raises(TypeError, match="out_dtype"):
        w4a4_gemm_naive(a, a, torch.int32)
