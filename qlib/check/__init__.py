"""Self-checks for the labs: the same code runs in nbgrader, on Colab and in pytest.

A lab's test cell calls one check, for example ``check.lab00.model_size(model_size_bytes)``.
A check runs the student's function on several cases (fresh random ones where that makes
sense), compares with a reference, and either prints a green ``PASS`` line or raises an
``AssertionError`` whose message says what was expected and what came back. nbgrader gives
the points of a test cell when its code raises nothing, so visible tests, hidden tests and
self-study on Colab all share one implementation.

Checks never crash on a student's mistake with a confusing traceback: an exception raised
by the student's code is reported as "your function raised ..." and still fails the check.
"""

from __future__ import annotations

import importlib
import math
import re
from contextlib import contextmanager
from typing import Any, Callable

import torch

__all__ = ["CheckFailed", "expect", "expect_close", "expect_equal", "call", "passed",
           "not_implemented", "run"]


class CheckFailed(AssertionError):
    """A self-check failed; the message says what was expected."""


def passed(name: str) -> None:
    print(f"PASS  {name}")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        shown = value if value.numel() <= 8 else value.flatten()[:8]
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype}, values={shown.tolist()}...)"
    return repr(value)


def expect_equal(got: Any, want: Any, what: str) -> None:
    """Exact equality (tensors: same shape, dtype-compatible values, ``torch.equal``)."""
    if isinstance(want, torch.Tensor):
        expect(isinstance(got, torch.Tensor),
               f"{what}: expected a torch.Tensor, got {type(got).__name__}")
        expect(got.shape == want.shape,
               f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
        expect(torch.equal(got.to(want.dtype), want),
               f"{what}: values differ.\n  expected {_describe(want)}\n  got      {_describe(got)}")
        return
    expect(got == want, f"{what}: expected {_describe(want)}, got {_describe(got)}")


def expect_close(got: Any, want: Any, what: str, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """Closeness for floats and float tensors: ``|got - want| <= atol + rtol * |want|``."""
    if isinstance(want, torch.Tensor):
        expect(isinstance(got, torch.Tensor),
               f"{what}: expected a torch.Tensor, got {type(got).__name__}")
        expect(got.shape == want.shape,
               f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
        ok = torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol)
        expect(ok, f"{what}: values differ by up to "
                   f"{(got.double() - want.double()).abs().max().item():.3g}.\n"
                   f"  expected {_describe(want)}\n  got      {_describe(got)}")
        return
    try:
        got_f = float(got)
    except (TypeError, ValueError):
        raise CheckFailed(f"{what}: expected a number, got {_describe(got)}") from None
    expect(math.isclose(got_f, float(want), rel_tol=rtol, abs_tol=atol),
           f"{what}: expected {want!r}, got {got!r}")


def call(fn: Callable, *args, what: str | None = None, **kwargs):
    """Call the student's function; turn its exceptions into a readable failed check."""
    name = what or getattr(fn, "__name__", "your function")
    expect(callable(fn), f"{name}: expected a function, got {type(fn).__name__}")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckFailed(f"{name} is not implemented yet: replace `raise NotImplementedError` "
                          f"with your code") from None
    except CheckFailed:
        raise
    except Exception as err:  # the student's bug, reported, not a crash of the checker
        raise CheckFailed(f"{name}{_args_text(args)} raised {type(err).__name__}: {err}") from err


def _args_text(args) -> str:
    return "(" + ", ".join(_describe(a) if not isinstance(a, torch.Tensor)
                            else f"tensor{tuple(a.shape)}" for a in args) + ")"


def not_implemented(*_args, **_kwargs):
    """Placeholder the released labs start from."""
    raise NotImplementedError


@contextmanager
def _quiet_torch_seed(seed: int | None):
    """Fresh randomness per check unless a seed is given (then reproducible, isolated)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def run(name: str, body: Callable[[], None], seed: int | None = None) -> None:
    """Run one check body; print PASS or re-raise a CheckFailed with the check's name.

    Returns None on purpose: nbgrader reads a test cell's displayed value as a score.
    """
    with _quiet_torch_seed(seed):
        try:
            body()
        except CheckFailed as err:
            raise CheckFailed(f"FAIL  {name}: {err}") from None
    passed(name)


def __getattr__(name: str):
    """``check.lab03`` imports the checks of lab 03 on first use (``qlib/check/lab03.py``)."""
    if re.fullmatch(r"lab\d\d", name):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"there are no checks for {name} (expected qlib/check/{name}.py)") from None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
