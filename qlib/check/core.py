"""The machinery every lab check shares: call the student's code safely, compare with a
reference, and print ``PASS`` or raise a message that says what was expected.

A check body is a plain function that raises :class:`CheckFailed` (an ``AssertionError``)
at the first wrong answer. :func:`run` wraps it: it prints ``PASS  <name>`` or re-raises
``FAIL  <name>: <what was expected, what came back, a hint>``. nbgrader gives a test cell
its points when the cell raises nothing, so one body serves the visible tests, the hidden
tests, self-study on Colab and pytest.

Every body runs with torch's global random generator forked and seeded (CPU only, so no
CUDA context is opened): a check never shifts the random draws of the student's notebook,
and anything it draws is reproducible (visible checks: a seed fixed by the check's name;
hidden checks: a seed per student, see :mod:`qlib.check.draws`).

Helpers, in the order a check uses them:

- :func:`call` runs the student's function; its exceptions become a failed check
  ("your_fn(args) raised ValueError: ...", or "not implemented yet").
- :func:`as_number`, :func:`scalar_tensor`, :func:`expect_pair`, :func:`expect_tensor` check
  the *form* of an answer (one number, a pair, a tensor of the right shape and dtype) before
  its value.
- :func:`expect_equal` (bit for bit) and :func:`expect_close` (``|got - want| <= atol +
  rtol * |want|``) compare values; :func:`first_difference` finds the first wrong element
  and :func:`first_hint` names the typical mistake an answer equals, when it equals one.
- :func:`snapshot` / :func:`changed_entries` / :func:`hooks_left` tell whether the
  student's code changed a model it should only have read; :func:`layer_activations`
  collects what a layer sees.
- :func:`quiet_deprecations`, :func:`one_thread` and :func:`isolated_rng` set the scene a
  reference or a student's training runs in, and restore it after.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from numbers import Integral, Real
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .draws import stable_seed

__all__ = ["CheckFailed", "passed", "expect", "describe", "expect_equal", "expect_close", "call",
           "not_implemented", "run", "as_number", "scalar_tensor", "expect_pair", "expect_tensor",
           "first_difference", "first_hint", "snapshot", "changed_entries", "layer_activations",
           "hooks_left", "quiet_deprecations", "one_thread", "isolated_rng"]


class CheckFailed(AssertionError):
    """A self-check failed; the message says what was expected."""


def passed(name: str) -> None:
    print(f"PASS  {name}")


def expect(condition: bool, message: str) -> None:
    """Raise :class:`CheckFailed` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CheckFailed(message)


def describe(value: Any) -> str:
    """A short text for a value in a message (a tensor: shape, dtype, first 8 values)."""
    if isinstance(value, torch.Tensor):
        shown = value if value.numel() <= 8 else value.flatten()[:8]
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype}, values={shown.tolist()}...)"
    return repr(value)


def expect_tensor(got: Any, what: str, shape: tuple | torch.Size | None = None,
                  dtype: torch.dtype | None = None, kind: str = "a torch.Tensor") -> torch.Tensor:
    """``got`` must be a tensor (of ``shape`` and ``dtype`` when given); returns it.

    ``kind`` names what was expected in the message ("a tensor of codes").
    """
    expect(isinstance(got, torch.Tensor), f"{what}: expected {kind}, got {type(got).__name__}")
    if shape is not None:
        expect(tuple(got.shape) == tuple(shape), f"{what}: expected shape {tuple(shape)}, got {tuple(got.shape)}")
    if dtype is not None:
        expect(got.dtype == dtype, f"{what}: expected a {str(dtype).replace('torch.', '')} tensor, "
                                   f"got {got.dtype}")
    return got


def expect_equal(got: Any, want: Any, what: str) -> None:
    """Exact equality (tensors: same shape, dtype-compatible values, ``torch.equal``)."""
    if isinstance(want, torch.Tensor):
        expect_tensor(got, what, shape=want.shape)
        expect(torch.equal(got.to(want.dtype), want),
               f"{what}: values differ.\n  expected {describe(want)}\n  got      {describe(got)}")
        return
    expect(got == want, f"{what}: expected {describe(want)}, got {describe(got)}")


def expect_close(got: Any, want: Any, what: str, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """Closeness for floats and float tensors: ``|got - want| <= atol + rtol * |want|``."""
    if isinstance(want, torch.Tensor):
        expect_tensor(got, what, shape=want.shape)
        ok = torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol)
        expect(ok, f"{what}: values differ by up to "
                   f"{(got.double() - want.double()).abs().max().item():.3g}.\n"
                   f"  expected {describe(want)}\n  got      {describe(got)}")
        return
    got_f = as_number(got, what, finite=False)
    expect(math.isclose(got_f, float(want), rel_tol=rtol, abs_tol=atol),
           f"{what}: expected {want!r}, got {got!r}")


