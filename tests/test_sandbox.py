"""The grading sandbox (qlib/sandbox.py): hostile submissions are stopped and graded, the class too.

Reference: the module's docstring (an unprivileged uid, private mount, network and PID
namespaces, rlimits on address space, CPU time and processes) and nbgrader 0.9's
``autograde`` with the course's ``nbgrader_config.py`` (``QLIB_SANDBOX=on``: grade only in
the sandbox). The hostile answers each try one thing and, if it works, go on to the right
answer: a sandbox that let it through would give that question its points, so every
assertion can fail. The allocation is ``torch.empty`` (virtual memory): without the limit it
would succeed without touching the machine's memory, and the test would fail, not the
machine. Tests that need the sandbox skip, saying why, where it cannot run (not root, no
namespaces); the argument checks and the course configuration's switch (on where the sandbox
can run, a warning or a refusal where it cannot) run everywhere.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qlib import sandbox
from test_grading import LAB, ROOT, answers, expected, graded_lab, manual, points, question_scores, release_nb, solution_nb

PROBLEM = sandbox.sandbox_problem()
needs_sandbox = pytest.mark.skipif(PROBLEM is not None, reason=f"no grading sandbox here: {PROBLEM}")


def test_command_rejects_bad_limits():
    kw = dict(uid=1234, cwd="/x", private_dir="/p", hide=[], keep=[], memory_bytes=1 << 30,
              cpu_seconds=10, processes=10)
    with pytest.raises(ValueError, match="kernel_cmd"):
        sandbox.sandbox_command([], **kw)
    for key in ("uid", "memory_bytes", "cpu_seconds", "processes"):
        with pytest.raises(ValueError, match=key):
            sandbox.sandbox_command(["python"], **{**kw, key: 0})


def test_command_round_trips_through_the_launcher_parser():
    cmd = sandbox.sandbox_command(["python", "-m", "ipykernel_launcher", "-f", "k.json"], uid=201234,
                                  cwd="/c/autograded/s/lab", private_dir="/tmp/p", hide=["/c", "/root"],
                                  keep=["/c/qlib"], memory_bytes=1 << 30, cpu_seconds=60, processes=64)
    assert cmd[:2] == ["unshare", "--net"] and "--pid" in cmd and "--kill-child" in cmd
    opts, kernel = sandbox._parse(cmd[cmd.index("inside") + 1:])
    assert kernel == ["python", "-m", "ipykernel_launcher", "-f", "k.json"]
    assert opts == {"uid": "201234", "cwd": "/c/autograded/s/lab", "private": "/tmp/p", "hide": ["/c", "/root"],
                    "keep": ["/c/qlib"], "memory": str(1 << 30), "cpu": "60", "nproc": "64"}


def test_problem_names_root_when_not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in sandbox.sandbox_problem()


PROBE = r"""
import os, resource, socket, sys
secret, home = sys.argv[1], sys.argv[2]
print("uid", os.getuid(), os.getgid(), os.getgroups())
print("secret", os.path.exists(secret), "home", os.path.exists(home), "pid", os.getpid())
print("limits", resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_CPU)[0],
      resource.getrlimit(resource.RLIMIT_NPROC)[0])
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[3])), timeout=3)
    print("net open")
except OSError as err:
    print("net closed", type(err).__name__)
open(os.path.join(os.getcwd(), "written.txt"), "w").write("mine")
print("wrote", open("written.txt").read())
"""


@needs_sandbox
def test_launcher_hides_limits_and_cuts_the_network(tmp_path):
    """The launcher alone, on a tiny Python program instead of a kernel (well under a second)."""
    course, cwd, private = tmp_path / "course", tmp_path / "course" / "autograded" / "s", tmp_path / "private"
    (course / "solutions").mkdir(parents=True)
    (course / "solutions" / "secret.txt").write_text("answers")
    cwd.mkdir(parents=True)
    private.mkdir()
    uid = 234567
    for path in (cwd, private):
        os.chown(path, uid, uid)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    cmd = sandbox.sandbox_command([sys.executable, "-c", PROBE, str(course / "solutions" / "secret.txt"),
                                   str(course / "gradebook.db"), str(port)],
                                  uid=uid, cwd=str(cwd), private_dir=str(private),
                                  hide=sandbox.default_hide([str(course)]), keep=sandbox.default_keep(),
                                  memory_bytes=3 << 30, cpu_seconds=77, processes=99)
    (course / "gradebook.db").write_text("db")
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    server.close()
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["uid"] == f"{uid} {uid} []"
    assert lines["secret"] == "False home False pid 1"
    assert lines["limits"] == f"{3 << 30} 77 99"
    assert lines["net"].startswith("closed")
    assert lines["wrote"] == "mine"  # its folder is writable for it...
    assert not (cwd / "written.txt").exists()  # ...but its changes stay in the sandbox


# ------------------------------------------------------------------ real nbgrader, hostile class

class Listener:
    """A TCP server on the host's 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.sock.settimeout(0.5)
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
                self.accepted += 1
                conn.close()
            except OSError:
                pass

    def close(self):
        self.running = False
        self.thread.join()
        self.sock.close()


