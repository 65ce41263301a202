"""Shared fixtures. atom_lab is imported first so Triton picks its CPU interpreter on machines without CUDA."""
import atom_lab  # noqa: F401  (must precede anything that imports triton)

import importlib.util

import pytest
import torch

from atom_lab.data import CORPORA
from atom_lab.models import MODELS


def _require(spec) -> None:
    # The packages are dependencies (make test installs them); a bare GPU image may lack them: skip, saying how.
    if importlib.util.find_spec(spec.package) is None:
        pytest.skip(f"{spec.package} is not installed ({spec.pip_install})")


@pytest.fixture(scope="session")
def smollm2():
    """The real offline model, float32, loaded once per test session: (model, tokenizer)."""
    _require(MODELS["smollm2-135m"])
    return atom_lab.load_model("smollm2-135m", dtype=torch.float32)


@pytest.fixture(scope="session")
def corpus():
    _require(CORPORA["wiki"])
    return atom_lab.load_corpus("wiki")


@pytest.fixture
def smollm2_package():
    _require(MODELS["smollm2-135m"])


@pytest.fixture(params=sorted(atom_lab.TINY_ARCHS))
def tiny(request):
    """Each tiny architecture in turn: (arch, model, tokenizer)."""
    model, tok = atom_lab.tiny_model(request.param, seed=0)
    return request.param, model, tok
