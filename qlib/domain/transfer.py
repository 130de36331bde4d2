"""Transfer learning with quantized models: reuse a pretrained backbone on a new domain.

Large pretrained networks (ResNet, BERT, GPT) are starting points, not final models: the
usual move is to keep the *backbone* (everything up to the last layer) and train a new
*head* on the new task. With quantization the question becomes which part is quantized
when, and what data each step needs. On the zoo (handwritten -> printed digits, or any
``Splits``) this module provides the pieces:

==========================  ==============================================================
``split_head``              ``model`` -> ``(backbone, head)`` (the last ``nn.Linear`` is the head)
``few_shot``                ``k`` labelled examples per class, drawn with a seed
``quantized_backbone``      static PTQ of the backbone only (``ptq_config(bits)``)
``train_head``              a new linear head on *frozen* backbone features (float head)
``quantize_head``           PTQ of that head, calibrated on the backbone's features
``qat_finetune``            QAT of the whole network on the target labels (BN kept, folded at the end)
``synthetic_calibration``   ZeroQ images from the backbone's BN statistics (no target data)
==========================  ==============================================================

A frozen backbone needs only forward passes on the target (cheap: features are computed
once and the head trains on them in a second); fine-tuning with QAT changes every weight
and needs labels, gradients and more time. Few labels (10 per class) favour the frozen
backbone. Data-free calibration reproduces the *source* statistics that the backbone's BNs
remember, which is not the target's: the lesson measures what that costs.

Shapes: backbones map ``(N, C, H, W)`` images to ``(N, features)``; heads map features to
``(N, classes)`` logits.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ..batching import input_batches, iter_batches, model_device
from ..datafree import synthesize_bn
from ..modules import QuantConfig
from ..ptq import quantize_static
from ..qat import convert_qat, quantization_aware_training
from .evaluate import ptq_config

__all__ = ["split_head", "few_shot", "features", "quantized_backbone", "train_head", "quantize_head",
           "qat_finetune", "synthetic_calibration"]


def split_head(model: nn.Module) -> tuple[nn.Sequential, nn.Linear]:
    """Copies of ``(backbone, head)`` of a zoo ``nn.Sequential`` whose last module is an ``nn.Linear``."""
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise TypeError("expected an nn.Sequential ending in an nn.Linear head (a qlib zoo model), "
                        f"got {type(model).__name__}")
    model = copy.deepcopy(model)
    return nn.Sequential(*list(model)[:-1]).eval(), model[-1]


def few_shot(dataset: TensorDataset, per_class: int, seed: int = 0) -> TensorDataset:
    """``per_class`` examples of every class of ``dataset`` (fewer if a class has fewer), seeded."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}")
    x, y = dataset.tensors[:2]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    keep = torch.cat([perm[y[perm] == c][:per_class] for c in torch.unique(y)])
    keep = keep[torch.argsort(keep)]
    return TensorDataset(x[keep], y[keep])


@torch.no_grad()
def features(backbone: nn.Module, data, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, F), labels (N,))`` of a labelled dataset through ``backbone`` in eval mode."""
    was = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y in iter_batches(data, batch_size, device=model_device(backbone)):
        feats.append(backbone(x))
        labels.append(y)
    backbone.train(was)
    if not feats:
        raise ValueError("no data to compute features on")
    return torch.cat(feats), torch.cat(labels)


def quantized_backbone(model: nn.Module, calibration, bits: int) -> nn.Sequential:
    """The backbone of ``model``, statically quantized at W``bits``A``bits`` on ``calibration``."""
    backbone, _ = split_head(model)
    return quantize_static(backbone, calibration, ptq_config(bits))


def train_head(backbone: nn.Module, train_set: TensorDataset, num_classes: int = 10, epochs: int = 200,
               lr: float = 1e-2, weight_decay: float = 1e-3, seed: int = 0) -> nn.Sequential:
    """``nn.Sequential(backbone, new_head)``: a new linear head trained on frozen features.

    The features are computed once; the head is trained full-batch with AdamW for
    ``epochs`` steps from a seeded initialization. The backbone is not trained (its
    parameters are frozen in the returned model).
    """
    feats, labels = features(backbone, train_set)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(feats.shape[1], num_classes).to(feats.device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = F.cross_entropy(head(feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    backbone = copy.deepcopy(backbone)
    for p in backbone.parameters():
        p.requires_grad_(False)
    return nn.Sequential(backbone, head.eval()).eval()


def quantize_head(model: nn.Sequential, calibration, bits: int) -> nn.Sequential:
    """``model = Sequential(backbone, head)`` with its head statically quantized at W``bits``A``bits``.

    The head is calibrated on the backbone's features of the ``calibration`` images.
    """
    backbone, head = model[0], model[1]
    device = model_device(backbone)
    with torch.no_grad():
        feats = [backbone(x) for x in input_batches(calibration, device=device)]
    qhead = quantize_static(nn.Sequential(head), feats, ptq_config(bits))
    return nn.Sequential(copy.deepcopy(backbone), qhead).eval()


def qat_finetune(model: nn.Module, train_set, val_set=None, bits: int = 4, epochs: int = 10, lr: float = 5e-4,
                 seed: int = 0) -> nn.Module:
    """QAT of the whole ``model`` on labelled target data; returns the converted quantized model."""
    config = QuantConfig(weight_bits=bits, act_bits=bits, weight_observer="mse", act_observer="percentile")
    qmodel, _ = quantization_aware_training(model, (train_set, val_set), config, epochs=epochs, lr=lr,
                                            fold_bn=False, seed=seed, progress=False)
    return convert_qat(qmodel)


def synthetic_calibration(model: nn.Module, shape, num_samples: int = 128, steps: int = 100,
                          seed: int = 0) -> list[torch.Tensor]:
    """Calibration batches made from ``model``'s BN statistics only (``qlib.datafree.synthesize_bn``)."""
    data = synthesize_bn(model, shape, num_samples=num_samples, batch_size=64, steps=steps, seed=seed,
                         progress=False)
    return data.batches