def hostile_class(course: Path, port: int) -> dict[str, dict[str, str]]:
    """Each hostile student's Q1 answer: the attack, then (if it was not stopped) the right answer."""
    good = answers(solution_nb(LAB))["q1-answer"]
    solutions = course / "solutions" / LAB / f"{LAB}.ipynb"
    attacks = {
        "reads_solutions": f"print(open({str(solutions)!r}).read()[:100])\n"
                           f"print(open('../../../solutions/{LAB}/{LAB}.ipynb').read()[:100])\n",
        "writes_gradebook": f"open({str(course / 'gradebook.db')!r}, 'r+b').write(b'0' * 100)\n",
        "writes_classmate": f"open({str(course / 'submitted' / 'perfect' / LAB / (LAB + '.ipynb'))!r}, 'w').write('{{}}')\n",
        "opens_socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5).close()\n",
        "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
        "allocates_20gb": "import torch\nhoard = torch.empty(20 * 2**30, dtype=torch.uint8)\n",
    }
    # not stopped, but harmless: the link lands in the sandbox's overlay, not in the folder
    # nbgrader (as root) writes the graded notebook into, so the gradebook is not overwritten
    plant = (f"import os\nos.remove('{LAB}.ipynb')\nos.symlink({str(course / 'gradebook.db')!r}, '{LAB}.ipynb')\n"
             + good)
    return {**{student: {"q1-answer": attack + good} for student, attack in attacks.items()},
            "plants_symlink": {"q1-answer": plant}}


