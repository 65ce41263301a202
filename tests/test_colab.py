"""The Colab setup cell and its GPU plan. CI has no Colab: ATOM_LAB_COLAB=simulate takes the Colab branch and
prints the install commands instead of running them (nothing is pip-installed here)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import atom_lab  # noqa: F401  (first: the interpreter switch)
from atom_lab import classroom, colab

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cap, kernels, dtype, small, large", [
    (None, "interpreter", "float32", "fused", "fused"),
    ((7, 5), "compiled", "float16", "fused", "fused"),   # T4: no bf16 / FP8 in Triton: the int8 kernel only
    ((8, 0), "compiled", "bfloat16", "fused", "fused"),  # A100: no FP8 tensor cores
    ((8, 9), "compiled", "bfloat16", "fused", "fp8"),
    ((9, 0), "compiled", "bfloat16", "fused", "blockwise"),
])
def test_plan_per_capability(cap, kernels, dtype, small, large):
    p = colab.plan(cap, torch_ver=(2, 9))
    assert (p["kernels"], p["model_dtype"], p["gemm_small_m"], p["gemm_large_m"]) == (kernels, dtype, small, large)


def test_plan_rejects_bad_capability():
    with pytest.raises(ValueError, match="capability"):
        colab.plan("7.5")
    with pytest.raises(ValueError, match="older than the T4"):
        colab.plan((6, 1))


def test_asset_pins_match_requirements_file():
    pins = [line.split("#")[0].strip() for line in (ROOT / "requirements-assets.txt").read_text().splitlines()]
    assert tuple(p for p in pins if p) == colab.ASSETS


def _run_cell(env_extra, epilogue=""):
    info = classroom.project_info(ROOT)
    source = colab.setup_cell_source(info["repository"], info["tag"]) + "\n" + epilogue
    env = {k: v for k, v in os.environ.items() if k not in ("ATOM_LAB_COLAB", "TRITON_INTERPRET")}
    env.update(env_extra, CUDA_VISIBLE_DEVICES="")  # Colab's CPU runtime
    return subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=300,
                          cwd="/")  # not the repository: the cell must not rely on its layout


def test_setup_cell_does_nothing_outside_colab():
    r = _run_cell({}, "print('imported atom_lab:', 'atom_lab' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "imported atom_lab: False"


def test_setup_cell_on_simulated_colab():
    r = _run_cell({"ATOM_LAB_COLAB": "simulate"},
                  "print('TRITON_INTERPRET =', os.environ.get('TRITON_INTERPRET'))")
    assert r.returncode == 0, r.stderr
    info = classroom.project_info(ROOT)
    lines = r.stdout.splitlines()
    assert lines[0].endswith(f"pip install --quiet atom-lab @ git+{info['repository']}@{info['tag']}")
    assert lines[1].endswith("pip install --quiet --no-deps " + " ".join(colab.ASSETS))
    assert lines[2].startswith("atom_lab on Colab: GPU none -> interpreter kernels, model dtype float32")
    assert lines[-1] == "TRITON_INTERPRET = 1"


def test_readme_colab_links_come_from_pyproject():
    import re

    info = classroom.project_info(ROOT)
    links = re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", (ROOT / "README.md").read_text())
    assert links, "README: the course table has no Colab badges"
    for link in links:
        nb = link.rsplit("/", 1)[-1]
        assert (ROOT / "notebooks" / nb).exists(), link
        assert f"({link})" in classroom.badge_source(info["repository"], info["tag"], nb), link


def test_every_package_is_installed_by_a_non_editable_install():
    """Colab installs atom_lab with `pip install git+...` (not editable): setuptools ships only the packages that
    pyproject.toml lists, so a subpackage missing there breaks `import atom_lab` on Colab only."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(tool["packages"]), tool["package-dir"]
    found = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            if not any(p.startswith((".", "__")) for p in rel):
                found.add(".".join((name, *rel)))
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
