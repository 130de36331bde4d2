"""Data-free quantization: calibrate and repair a quantized model without its training data.

Read in this order:

==================  ======================================================================
``bn_loss``         the BatchNorm-statistics loss and its published forms (ZeroQ's code,
                    DeepInversion's regularizer)
``synthetic``       the input range from the preprocessing; Gaussian/uniform noise; ZeroQ:
                    images optimized to match the model's BatchNorm statistics (Cai et al., CVPR 2020)
``generator``       GDFQ: a small generator trained on BN statistics + the teacher's
                    cross-entropy (Xu et al., ECCV 2020)
``distance``        how close is a calibration set to real data: MMD, KL, BN-statistics
``equalize``        cross-layer equalization of per-channel weight ranges, depthwise layers
                    included; ReLU6 -> ReLU (Nagel et al., ICCV 2019)
``bias_correction`` remove the mean output error of quantized weights using BN statistics
                    (same paper)
==================  ======================================================================

Distillation of a quantized student on synthetic data lives in ``qlib.distill``.
"""

from .bias_correction import (bn_preactivation_stats, clipped_normal_mean, correct_bias,  # noqa: F401
                              empirical_input_means, expected_inputs, expected_output_error, scale_stats)
from .distance import (bn_statistic_distance, histogram_kl, mmd, score_calibration_set,  # noqa: F401
                       softmax_kl)
from .equalize import (channel_ranges, cross_layer_equalize, equalize_pair,  # noqa: F401
                       find_equalization_pairs, input_channel_ranges, is_depthwise, pair_precision,
                       relu6_to_relu, unbalance)
from .generator import Generator, generator_batches, train_generator  # noqa: F401
from .bn_loss import BN_LOSS_VARIANTS  # noqa: F401
from .synthetic import (DIGITS_NORMALIZATION, SyntheticData, bn_layers, bn_statistics_loss,  # noqa: F401
                        gaussian_batches, standardized_range, synthesize_bn, uniform_batches)

__all__ = [
    "BN_LOSS_VARIANTS", "DIGITS_NORMALIZATION", "standardized_range", "gaussian_batches", "uniform_batches",
    "bn_layers", "bn_statistics_loss", "synthesize_bn", "SyntheticData",
    "Generator", "train_generator", "generator_batches",
    "mmd", "softmax_kl", "histogram_kl", "bn_statistic_distance", "score_calibration_set",
    "is_depthwise", "relu6_to_relu", "channel_ranges", "input_channel_ranges", "find_equalization_pairs",
    "equalize_pair", "pair_precision", "cross_layer_equalize",
    "unbalance",
    "clipped_normal_mean", "bn_preactivation_stats", "scale_stats", "expected_inputs", "empirical_input_means",
    "expected_output_error", "correct_bias",
]
