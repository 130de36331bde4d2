"""The README's lab command starts JupyterLab on the course; it answers, then stops; a
student's save of a released lab writes the notebook only.

Reference: the README's quick start (``make lab``) and Jupyter Server's REST API
(contents API: the PUT JupyterLab's Save sends).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_make_lab_serves_the_course():
    port = free_port()
    token = "qlib-test"
    args = f"--no-browser --ip=127.0.0.1 --IdentityProvider.token={token}"
    proc = subprocess.Popen(["make", "lab", f"PORT={port}", f"LAB_ARGS={args}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                url = f"http://127.0.0.1:{port}/api/contents/lessons?token={token}"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    listing = json.load(resp)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.time() < deadline, "JupyterLab did not answer within 180 s"
                time.sleep(1)
        names = {item["name"] for item in listing["content"]}
        assert "00_welcome.ipynb" in names
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token={token}", timeout=10) as resp:
            assert resp.status == 200 and b"JupyterLab" in resp.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def _put(port: int, token: str, path: str, model: dict) -> None:
    body = json.dumps({"type": "notebook", "format": "json", "content": model}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/contents/{path}?token={token}",
                                 data=body, method="PUT", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status in (200, 201)


def _get(port: int, token: str, path: str) -> dict:
    return _api(port, token, f"api/contents/{path}")


def _api(port: int, token: str, path: str) -> dict:
    sep = "&" if "?" in path else "?"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}{sep}token={token}", timeout=60) as resp:
        return json.load(resp)


@pytest.mark.slow
def test_saving_a_released_lab_writes_only_the_notebook(tmp_path):
    """Saving through Jupyter Server's contents API (what JupyterLab's Save does, with the
    jupytext extension that `make lab` installs) writes the ``.ipynb`` alone for a released
    lab. Control: the paired source in ``solutions/`` does get its ``.py`` twin, so the test
    would see one if the release carried the pairing metadata (tools/release.py strips it).
    """
    shutil.copytree(ROOT / "labs" / "lab00_warmup", tmp_path / "released")
    (tmp_path / "source").mkdir()
    shutil.copy(ROOT / "solutions" / "lab00_warmup" / "lab00_warmup.ipynb", tmp_path / "source")
    port, token = free_port(), "qlib-save"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "jupyter"), "server", "--no-browser",
                             "--ip=127.0.0.1", f"--port={port}", f"--ServerApp.root_dir={tmp_path}",
                             f"--IdentityProvider.token={token}", "--allow-root"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                released = _get(port, token, "released/lab00_warmup.ipynb")
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.time() < deadline, "Jupyter Server did not answer within 120 s"
                time.sleep(1)
        model = released["content"]
        answer = next(c for c in model["cells"] if "raise NotImplementedError" in "".join(c["source"]))
        answer["source"] = "def size_in_bytes(num_params, bits):\n    return (num_params * bits + 7) // 8\n"
        _put(port, token, "released/lab00_warmup.ipynb", model)
        assert sorted(p.name for p in (tmp_path / "released").iterdir()
                      if not p.name.startswith(".")) == ["lab00_warmup.ipynb"], \
            "saving the released lab wrote a twin next to it"
        assert "jupytext" not in model["metadata"]
        saved = json.loads((tmp_path / "released" / "lab00_warmup.ipynb").read_text())
        assert any("(num_params * bits + 7) // 8" in "".join(c["source"]) for c in saved["cells"])

        _put(port, token, "source/lab00_warmup.ipynb", _get(port, token, "source/lab00_warmup.ipynb")["content"])
        assert (tmp_path / "source" / "lab00_warmup.py").exists(), \
            "control: jupytext should pair the solutions' source notebook"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def _copy_checkout(dest: Path) -> Path:
    """The tracked and unignored files of this checkout, as a fresh clone has them."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


@contextmanager
def make_lab(course: Path, env: dict, token: str, wait_path: str = "api/status", timeout: float = 180):
    """``make lab`` in ``course`` (this Python's environment: ``BIN``; ``-o`` keeps make from
    reinstalling) on a free 127.0.0.1 port with ``token``; yields ``(port, first answer of
    wait_path)`` once the server answers it, and stops the server's whole process group after."""
    bin_dir = Path(sys.executable).parent
    port = free_port()
    args = f"--no-browser --ip=127.0.0.1 --IdentityProvider.token={token}"
    proc = subprocess.Popen(["make", "-o", ".venv/.installed", "lab", f"BIN={bin_dir}", f"PORT={port}",
                             f"LAB_ARGS={args}"], cwd=course, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                first = _api(port, token, wait_path)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.time() < deadline, f"JupyterLab did not answer within {timeout:.0f} s"
                time.sleep(1)
        yield port, first
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_make_lab_assignment_list_works_without_root(tmp_path):
    """On a fresh clone, ``make lab``'s Assignment List panel finds its exchange (a folder of
    the checkout, deploy/local) instead of "Error fetching courses!": the REST calls the panel
    makes succeed, and a lab the instructor releases locally shows up as released.

    The course's environment is this Python's (``BIN``; ``-o`` keeps make from reinstalling).
    """
    course = _copy_checkout(tmp_path / "course")
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PYTHONPATH=str(course), JUPYTER_CONFIG_PATH="")
    token = "qlib-exchange"
    with make_lab(course, env, token, wait_path="courses", timeout=120) as (port, courses):
        assert courses["success"], courses
        listed = _api(port, token, "assignments?course_id=quantization")
        assert listed["success"] and listed["value"] == [], listed

        local = dict(env, JUPYTER_CONFIG_PATH=str(course / "deploy" / "local"),
                     PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        for step in ("generate_assignment", "release_assignment"):
            subprocess.run([str(bin_dir / "nbgrader"), step, "lab00_warmup", "--log-level=WARN"]
                           + (["--force"] if step == "generate_assignment" else []),
                           cwd=course, env=local, check=True, timeout=120)
        listed = _api(port, token, "assignments?course_id=quantization")
        assert [(a["assignment_id"], a["status"]) for a in listed["value"]] == [("lab00_warmup", "released")]
        assert (course / "deploy" / "local" / "exchange" / "quantization" / "outbound" / "lab00_warmup").is_dir()
