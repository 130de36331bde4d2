"""Granularity: how many (scale, zero_point) pairs a tensor gets, and the row view of it.

``PerTensor()`` gives one pair for the whole tensor; ``PerChannel(axis)`` (torchao's
``PerAxis``) one per slice along ``axis`` (weights: the output channels, axis 0);
``PerGroup(group_size, axis)`` one per run of ``group_size`` consecutive elements along
``axis`` (4-bit LLM weights: groups of 32..128 along the input dimension).

Every granularity has a *row view*: ``to_rows(x, g)`` reshapes ``x`` to ``(R, N)``, one row
per pair, so that observers and qparams code compute per row once (``aminmax(rows, dim=1)``)
and ``rows_to_qparams`` puts the R results back in the shape that broadcasts against ``x``
(``qparams_shape``). Example: a weight ``(out=64, in=256)`` with ``PerGroup(32)`` has rows
``(512, 32)`` and scales of shape ``(64, 8)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PerTensor", "PerChannel", "PerAxis", "PerGroup", "check_granularity", "to_rows",
           "qparams_shape", "rows_to_qparams"]

def _check_int(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero_point for the whole tensor (shape ``()``)."""


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero_point per slice along ``axis`` (shape ``(x.shape[axis],)``).

    ``PerAxis`` (torchao's name) is this same class.
    """

    axis: int = 0

    def __post_init__(self):
        _check_int(self.axis, "PerChannel axis")


PerAxis = PerChannel


@dataclass(frozen=True)
class PerGroup:
    """One scale and zero_point per ``group_size`` consecutive elements along ``axis``.

    The qparams have the shape of ``x`` with ``x.shape[axis]`` replaced by
    ``x.shape[axis] // group_size``; e.g. a weight ``(out, in)`` with ``PerGroup(32)``
    gets scales of shape ``(out, in // 32)``.
    """

    group_size: int
    axis: int = -1

    def __post_init__(self):
        _check_int(self.group_size, "PerGroup group_size")
        _check_int(self.axis, "PerGroup axis")
        if self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size}")


def check_granularity(granularity):
    """Raise TypeError unless ``granularity`` is a PerTensor/PerChannel/PerGroup instance."""
    if not isinstance(granularity, (PerTensor, PerChannel, PerGroup)):
        raise TypeError(f"granularity must be PerTensor(), PerChannel(axis) or PerGroup(group_size, axis), "
                        f"got {granularity!r}")
    return granularity


def _axis(axis: int, ndim: int) -> int:
    _check_int(axis, "axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dims")
    return axis % ndim


def to_rows(x: torch.Tensor, granularity=PerTensor()) -> torch.Tensor:
    """View ``x`` as a 2-D ``(R, N)`` tensor: one row per (scale, zero_point) pair.

    PerTensor: ``(1, numel)``; PerChannel(axis): ``(C, numel // C)``;
    PerGroup(group_size, axis): ``(numel // group_size, group_size)``, rows in the
    row-major order of :func:`qparams_shape`.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    qparams_shape(x.shape, granularity)  # checks the granularity, its axis and group size
    if isinstance(granularity, PerTensor):
        return x.reshape(1, -1)
    axis = granularity.axis % x.dim()
    if isinstance(granularity, PerChannel):
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return x.movedim(axis, -1).reshape(-1, granularity.group_size)


def qparams_shape(shape, granularity=PerTensor()) -> tuple[int, ...]:
    """Shape of scale/zero_point for a tensor of ``shape`` (see :func:`to_rows`)."""
    check_granularity(granularity)
    shape = tuple(shape)
    if isinstance(granularity, PerTensor):
        return ()
    axis = _axis(granularity.axis, len(shape))
    if isinstance(granularity, PerChannel):
        return (shape[axis],)
    if shape[axis] % granularity.group_size:
        raise ValueError(f"shape[{axis}] = {shape[axis]} is not divisible by group_size {granularity.group_size}")
    return tuple(s // granularity.group_size if d == axis else s for d, s in enumerate(shape))


def rows_to_qparams(t: torch.Tensor, shape, granularity=PerTensor()) -> torch.Tensor:
    """Inverse of the row layout: a length-R vector -> :func:`qparams_shape`."""
    want = qparams_shape(shape, granularity)
    if not isinstance(t, torch.Tensor) or t.numel() != math.prod(want):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"expected a tensor of {math.prod(want)} values (one per row of "
                         f"to_rows(x, {granularity})), got {got}")
    if isinstance(granularity, PerGroup):
        axis = _axis(granularity.axis, len(shape))
        moved = [s for d, s in enumerate(shape) if d != axis] + [shape[axis] // granularity.group_size]
        return t.reshape(moved).movedim(-1, axis)
    return t.reshape(want)
