"""Non-uniform quantization: codebooks (k-means) and NormalFloat (NF4) levels.

A uniform grid spends its levels evenly over the range. Trained weights are bell-shaped:
most of them sit near 0, a few far out. At 8 bits that does not matter (the steps are tiny
anyway); at 4 bits and below the MSE-optimal levels are **denser near 0** and sparser in the
tails, so a uniform grid is MSE-suboptimal (Max 1960: for a Gaussian the optimal 3-bit
levels give MSE 0.0345 against 0.0374 for the best uniform grid, 4 bits 0.0095 vs 0.0115).
Two ways to place the levels, both storing an index per weight plus a small table:

- **k-means codebook** (Han et al. 2016, *Deep Compression*): the ``2**bits`` levels of a
  tensor are the centroids of 1-D k-means on its values, found with **Lloyd's algorithm**:
  assign each value to its nearest centroid, move each centroid to the mean of its values,
  repeat until nothing moves. Each step can only lower the MSE, so the result is never worse
  than the starting grid. ``init="linear"`` (Han et al.'s best: levels evenly spaced over
  ``[min, max]``, i.e. a uniform grid), ``"density"`` (quantiles) or ``"random"`` (Forgy:
  distinct values drawn with a seeded ``torch.Generator``). Deterministic for a given seed.
- **NormalFloat** (Dettmers et al. 2023, *QLoRA*): fixed levels at quantiles of N(0, 1),
  normalized to ``[-1, 1]``, with an exact 0; a tensor is cut into blocks of ``block_size``
  (64) values, each scaled by its absmax (``blockwise_quantize``). NF4 is
  ``normal_float_codebook(4)``, built as bitsandbytes' ``create_normal_map``: ``2**(b-1)``
  positive quantiles between ``offset`` and 1/2, ``2**(b-1) - 1`` negative ones, and 0,
  divided by the largest. ``offset = 1 - (1/(2(2^b - 1)) + 1/(2 \\cdot 2^b)) / 2`` (0.9677083 at
  4 bits) keeps the outermost level finite.

Encoding maps each value to the index of its nearest level (``codebook_encode``: uint8
indices, ties to the lower level); decoding is a table lookup (``codebook_decode``). Indices
pack into bytes with ``qlib.packing``. ``uniform_codebook(bits)`` is the symmetric uniform
grid as a codebook, so the same blockwise code path compares grid *shapes* alone.
Every function works on the device of its input; codebooks are float32.
"""

from __future__ import annotations

import torch

from .qparams import check_tensor

__all__ = ["kmeans_codebook", "codebook_encode", "codebook_decode", "codebook_quantize",
           "normal_float_codebook", "nf4_codebook", "uniform_codebook", "blockwise_quantize",
           "blockwise_dequantize", "blockwise_fake_quantize"]

INITS = ("linear", "density", "random")


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8] (indices are stored as uint8), got {bits!r}")
    return bits


def _check_codebook(codebook) -> torch.Tensor:
    if not isinstance(codebook, torch.Tensor) or not codebook.is_floating_point() or codebook.dim() != 1:
        raise TypeError("codebook must be a 1-D floating-point tensor of levels")
    if not 1 <= codebook.numel() <= 256 or not torch.isfinite(codebook).all():
        raise ValueError(f"codebook must hold 1 to 256 finite levels, got {codebook.numel()}")
    return codebook


