"""Notebook execution for grading and tests: a dead kernel is graded, a widget never hangs.

Two things go wrong when a machine executes notebooks unattended, and this module handles both.

**A submission that kills its kernel.** nbgrader interrupts a cell that runs past
``c.Execute.timeout`` and records an error in a cell that raises, so those submissions are
graded as usual. A cell that kills the Python process itself (``os._exit``, a segfault, running
out of memory) makes nbclient raise ``DeadKernelError`` and nbgrader drops the whole
submission. :class:`ResilientExecute` records the death in that cell, marks the cells after it
as not run, and hands the notebook on: tests that passed before the crash keep their points,
the rest score zero, and the batch goes on. ``nbgrader_config.py`` installs it in place of
nbgrader's ``Execute``.

**A cell that never finishes although the kernel is idle** (jupyter/nbclient#312). nbclient
waits for a cell's ``execute_reply`` with ``await shell_channel.get_msg(timeout)``, an asyncio
poll on the zmq socket that wakes on the socket's file descriptor. The same client *sends* on
that socket while it waits: its stand-in for the browser's Output widget
(``nbclient.output_widget.OutputWidget.sync_state``) sends a ``comm_msg`` to the kernel for
every output an Output widget captures (``ipywidgets.interact`` captures its function's
output in one). The upstream report (nbclient#312 and its pull request #311) traces the hang
to this send-while-waiting. Our reading of the mechanism: zmq's descriptor is edge-triggered,
so a send can swallow the wake-up that announced the reply, and the poll then sleeps with the
reply unread in the socket, forever when the timeout is ``None`` (nbconvert's default). The race is rare (3 hangs in 33 runs of lesson
00 were reported; none reproduced here in several hundred widget cells), so the defence is
structural rather than a fix of a reproduced case. :class:`NeverHangs` makes every wait on the
shell channel a series of short polls (``POLL_SLICE_S``): each new poll first checks the
socket without waiting, so a missed wake-up costs at most one slice. The lessons' widgets
also avoid the trigger altogether (:func:`qlib.widgets.interact` draws without an Output
widget), and every execution in tests and grading has a per-cell timeout
(:func:`config_timeout` reads the course's one value from ``nbgrader_config.py``).
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from pathlib import Path
from queue import Empty

from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from nbclient.util import run_sync
from nbformat import NotebookNode
from nbgrader.preprocessors import Execute
from traitlets import Bool

__all__ = ["POLL_SLICE_S", "sliced_get_msg", "NeverHangs", "NotebookRunner", "ResilientExecute",
           "config_timeout", "execute_notebook", "error_output", "shards", "submitted_students",
           "autograde_parallel", "SQLITE_WAIT_S"]

POLL_SLICE_S = 0.5
"""Longest single wait on the shell channel, in seconds; a missed wake-up costs at most this."""


def sliced_get_msg(get_msg, slice_s: float = POLL_SLICE_S):
    """Wrap a channel's ``get_msg(timeout=...)`` so that it never waits more than ``slice_s`` at once.

    The wrapper keeps the contract: it returns the next message, or raises ``queue.Empty``
    once ``timeout`` seconds have passed (``None``: wait as long as it takes). Works for the
    blocking and the asyncio clients (returns a coroutine; nbclient awaits either).
    """
    if slice_s <= 0:
        raise ValueError(f"slice_s must be a positive number of seconds, got {slice_s}")

    async def get(timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = slice_s if deadline is None else max(0.0, min(slice_s, deadline - time.monotonic()))
            try:
                msg = get_msg(timeout=left)
                return await msg if inspect.isawaitable(msg) else msg
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    return get


class NeverHangs:
    """Mixin for an nbclient ``NotebookClient`` (or nbgrader ``Execute``): sliced shell polls."""

    async def async_start_new_kernel_client(self):
        kc = await super().async_start_new_kernel_client()
        kc.shell_channel.get_msg = sliced_get_msg(kc.shell_channel.get_msg)
        return kc

    def start_new_kernel_client(self):
        # nbclient binds its sync twin to its own coroutine: dispatch to the override instead
        return run_sync(self.async_start_new_kernel_client)()


class NotebookRunner(NeverHangs, NotebookClient):
    """nbclient's ``NotebookClient`` with sliced shell polls; use it with a per-cell ``timeout``."""


def config_timeout(course_dir: str | os.PathLike) -> int:
    """The per-cell execution timeout in seconds, ``c.Execute.timeout`` of ``nbgrader_config.py``.

    One value for grading and for every notebook execution in the tests.
    """
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader("nbgrader_config.py", path=str(course_dir)).load_config()
    timeout = config.Execute.timeout
    if not isinstance(timeout, int) or timeout <= 0:
        raise ValueError(f"nbgrader_config.py must set c.Execute.timeout to a positive number of "
                         f"seconds, got {timeout!r}")
    return timeout


def execute_notebook(nb: NotebookNode, cwd: str | os.PathLike, timeout: int, **env: str) -> float:
    """Execute ``nb`` in place (outputs filled in) with a per-cell ``timeout``; returns seconds.

    ``env`` entries are set for the kernel's process only while it starts (for example
    ``QLIB_FAST="1"``). A cell past its timeout raises ``nbclient.exceptions.CellTimeoutError``.
    """
    before = dict(os.environ)
    os.environ.update(env)
    try:
        client = NotebookRunner(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(Path(cwd))}})
        start = time.perf_counter()
        client.execute()
        return time.perf_counter() - start
    finally:
        os.environ.clear()
        os.environ.update(before)


def error_output(ename: str, evalue: str) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=evalue,
                        traceback=[f"{ename}: {evalue}"])


