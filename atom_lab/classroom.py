"""The course as a classroom: student releases with autograded exercises (nbgrader), and the notebooks' Colab cells.

The convention every course notebook follows (`notebooks/[0-9][0-9]*.ipynb`, found by glob, so a new chapter is
covered by `check`, `make student` and tests/test_student.py as soon as it exists):

- cell 0: markdown, tag `colab-badge`: the "Open in Colab" badge; cell 1: code, tag `colab-setup`: the Colab setup
  cell. Both are written by `sync()` (`make notebooks-sync`) from pyproject.toml and never edited by hand.
- each exercise is a pair of nbgrader cells:
  an **answer cell** (metadata.nbgrader: solution=true, grade=false, grade_id "exN-answer") whose solution lines sit
  between `### BEGIN SOLUTION` and `### END SOLUTION`, preceded by a starter line that runs and is wrong
  (`my_index = None`, a function whose body is only its docstring, the buggy mask line of a kernel), so that the
  student's copy runs top to bottom with no syntax error; and a **check cell** (grade=true, locked, points,
  grade_id "exN-check") of asserts with exact expected values.
- a solution region is never the only statement of a Triton kernel: the stub left in its place is a comment, so the
  kernel keeps the starter line and still compiles.

`build_student` runs nbgrader's generate_assignment (one assignment per notebook) and keeps the notebook's outputs
except those of answer and check cells; `validate` runs a notebook and reports the checks that pass / fail;
`grade` autogrades one submitted notebook and returns the points of each exercise.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from atom_lab import colab

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_GLOB = "[0-9][0-9]*.ipynb"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = "# YOUR CODE HERE"
BADGE_TAG, SETUP_TAG = "colab-badge", "colab-setup"
# Chapters not yet converted to the convention (badge/setup cells, exercise marks). `make student` leaves them out
# of the release (saying so) and the tests expect them to fail `check`; any OTHER notebook that fails `check` stops
# the build. Remove a name once its notebook is converted.
NOT_CONVERTED = frozenset()


def course_notebooks(root: Path | str = REPO_ROOT) -> list[Path]:
    """Every course notebook under root/notebooks, in chapter order."""
    return sorted((Path(root) / "notebooks").glob(NOTEBOOK_GLOB))


def project_info(root: Path | str = REPO_ROOT) -> dict:
    """{"repository": URL, "tag": "v<version>"} from pyproject.toml: the one place the repository URL is written."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    meta = tomllib.loads((Path(root) / "pyproject.toml").read_text())["project"]
    repo = meta.get("urls", {}).get("Repository")
    if not repo or not repo.startswith("https://github.com/"):
        raise ValueError("pyproject.toml [project.urls] needs Repository = \"https://github.com/<org>/<repo>\" "
                         f"(Colab badges and the setup cell are built from it), got {repo!r}.")
    return {"repository": repo.rstrip("/"), "tag": "v" + meta["version"]}


def badge_source(repository: str, tag: str, notebook: str) -> str:
    path = repository.removeprefix("https://github.com/")
    url = f"https://colab.research.google.com/github/{path}/blob/{tag}/notebooks/{notebook}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def _cell(kind: str, source: str, tag: str) -> dict:
    cell = {"cell_type": kind, "metadata": {"tags": [tag]}, "source": source}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def _tagged(cell: dict, tag: str) -> bool:
    return tag in cell.get("metadata", {}).get("tags", [])


def sync(path: Path | str, root: Path | str = REPO_ROOT) -> bool:
    """Write (or refresh) the badge and setup cells at the top of a notebook; True when the file changed."""
    path, info = Path(path), project_info(root)
    nb = json.loads(path.read_text())
    want = [_cell("markdown", badge_source(info["repository"], info["tag"], path.name), BADGE_TAG),
            _cell("code", colab.setup_cell_source(info["repository"], info["tag"]), SETUP_TAG)]
    rest = [c for c in nb["cells"] if not (_tagged(c, BADGE_TAG) or _tagged(c, SETUP_TAG))]
    old = [c for c in nb["cells"] if _tagged(c, BADGE_TAG) or _tagged(c, SETUP_TAG)]
    if len(old) == 2 and all(_src(o) == w["source"] for o, w in zip(old, want)) and nb["cells"][:2] == old:
        return False
    nb["cells"] = want + rest
    import nbformat

    nbformat.write(nbformat.from_dict(nb), str(path))
    return True


