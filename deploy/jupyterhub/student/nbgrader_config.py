"""nbgrader in a student's server (deploy/jupyterhub): the course's shared exchange.

The student id is the JupyterHub user name. With one system account per person it equals
the account's name (nbgrader's default); in containers every user is ``jovyan`` and on a
test hub all users share one account, so it is set here explicitly.
"""

import os

c = get_config()  # noqa: F821

c.Exchange.root = os.environ["NBGRADER_EXCHANGE"]
c.CourseDirectory.course_id = os.environ.get("COURSE_ID", "quantization")
c.CourseDirectory.student_id = os.environ["JUPYTERHUB_USER"]