@pytest.fixture(scope="module")
def hostile_course(tmp_path_factory):
    if PROBLEM is not None:
        pytest.skip(f"no grading sandbox here: {PROBLEM}")
    course = tmp_path_factory.mktemp("hostile")
    listener = Listener()
    students = {"perfect": {}, **hostile_class(course, listener.port), "perfect_after": {}}
    before = set(Path("/tmp").glob("qlib-sandbox-*"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLIB_SANDBOX", "on")  # grade only inside the sandbox
        graded_lab(course, LAB, students)
    listener.close()
    left = set(Path("/tmp").glob("qlib-sandbox-*")) - before
    return course, listener, students, left


@pytest.mark.grading
def test_hostile_submissions_lose_only_the_attacked_question(hostile_course):
    course, _, students, _ = hostile_course
    nb = release_nb(LAB)
    want = expected(points(nb), manual(nb))  # the written answer waits for the instructor: 0
    for student in students:
        got = question_scores(course, LAB, student)
        if student.startswith("perfect") or student == "plants_symlink":
            assert got == want, student
        elif student == "fork_bomb":  # its kernel may have no threads left for later cells
            assert got["q1-test"] == 0.0, got
        else:
            assert got == {**want, "q1-test": 0.0}, (student, got)


@pytest.mark.grading
def test_hostile_submissions_left_no_trace(hostile_course):
    course, listener, _, left = hostile_course
    assert listener.accepted == 0
    submitted = course / "submitted" / "perfect" / LAB / f"{LAB}.ipynb"
    assert submitted.read_text().startswith("{\n")  and len(submitted.read_text()) > 100
    graded = course / "autograded" / "plants_symlink" / LAB / f"{LAB}.ipynb"
    assert graded.is_file() and not graded.is_symlink()
    assert (course / "gradebook.db").read_bytes().startswith(b"SQLite format 3")
    # no process of a sandbox uid is left running, no private folder left behind. Another test
    # worker may be grading in its own sandboxes right now: what is seen must go away (a leak
    # would stay), within a bound longer than one graded notebook.
    deadline = time.time() + 300
    seen = {Path("/proc") / str(pid) for pid in _sandbox_pids()} | set(left)
    while any(p.exists() for p in seen) and time.time() < deadline:
        time.sleep(2)
    seen = {p for p in seen if p.exists()}
    assert not seen, f"sandbox processes or private folders left behind: {seen}"


def _sandbox_pids() -> list[int]:
    pids = []
    for p in Path("/proc").glob("[0-9]*"):
        uid = [int(line.split()[1]) for line in _status(p) if line.startswith("Uid:")]
        if uid and 200000 <= uid[0] < 300000:
            pids.append(int(p.name))
    return pids


def _status(proc: Path) -> list[str]:
    try:
        return (proc / "status").read_text().splitlines()
    except OSError:
        return []


@pytest.mark.grading
def test_hostile_outputs_show_the_attack_was_stopped(hostile_course):
    import nbformat

    course, _, _, _ = hostile_course

    def q1_error(student):
        nb = nbformat.read(course / "autograded" / student / LAB / f"{LAB}.ipynb", as_version=4)
        cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "q1-answer")
        return next(o for o in cell.outputs if o.output_type == "error")

    assert q1_error("reads_solutions").ename == "FileNotFoundError"
    assert q1_error("writes_gradebook").ename == "FileNotFoundError"
    assert q1_error("writes_classmate").ename == "FileNotFoundError"
    assert q1_error("opens_socket").ename in ("ConnectionRefusedError", "OSError", "TimeoutError")
    assert q1_error("fork_bomb").ename == "BlockingIOError"
    assert q1_error("allocates_20gb").ename in ("RuntimeError", "MemoryError")


# ------------------------------------------------------------------ the course's switch

def load_course_config(monkeypatch, mode: str, problem: str | None):
    from traitlets.config.loader import PyFileConfigLoader

    monkeypatch.setenv("QLIB_SANDBOX", mode)
    monkeypatch.setattr(sandbox, "sandbox_problem", lambda: problem)
    return PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config()


def test_course_config_switches_the_sandbox_on_where_it_can_run(monkeypatch):
    config = load_course_config(monkeypatch, "auto", None)
    assert config.ResilientExecute.sandbox is True
    assert config.SandboxKernelManager.hide == [str(ROOT)]


def test_course_config_without_the_sandbox_warns_or_refuses(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["nbgrader", "autograde", "lab00_warmup"])
    config = load_course_config(monkeypatch, "auto", "no root here")
    assert "sandbox" not in config.ResilientExecute
    assert "WARNING: grading WITHOUT the sandbox: no root here" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="QLIB_SANDBOX=on but no root here"):
        load_course_config(monkeypatch, "on", "no root here")
    with pytest.raises(ValueError, match="QLIB_SANDBOX must be auto, on or off"):
        load_course_config(monkeypatch, "maybe", None)
    assert "sandbox" not in load_course_config(monkeypatch, "off", None).ResilientExecute


@needs_sandbox
def test_private_folder_is_removed_after_the_kernel_dies(tmp_path):
    """A kernel that kills itself (os._exit): nbclient then skips ``shutdown_kernel`` and calls
    ``cleanup_resources`` alone (``NotebookClient._async_cleanup_kernel``), which
    AsyncKernelManager binds to the base class's coroutine; the sandbox's private folder
    (HOME, connection file, sockets) must still go (one was seen left behind)."""
    import asyncio

    async def run() -> str:
        km = sandbox.SandboxKernelManager(kernel_name="python3")
        await km.start_kernel(cwd=str(tmp_path))
        private = km._sandbox_dir
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=120)
            kc.execute("import os; os._exit(1)")
            for _ in range(600):
                if not await km.is_alive():
                    break
                await asyncio.sleep(0.1)
            assert not await km.is_alive()
        finally:  # what nbclient does after a cell
            if await km.is_alive():
                await km.shutdown_kernel(now=True)
            await km.cleanup_resources()
            kc.stop_channels()
        return private

    private = asyncio.run(run())
    assert private and not os.path.exists(private)
