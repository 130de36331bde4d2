"""After federated training: the server quantizes the global model, without any data.

Idea. In federated learning the server never sees a training example, yet post-training
quantization needs calibration inputs to choose activation ranges. The global model carries
the clients' averaged BatchNorm running statistics (FedAvg averages them with the weights),
so the server can make calibration inputs from the model alone: ZeroQ images whose
per-layer batch statistics match those running statistics (:func:`qlib.datafree.synthesize_bn`).
Compare with a calibration the server could not have had in a real deployment (real
training images), and, for the weights, with QAT in the clients (:class:`.fedavg.FedConfig`
``qat_bits``).

Shapes: ``image_shape`` is one input's shape, e.g. ``(1, 8, 8)`` for the digits MLP.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..datafree import gaussian_batches, synthesize_bn
from ..modules import QuantConfig
from ..ptq import quantize_static

__all__ = ["calibration_sets", "quantize_global"]


def calibration_sets(model: nn.Module, image_shape, real=None, num_samples: int = 128, steps: int = 50,
                     seed: int = 0) -> dict[str, list]:
    """Batches the server could calibrate with: ``synthetic`` (BN statistics), ``noise``
    (Gaussian), and ``real`` when given (a list of input batches; for comparison only)."""
    syn = synthesize_bn(model, tuple(image_shape), num_samples=num_samples, batch_size=min(64, num_samples),
                        steps=steps, seed=seed, progress=False)
    sets = {"synthetic": [syn.x], "noise": list(gaussian_batches(tuple(image_shape), num_samples,
                                                                      batch_size=num_samples, seed=seed))}
    if real is not None:
        sets["real"] = list(real)
    return sets


def quantize_global(model: nn.Module, batches, weight_bits: int = 8, act_bits: int = 8,
                    config: QuantConfig | None = None) -> nn.Module:
    """Static PTQ of the global model (weights symmetric per channel, activations affine per
    tensor, 99.9th-percentile activation ranges) calibrated on ``batches``; a new model."""
    config = config or QuantConfig(act_observer="percentile", act_observer_kwargs={"percentile": 99.9})
    return quantize_static(model, batches, replace(config, weight_bits=weight_bits, act_bits=act_bits))
