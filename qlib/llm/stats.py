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
- ``residual_stream(model, tokens)``: what each block *writes*, ``x`` after block ``i``, as
  ``(tokens, width)``: the residual stream where Elhage et al. (2023, "Privileged bases in the
  transformer residual stream") saw Adam grow a few outlier *dimensions*. A residual channel
  that dominates the others survives LayerNorm as one large input channel of ``q, k, v`` and
  ``fc1`` (at most ``sqrt(width)`` when it is the only non-zero one).
- ``snapshot(model, tokens)``: ``layer_report`` of every block linear input and of the residual
  stream, summed up: the numbers ``train_charlm.py --recipe long`` logs as training goes on
  (the emergence curve of lesson 16).
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


@torch.no_grad()
def residual_stream(model, tokens: torch.Tensor, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """``{"resid.i": X}``: the residual stream after block ``i``, ``(tokens, width)`` float32.

    ``tokens``: ``(batch, T)`` int64 windows. Hooks on ``model.blocks[i]`` keep their outputs;
    runs on the model's device, in eval mode, and leaves the model's mode as it was.
    """
    from .layers import _check_tokens, collect

    _check_tokens(tokens)
    if not hasattr(model, "blocks"):
        raise TypeError(f"expected a transformer with .blocks, got {type(model).__name__}")
    return collect(model, tokens, {f"resid.{i}": b for i, b in enumerate(model.blocks)}, output=True,
                   batch_size=batch_size)


def _kind(name: str) -> str:
    """Which tensor a layer reads: ``ln1`` (q, k, v), ``attn`` (proj), ``ln2`` (fc1), ``gelu``
    (fc2) or ``resid`` (the residual stream itself)."""
    if name.startswith("resid."):
        return "resid"
    last = name.rsplit(".", 1)[-1]
    return {"q": "ln1", "k": "ln1", "v": "ln1", "proj": "attn", "fc1": "ln2", "fc2": "gelu"}[last]


def snapshot(model, tokens: torch.Tensor, threshold: float = 6.0) -> dict:
    """Outlier statistics of ``model`` on ``tokens`` (``(batch, T)`` int64 windows).

    Returns ``{"layers": {name: [absmax, channel_ratio, n_outliers]}, "summary": {...}}`` over
    the inputs of the block linears (``q`` ``k`` ``v`` share one input, so only ``q`` is kept)
    and the residual stream. ``summary`` has, per kind of tensor (``ln1``, ``attn``, ``ln2``,
    ``gelu``, ``resid``), the largest ``absmax`` and ``channel_ratio`` over layers, and
    ``int8_columns``: the LLM.int8() outlier columns (``|X| >= threshold``) summed over the
    linear layers that read them (``q``, ``k``, ``v`` counted once each, as LLM.int8 decomposes
    each layer), the residual stream excluded.
    """
    from .layers import capture_inputs

    acts = capture_inputs(model, tokens)
    rows = layer_report({n: x for n, x in acts.items() if not n.endswith((".k", ".v"))}, threshold)
    rows += layer_report(residual_stream(model, tokens), threshold)
    layers_out = {r["name"]: [round(r["absmax"], 4), round(r["channel_ratio"], 3), r["n_outliers"]]
                  for r in rows}
    summary: dict = {"int8_columns": 0}
    for r in rows:
        kind = _kind(r["name"])
        best = summary.setdefault(kind, {"absmax": 0.0, "channel_ratio": 0.0, "layer": r["name"]})
        if r["absmax"] > best["absmax"]:
            best.update(absmax=round(r["absmax"], 4), layer=r["name"])
        best["channel_ratio"] = round(max(best["channel_ratio"], r["channel_ratio"]), 3)
        if kind != "resid":
            summary["int8_columns"] += r["n_outliers"] * (3 if kind == "ln1" else 1)
    return {"layers": layers_out, "summary": summary}
