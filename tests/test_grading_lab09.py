"""Lab 09 through real nbgrader: a wrong answer gets partial marks, the written answer waits
for the instructor. Also the lab's checks themselves: the reference answers (qlib.mixed,
qlib.export) pass and typical wrong answers fail.

Reference: nbgrader 0.9 (generate_assignment, autograde, export), qlib.check.lab09.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from qlib.check import CheckFailed, lab09
from qlib.mixed import greedy_allocate, ilp_allocate

ROOT = Path(__file__).resolve().parents[1]
NBGRADER = str(Path(sys.executable).parent / "nbgrader")
LAB = "lab09_mixed_precision"
MANUAL = 2.0  # Q4, the written answer

GREEDY = '''def allocate(sensitivity, sizes, budget_bits):
    from qlib.mixed import greedy_allocate
    return greedy_allocate(sensitivity, sizes, budget_bits)
'''


# ------------------------------------------------------------------ the checks, without nbgrader
def test_reference_answers_pass():
    def trace(loss_fn, weight, samples, seed):
        w = weight.detach().clone().requires_grad_(True)
        g = torch.autograd.grad(loss_fn(w), w, create_graph=True)[0]
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(samples):
            v = (torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w.dtype)
            total += float((v * torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True)[0]).sum())
        return total / samples

    lab09.hessian_trace(trace)
    lab09.hessian_trace_hidden(trace)
    lab09.allocate(ilp_allocate)
    lab09.allocate_hidden(ilp_allocate)


def test_wrong_answers_fail_with_a_message():
    with pytest.raises(CheckFailed, match="greedy lowering is not optimal"):
        lab09.allocate_hidden(greedy_allocate)
    with pytest.raises(CheckFailed, match="over the budget"):
        lab09.allocate(lambda sens, sizes, budget: {n: 8 for n in sizes})
    with pytest.raises(CheckFailed, match="diagonal Hessian"):
        lab09.hessian_trace(lambda loss_fn, w, samples, seed: float(w.numel()))
    with pytest.raises(CheckFailed, match="agreement"):
        lab09.verify_onnx(lambda qmodel, x: {"agreement": 0.5, "max_abs_diff": 0.0})
    with pytest.raises(CheckFailed, match="not implemented"):
        lab09.verify_onnx(lambda qmodel, x: (_ for _ in ()).throw(NotImplementedError()))


# ------------------------------------------------------------------ nbgrader end to end
def nbgrader(course: Path, *args: str) -> None:
    out = subprocess.run([NBGRADER, *args], cwd=course, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"


def answers(nb) -> dict[str, str]:
    return {c.metadata["nbgrader"]["grade_id"]: c.source for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("solution")}


def submission(release_nb, replace: dict[str, str]):
    nb = nbformat.from_dict(release_nb)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in replace:
            cell.source = replace[gid]
    return nb


@pytest.mark.grading
def test_wrong_allocation_gets_partial_marks(tmp_path):
    course = tmp_path
    shutil.copy(ROOT / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "solutions" / LAB, course / "solutions" / LAB, ignore=shutil.ignore_patterns("*.py"))
    nbgrader(course, "generate_assignment", LAB, "--force")
    release = nbformat.read(course / "labs" / LAB / f"{LAB}.ipynb", as_version=4)
    good = answers(nbformat.read(ROOT / "solutions" / LAB / f"{LAB}.ipynb", as_version=4))
    for student, nb in {"perfect": submission(release, good),
                        "greedy": submission(release, {**good, "q2-answer": GREEDY})}.items():
        target = course / "submitted" / student / LAB
        target.mkdir(parents=True)
        nbformat.write(nb, target / f"{LAB}.ipynb")
    nbgrader(course, "autograde", LAB, "--create")
    nbgrader(course, "export", "--to", "grades.csv")
    with open(course / "grades.csv") as f:
        rows = {r["student_id"]: r for r in csv.DictReader(f) if r["assignment"] == LAB}
    full = float(rows["perfect"]["max_score"])
    assert full == 2 + 3 + 2 + MANUAL
    perfect, greedy = float(rows["perfect"]["score"]), float(rows["greedy"]["score"])
    assert greedy == perfect - 3  # Q2 is worth 3 points; the hidden case defeats greedy
    assert perfect == full - MANUAL  # every autograded point; the written answer waits for the instructor
