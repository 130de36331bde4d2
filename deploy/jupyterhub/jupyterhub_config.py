"""JupyterHub for one course server: an instructor and students, nbgrader's exchange shared.

Follows nbgrader's "Using nbgrader with JupyterHub" (one course, one instructor): every
person is a JupyterHub user; the instructor's own single-user server opens in the course
repository, where the Formgrader (nbgrader's server extension) grades; students' servers
open in their home folder, where the Assignment List fetches and submits. The exchange is
one shared directory that every user can write to (``chmod 1777``, sticky, as nbgrader's
docs say), outside anyone's home.

Settings come from environment variables so one file serves a real server and the test
(``tests/test_jupyterhub.py``):

- ``COURSE_DIR``: a clone of this repository, owned by the instructor (default
  ``/srv/quantization-course``).
- ``COURSE_ID``: nbgrader's course id (default ``quantization``, as in nbgrader_config.py).
- ``NBGRADER_EXCHANGE``: the shared exchange (default ``/srv/nbgrader/exchange``).
- ``COURSE_INSTRUCTORS`` and ``COURSE_STUDENTS``: user names, comma-separated.

Authentication and spawning are JupyterHub's defaults (PAM and one system user per person,
``LocalProcessSpawner``): create the users first (``adduser``). The test replaces them with
the dummy authenticator and ``SimpleLocalProcessSpawner`` (all users one system account),
see the instructor guide in README.md.
"""

import os
from pathlib import Path

c = get_config()  # noqa: F821  (JupyterHub injects get_config)

HERE = Path(__file__).resolve().parent
COURSE_DIR = os.environ.get("COURSE_DIR", "/srv/quantization-course")
COURSE_ID = os.environ.get("COURSE_ID", "quantization")
EXCHANGE = os.environ.get("NBGRADER_EXCHANGE", "/srv/nbgrader/exchange")
INSTRUCTORS = {u for u in os.environ.get("COURSE_INSTRUCTORS", "instructor").split(",") if u}
STUDENTS = {u for u in os.environ.get("COURSE_STUDENTS", "").split(",") if u}

# Who may log in; instructors are hub admins (they can see students' servers).
c.Authenticator.allowed_users = INSTRUCTORS | STUDENTS
c.Authenticator.admin_users = INSTRUCTORS
# nbgrader's JupyterHub groups: formgrade-<course> grades, nbgrader-<course> takes the course.
c.JupyterHub.load_groups = {
    f"formgrade-{COURSE_ID}": {"users": sorted(INSTRUCTORS)},
    f"nbgrader-{COURSE_ID}": {"users": sorted(STUDENTS)},
}

# Every single-user server: JupyterLab, and nbgrader's settings for this course (the
# exchange and the course id) from deploy/jupyterhub/<role>/nbgrader_config.py.
c.Spawner.default_url = "/lab"
c.Spawner.environment = {"NBGRADER_EXCHANGE": EXCHANGE, "COURSE_ID": COURSE_ID}


def per_role(spawner):
    """The instructor's server opens in the course, a student's in their home folder.

    The role's folder goes first on ``JUPYTER_CONFIG_PATH``: students' servers get the
    exchange and their student id, and the Formgrader and Create Assignment extensions are
    switched off for them (nbgrader's docs: instructors only).
    """
    name = spawner.user.name
    role = "instructor" if name in INSTRUCTORS else "student"
    # A new dict: the configured one may be shared by every user's spawner.
    spawner.environment = {**spawner.environment, "JUPYTER_CONFIG_PATH": str(HERE / role)}
    if role == "instructor":
        spawner.notebook_dir = COURSE_DIR


c.Spawner.pre_spawn_hook = per_role
