"""An instructor's first grading run on a fresh clone: ``make grade LAB=...`` with nothing
generated before (no ``gradebook.db``, no ``make course``) grades the class.

Reference: the README's instructor guide and the Makefile's ``grade`` target (nbgrader
``generate_assignment`` into a scratch folder to register the lab, ``autograde``,
``generate_feedback``, ``export``). The copy is the working tree's tracked and unignored files,
as ``git clone`` would give them; the course's virtual environment is this Python's, passed as
``BIN`` (``-o`` keeps make from reinstalling it).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAB = "lab01_linear_quantization"

pytestmark = pytest.mark.grading


def fresh_clone(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.timeout(300)
def test_make_grade_works_on_a_fresh_clone(tmp_path):
    course = fresh_clone(tmp_path / "course")
    assert not (course / "gradebook.db").exists()
    submitted = course / "submitted" / "alice" / LAB
    submitted.mkdir(parents=True)
    # One submission: the solution itself (full marks expected).
    shutil.copy(course / "solutions" / LAB / f"{LAB}.ipynb", submitted)
    labs_before = {p: p.read_bytes() for p in sorted((course / "labs").rglob("*")) if p.is_file()}

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PYTHONPATH=str(course))  # the clone's qlib, not this checkout's
    out = subprocess.run(["make", "-o", ".venv/.installed", "grade", f"LAB={LAB}", f"BIN={bin_dir}"],
                         cwd=course, env=env, capture_output=True, text=True, timeout=280)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "No assignment with ID" not in log

    with open(course / f"grades_{LAB}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["assignment"], r["student_id"]) for r in rows] == [(LAB, "alice")]
    # every automatic point; the written answer (graded by hand in the Formgrader) waits at 0
    from test_grading import manual, points, release_nb

    by_hand = sum(points(release_nb(LAB))[gid] for gid in manual(release_nb(LAB)))
    assert by_hand > 0
    assert float(rows[0]["score"]) == float(rows[0]["max_score"]) - by_hand > 0
    assert (course / "feedback" / "alice" / LAB / f"{LAB}.html").exists()
    with open(course / "grades.csv") as f:
        assert {r["assignment"] for r in csv.DictReader(f)} == {LAB}
    # The committed release is left as it was (the lab was registered from a scratch copy).
    assert {p: p.read_bytes() for p in sorted((course / "labs").rglob("*")) if p.is_file()} == labs_before