def _src(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def exercises(nb: dict) -> tuple[list[dict], list[dict]]:
    """(answer cells, check cells) of a notebook, by their nbgrader metadata."""
    meta = [c.get("metadata", {}).get("nbgrader") for c in nb["cells"]]
    answers = [c for c, m in zip(nb["cells"], meta) if m and m.get("solution")]
    checks = [c for c, m in zip(nb["cells"], meta) if m and m.get("grade")]
    return answers, checks


def check(path: Path | str, root: Path | str = REPO_ROOT) -> list[str]:
    """Everything in a course notebook that breaks the convention above; [] when it follows it."""
    path, info = Path(path), project_info(root)
    nb = json.loads(path.read_text())
    problems = []
    cells = nb["cells"]
    if len(cells) < 2 or not _tagged(cells[0], BADGE_TAG) or \
            _src(cells[0]) != badge_source(info["repository"], info["tag"], path.name):
        problems.append("cell 0 is not the Colab badge for this notebook (run `make notebooks-sync`)")
    if len(cells) < 2 or not _tagged(cells[1], SETUP_TAG) or \
            _src(cells[1]) != colab.setup_cell_source(info["repository"], info["tag"]):
        problems.append("cell 1 is not the generated Colab setup cell (run `make notebooks-sync`)")
    answers, checks = exercises(nb)
    if not answers or not checks:
        problems.append("no exercise: needs nbgrader answer cells (solution) and check cells (grade, points)")
    ids = [c["metadata"]["nbgrader"].get("grade_id") for c in answers + checks]
    if len(set(ids)) != len(ids) or None in ids:
        problems.append(f"grade_id missing or repeated: {ids}")
    for c in answers:
        s = _src(c)
        if c["cell_type"] != "code" or s.count(BEGIN) == 0 or s.count(BEGIN) != s.count(END):
            problems.append(f"answer cell {c['metadata']['nbgrader'].get('grade_id')}: needs {BEGIN} / {END}")
    for c in checks:
        m = c["metadata"]["nbgrader"]
        if not m.get("locked") or not m.get("points", 0) > 0 or c["cell_type"] != "code":
            problems.append(f"check cell {m.get('grade_id')}: must be a locked code cell with points > 0")
        if BEGIN in _src(c):
            problems.append(f"check cell {m.get('grade_id')} holds a solution region")
    return problems


def solution_lines(nb: dict) -> list[str]:
    """The non-trivial lines inside every solution region (what must not reach a student)."""
    lines = []
    for cell in exercises(nb)[0]:
        inside = False
        for line in _src(cell).splitlines():
            if BEGIN in line:
                inside = True
            elif END in line:
                inside = False
            elif inside and len(line.strip()) > 6:
                lines.append(line.strip())
    return lines


def _leaked(source: dict, release: dict) -> list[str]:
    """Solution lines found in the release that the source shows nowhere outside its solution regions."""
    outside = []
    for cell in source["cells"]:
        inside = False
        for line in _src(cell).splitlines():
            inside = (inside or BEGIN in line) and END not in line
            if not inside:
                outside.append(line.strip())
        if not cell.get("metadata", {}).get("nbgrader", {}).get("solution"):  # e.g. a printed library kernel
            for out in cell.get("outputs", []):
                outside.extend(line.strip() for line in "".join(out.get("text", "")).splitlines())
    released = set()
    for cell in release["cells"]:
        released.update(line.strip() for line in _src(cell).splitlines())
        for out in cell.get("outputs", []):
            released.update(line.strip() for line in "".join(out.get("text", "")).splitlines())
    released.update(line.strip() for line in json.dumps(release.get("metadata", {})).split("\\n"))
    return [line for line in solution_lines(source) if line not in set(outside) and line in released]


def _config(course: Path):
    from traitlets.config import Config

    c = Config()
    c.CourseDirectory.root = str(course)
    c.ClearSolutions.code_stub = {"python": STUB}
    c.ClearOutput.enabled = False  # keep the figures a student reads before running; graded cells cleared below
    c.Execute.timeout = 900
    c.Execute.interrupt_on_timeout = True
    return c


def _api(course: Path):
    import os

    from nbgrader.apps import NbGraderAPI

    # nbgrader runs `alembic` (its gradebook migrations) as a program: find it beside this Python, venv or not.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    return NbGraderAPI(config=_config(course))


def _stage(notebooks: list[Path], course: Path) -> None:
    for nb in notebooks:
        dest = course / "source" / nb.stem / nb.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(nb, dest)


def build_student(out: Path | str, notebooks: list[Path] | None = None, course: Path | str | None = None) -> list[Path]:
    """Write the student release of every course notebook to `out` (and the nbgrader course to `course`).

    out/<notebook>.ipynb: solutions replaced by stubs, answer and check cells without outputs, the rest as executed.
    course (default out/../course): nbgrader's course directory (source/, release/, gradebook.db) for grading.
    """
    notebooks = course_notebooks() if notebooks is None else [Path(n) for n in notebooks]
    out = Path(out)
    course = Path(course) if course else out.parent / "course"
    out.mkdir(parents=True, exist_ok=True)
    _stage(notebooks, course)
    api = _api(course)
    written = []
    for nb in notebooks:
        result = api.generate_assignment(nb.stem)
        if not result["success"]:
            raise RuntimeError(f"nbgrader generate_assignment failed for {nb.name}:\n{result['log']}")
        release = json.loads((course / "release" / nb.stem / nb.name).read_text())
        for cell in release["cells"]:
            if cell.get("metadata", {}).get("nbgrader", {}).get("solution") or \
                    cell.get("metadata", {}).get("nbgrader", {}).get("grade"):
                cell["outputs"], cell["execution_count"] = [], None
        leaked = _leaked(json.loads(nb.read_text()), release)
        if leaked:
            raise RuntimeError(f"{nb.name}: solution lines left in the student release: {leaked[:3]}")
        dest = out / nb.name
        dest.write_text(json.dumps(release, indent=1, ensure_ascii=False) + "\n")
        written.append(dest)
    return written


def validate(path: Path | str) -> dict:
    """Run a notebook as nbgrader does; {"passed": [grade_id], "failed": [grade_id]} over its check cells."""
    from nbgrader.validator import Validator

    path = Path(path).resolve()
    v = Validator(config=_config(path.parent))
    nb = _execute(v, path)
    passed = {c.metadata.nbgrader.grade_id for c in v._get_passed_cells(nb)}
    checks = [c.metadata.nbgrader.grade_id for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
    return {"passed": [g for g in checks if g in passed], "failed": [g for g in checks if g not in passed]}


def _execute(validator, path: Path):
    from nbformat import read
    from nbgrader import utils

    with utils.chdir(str(path.parent)):
        with open(path.name) as f:
            nb = read(f, as_version=4)
        return validator._preprocess(nb)


def grade(submission: Path | str, notebook: str, course: Path | str, student: str = "student") -> dict:
    """Autograde one submitted notebook against the course built by `build_student`; {grade_id: (score, max)}."""
    from nbgrader.api import Gradebook

    course, stem = Path(course), Path(notebook).stem
    dest = course / "submitted" / student / stem / f"{stem}.ipynb"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(submission, dest)
    result = _api(course).autograde(stem, student)
    if not result["success"]:
        raise RuntimeError(f"nbgrader autograde failed for {submission}:\n{result['log']}")
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        sub = gb.find_submission_notebook(stem, stem, student)
        return {g.name: (g.score, g.max_score) for g in sub.grades}


def main(argv: list[str] | None = None) -> int:
    """`python -m atom_lab.classroom {sync,check,build} [--out DIR]` (make notebooks-sync / make student)."""
    import argparse

    ap = argparse.ArgumentParser(prog="atom_lab.classroom", description=main.__doc__)
    ap.add_argument("command", choices=["sync", "check", "build"])
    ap.add_argument("--out", default=str(REPO_ROOT / "build" / "student"))
    args = ap.parse_args(argv)
    if args.command == "sync":
        for nb in course_notebooks():
            print(("updated " if sync(nb) else "ok      ") + nb.name)
        return 0
    if args.command == "check":
        bad = {nb.name: check(nb) for nb in course_notebooks()}
        for name, problems in bad.items():
            print(name + ": " + ("ok" if not problems else "; ".join(problems)))
        return 1 if any(bad.values()) else 0
    ready = []
    for nb in course_notebooks():
        problems = check(nb)
        if problems and nb.stem in NOT_CONVERTED:
            print(f"{nb.name}: not converted yet, left out of the release", file=sys.stderr)
        elif problems:
            print(f"{nb.name}: {'; '.join(problems)}", file=sys.stderr)
            return 1
        else:
            ready.append(nb)
    for path in build_student(args.out, ready):
        print("student release:", path)
    print(f"nbgrader course (for grading): {Path(args.out).parent / 'course'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
