"""A sandbox for autograding: each submission's kernel runs as nobody, offline, within limits.

``nbgrader autograde`` runs every student's code, and by default it runs it as the
instructor: a submission could read ``solutions/`` and the hidden tests, rewrite
``gradebook.db`` or another student's files, open network connections, fork without end or
take all the memory. :class:`SandboxKernelManager` is a jupyter_client kernel manager that
starts each kernel inside Linux namespaces, with nothing but util-linux's ``unshare``:

- **an unprivileged user**: a fresh numeric uid per kernel (``uid_base`` plus a random
  offset, no ``/etc/passwd`` entry needed), no supplementary groups, so the usual file
  permissions keep it out of anything private;
- **its own mount namespace**: the course directory (``hide``, the course root in
  ``nbgrader_config.py``), the grader's home folder, ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are covered with empty
  file systems, then only what the kernel needs is mounted back: the submission's own folder
  (as an overlay), the qlib package and the Python environment (read-only). ``solutions/``, the
  source notebooks, ``gradebook.db``, ``submitted/`` and the other students' ``autograded/``
  folders simply do not exist inside; ``/tmp`` is a private, small tmpfs. The submission's
  folder is an overlay: the kernel may write there, but its changes stay in the sandbox;
- **its own network namespace**: only a loopback interface of its own, no route out, and the
  host's ``127.0.0.1`` services unreachable. The kernel talks to nbgrader over jupyter's
  ``ipc`` transport (unix sockets in the kernel's private folder), which needs no network;
- **its own PID namespace**: the kernel is process 1 there, so when it ends (shut down,
  killed, or a fork bomb stopped) every process it left behind ends with it;
- **resource limits** (``setrlimit``): address space (``memory_bytes``; a 20 GB allocation
  fails with ``MemoryError``), CPU seconds (``cpu_seconds``), processes and threads of its
  uid (``processes``: a fork bomb gets ``BlockingIOError``), file size, no core dumps.

nbgrader's per-cell timeout (``c.Execute.timeout``) applies unchanged: interrupts reach the
kernel as before (the kernel keeps the process group nbclient signals). A cell that breaks a
limit fails like any wrong answer; a kernel that dies is graded by
:class:`qlib.grading.ResilientExecute`.

Needs: Linux, root (or a container run as root with ``CAP_SYS_ADMIN``, e.g. ``docker run
--privileged``), and ``unshare`` from util-linux. :func:`sandbox_problem` says in one sentence
why the sandbox cannot run here, or returns ``None``; ``nbgrader_config.py`` switches the
sandbox on for ``nbgrader autograde`` when it can run (``QLIB_SANDBOX=off`` to skip it,
``QLIB_SANDBOX=on`` to refuse grading without it).

The launcher half of this module runs as a script (``python qlib/sandbox.py inside ...``)
between ``unshare`` and the kernel, as root inside the new namespaces: it mounts, limits,
drops to the sandbox user and ``exec``s the kernel. It imports only the standard library.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import subprocess
import sys

__all__ = ["sandbox_problem", "sandbox_command", "default_keep", "default_hide", "SandboxKernelManager", "HIDDEN_SYSTEM_DIRS"]

HIDDEN_SYSTEM_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
"""Shared writable folders every kernel gets a private, empty copy of."""

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384


def sandbox_problem() -> str | None:
    """``None`` when the sandbox can run here, else one sentence saying why not."""
    if not sys.platform.startswith("linux"):
        return f"the grading sandbox needs Linux namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return ("the grading sandbox needs root to create namespaces and switch users (run `make grade` "
                "as root, e.g. in a container, or see the README's 'Grading untrusted code')")
    if shutil.which("unshare") is None:
        return "the grading sandbox needs `unshare` (util-linux: apt-get install util-linux)"
    probe = subprocess.run(["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return ("this machine refuses new namespaces (a container without CAP_SYS_ADMIN?): "
                f"`unshare --net --mount --pid` said: {probe.stderr.strip()[:200]}")
    return None


def sandbox_command(kernel_cmd: list[str], *, uid: int, cwd: str, private_dir: str,
                    hide: list[str], keep: list[str], memory_bytes: int, cpu_seconds: int,
                    processes: int) -> list[str]:
    """The command that runs ``kernel_cmd`` in the sandbox (see the module docstring).

    ``unshare`` makes the namespaces (``--kill-child``: the kernel dies with it), this file
    run as a script does the rest, as root, then ``exec``s the kernel as ``uid``.
    """
    if not kernel_cmd:
        raise ValueError("kernel_cmd must be a non-empty list (the kernel's argv)")
    for name, value in (("uid", uid), ("memory_bytes", memory_bytes), ("cpu_seconds", cpu_seconds),
                        ("processes", processes)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    args = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
            "--propagation", "private", "--", sys.executable, "-I", "-S", os.path.abspath(__file__),
            "inside", "--uid", str(uid), "--cwd", cwd, "--private", private_dir,
            "--memory", str(memory_bytes), "--cpu", str(cpu_seconds), "--nproc", str(processes)]
    for path in hide:
        args += ["--hide", path]
    for path in keep:
        args += ["--keep", path]
    return args + ["--", *kernel_cmd]


def default_keep(extra=()) -> list[str]:
    """What a kernel must see (read-only): the qlib package and the Python environment
    (``sys.prefix`` and ``sys.base_prefix``, links resolved), plus ``extra``."""
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [here, *extra]
    for prefix in (sys.prefix, sys.base_prefix):
        paths += [prefix, os.path.realpath(prefix)]
    return list(dict.fromkeys(paths))


def default_hide(extra=()) -> list[str]:
    """What a kernel must not see: ``extra`` (the course root) and the grader's home folder
    (keys, tokens, shell history); ``/tmp`` and the like are always replaced (launcher)."""
    home = os.path.expanduser("~")
    return list(dict.fromkeys([*extra, *([home] if home not in ("/", "") else [])]))


# ------------------------------------------------------------------ launcher (root, inside)

def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
    libc = ctypes.CDLL(None, use_errno=True)
    enc = (lambda s: None if s is None else s.encode())
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _submission_folder(cwd: str, cwd_fd: int, scratch: str, uid: int) -> None:
    """Show the submission's folder at ``cwd``, writable, without letting the kernel change it.

    An overlay: nbgrader's folder below (read-only), the kernel's changes in a small tmpfs
    above, thrown away with the namespace. The folder nbgrader writes the graded notebook
    into is never writable by the kernel (else a symbolic link planted there would make
    nbgrader, as root, write wherever it points). Where overlays are refused, the folder is
    mounted read-only.
    """
    os.makedirs(cwd, exist_ok=True)
    os.makedirs(scratch, exist_ok=True)
    try:
        _mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, "size=256m,mode=0755")
        upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
        os.mkdir(upper)
        os.mkdir(work)
        os.chown(upper, uid, uid)
        _mount("overlay", cwd, "overlay", MS_NOSUID | MS_NODEV,
               f"lowerdir=/proc/self/fd/{cwd_fd},upperdir={upper},workdir={work}")
    except OSError:
        _mount(f"/proc/self/fd/{cwd_fd}", cwd, None, MS_BIND)
        _mount(None, cwd, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
    os.close(cwd_fd)


def _inside(opts: dict, kernel_cmd: list[str]) -> None:
    """Mount, limit, drop privileges, exec the kernel (runs as root in the new namespaces)."""
    uid = int(opts["uid"])
    # what stays visible: opened before the covering mounts, so it can be bound back after
    keep = [(opts["private"], False)] + [(p, True) for p in opts["keep"]]
    fds = [(path, ro, os.open(path, os.O_PATH)) for path, ro in keep if os.path.exists(path)]
    cwd_fd = os.open(opts["cwd"], os.O_PATH)
    hide = sorted(set(opts["hide"]) | set(HIDDEN_SYSTEM_DIRS), key=len)
    for path in hide:
        if os.path.isdir(path):  # a folder inside one hidden before is gone already
            mode = "1777" if path in HIDDEN_SYSTEM_DIRS else "0755"
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size=256m,mode={mode}")
    for path, ro, fd in fds:
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        if ro:
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
        os.close(fd)
    _submission_folder(opts["cwd"], cwd_fd, os.path.join(opts["private"], "rw"), uid)
    if shutil.which("ip"):  # a loopback of its own (some libraries talk to themselves over it)
        subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True)
    limits = {resource.RLIMIT_AS: int(opts["memory"]), resource.RLIMIT_CPU: int(opts["cpu"]),
              resource.RLIMIT_NPROC: int(opts["nproc"]), resource.RLIMIT_CORE: 0,
              resource.RLIMIT_FSIZE: 1 << 30}
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    os.chdir(opts["cwd"])  # the bind mount, not the folder under it
    env = dict(os.environ, HOME=opts["private"], TMPDIR="/tmp", MPLCONFIGDIR=opts["private"])
    env.setdefault("OMP_NUM_THREADS", "1")  # torch's default pool (one thread a core) would hit the limit
    os.execvpe(kernel_cmd[0], kernel_cmd, env)


def _parse(argv: list[str]) -> tuple[dict, list[str]]:
    split = argv.index("--")
    opts: dict = {"hide": [], "keep": []}
    it = iter(argv[:split])
    for flag in it:
        key = flag.lstrip("-")
        value = next(it)
        if key in ("hide", "keep"):
            opts[key].append(value)
        else:
            opts[key] = value
    return opts, argv[split + 1:]


if __name__ == "__main__" and sys.argv[1:2] == ["inside"]:
    _inside(*_parse(sys.argv[2:]))


# ------------------------------------------------------------------ kernel manager (grader side)

if __name__ != "__main__":
    import secrets
    import tempfile

    from jupyter_client.manager import AsyncKernelManager
    from traitlets import Int, List, Unicode

    class SandboxKernelManager(AsyncKernelManager):
        """A kernel manager whose kernels run in the sandbox (module docstring).

        Use it as nbclient's / nbgrader's ``kernel_manager_class``; ``hide`` lists the
        folders the kernel must not see (the course root). Each kernel gets a private folder
        (``/tmp/qlib-sandbox-*``, its ``HOME``, its connection file and sockets), removed at
        shutdown. The submission's folder is never writable by the kernel (an overlay takes its
        changes, see ``_submission_folder``).
        """

        hide = List(Unicode(), help="folders the kernel must not see (the course root)").tag(config=True)
        keep = List(Unicode(), help="folders inside hidden ones to show read-only").tag(config=True)
        memory_bytes = Int(8 << 30, help="address-space limit of the kernel, bytes").tag(config=True)
        cpu_seconds = Int(1800, help="CPU-time limit of the kernel, seconds").tag(config=True)
        processes = Int(64, help="processes and threads the kernel's uid may have (a lab kernel uses about 10)").tag(config=True)
        uid_base = Int(200000, help="sandbox uids are uid_base + [0, 100000)").tag(config=True)

        async def _async_pre_start_kernel(self, **kw):
            problem = sandbox_problem()
            if problem:
                raise RuntimeError(f"cannot start a sandboxed kernel: {problem}")
            self._sandbox_uid = self.uid_base + secrets.randbelow(100000)
            self._sandbox_dir = tempfile.mkdtemp(prefix="qlib-sandbox-")
            self._sandbox_cwd = os.path.abspath(kw.get("cwd") or os.getcwd())
            self.transport = "ipc"
            self.ip = os.path.join(self._sandbox_dir, "kernel")
            self.connection_file = os.path.join(self._sandbox_dir, "kernel.json")
            return await super()._async_pre_start_kernel(**kw)

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            uid = self._sandbox_uid
            for path in (self._sandbox_dir, self.connection_file):
                os.chown(path, uid, uid)
            os.chmod(self._sandbox_dir, 0o700)
            cmd = sandbox_command(kernel_cmd, uid=uid, cwd=self._sandbox_cwd, private_dir=self._sandbox_dir,
                                  hide=default_hide(self.hide), keep=default_keep(self.keep), memory_bytes=self.memory_bytes,
                                  cpu_seconds=self.cpu_seconds, processes=self.processes)
            return await super()._async_launch_kernel(cmd, **kw)

        async def _async_shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
            # remove the private folder whatever happened to the kernel
            try:
                await super()._async_shutdown_kernel(now=now, restart=restart)
            finally:
                if not restart:
                    self._remove_private_dir()

        shutdown_kernel = _async_shutdown_kernel  # AsyncKernelManager binds the base's coroutine

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart)
            if not restart:
                self._remove_private_dir()

        # nbclient calls cleanup_resources() alone when the kernel is already dead
        cleanup_resources = _async_cleanup_resources

        def _remove_private_dir(self) -> None:
            if getattr(self, "_sandbox_dir", None):
                shutil.rmtree(self._sandbox_dir, ignore_errors=True)
                self._sandbox_dir = None
