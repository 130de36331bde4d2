"""The BatchNorm-statistics loss: how far a batch is from what a model's BatchNorms remember.

Post-training quantization needs a few hundred inputs to calibrate activation ranges. When
no real data may be used (privacy, licensing), the model itself carries a summary of its
training data: every BatchNorm stores the running mean ``mu_l`` and variance ``var_l`` of
the activations that entered it. ZeroQ (Cai et al., CVPR 2020, "ZeroQ: A Novel Zero Shot
Quantization Framework") turns that summary back into inputs: start from Gaussian noise
``x`` and minimize, by gradient descent *on the pixels*, a distance between the statistics
that ``x`` induces and the stored ones. qlib's default (``variant="mean"``) is ::

    L_BN(x) = sum_l  mean_c (mu~_lc - mu_lc)^2  +  mean_c (sigma~_lc - sigma_lc)^2
              + mean_c (m~_c - m_c)^2 + mean_c (s~_c - s_c)^2        (the input itself)

where ``mu~_l, sigma~_l`` are the per-channel batch mean and standard deviation of the
activation entering BatchNorm ``l`` when the model runs on ``x`` (eval mode: the model's
weights and running statistics stay fixed), ``sigma_l = sqrt(var_l + eps)``, and ``m, s``
are the known per-channel mean and std of the preprocessed input (0 and 1 for the
standardized digits). 
The "BN-statistics loss" comes in several forms; ``variant=`` names them (``BN_LOSS_VARIANTS``):

================  =========================================================================
``"mean"``        the formula above: batch statistics, squared differences averaged over the
                  channels of each layer (every layer weighs alike, whatever its width)
``"zeroq"``       ZeroQ's official code (``own_loss`` in ``distill_data.py``): statistics of
                  *each image* (mean and std over its spatial positions, ``std =
                  sqrt(unbiased var + 1e-6)``), squared L2 norm over channels, averaged over
                  the images: ``sum_l mean_n ||mu~_ln - mu_l||^2 + ||sigma~_ln - sigma_l||^2``
                  (``sigma_l = sqrt(var_l + 1e-6)``); the paper (its Eq. 2) sums over the
                  BatchNorm layers a distance between the distilled data's mean and std
                  and the stored ones
``"l2"``          batch statistics, plain (not squared) L2 norms of the mean and std
                  differences: ``sum_l ||mu~_l - mu_l||_2 + ||sigma~_l - sigma_l||_2`` (the
                  form lab 05 asks for)
``"deepinversion"``  DeepInversion's feature regularizer (Yin et al., CVPR 2020, eq. 4 and
                  its code): batch statistics, plain L2 norms of the mean and the *variance*
                  differences, ``sum_l ||mu~_l - mu_l||_2 + ||var~_l - var_l||_2``
================  =========================================================================

Squared or not changes the weighting: a squared norm's gradient shrinks with the mismatch
(fine tuning near the optimum), a plain norm's gradient has constant size (every layer keeps
pulling until it matches). All forms are zero exactly when the statistics match.

Pure functions: ``bn_layers``, ``batch_moments``, ``capture_bn_inputs`` (forward pre-hooks),
``bn_statistics_loss``. ``qlib.datafree.synthetic.synthesize_bn`` minimizes it over the pixels.
Shapes: activations ``(N, C, H, W)`` or ``(N, C)``; statistics ``(groups, C)``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..batching import eval_mode, model_device, model_dtype, to_device
from ..fold import BATCHNORMS

__all__ = ["BN_LOSS_VARIANTS", "ZEROQ_EPS", "bn_layers", "batch_moments", "capture_bn_inputs",
           "bn_statistics_loss", "check_input_shape"]


def bn_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """``{name: BatchNorm}`` of every BatchNorm with running statistics in ``model``.

    Raises ValueError when there is none: BN-statistics methods have nothing to match (a
    model whose BatchNorms were folded away by ``qlib.fold`` has lost them too).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    bns = {name: m for name, m in model.named_modules()
           if isinstance(m, BATCHNORMS) and m.running_mean is not None}
    if not bns:
        raise ValueError("the model has no BatchNorm layers with running statistics: BN-statistics "
                         "methods need them (use the unfolded model, not a fold_batchnorm copy)")
    return bns