def as_number(value: Any, what: str, finite: bool = True) -> float:
    """One number (a Python number or a one-element tensor) as a float, or a clear failure."""
    if isinstance(value, torch.Tensor):
        expect(value.numel() == 1, f"{what}: expected one number (a 0-d tensor or a float), "
                                   f"got a tensor of shape {tuple(value.shape)}")
        value = value.detach().item()
    if isinstance(value, bool):
        raise CheckFailed(f"{what}: expected a number, got {value!r}")
    expect(isinstance(value, Real), f"{what}: expected a number, got {type(value).__name__}")
    number = float(value)
    if finite:
        expect(math.isfinite(number), f"{what}: expected a finite number, got {number}")
    return number


def scalar_tensor(value, what: str, integer: bool) -> torch.Tensor:
    """One number from the student (a scale, a zero point) as a 0-d float32 or int64 tensor.

    ``integer``: an int or an integer tensor is expected (a float fails with a hint).
    """
    if isinstance(value, torch.Tensor):
        expect(value.numel() == 1, f"{what}: expected one number (per-tensor), got shape {tuple(value.shape)}")
        if integer:
            expect(not value.is_floating_point(),
                   f"{what}: expected an integer (int or integer tensor), got a {value.dtype} tensor; "
                   f"convert it, e.g. `.to(torch.int64)`")
            return value.reshape(()).to(torch.int64)
        expect(value.is_floating_point(), f"{what}: expected a float tensor, got {value.dtype}")
        return value.detach().reshape(()).to(torch.float32)
    if integer:
        expect(isinstance(value, Integral) and not isinstance(value, bool),
               f"{what}: expected an integer, got {value!r} ({type(value).__name__})")
        return torch.tensor(int(value))
    expect(isinstance(value, (float, int)) and not isinstance(value, bool),
           f"{what}: expected a number or a float32 tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=torch.float32)


def expect_pair(got: Any, what: str, names: str = "(lo, hi)") -> tuple[Any, Any]:
    """``got`` must be a tuple or list of two things; ``names`` says which, for the message."""
    expect(isinstance(got, (tuple, list)) and len(got) == 2,
           f"{what}: expected a pair {names}, got {type(got).__name__} {describe(got)}"[:300])
    return got[0], got[1]


def first_difference(got: torch.Tensor, want: torch.Tensor) -> tuple[int, int]:
    """``(how many elements differ, flat index of the first)`` (index 0 when none differ)."""
    bad = (got.flatten() != want.flatten()).nonzero().flatten()
    return len(bad), (bad[0].item() if len(bad) else 0)


def first_hint(got: Any, variants: Iterable[tuple[str, Any]],
               same: Callable[[Any, Any], bool] | None = None) -> str:
    """The hint of the first typical wrong answer that ``got`` equals ("" if none).

    ``variants`` are ``(hint, wrong_value)`` pairs; ``same`` compares (default: ``torch.equal``
    for tensors, ``==`` otherwise).
    """
    if same is None:
        def same(a, b):
            if isinstance(b, torch.Tensor):
                return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.equal(a, b.to(a.dtype))
            return a == b
    return next((hint for hint, wrong in variants if same(got, wrong)), "")


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
    return "(" + ", ".join(describe(a) if not isinstance(a, torch.Tensor)
                            else f"tensor{tuple(a.shape)}" for a in args) + ")"


def not_implemented(*_args, **_kwargs):
    """Placeholder the released labs start from."""
    raise NotImplementedError


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer of ``model`` (its ``state_dict``)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_entries(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Names of the ``state_dict`` entries that differ from the :func:`snapshot` ``before``."""
    after = model.state_dict()
    return [k for k, v in before.items() if k not in after or not torch.equal(after[k], v)]


def layer_activations(model: nn.Module, layer_name: str, batches, output: bool = False) -> torch.Tensor:
    """What ``model.<layer_name>`` receives (or, with ``output``, returns) over ``batches``,
    concatenated along dim 0; the model runs under ``torch.no_grad()`` in its current mode."""
    seen = []
    layer = model.get_submodule(layer_name)
    if output:
        handle = layer.register_forward_hook(lambda _m, _args, out: seen.append(out.detach().clone()))
    else:
        handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        handle.remove()
    return torch.cat(seen)


def hooks_left(model: nn.Module) -> bool:
    """Whether any forward hook or pre-hook is still attached somewhere in ``model``."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@contextmanager
def quiet_deprecations():
    """PyTorch's quantization APIs warn about their deprecation: not the student's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecat")
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@contextmanager
def one_thread():
    """Run the student's training on one torch thread (restored after): a tiny model trains as
    fast, and steadily when a grader runs many notebooks at once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def isolated_rng(seed: int):
    """Run with torch's CPU generator seeded to ``seed``; restore the caller's state after.

    ``devices=[]``: forking the CUDA generators would open a CUDA context in every kernel.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def run(name: str, body: Callable[[], None], seed: int | None = None, note: str = "") -> None:
    """Run one check body; print PASS or re-raise a CheckFailed with the check's name.

    ``seed`` seeds torch's global generator for the body (default: a seed fixed by ``name``);
    ``note`` is appended to a failure (the hidden checks say how to replay their draws).
    Returns None on purpose: nbgrader reads a test cell's displayed value as a score.
    """
    with isolated_rng(stable_seed(name) if seed is None else seed):
        try:
            body()
        except CheckFailed as err:
            raise CheckFailed(f"FAIL  {name}: {err}{note}") from None
    passed(name)
