"""Quantization-aware training (QAT): train the network *through* its fake quantizers.

PTQ rounds a trained model and hopes; QAT keeps training with the rounding in the forward
pass, so the weights learn to live on the quantization grid. The backward pass goes through
``round`` with the straight-through estimator (``qat.ste``). Two ways to get the step sizes:

- ``method="ste"``: observers choose them. Activations keep their observer (the config's)
  recording while training, until ``freeze_observer_epoch``; weights use
  ``TrackingWeightFakeQuantize`` (the observer picks a clip ratio once, the scale follows the
  min-max of the weights at every step).
- ``method="lsq"``: ``s`` (and the activation zero point) are learned (``qlib.lsq``).
- ``method="pact"``: activation clipping levels are learned (``qlib.pact``), weights as "ste".

The BatchNorm schedule of QAT (Krishnamoorthi 2018, sec. 3.2; torch.ao's ``freeze_bn_stats``
and ``disable_observer``): keep the BatchNorms (``fold_bn=False``) so that batch statistics
follow the changing weights early on, then freeze them (``freeze_bn_epoch``: the BatchNorms use
their running statistics, as after folding), then freeze the activation ranges
(``freeze_observer_epoch``), so that the last epochs fine-tune the weights against the exact
grid and statistics the deployed model will have.

One concept per module:

==================  ===========================================================================
``qat.ste``         ``ste_staircase`` (the STE's two faces) and ``TrackingWeightFakeQuantize``
``qat.prepare``     ``prepare_qat`` (swap in quantizers per method), ``calibrate_qat``
``qat.schedule``    ``set_bits``, bits schedules, freezing observers and BatchNorm statistics
``qat.convert``     ``step_sizes``, ``fold_kept_bn``, ``convert_qat``, ``to_integer``
``qat.config``      ``QATConfig``: the training recipe (epochs, lr, method, schedules, ...)
``qat.oscillation`` weight oscillations: ``dampening_loss``, ``OscillationFreezer`` (Nagel et al. 2022)
``qat.losses``      ``kd_objective`` (distillation from the float model), ``with_dampening``
``qat.train``       ``quantization_aware_training``: the whole pipeline
==================  ===========================================================================

Typical use::

    qat_model, history = quantization_aware_training(model, digits, QuantConfig(weight_bits=4),
                                                     epochs=5, method="lsq")
    int_model = to_integer(qat_model)
"""

from .config import QATConfig
from .convert import FixedQParamsObserver, convert_qat, fold_kept_bn, qparams_now, step_sizes, to_integer
from .losses import cross_entropy_objective, kd_objective, with_dampening
from .oscillation import OscillationFreezer, dampening_loss, weight_codes
from .prepare import LEARNED, METHODS, act_quantizers, calibrate_qat, prepare_qat, qat_layers, refresh_weight_qparams
from .schedule import check_schedule, freeze_bn_stats, freeze_observers, set_bits
from .ste import TrackingWeightFakeQuantize, ste_staircase
from .train import quantization_aware_training, split_data

__all__ = ["METHODS", "LEARNED", "QATConfig", "kd_objective", "with_dampening", "cross_entropy_objective",
           "OscillationFreezer", "dampening_loss", "weight_codes", "ste_staircase", "FixedQParamsObserver", "TrackingWeightFakeQuantize",
           "qat_layers", "act_quantizers", "prepare_qat", "calibrate_qat", "refresh_weight_qparams", "set_bits",
           "check_schedule", "freeze_observers", "freeze_bn_stats", "step_sizes", "qparams_now", "fold_kept_bn",
           "convert_qat", "to_integer", "split_data", "quantization_aware_training"]
