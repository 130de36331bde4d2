"""A class on JupyterHub, for real, on 127.0.0.1: one instructor, two students, nbgrader's
exchange in a shared directory.

Reference: deploy/jupyterhub/jupyterhub_config.py (loaded as is) and nbgrader's "Using
nbgrader with JupyterHub". JupyterHub runs with its dummy authenticator and the
``SimpleLocalProcessSpawner`` (every user one system account, homes in a temporary folder),
configurable-http-proxy from npm (``make proxy``, a project-local install). The instructor
releases lab00 through the exchange; each student fetches and submits it through the
Assignment List's REST API of their own single-user server (what the panel's buttons call);
the instructor collects, autogrades, generates and releases feedback with nbgrader's commands
in the course folder (the instructor's terminal); a student fetches the feedback through the
REST API. Everything is stopped and removed at the end.
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
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "jupyterhub"
PROXY = DEPLOY / ".proxy" / "node_modules" / ".bin" / "configurable-http-proxy"
LAB = "lab00_warmup"
COURSE = "quantization"
STUDENTS = ("alice", "bob")
TOKEN = "qlib-hub-test-token-0123456789"

pytestmark = [pytest.mark.grading, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxy() -> Path:
    """configurable-http-proxy, installed by ``make proxy`` into deploy/jupyterhub/.proxy."""
    if not PROXY.exists():
        if shutil.which("npm") is None:
            pytest.skip("npm is missing: JupyterHub needs configurable-http-proxy (node 20 + npm)")
        out = subprocess.run(["make", "-o", ".venv/.installed", "proxy"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            pytest.skip(f"could not install configurable-http-proxy from npm:\n{out.stderr[-2000:]}")
    return PROXY


class Hub:
    def __init__(self, url: str):
        self.url = url

    def call(self, method: str, path: str, data=None, timeout: float = 60):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Authorization": f"token {TOKEN}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode()
            return resp.status, (json.loads(text) if text.strip().startswith(("{", "[")) else text)

    def wait(self, what: str, probe, limit: float = 90):
        deadline = time.time() + limit
        while True:
            try:
                result = probe()
                if result:
                    return result
            except (OSError, urllib.error.HTTPError):
                pass
            assert time.time() < deadline, f"{what} within {limit} s"
            time.sleep(0.5)

    def start_server(self, user: str) -> None:
        self.call("POST", f"/hub/api/users/{user}/server")
        self.wait(f"{user}'s server ready",
                  lambda: self.call("GET", f"/hub/api/users/{user}")[1]["servers"][""]["ready"])

    def assignments(self, user: str, action: str = "") -> list:
        if action:
            status, out = self.call("POST", f"/user/{user}/assignments/{action}",
                                    {"assignment_id": LAB, "course_id": COURSE})
        else:
            status, out = self.call("GET", f"/user/{user}/assignments?course_id={COURSE}")
        assert isinstance(out, dict) and out.get("success"), out
        return out["value"]


def nbgrader(*args: str, cwd: Path, env: dict) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "nbgrader"), *args, "--log-level=WARN"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"nbgrader {' '.join(args)}:\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.mark.timeout(240)
def test_a_class_on_jupyterhub(tmp_path):
    pytest.importorskip("jupyterhub", reason="JupyterHub comes with the test extra: `make test`")
    chp = proxy()
    course = tmp_path / "course"
    for part in ("solutions", "labs"):
        shutil.copytree(ROOT / part / LAB, course / part / LAB,
                        ignore=shutil.ignore_patterns("*.py", ".ipynb_checkpoints"))
    shutil.copy(ROOT / "nbgrader_config.py", course)
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    exchange.chmod(0o1777)
    homes = tmp_path / "home"
    homes.mkdir()

    port = free_port()
    env = dict(os.environ, COURSE_DIR=str(course), COURSE_ID=COURSE, NBGRADER_EXCHANGE=str(exchange),
               COURSE_INSTRUCTORS="teacher", COURSE_STUDENTS=",".join(STUDENTS),
               PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    allow_root = ["--allow-root"] if os.getuid() == 0 else []
    (tmp_path / "test_config.py").write_text(f"""
