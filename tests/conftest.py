"""Shared fixtures. atom_lab is imported first so Triton picks its CPU interpreter on machines without CUDA."""
import atom_lab  # noqa: F401  (must precede anything that imports triton)

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2():
    """The real offline model, float32, loaded once per test session: (model, tokenizer)."""
    return atom_lab.load_model("smollm2-135m", dtype=torch.float32)


@pytest.fixture(scope="session")
def corpus():
    return atom_lab.load_corpus("wiki")


@pytest.fixture(params=sorted(atom_lab.TINY_ARCHS))
def tiny(request):
    """Each tiny architecture in turn: (arch, model, tokenizer)."""
    model, tok = atom_lab.tiny_model(request.param, seed=0)
    return request.param, model, tok
