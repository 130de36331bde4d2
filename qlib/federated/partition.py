"""Split a data set among federated clients: IID, or non-IID by a Dirichlet label partition.

Idea. In federated learning each client (a phone, a hospital) holds its own data, and the
clients' label mixes differ. The standard way to simulate this (Hsu et al. 2019) draws, for
every class ``c``, the shares of that class that each of the ``K`` clients receives::

    p_c ~ Dirichlet(alpha, ..., alpha)          (K numbers >= 0 that sum to 1)
    client k gets round(p_c[k] * n_c) of the n_c examples of class c

Small ``alpha`` (0.1) gives each client one or two classes; large ``alpha`` (100) gives every
client nearly the global mix (IID). The split is a partition: every example goes to exactly
one client. Draws use a seeded ``torch.Generator``: same seed, same split.

Shapes: ``labels`` int64 ``(N,)``; each function returns ``K`` int64 index tensors.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Subset, TensorDataset

from ..batching import check_seed

__all__ = ["iid_partition", "dirichlet_partition", "label_histogram", "client_datasets"]


def _check(labels, num_clients) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
        raise TypeError(f"labels must be a 1-d integer tensor, got {getattr(labels, 'shape', type(labels))}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    if labels.numel() < num_clients:
        raise ValueError(f"{labels.numel()} examples cannot be split among {num_clients} clients")
    return labels.cpu()


def iid_partition(labels: torch.Tensor, num_clients: int, seed: int = 0) -> list[torch.Tensor]:
    """A seeded random permutation cut into ``num_clients`` nearly equal parts."""
    labels = _check(labels, num_clients)
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(check_seed(seed)))
    return [p.sort().values for p in torch.tensor_split(perm, num_clients)]


def dirichlet_partition(labels: torch.Tensor, num_clients: int, alpha: float, seed: int = 0,
                        min_size: int = 1) -> list[torch.Tensor]:
    """Non-IID split: class shares per client drawn from ``Dirichlet(alpha)`` (module docstring).

    The draw is repeated (same generator, next numbers) until every client holds at least
    ``min_size`` examples, as in Hsu et al.'s code; at most 100 tries.
    """
    labels = _check(labels, num_clients)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    if labels.numel() < num_clients * min_size:
        raise ValueError(f"cannot give {num_clients} clients {min_size} examples each from {labels.numel()}")
    g = torch.Generator().manual_seed(check_seed(seed))
    classes = labels.unique()
    conc = torch.full((num_clients,), float(alpha), dtype=torch.float64)
    for _ in range(100):
        parts: list[list[torch.Tensor]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = (labels == c).nonzero().flatten()
            idx = idx[torch.randperm(idx.numel(), generator=g)]
            # Dirichlet via normalized Gamma draws (torch's sampler takes no generator)
            gam = _gamma(conc, g)
            p = gam / gam.sum()
            cuts = (torch.cumsum(p, 0) * idx.numel()).round().long().clamp(max=idx.numel())
            start = 0
            for k, end in enumerate(cuts.tolist()):
                parts[k].append(idx[start:end])
                start = end
        out = [torch.cat(p).sort().values for p in parts]
        if min(len(o) for o in out) >= min_size:
            return out
    raise ValueError(f"no Dirichlet({alpha}) draw gave every client {min_size} examples in 100 tries; "
                     "raise alpha or lower min_size")


def _gamma(conc: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gamma(conc, 1) draws from a seeded generator (Marsaglia-Tsang, boosted for conc < 1)."""
    out = torch.empty_like(conc)
    for i, a in enumerate(conc.tolist()):
        boost = a < 1
        d = (a + 1 if boost else a) - 1 / 3
        c = 1 / (9 * d) ** 0.5
        while True:
            x = torch.randn((), generator=g, dtype=torch.float64).item()
            v = (1 + c * x) ** 3
            if v <= 0:
                continue
            u = torch.rand((), generator=g, dtype=torch.float64).item()
            if u < 1 - 0.0331 * x ** 4 or (u > 0 and math.log(u) < 0.5 * x * x + d * (1 - v + math.log(v))):
                break
        val = d * v
        if boost:
            val *= torch.rand((), generator=g, dtype=torch.float64).item() ** (1 / a)
        out[i] = val
    return out


def label_histogram(labels: torch.Tensor, parts: list[torch.Tensor], num_classes: int) -> torch.Tensor:
    """``(num_clients, num_classes)`` counts: how many examples of each class a client holds."""
    return torch.stack([torch.bincount(labels.cpu()[p], minlength=num_classes) for p in parts])


def client_datasets(dataset: TensorDataset, parts: list[torch.Tensor]) -> list[TensorDataset]:
    """One TensorDataset per client (copies of the selected rows)."""
    if isinstance(dataset, Subset) or not isinstance(dataset, TensorDataset):
        raise TypeError(f"dataset must be a TensorDataset, got {type(dataset).__name__}")
    return [TensorDataset(*(t[p] for t in dataset.tensors)) for p in parts]
