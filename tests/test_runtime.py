"""Tests for qlib/runtime.py (fast/quiet switches, benchmark results) and ``qlib.train.format_spread``.

Reference: the files themselves. ``benchmark_result`` must return exactly what
``json.loads`` reads from ``benchmarks/results/NAME.json``, and a missing file gives ``None``
plus one line naming the command that creates it. ``format_spread`` is checked against
the f-string the lessons wrote by hand before it existed.
"""

import json
import uuid
from pathlib import Path

import pytest

from qlib import runtime
from qlib.train import accuracy_over_seeds, format_spread

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_pick_follows_fast(monkeypatch):
    monkeypatch.setenv("QLIB_FAST", "1")
    assert runtime.fast() and runtime.pick(40, 3) == 3
    monkeypatch.setenv("QLIB_FAST", "0")
    assert not runtime.fast() and runtime.pick(40, 3) == 40


@pytest.mark.parametrize("name", sorted(p.stem for p in RESULTS.glob("*.json")))
def test_benchmark_result_reads_the_real_file(name, capsys):
    expected = json.loads((RESULTS / f"{name}.json").read_text())
    assert runtime.benchmark_result(name) == expected
    assert runtime.benchmark_result(name + ".json") == expected
    assert capsys.readouterr().out == ""


def test_benchmark_result_found_from_a_lesson_folder(tmp_path, monkeypatch, capsys):
    # a repository that is not next to the installed qlib: found through ../benchmarks/results
    name = f"absent_{uuid.uuid4().hex[:8]}"
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / f"{name}.json").write_text('{"value": 3}')
    (tmp_path / "lessons").mkdir()
    monkeypatch.chdir(tmp_path / "lessons")
    assert runtime.benchmark_result(name) == {"value": 3}


def test_benchmark_result_missing_says_how_to_make_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    name = f"absent_{uuid.uuid4().hex[:8]}"
    assert runtime.benchmark_result(name) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert f"benchmarks/results/{name}.json not found" in out
    assert f"python benchmarks/{name}.py" in out


@pytest.mark.parametrize("bad", ["", "../ptq", "a/b", None, 3])
def test_benchmark_result_rejects_paths(bad):
    with pytest.raises(ValueError, match="benchmark name"):
        runtime.benchmark_result(bad)


def test_format_spread_matches_the_hand_written_formats():
    s = accuracy_over_seeds([90.0, 91.25, 92.5])
    m, lo, hi = s["mean"], s["min"], s["max"]
    assert format_spread(s) == f"{m:5.1f} [{lo:5.1f}, {hi:5.1f}]"
    assert format_spread(s, digits=3, width=7) == f"{m:7.3f} [{lo:7.3f}, {hi:7.3f}]"
    assert format_spread(s, digits=2, width=6, bounds_width=0) == f"{m:6.2f} [{lo:.2f}, {hi:.2f}]"
    assert format_spread(s, 2, 6, bounds_digits=1, bounds_width=0) == f"{m:6.2f} [{lo:.1f}, {hi:.1f}]"
    assert format_spread({"mean": 1.0, "min": 0.5, "max": 2.0}, 0, 0) == "1 [0, 2]"


@pytest.mark.parametrize("bad", [[1, 2], {"mean": 1.0}, None])
def test_format_spread_rejects_non_stats(bad):
    with pytest.raises(TypeError, match="mean"):
        format_spread(bad)


def test_autograding_reads_nbgraders_variable(monkeypatch):
    """nbgrader's autograde sets NBGRADER_EXECUTION=autograde in the kernel (nbgrader 0.9,
    converters/autograde.py); validate sets "validate" (validator.py), a student's own run sets nothing."""
    from qlib import runtime

    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    assert not runtime.autograding()
    monkeypatch.setenv("NBGRADER_EXECUTION", "validate")
    assert not runtime.autograding()
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert runtime.autograding()