def batch_moments(x: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of an activation ``x`` ``(N, C, ...)``.

    ``groups`` splits the batch into ``groups`` equal sub-batches with their own statistics:
    returns tensors of shape ``(groups, C)``. The statistics are those BatchNorm computes in
    training mode (over the batch and every spatial position).
    """
    if x.dim() < 2:
        raise ValueError(f"expected an activation (N, C, ...), got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    if n % groups:
        raise ValueError(f"batch of {n} does not split into {groups} equal groups")
    v = x.reshape(groups, n // groups, c, -1).transpose(2, 3).reshape(groups, -1, c)
    return v.mean(dim=1), v.var(dim=1, unbiased=False)


@contextmanager
def capture_bn_inputs(model: nn.Module):
    """Context manager: ``{name: tensor}`` filled with the input of every BatchNorm on each
    forward pass (the latest call wins). Hooks are removed on exit."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, bn in bn_layers(model).items():
        def hook(module, args, name=name):
            seen[name] = args[0]
        handles.append(bn.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


BN_LOSS_VARIANTS = ("mean", "zeroq", "l2", "deepinversion")
ZEROQ_EPS = 1e-6
"""The epsilon ZeroQ's code adds to every variance (stored and measured), instead of ``bn.eps``."""


def _check_variant(variant) -> str:
    if variant not in BN_LOSS_VARIANTS:
        raise ValueError(f"variant must be one of {BN_LOSS_VARIANTS}, got {variant!r}")
    return variant


def _image_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and std of ``x`` ``(N, C, H, W)`` over the spatial positions
    (ZeroQ's code: ``std = sqrt(var(unbiased) + 1e-6)``); shapes ``(N, C)``."""
    if x.dim() < 3:
        raise ValueError(f"the 'zeroq' variant takes per-image statistics over spatial positions: it needs "
                         f"activations (N, C, H, W), got shape {tuple(x.shape)} (use another variant)")
    v = x.reshape(x.shape[0], x.shape[1], -1)
    return v.mean(dim=2), torch.sqrt(v.var(dim=2) + ZEROQ_EPS)


def _moment_loss(a: torch.Tensor, bn, groups: int, variant: str) -> torch.Tensor:
    """One BatchNorm's term of ``L_BN`` for the activation ``a`` entering it (module docstring)."""
    if variant == "zeroq":
        mean, std = _image_moments(a)
        target_std = torch.sqrt(bn.running_var + ZEROQ_EPS)
        return ((mean - bn.running_mean) ** 2).sum(1).mean() + ((std - target_std) ** 2).sum(1).mean()
    mean, var = batch_moments(a, groups)
    if variant == "deepinversion":
        return (torch.linalg.vector_norm(mean - bn.running_mean, dim=-1)
                + torch.linalg.vector_norm(var - bn.running_var, dim=-1)).mean()
    target_std = torch.sqrt(bn.running_var + bn.eps)
    std = torch.sqrt(var + bn.eps)
    if variant == "l2":
        return (torch.linalg.vector_norm(mean - bn.running_mean, dim=-1)
                + torch.linalg.vector_norm(std - target_std, dim=-1)).mean()
    return ((mean - bn.running_mean) ** 2).mean() + ((std - target_std) ** 2).mean()


def _input_loss(x: torch.Tensor, groups: int, input_mean, input_std, variant: str) -> torch.Tensor:
    """The input-statistics term: the same distance, against the known mean and std of the input."""
    def target(v):
        return torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if variant == "zeroq":
        mean, std = _image_moments(x)
        dist = lambda d: (d ** 2).sum(1).mean()  # noqa: E731
    else:
        mean, var = batch_moments(x, groups)
        std = var.sqrt()
        if variant in ("l2", "deepinversion"):
            dist = lambda d: torch.linalg.vector_norm(d, dim=-1).mean()  # noqa: E731
        else:
            dist = lambda d: (d ** 2).mean()  # noqa: E731
    loss = x.new_zeros(())
    if input_mean is not None:
        loss = loss + dist(mean - target(input_mean))
    if input_std is not None:
        loss = loss + dist(std - target(input_std))
    return loss


def bn_statistics_loss(model: nn.Module, x: torch.Tensor, groups: int = 1,
                       input_mean=None, input_std=None, return_logits: bool = False, *,
                       variant: str = "mean"):
    """The BN-statistics loss ``L_BN(x)`` (module docstring): how far the statistics that ``x``
    induces at every BatchNorm are from the model's running statistics. Differentiable in ``x``.

    ``x``: ``(N, C, H, W)`` (or ``(N, D)`` for an MLP); ``groups`` sub-batches are matched
    separately (each sub-batch must look like a training batch; the ``"zeroq"`` variant matches
    every image on its own). ``input_mean`` / ``input_std`` (floats or per-channel tensors) add
    the input-statistics term. ``variant``: ``"mean"`` (default), ``"zeroq"``, ``"l2"`` or
    ``"deepinversion"`` (``BN_LOSS_VARIANTS``, module docstring). The model runs in eval mode
    whatever its mode (its running statistics are never updated; every submodule's mode is
    restored). ``x`` goes to the model's device and dtype (the gradient still reaches the
    original ``x``); the loss lives there.
    Returns a 0-d tensor, or ``(loss, logits)`` with ``return_logits=True``.
    """
    _check_variant(variant)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    x = to_device(x, model_device(model), model_dtype(model, default=None))
    with capture_bn_inputs(model) as seen, eval_mode(model):
        logits = model(x)
    if not seen:
        raise ValueError("no BatchNorm was reached by the forward pass")
    loss = x.new_zeros(())
    for name, bn in bn_layers(model).items():
        if name in seen:
            loss = loss + _moment_loss(seen[name], bn, groups, variant)
    if input_mean is not None or input_std is not None:
        loss = loss + _input_loss(x, groups, input_mean, input_std, variant)
    return (loss, logits) if return_logits else loss


@torch.no_grad()
def check_input_shape(model: nn.Module, shape) -> None:
    """Raise ValueError unless ``model`` (in eval mode) accepts a batch of ``shape`` images
    (on its device, in its dtype)."""
    try:
        with eval_mode(model):
            model(torch.zeros(2, *shape, device=model_device(model), dtype=model_dtype(model)))
    except RuntimeError as err:
        raise ValueError(f"the model does not accept inputs of shape (N, {', '.join(map(str, shape))}): "
                         f"{str(err).splitlines()[0]}") from err
