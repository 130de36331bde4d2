"""qlib.check.draws: hidden checks draw fresh cases per student, the same at every re-grade.

Reference: nbgrader 0.9's autograde, which executes each submission with the kernel's working
directory ``autograded/<student_id>/<assignment>/`` and ``NBGRADER_EXECUTION=autograde`` in its
environment (``nbgrader.converters.autograde.Autograde.convert_single_notebook``); the last test
runs the real ``nbgrader autograde`` to hold that reference to its word.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import nbformat
import pytest
import torch

from qlib import check
from qlib.check import draws, lab00, lab01
from qlib.quantize import quantize

ROOT = Path(__file__).resolve().parents[1]


def drawn_cases(hidden_check, answer=quantize) -> list[torch.Tensor]:
    """Run ``hidden_check`` on ``answer`` and return every first argument it was called with."""
    seen = []

    def recording(x, *args):
        seen.append(x.clone() if isinstance(x, torch.Tensor) else x)
        return answer(x, *args)

    with redirect_stdout(io.StringIO()):
        try:
            hidden_check(recording)
        except check.CheckFailed:
            pass
    assert seen, "the check never called the answer"
    return seen


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y) for x, y in zip(a, b))


@pytest.fixture
def grading(monkeypatch, tmp_path):
    """Pretend to be nbgrader autograding: ``grading("alice")`` moves into her submission."""
    monkeypatch.delenv(draws.SEED_ENV, raising=False)
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")

    def enter(student: str, lab: str = "lab01_linear_quantization") -> None:
        folder = tmp_path / "autograded" / student / lab
        folder.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(folder)
    return enter


def test_same_submission_graded_twice_draws_the_same_cases(grading):
    grading("alice")
    first = drawn_cases(lab01.quantize_hidden)
    again = drawn_cases(lab01.quantize_hidden)
    assert same(first, again)


def test_two_students_draw_different_cases(grading):
    grading("alice")
    alice = drawn_cases(lab01.quantize_hidden)
    grading("bob")
    bob = drawn_cases(lab01.quantize_hidden)
    assert not same(alice, bob)


def test_each_check_and_each_lab_draws_its_own_cases(grading):
    grading("alice")
    seeds = {draws.hidden_seed("quantize"), draws.hidden_seed("dequantize")}
    grading("alice", "lab02_calibration")
    seeds.add(draws.hidden_seed("quantize"))
    assert len(seeds) == 3


def test_outside_grading_every_run_draws_fresh_cases(monkeypatch):
    monkeypatch.delenv(draws.SEED_ENV, raising=False)
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    assert not same(drawn_cases(lab01.quantize_hidden), drawn_cases(lab01.quantize_hidden))


def test_seed_variable_fixes_the_draws_and_differs_between_values(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.setenv(draws.SEED_ENV, "7")
    seven = drawn_cases(lab00.size_in_bytes_hidden, lambda n, bits: (n * bits + 7) // 8)
    assert same(seven, drawn_cases(lab00.size_in_bytes_hidden, lambda n, bits: (n * bits + 7) // 8))
    monkeypatch.setenv(draws.SEED_ENV, "8")
    assert not same(seven, drawn_cases(lab00.size_in_bytes_hidden, lambda n, bits: (n * bits + 7) // 8))


def test_seeded_overrides_the_variable_and_nests(monkeypatch):
    monkeypatch.setenv(draws.SEED_ENV, "7")
    outside = draws.hidden_seed("x")
    with check.seeded(1):
        one = draws.hidden_seed("x")
        with check.seeded(2):
            assert draws.hidden_seed("x") != one
        assert draws.hidden_seed("x") == one
    assert draws.hidden_seed("x") == outside != one


def test_a_failure_says_how_to_replay_its_cases(monkeypatch):
    monkeypatch.delenv(draws.SEED_ENV, raising=False)
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)

    def wrong(x, scale, zp, qmin, qmax):  # no clamp: fails on the first case
        return (torch.round(x * (1.0 / scale)) + zp).to(torch.int64)

    seen = []
    with pytest.raises(check.CheckFailed) as failure:
        lab01.quantize_hidden(lambda x, *a: seen.append(x.clone()) or wrong(x, *a))
    base = re.search(rf"{draws.SEED_ENV}=(\d+)", str(failure.value)).group(1)
    monkeypatch.setenv(draws.SEED_ENV, base)
    assert same(seen, drawn_cases(lab01.quantize_hidden, wrong))


def test_a_failure_under_grading_names_the_submission(grading):
    grading("carol")
    with pytest.raises(check.CheckFailed, match=r"submission carol/lab01_linear_quantization: a re-grade"):
        lab00.size_in_bytes_hidden(lambda n, bits: n * bits // 8)


def test_draw_sources_follow_the_seed():
    a, b = draws.Draw(5), draws.Draw(5)
    assert a.rng.random() == b.rng.random() and a.integer() == b.integer()
    assert torch.equal(torch.randn(4, generator=a.gen), torch.randn(4, generator=b.gen))
    assert draws.stable_seed("a", 1) == draws.stable_seed("a", 1) != draws.stable_seed("a", 2)
    assert 0 <= draws.stable_seed("anything") < 2**63


# ------------------------------------------------------------------ the real nbgrader
DRAW_CELL = ("from qlib.check import draws\n"
             "print('seed', draws.hidden_seed('q1'))\n")


@pytest.mark.grading
@pytest.mark.slow
def test_nbgrader_autograde_seeds_per_student_and_reproducibly(tmp_path):
    course = tmp_path / "course"
    (course / "solutions" / "seeds").mkdir(parents=True)
    shutil.copy(ROOT / "nbgrader_config.py", course)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(DRAW_CELL)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, course / "solutions" / "seeds" / "seeds.ipynb")
    nbgrader = [str(Path(sys.executable).parent / "nbgrader")]

    def run(*args):
        out = subprocess.run(nbgrader + list(args), cwd=course, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr

    run("generate_assignment", "seeds", "--force")
    for student in ("alice", "bob"):
        (course / "submitted" / student / "seeds").mkdir(parents=True)
        shutil.copy(course / "labs" / "seeds" / "seeds.ipynb", course / "submitted" / student / "seeds")

    def seeds(student: str = "*") -> dict[str, str]:
        run("autograde", "seeds", "--create", "--force", f"--student={student}")
        found = {}
        for student in ("alice", "bob") if student == "*" else (student,):
            graded = nbformat.read(course / "autograded" / student / "seeds" / "seeds.ipynb", as_version=4)
            text = "".join(o.get("text", "") for o in graded.cells[0].outputs)
            found[student] = re.search(r"seed (\d+)", text).group(1)
        return found

    first = seeds()
    assert first["alice"] != first["bob"]
    assert seeds("alice") == {"alice": first["alice"]}  # a re-grade draws the same
