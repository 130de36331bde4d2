"""Packaging and the two commands: pyproject, environment.yml, constraints, Makefile, CI.

Reference: the README's quick start and DESIGN.md's layout.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def env_pip_section() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "- pip:")
    return [l.strip()[2:] for l in lines[start + 1:] if l.strip().startswith("- ")]


def test_environment_yml_matches_pyproject():
    project = pyproject()["project"]
    wanted = project["dependencies"] + [d for extra in ("course", "test", "federated", "hub", "book")
                                        for d in project["optional-dependencies"][extra]]
    got = [d for d in env_pip_section() if not d.startswith("-e")]
    assert sorted(got) == sorted(wanted)
    assert "-e ." in env_pip_section()


def test_pyproject_states_ranges_not_pins():
    # Colab and laptops bring their own torch: a pin would force a reinstall.
    for dep in pyproject()["project"]["dependencies"]:
        assert "==" not in dep.split(";")[0], dep


def test_constraints_pin_every_runtime_dependency_exactly():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    for dep in pyproject()["project"]["dependencies"] + ["nbgrader", "jupyterlab"]:
        name = re.split(r"[<>=;\s\[]", dep)[0].lower()
        assert name in pins, f"{name} is not pinned in constraints.txt"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make lab" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)


def test_makefile_setup_is_a_stamp_on_its_inputs():
    make = (ROOT / "Makefile").read_text()
    assert "$(STAMP): pyproject.toml constraints.txt" in make
    for target in ("lab:", "test:", "release:", "grade:", "course:"):
        assert target in make


def test_weights_ship_as_package_data():
    data = pyproject()["tool"]["setuptools"]["package-data"]["qlib"]
    assert "weights/*.pt" in data and "weights/*.json" in data


def test_nothing_points_outside_the_repository():
    """The course is self-contained: no lesson, lab, module or benchmark cites planning files
    that live beside the repository (a planning folder, FINDINGS.md) instead of its own results."""
    tracked = subprocess.run(["git", "ls-files", "lessons", "solutions", "labs", "qlib", "benchmarks",
                              "README.md"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = [f for f in tracked if f.endswith((".py", ".ipynb", ".md"))
           and re.search(r"FINDINGS\.md|\.\./shared", (ROOT / f).read_text(errors="ignore"))]
    assert not bad, bad


def test_cpu_only_setup_uses_pytorchs_cpu_index_and_the_same_pins():
    """`make setup TORCH=cpu` (README, "A smaller install") adds PyTorch's CPU wheel index and
    keeps the constraints (torch==X matches X+cpu); the default setup does not."""
    import subprocess

    def dry(*args):
        return subprocess.run(["make", "-n", "-W", "pyproject.toml", "setup", *args], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout

    cpu, default = dry("TORCH=cpu"), dry()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in cpu
    assert "download.pytorch.org" not in default
    for out in (cpu, default):
        assert "-c constraints.txt" in out and "book]" in out
