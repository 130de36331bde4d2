"""Activation statistics per channel and per token: where the outliers of a transformer live.

Dettmers et al. (LLM.int8(), 2022) found that large transformers grow a few *feature
dimensions* (channels) whose activations reach magnitudes of 6 to 100 while the rest stay
near 1, in almost every token, at the inputs of the attention and MLP projections. A
per-tensor int8 scale must cover the largest value, so the many small values of the other
channels fall into a handful of codes. Whether an outlier is a *channel* phenomenon (one
column of ``X`` large in every token) or a *token* phenomenon (one row large) decides which
granularity helps: per-channel scales of ``X`` cannot be used in an integer matmul (they sit
on the summed dimension), which is why LLM.int8() splits the outlier columns off and
SmoothQuant moves them into the weights.

For ``X`` of shape ``(tokens, channels)`` (from ``layers.capture_inputs``):

- ``channel_absmax(X)``: ``max_t |X[t, j]|``, shape ``(channels,)``.
- ``token_absmax(X)``: ``max_j |X[t, j]|``, shape ``(tokens,)``.
- ``outlier_ratio(v)``: ``max(v) / median(v)``: how far the largest channel stands out.
- ``outlier_channels(X, threshold=6.0)``: channels with any ``|X| >= threshold`` (the rule of
  LLM.int8(); 6.0 is the paper's threshold).
- ``layer_report(acts)``: one row per layer with these numbers, for the lesson's table.
"""

from __future__ import annotations

import torch


def _check_2d(x: torch.Tensor, name: str = "X") -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (tokens, channels) matrix, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """``max over tokens of |X[:, j]|``: shape ``(channels,)``, on ``X``'s device and dtype."""
    _check_2d(x)
    return x.abs().amax(dim=0)


def token_absmax(x: torch.Tensor) -> torch.Tensor:
    """``max over channels of |X[t, :]|``: shape ``(tokens,)``."""
    _check_2d(x)
    return x.abs().amax(dim=1)


def outlier_ratio(v: torch.Tensor) -> float:
    """``max(v) / median(v)`` of a vector of magnitudes (1 for a flat profile)."""
    if v.dim() != 1 or v.numel() == 0:
        raise ValueError(f"expected a non-empty vector, got shape {tuple(v.shape)}")
    med = v.median()
    return float(v.max() / med) if med > 0 else float("inf")


def outlier_channels(x: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """Indices (int64, sorted) of channels where some token has ``|X[t, j]| >= threshold``."""
    _check_2d(x)
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    return torch.nonzero(channel_absmax(x) >= threshold).flatten()


def layer_report(acts: dict[str, torch.Tensor], threshold: float = 6.0) -> list[dict]:
    """One dict per layer: ``name``, ``absmax``, ``channel_ratio`` (max/median of the channel
    maxima), ``token_ratio`` (the same over tokens), ``top_channel`` and ``n_outliers``
    (channels reaching ``threshold``)."""
    rows = []
    for name, x in acts.items():
        ch, tok = channel_absmax(x), token_absmax(x)
        rows.append({"name": name, "absmax": float(ch.max()), "channel_ratio": outlier_ratio(ch),
                     "token_ratio": outlier_ratio(tok), "top_channel": int(ch.argmax()),
                     "n_outliers": int(outlier_channels(x, threshold).numel())})
    return rows


@torch.no_grad()
def with_outlier_channels(model, channels=(7, 77), factor: float = 20.0):
    """A copy of ``model`` computing the *same function* but with outlier input channels.

    Large trained transformers grow LayerNorm gains that are tens of times larger in a few
    channels, and weights that are small in the same columns. This builds that shape by hand,
    without changing a single output: for every LayerNorm that feeds projections (``ln1 ->
    q, k, v`` and ``ln2 -> fc1``) channel ``j`` in ``channels`` gets ``gamma_j, beta_j *=
    factor`` and the weight column ``W[:, j] /= factor`` (the inverse of SmoothQuant's
    migration). Used to show, honestly labelled, what the methods do when outliers exist.
    """
    import copy

    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    new = copy.deepcopy(model)
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    for block in new.blocks:
        for ln, fcs in ((block.ln1, (block.attn.q, block.attn.k, block.attn.v)), (block.ln2, (block.fc1,))):
            ln.weight[idx] *= factor
            ln.bias[idx] *= factor
            for fc in fcs:
                fc.weight[:, idx] /= factor
    return new
