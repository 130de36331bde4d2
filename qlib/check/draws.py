"""Random cases for the hidden checks: fresh for every student, the same at every re-grade.

A hidden check draws new random cases (tensors, bit widths, models) so that an answer
tuned to the visible cases does not pass. If those draws changed at every grading run, a
re-grade could change a score. So the draws come from one seed per (student, check)::

    seed = sha256("<base>|<student>/<lab>|<check name>")[:8]   (as an integer)

- **student/lab**: ``nbgrader autograde`` runs each submission in
  ``autograded/<student_id>/<lab>/`` with ``NBGRADER_EXECUTION=autograde`` set; the last two
  parts of the working directory name the submission. Two students draw different cases;
  the same submission graded twice draws the same ones.
- **base**: ``QLIB_CHECK_SEED`` when set (an instructor may pick one per term; CI runs the
  suite with several), else ``""`` under nbgrader, else a fresh random number (plain
  JupyterLab, Colab, pytest without the variable): every run then tries new cases. A
  failure message prints the base, so ``QLIB_CHECK_SEED=<base>`` replays the exact cases.
- **check name**: each check draws its own cases.

A check body receives a :class:`Draw`: ``draw.rng`` (a :class:`random.Random`) for
Python-side choices, ``draw.gen`` (a CPU :class:`torch.Generator`) for tensors, and
``draw.integer()`` for sub-seeds (a model's seed, a batch order). :func:`seeded` fixes the
base inside a ``with`` block (tests use it to replay or to vary the draws). The case
generators the labs share take a generator: :func:`heavy_tailed`, :func:`relu_like` (tensors
shaped like real activations) and :func:`random_bn` (a BatchNorm with random statistics).
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = ["SEED_ENV", "Draw", "base_seed", "hidden", "hidden_seed", "seeded", "stable_seed",
           "submission", "heavy_tailed", "relu_like", "random_bn"]

SEED_ENV = "QLIB_CHECK_SEED"
"""Environment variable that fixes the base of every hidden draw."""

_override: list[str] = []  # set by seeded(); innermost last


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from text: the same parts give the same seed on every machine and run."""
    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def submission() -> str:
    """``"<student_id>/<lab>"`` while nbgrader autogrades a submission, else ``""``."""
    if os.environ.get("NBGRADER_EXECUTION") != "autograde":
        return ""
    return "/".join(Path.cwd().parts[-2:])


def base_seed() -> str:
    """The base of the hidden draws: :func:`seeded`, else ``$QLIB_CHECK_SEED``, else ``""``
    under nbgrader, else a fresh random number."""
    if _override:
        return _override[-1]
    env = os.environ.get(SEED_ENV, "").strip()
    if env:
        return env
    return "" if submission() else str(secrets.randbelow(10**9))


def hidden_seed(name: str, base: str | None = None) -> int:
    """The seed of the hidden check ``name`` for this submission (see the module docstring)."""
    return stable_seed(base_seed() if base is None else base, submission(), name)


@contextmanager
def seeded(base: int | str):
    """Within the block, hidden checks draw from ``base`` (as if ``QLIB_CHECK_SEED=base``)."""
    _override.append(str(base))
    try:
        yield
    finally:
        _override.pop()


class Draw:
    """The random sources of one hidden check, all derived from ``seed``.

    ``rng``: Python's :class:`random.Random`; ``gen``: a CPU :class:`torch.Generator`.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed % 2**63)

    def integer(self, high: int = 2**31 - 1) -> int:
        """A sub-seed in ``[0, high)`` (a model's seed, a batch order)."""
        return self.rng.randrange(high)


def heavy_tailed(n: int, gen: torch.Generator) -> torch.Tensor:
    """Student-t-like: a Gaussian divided by a random magnitude, so a few values are huge."""
    return torch.randn(n, generator=gen) / (torch.rand(n, generator=gen) + 0.05)


def relu_like(n: int, gen: torch.Generator) -> torch.Tensor:
    """Half exact zeros, half a skewed positive tail: what a ReLU layer emits."""
    return torch.relu(torch.randn(n, generator=gen)) * torch.rand(n, generator=gen).pow(2) * 3


def random_bn(c: int, gen: torch.Generator, affine: bool = True, eps: float = 1e-5,
              dims: int = 2) -> nn.modules.batchnorm._BatchNorm:
    """An eval-mode BatchNorm with random running statistics (and gamma, beta)."""
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(c, eps=eps, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.05)
        if affine:
            bn.weight.copy_(torch.randn(c, generator=gen))
            bn.bias.copy_(torch.randn(c, generator=gen))
    return bn


def hidden(name: str, body: Callable[[Draw], None]) -> None:
    """Run a hidden check: ``body(draw)`` with this submission's draws (see :func:`run`).

    Torch's global generator is seeded from the same seed, so a draw that does not go through
    ``draw`` (a layer's default initialisation) is reproducible too.
    """
    from .core import run

    base = base_seed()
    seed = hidden_seed(name, base)
    who = submission()
    if who and not base:
        note = f"\n  (hidden cases of submission {who}: a re-grade draws the same ones)"
    else:
        note = f"\n  (hidden cases drawn with {SEED_ENV}={base}{' for ' + who if who else ''}: set it to replay them)"
    run(name, lambda: body(Draw(seed)), seed=seed, note=note)
