"""Self-checks for the labs: the same code runs in nbgrader, on Colab and in pytest.

A lab's test cell calls one check, for example ``check.lab00.model_size(model_size_bytes)``.
A check runs the student's function on several cases, compares with a reference, and
either prints a green ``PASS`` line or raises an ``AssertionError`` whose message says what
was expected, what came back and, when the answer matches a typical mistake, which one.
nbgrader gives the points of a test cell when its code raises nothing, so visible tests,
hidden tests and self-study on Colab all share one implementation.

- :mod:`qlib.check.core`: the shared machinery (calling the student's code safely, checking
  the form and the value of an answer, the PASS/FAIL report).
- :mod:`qlib.check.draws`: the random cases of the hidden checks, fresh for every student and
  the same at every re-grade of one submission.
- :mod:`qlib.check.mistakes`: typical wrong answers shared by several labs, with their hints.
- ``qlib/check/labNN.py``: the checks of lab NN, loaded on first use (``check.lab03``).

Checks never crash on a student's mistake with a confusing traceback: an exception raised
by the student's code is reported as "your function raised ..." and still fails the check.
"""

from __future__ import annotations

import importlib
import re

from .core import (CheckFailed, as_number, call, changed_entries, describe, expect, expect_close, layer_activations,
                   expect_equal, expect_pair, expect_tensor, first_difference, first_hint, hooks_left,
                   isolated_rng, not_implemented, one_thread, passed, quiet_deprecations, run, snapshot)
from .draws import SEED_ENV, Draw, hidden, hidden_seed, seeded

__all__ = ["CheckFailed", "expect", "expect_close", "expect_equal", "call", "passed",
           "not_implemented", "run", "hidden", "seeded", "hidden_seed", "Draw", "SEED_ENV",
           "as_number", "expect_pair", "expect_tensor", "first_difference", "first_hint",
           "describe", "snapshot", "changed_entries", "hooks_left", "quiet_deprecations",
           "isolated_rng", "one_thread", "layer_activations"]


def __getattr__(name: str):
    """``check.lab03`` imports the checks of lab 03 on first use (``qlib/check/lab03.py``)."""
    if re.fullmatch(r"lab\d\d", name):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # a missing import inside an existing lab module: show it
            raise AttributeError(f"there are no checks for {name} (expected qlib/check/{name}.py)") from None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


RUN_ALL_NOTE = ("(Run All stops at the first failing check: fix this answer and run its cell again, "
                "or run the cells below one by one.)")


def friendly_failures(shell=None) -> bool:
    """In a notebook, show a failing check as its message, not as a traceback into qlib.

    IPython's ``set_custom_exc`` hands ``CheckFailed`` to a handler that still reports an
    *error* (so nbgrader still gives the cell no points and Run All still stops), but whose
    traceback is two lines: the check's message and a note on Run All. Returns whether it was
    installed (False outside IPython). Called once at import.
    """
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        shell = get_ipython()
    if shell is None or not hasattr(shell, "set_custom_exc"):
        return False

    def show(sh, etype, value, tb, tb_offset=None):
        text = str(value)  # a check's own message already starts "FAIL  <name>: "
        sh._showtraceback(etype, value, [text if text.startswith("FAIL") else f"FAIL  {text}", RUN_ALL_NOTE])

    shell.set_custom_exc((CheckFailed,), show)
    return True


friendly_failures()
