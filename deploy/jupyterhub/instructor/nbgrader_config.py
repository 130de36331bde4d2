"""nbgrader in the instructor's server (deploy/jupyterhub): the course's shared exchange.

Everything else (source and release folders, the gradebook, timeouts) comes from the course
repository's own ``nbgrader_config.py``, read from the server's folder, the course.
"""

import os

c = get_config()  # noqa: F821

c.Exchange.root = os.environ["NBGRADER_EXCHANGE"]
c.CourseDirectory.course_id = os.environ.get("COURSE_ID", "quantization")