class ResilientExecute(NeverHangs, Execute):
    """nbgrader's Execute, except that a dead kernel fails the remaining cells, not the grading.

    ``c.ResilientExecute.sandbox = True`` starts each kernel in the grading sandbox
    (:class:`qlib.sandbox.SandboxKernelManager`: an unprivileged user, no network, limits);
    ``nbgrader_config.py`` sets it when the sandbox can run.
    """

    sandbox = Bool(False, help="run each submission's kernel in qlib.sandbox").tag(config=True)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.sandbox:  # nbgrader's Execute passes its kernel_manager_class as an argument
            from .sandbox import SandboxKernelManager

            self.kernel_manager_class = SandboxKernelManager

    def preprocess(self, nb, resources=None, km=None):
        self._kernel_dead = False
        try:
            return super().preprocess(nb, resources, km)
        except DeadKernelError:  # raised again while shutting the dead kernel down
            if not self._kernel_dead:
                raise
            return self.nb, self.resources

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != "code":
            return cell, self.resources
        if self._kernel_dead:
            cell.outputs = [error_output("KernelDied", "not run: the kernel died in an earlier cell")]
            return cell, self.resources
        try:
            return super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            self._kernel_dead = True
            self.log.warning("The kernel died in cell %d; the cells after it are marked not run",
                             index)
            cell.outputs.append(error_output("KernelDied", "the kernel died while running this cell "
                                             "(os._exit, a segfault or out of memory?)"))
            return cell, self.resources


# ------------------------------------------------------------------ a class graded in parallel

SQLITE_WAIT_S = 120
"""How long a grading process waits for the gradebook's lock (SQLite allows one writer at a time)."""


def shards(students: list[str], jobs: int) -> list[list[str]]:
    """Split ``students`` into at most ``jobs`` groups of nearly equal size (round robin over the
    sorted ids, so each group gets a similar mix); empty groups are dropped."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    ordered = sorted(set(students))
    return [group for group in (ordered[i::jobs] for i in range(jobs)) if group]


def submitted_students(course_dir: str | os.PathLike, lab: str) -> list[str]:
    """The student ids with a submission of ``lab`` in ``submitted/<student>/<lab>/``."""
    return sorted(p.parent.name for p in Path(course_dir, "submitted").glob(f"*/{lab}") if p.is_dir())


def autograde_parallel(course_dir: str | os.PathLike, lab: str, jobs: int, *args: str,
                       nbgrader: str = "nbgrader", timeout: float | None = None) -> None:
    """``nbgrader autograde lab --create *args`` for every submission, in ``jobs`` processes.

    nbgrader grades one submission after the other; a class of 100 is 100 kernel starts and
    100 runs of the checks, so a machine with several cores grades faster with several
    processes. Each process gets one group of :func:`shards` (the others are excluded with
    ``--CourseDirectory.student_id_exclude``) and waits up to ``SQLITE_WAIT_S`` seconds for the
    gradebook's lock instead of SQLite's default 5 (``?timeout=`` on the database URL: each
    write is short, but two processes do write at the same moment). ``jobs=1`` is plain
    ``nbgrader autograde``. Raises ``RuntimeError`` naming the groups whose process failed.
    """
    import subprocess

    from traitlets.config.loader import PyFileConfigLoader

    students = submitted_students(course_dir, lab)
    groups = shards(students, jobs) if students else []
    if len(groups) <= 1:
        procs = [(students, subprocess.Popen([nbgrader, "autograde", lab, "--create", *args], cwd=course_dir))]
        return _wait(lab, procs, timeout)
    config = PyFileConfigLoader("nbgrader_config.py", path=str(course_dir)).load_config()
    db_url = config.CourseDirectory.db_url
    if not isinstance(db_url, str) or not db_url.startswith("sqlite:///"):
        raise ValueError(f"parallel grading needs the SQLite gradebook of nbgrader_config.py, got {db_url!r}")
    db_url += ("&" if "?" in db_url else "?") + f"timeout={SQLITE_WAIT_S}"
    procs = []
    for group in groups:
        others = ",".join(s for s in students if s not in group)
        cmd = [nbgrader, "autograde", lab, "--create", f"--CourseDirectory.db_url={db_url}",
               f"--CourseDirectory.student_id_exclude={others}", *args]
        procs.append((group, subprocess.Popen(cmd, cwd=course_dir)))
    return _wait(lab, procs, timeout)


def _wait(lab: str, procs: list, timeout: float | None) -> None:
    import subprocess

    deadline = None if timeout is None else time.monotonic() + timeout
    failed = []
    for group, proc in procs:
        try:
            code = proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for _, other in procs:
                other.kill()
            raise RuntimeError(f"nbgrader autograde {lab} ran past {timeout} s; stopped") from None
        if code != 0:
            failed.append(group)
    if failed:
        raise RuntimeError(f"nbgrader autograde {lab} failed for the groups {failed} (see the log above)")


def main(argv: list[str] | None = None) -> int:
    """``python -m qlib.grading autograde LAB [--jobs N] [nbgrader options]`` (``make grade JOBS=N``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qlib.grading",
                                     description="Autograde every submission of a lab in parallel processes.")
    parser.add_argument("command", choices=["autograde"])
    parser.add_argument("lab")
    parser.add_argument("--jobs", type=int, default=1, help="grading processes (default 1)")
    parser.add_argument("--course", default=".", help="the course directory (default: here)")
    args, rest = parser.parse_known_args(argv)
    nbgrader = str(Path(sys.executable).parent / "nbgrader")
    autograde_parallel(args.course, args.lab, args.jobs, *rest, nbgrader=nbgrader)
    return 0


if __name__ == "__main__":
    sys.exit(main())