def codebook_encode(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (uint8, shape of ``x``) of the nearest level of ``codebook`` for every element.

    The levels are sorted internally; ties (a value exactly between two levels) go to the
    lower level. Indices refer to ``codebook`` as given (sorted or not).
    """
    check_tensor(x)
    codebook = _check_codebook(codebook).to(device=x.device)
    levels, order = torch.sort(codebook.to(torch.float32))
    mids = (levels[1:] + levels[:-1]) / 2
    pos = torch.bucketize(x.detach().to(torch.float32), mids, right=False)  # x <= mid -> lower level
    return order[pos].to(torch.uint8)


def codebook_decode(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``codebook[indices]``: the levels (float32, shape of ``indices``)."""
    codebook = _check_codebook(codebook)
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point():
        raise TypeError("indices must be an integer tensor (from codebook_encode)")
    return codebook.to(device=indices.device, dtype=torch.float32)[indices.long()]


def codebook_quantize(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Every element of ``x`` replaced by its nearest level (``decode(encode(x))``), in ``x.dtype``."""
    return codebook_decode(codebook_encode(x, codebook), codebook).to(x.dtype)


def _init_levels(v: torch.Tensor, k: int, init: str, seed: int) -> torch.Tensor:
    if init == "linear":
        return torch.linspace(0, 1, k, dtype=torch.float64, device=v.device) * (v[-1] - v[0]) + v[0]
    if init == "density":
        return torch.quantile(v, torch.linspace(0, 1, k + 2, dtype=torch.float64, device=v.device)[1:-1])
    distinct = torch.unique(v)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(distinct.numel(), generator=g)[:k].to(v.device)
    return distinct[pick].sort().values


def kmeans_codebook(x: torch.Tensor, bits: int, init: str = "linear", iters: int = 1000, seed: int = 0,
                    return_info: bool = False):
    """The ``2**bits`` levels of 1-D k-means on the values of ``x`` (Lloyd's algorithm), float32, sorted.

    ``init``: ``"linear"`` (uniform over ``[min, max]``), ``"density"`` (quantiles) or
    ``"random"`` (distinct values drawn with ``seed``). Stops when no assignment changes (a
    fixed point: every level is the mean of its values, every value is nearest to its level)
    or after ``iters`` rounds. The values are sorted once; then each value's level is found
    by comparing with the midpoints between levels, and the means come from prefix sums, so a
    round costs ``O(2**bits log N)``. Computes in float64 on ``x``'s device. A tensor with fewer distinct
    values than levels gets those values (and repeats of the last). ``return_info=True``
    also returns ``{"iterations", "converged", "mse"}`` (``mse`` per round, non-increasing).
    """
    check_tensor(x)
    _check_bits(bits)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if x.numel() == 0:
        raise ValueError("x is empty: no values to cluster")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    v = x.detach().reshape(-1).to(torch.float64).sort().values
    k = 2**bits
    distinct = torch.unique(v)
    if distinct.numel() <= k:
        levels = torch.cat([distinct, distinct[-1:].expand(k - distinct.numel())])
        info = {"iterations": 0, "converged": True, "mse": [0.0]}
        return (levels.float(), info) if return_info else levels.float()
    levels = _init_levels(v, k, init, seed)
    # v is sorted, so each level's values are one contiguous run: the assignment is k - 1
    # boundaries (searchsorted of the midpoints) and the means come from prefix sums, O(k log n) a round
    csum = torch.cat([v.new_zeros(1), torch.cumsum(v, 0)])
    total_sq, n = float(v.pow(2).sum()), v.numel()
    bounds, mses, converged = None, [], False
    for it in range(iters):
        mids = (levels[1:] + levels[:-1]) / 2
        edges = torch.searchsorted(v, mids, right=True)            # values <= mid go to the lower level
        new = torch.cat([edges.new_zeros(1), edges, edges.new_full((1,), n)])
        counts = (new[1:] - new[:-1]).to(torch.float64)
        sums = csum[new[1:]] - csum[new[:-1]]
        mses.append(max(0.0, (total_sq - 2 * float((levels * sums).sum()) + float((counts * levels**2).sum())) / n))
        if bounds is not None and torch.equal(new, bounds):
            converged = True
            break
        bounds = new
        levels = torch.where(counts > 0, sums / counts.clamp(min=1), levels).sort().values  # empty: stays
    info = {"iterations": it + 1, "converged": converged, "mse": mses}
    return (levels.float(), info) if return_info else levels.float()


def normal_float_codebook(bits: int = 4) -> torch.Tensor:
    """NormalFloat levels (QLoRA), float32, sorted, in ``[-1, 1]`` with an exact 0.

    bitsandbytes' ``create_normal_map(offset, use_extra_value=True)``: the float32
    ``linspace(offset, 0.5, 2**(b-1) + 1)`` (last point dropped) through the normal quantile
    function gives ``2**(b-1)`` positive levels, ``linspace(offset, 0.5, 2**(b-1))`` the
    ``2**(b-1) - 1`` negative ones, plus 0; all divided by the largest. ``bits`` 2 to 8.
    ``offset`` is the module docstring's formula written with 7 decimals, as bitsandbytes
    writes 0.9677083: with the unrounded value, 12 of the 16 NF4 levels move by a few float32 ulps.
    """
    _check_bits(bits)
    if bits < 2:
        raise ValueError("NormalFloat needs bits >= 2 (a zero and levels on both sides)")
    half = 2 ** (bits - 1)
    offset = round(1 - (1 / (2 * (2**bits - 1)) + 1 / (2 * 2**bits)) / 2, 7)  # 4 bits: 0.9677083, bnb's literal
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half)[:-1].double())
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return values / values.max()


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 levels of QLoRA / bitsandbytes (``normal_float_codebook(4)``)."""
    return normal_float_codebook(4)


def uniform_codebook(bits: int) -> torch.Tensor:
    """The symmetric uniform grid ``k / (2**(b-1) - 1)``, ``k = -(2**(b-1) - 1) .. 2**(b-1) - 1``, as levels in [-1, 1].

    ``2**bits - 1`` levels (the narrow symmetric range, as absmax int formats use); with a
    blockwise absmax scale it is plain uniform absmax quantization.
    """
    _check_bits(bits)
    if bits < 2:
        raise ValueError("a symmetric uniform grid needs bits >= 2")
    n = 2 ** (bits - 1) - 1
    return torch.arange(-n, n + 1, dtype=torch.float32) / n


def _blocks(x: torch.Tensor, block_size: int | None) -> tuple[torch.Tensor, int]:
    flat = x.detach().reshape(-1).to(torch.float32)
    size = flat.numel() if block_size is None else block_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"block_size must be None (one block) or an int >= 1, got {block_size!r}")
    pad = (-flat.numel()) % size
    return (torch.cat([flat, flat.new_zeros(pad)]) if pad else flat).reshape(-1, size), pad


def blockwise_quantize(x: torch.Tensor, codebook: torch.Tensor, block_size: int | None = 64):
    """``(indices uint8 of x.shape, absmax float32 (num_blocks,))``: blocks scaled to ``[-1, 1]``, then encoded.

    The flattened ``x`` is cut into blocks of ``block_size`` (``None``: one block, a
    per-tensor scale); the last block is padded with zeros. Each block is divided by its
    absmax (an all-zero block by 1) and every value mapped to its nearest level of
    ``codebook`` (levels in ``[-1, 1]``: ``nf4_codebook()``, ``uniform_codebook(b)``).
    """
    check_tensor(x)
    if x.numel() == 0 or not torch.isfinite(x).all():
        raise ValueError("x must be non-empty and finite")
    blocks, pad = _blocks(x, block_size)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    idx = codebook_encode(blocks / scale[:, None], codebook).reshape(-1)
    return idx[: idx.numel() - pad].reshape(x.shape), absmax


def blockwise_dequantize(indices: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                         block_size: int | None = 64) -> torch.Tensor:
    """Inverse of ``blockwise_quantize``: ``codebook[indices] * absmax`` of each block, float32."""
    values = codebook_decode(indices, codebook)
    size = indices.numel() if block_size is None else block_size
    blocks, pad = _blocks(values, size)
    if blocks.shape[0] != absmax.numel():
        raise ValueError(f"{indices.numel()} indices in blocks of {size} need {blocks.shape[0]} scales, "
                         f"got {absmax.numel()}")
    out = (blocks * absmax.to(device=values.device, dtype=torch.float32)[:, None]).reshape(-1)
    return out[: out.numel() - pad].reshape(indices.shape)


def blockwise_fake_quantize(x: torch.Tensor, codebook: torch.Tensor, block_size: int | None = 64) -> torch.Tensor:
    """Quantize and dequantize ``x`` blockwise with ``codebook`` (in ``x.dtype``): what a weight becomes."""
    idx, absmax = blockwise_quantize(x, codebook, block_size)
    return blockwise_dequantize(idx, absmax, codebook, block_size).to(x.dtype)
