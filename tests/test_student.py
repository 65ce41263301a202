"""Student releases and grading (atom_lab/classroom.py). Every course notebook, found by glob, must follow the
convention; its student release must have every check fail (stubs) while the solution version (the notebook as
committed, run by nbval) has every check pass. A check that passes on a stub is a defect."""
import json
from pathlib import Path

import nbformat
import pytest

import atom_lab  # noqa: F401
from atom_lab import classroom

NOTEBOOKS = classroom.course_notebooks()
# Chapters not yet converted (badge/setup cells, exercise marks): they xfail while `classroom.check` reports
# problems and pass (xpass) once converted. One list with `make student`, which leaves them out of the release.
AWAITING = classroom.NOT_CONVERTED


def _awaiting(path):
    if path.stem in AWAITING and classroom.check(path):
        pytest.xfail(f"{path.name} is not converted yet: " + "; ".join(classroom.check(path)))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_convention(path):
    _awaiting(path)
    assert classroom.check(path) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_checks_passed(path):
    """The executed notebook (solutions in place) shows no error in any check cell."""
    _awaiting(path)
    _, checks = classroom.exercises(json.loads(path.read_text()))
    for cell in checks:
        assert cell.get("outputs"), f"{cell['metadata']['nbgrader']['grade_id']}: not executed; re-run the notebook"
        assert not [o for o in cell["outputs"] if o["output_type"] == "error"]


def _tiny_course(tmp_path):
    """A two-exercise notebook with no model: the whole build / validate / grade pipeline in seconds."""
    def cell(src, **nbg):
        c = nbformat.v4.new_code_cell(src)
        if nbg:
            c.metadata["nbgrader"] = dict(schema_version=3, task=False, **nbg)
        return c
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        cell("import torch"),
        cell("answer = None  # your answer\n### BEGIN SOLUTION\nanswer = 6 * 7\n### END SOLUTION",
             solution=True, grade=False, locked=False, grade_id="ex1-answer"),
        cell("assert answer == 42", solution=False, grade=True, locked=True, points=2, grade_id="ex1-check"),
        cell("def double(t):\n    \"\"\"int tensor -> 2 t\"\"\"\n    ### BEGIN SOLUTION\n    return 2 * t\n"
             "    ### END SOLUTION", solution=True, grade=False, locked=False, grade_id="ex2-answer"),
        cell("assert torch.equal(double(torch.tensor([1, -3])), torch.tensor([2, -6]))",
             solution=False, grade=True, locked=True, points=1, grade_id="ex2-check"),
    ]
    src = tmp_path / "src" / "99_tiny.ipynb"
    src.parent.mkdir()
    nbformat.write(nb, src)
    return src


def test_build_validate_and_grade_a_tiny_notebook(tmp_path):
    src = _tiny_course(tmp_path)
    (release,) = classroom.build_student(tmp_path / "student", [src], course=tmp_path / "course")
    text = release.read_text()
    assert "6 * 7" not in text and "return 2 * t" not in text and classroom.STUB in text
    assert classroom.validate(src) == {"passed": ["ex1-check", "ex2-check"], "failed": []}
    assert classroom.validate(release) == {"passed": [], "failed": ["ex1-check", "ex2-check"]}
    course = tmp_path / "course"
    assert classroom.grade(src, "99_tiny", course, "ada") == {"ex1-check": (2.0, 2.0), "ex2-check": (1.0, 1.0)}
    assert classroom.grade(release, "99_tiny", course, "bob") == {"ex1-check": (0.0, 2.0), "ex2-check": (0.0, 1.0)}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_check_fails_on_the_student_release(path, tmp_path):
    """Runs the whole student notebook (as nbgrader's validate --invert does): no check may pass on a stub."""
    _awaiting(path)
    (release,) = classroom.build_student(tmp_path / "student", [path], course=tmp_path / "course")
    assert classroom._leaked(json.loads(path.read_text()), json.loads(release.read_text())) == []
    result = classroom.validate(release)
    _, checks = classroom.exercises(json.loads(path.read_text()))
    assert result["passed"] == []
    assert result["failed"] == [c["metadata"]["nbgrader"]["grade_id"] for c in checks]
