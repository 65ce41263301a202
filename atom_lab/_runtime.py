"""Where kernels run: compiled on a CUDA GPU, or Triton's interpreter on the CPU.

The interpreter must be chosen before `triton` is first imported anywhere in the process: triton reads
TRITON_INTERPRET while it sets up `triton.language`, and a late switch leaves tl.sum/tl.max broken. Importing
atom_lab therefore decides first; notebooks and tests import atom_lab before anything that pulls in triton
(transformers, torch.compile).
"""
from __future__ import annotations

import os
import platform
import sys

import torch


def _decide() -> bool:
    """Set TRITON_INTERPRET=1 when there is no CUDA device; return True when kernels are interpreted."""
    requested = os.environ.get("TRITON_INTERPRET", "").strip()
    if torch.cuda.is_available():
        # A user may still ask for the interpreter on a GPU machine (debugging a kernel); respect it.
        return requested == "1"
    if requested != "1" and "triton" in sys.modules:
        raise ImportError(
            "atom_lab: triton was imported in compiled mode before atom_lab, but this machine has no CUDA GPU, "
            "so Triton kernels can only run in its CPU interpreter. Fix: `import atom_lab` before anything that "
            "imports triton (transformers, torch.compile), or start Python with TRITON_INTERPRET=1 set "
            "(in a notebook: restart the kernel and import atom_lab in the first cell)."
        )
    os.environ["TRITON_INTERPRET"] = "1"
    return True


INTERPRET: bool = _decide()
DEVICE: torch.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_device() -> torch.device:
    """The device atom_lab puts models and kernel inputs on: the CUDA GPU if there is one, else the CPU."""
    return DEVICE


def environment() -> dict:
    """Versions and the kernel mode, for notebooks and benchmark JSON."""
    import transformers
    import triton

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})",
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "kernels": "Triton interpreter (CPU): correct results, meaningless timings" if INTERPRET
        else "compiled Triton on the GPU",
        "cpu_threads": torch.get_num_threads(),
    }
    return info