c = get_config()
load_subconfig({str(DEPLOY / 'jupyterhub_config.py')!r})
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = {str(homes)!r} + "/{{username}}"
c.Spawner.args = {allow_root!r}
c.Spawner.start_timeout = 90
c.Spawner.http_timeout = 90
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {free_port()}
c.ConfigurableHTTPProxy.command = [{str(chp)!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
c.JupyterHub.db_url = "sqlite:///{tmp_path}/hub.sqlite"
c.JupyterHub.cookie_secret_file = "{tmp_path}/cookie_secret"
c.JupyterHub.pid_file = "{tmp_path}/hub.pid"
c.JupyterHub.cleanup_servers = True
c.JupyterHub.services = [{{"name": "course-test", "api_token": {TOKEN!r}}}]
c.JupyterHub.load_roles = [{{"name": "course-test", "services": ["course-test"],
    "scopes": ["admin:users", "admin:servers", "access:servers", "list:users", "read:users"]}}]
""")
    log = open(tmp_path / "hub.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "jupyterhub"), "-f",
                             str(tmp_path / "test_config.py")], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    hub = Hub(f"http://127.0.0.1:{port}")
    try:
        hub.wait("the hub answers", lambda: hub.call("GET", "/hub/api/")[0] == 200)
        for user in ("teacher", *STUDENTS):  # the config's allowed users exist already
            hub.start_server(user)
        # The instructor's server opens in the course and serves the Formgrader.
        status, _ = hub.call("GET", "/user/teacher/formgrader")
        assert status == 200
        with pytest.raises(urllib.error.HTTPError) as no_formgrader:  # students: switched off
            hub.call("GET", "/user/alice/formgrader")
        assert no_formgrader.value.code == 404

        teacher = dict(env, JUPYTERHUB_USER="teacher", JUPYTER_CONFIG_PATH=str(DEPLOY / "instructor"))
        nbgrader("generate_assignment", LAB, "--force", cwd=course, env=teacher)
        nbgrader("release_assignment", LAB, cwd=course, env=teacher)

        for student in STUDENTS:
            listed = hub.assignments(student)
            assert [(a["assignment_id"], a["status"]) for a in listed] == [(LAB, "released")]
            hub.assignments(student, "fetch")
            fetched = homes / student / LAB / f"{LAB}.ipynb"
            assert fetched.exists()
            if student == "alice":  # alice answers Q1; bob submits the lab untouched
                nb = json.loads(fetched.read_text())
                cell = next(c for c in nb["cells"] if c["metadata"].get("nbgrader", {}).get("grade_id") == "q1-answer")
                cell["source"] = "def size_in_bytes(num_params, bits):\n    return (num_params * bits + 7) // 8\n"
                fetched.write_text(json.dumps(nb))
            hub.assignments(student, "submit")
            assert (exchange / COURSE / "inbound").exists()

        nbgrader("collect", LAB, cwd=course, env=teacher)
        assert sorted(p.name for p in (course / "submitted").iterdir()) == sorted(STUDENTS)
        nbgrader("autograde", LAB, "--create", cwd=course, env=teacher)
        nbgrader("generate_feedback", LAB, cwd=course, env=teacher)
        nbgrader("release_feedback", LAB, cwd=course, env=teacher)
        nbgrader("export", "--to", str(tmp_path / "grades.csv"), cwd=course, env=teacher)
        grades = (tmp_path / "grades.csv").read_text().splitlines()
        scores = {row.split(",")[3]: float(row.split(",")[-2]) for row in grades[1:]}  # student_id, score
        assert scores["alice"] == 2.0 and scores["bob"] == 0.0, grades

        listed = hub.assignments("alice", "fetch_feedback")
        feedback = list((homes / "alice" / LAB / "feedback").rglob(f"{LAB}.html"))
        assert feedback, listed
    finally:
        for user in ("teacher", *STUDENTS):
            try:
                hub.call("DELETE", f"/hub/api/users/{user}/server", timeout=20)
            except Exception:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        print((tmp_path / "hub.log").read_text()[-3000:])


def test_zero_to_jupyterhub_values_are_valid():
    """deploy/kubernetes/values.yaml parses, its hub hook is valid Python, and the role folders
    it points the pods at exist in the repository (the Helm chart itself is not run here)."""
    yaml = pytest.importorskip("yaml")
    values = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "values.yaml").read_text())
    hook = values["hub"]["extraConfig"]["per-role"]
    compile(hook, "per-role", "exec")
    for role in ("instructor", "student"):
        assert f"deploy/jupyterhub/{{role}}" in hook
        assert (DEPLOY / role / "nbgrader_config.py").exists()
    assert values["singleuser"]["extraEnv"]["NBGRADER_EXCHANGE"] == "/srv/nbgrader/exchange"
