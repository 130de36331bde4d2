"""nbgrader settings for one person on one machine (``make lab`` puts this folder on
``JUPYTER_CONFIG_PATH``).

nbgrader's exchange (where ``release_assignment`` puts a lab and the Assignment List panel
looks for it) defaults to ``/usr/local/share/nbgrader/exchange``, which does not exist and
needs root to create: the panel then shows "Error fetching courses!". Here the exchange is a
folder of this checkout, ``deploy/local/exchange`` (ignored by git), created when needed, so
the panel works without root. It lists what ``nbgrader release_assignment <lab>`` put there;
students of a class get the labs from their instructor's JupyterHub (deploy/jupyterhub).
"""

import os

c = get_config()  # noqa: F821  (nbgrader injects get_config)

exchange = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exchange")
os.makedirs(exchange, exist_ok=True)
c.Exchange.root = exchange
c.CourseDirectory.course_id = "quantization"
