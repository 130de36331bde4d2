"""What changes during QAT from one epoch to the next: bits, observers, BatchNorm statistics.

Three schedules, all optional (epoch numbers count from 0):

- ``bits_schedule={0: 8, 2: 4, 4: 2}``: start at 8 bits and lower them (an int sets weights
  and activations, a pair ``(w, a)`` sets each); the last entry must reach the config's bits,
  and no entry goes below them (``set_bits`` floors at the layer's config). Lowering the bits
  step by step lets the weights adapt before the grid becomes coarse.
- ``freeze_observer_epoch``: from that epoch on, STE activation ranges stop moving
  (``freeze_observers``): the last epochs fine-tune the weights against a fixed grid.
- ``freeze_bn_epoch`` (with ``fold_bn=False``): from that epoch on, BatchNorms use and keep
  their running statistics (``freeze_bn_stats``, as torch.ao's ``freeze_bn_stats``).
"""

from __future__ import annotations

from torch import nn

from ..modules import FakeQuantize, QuantConfig
from ..qparams import quant_range
from .prepare import LEARNED, act_quantizers, qat_layers, refresh_weight_qparams

__all__ = ["set_bits", "check_schedule", "freeze_observers", "freeze_bn_stats"]


def set_bits(model: nn.Module, weight_bits: int | None = None, act_bits: int | None = None) -> nn.Module:
    """Set the bits of every quantizer, never below its layer's config (``None`` keeps them).

    Bits are validated first (``qlib.qparams.quant_range``: a TypeError or ValueError for
    anything that is not a valid bit width), then floored at the config's. STE quantizers keep
    their observed ranges (the qparams are recomputed for the new range of codes); LSQ
    quantizers keep their learned clipping range.
    """
    for name, bits in (("weight_bits", weight_bits), ("act_bits", act_bits)):
        if bits is not None:
            try:
                quant_range(bits)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{name}: {err}") from None
    layers = qat_layers(model)
    if not layers:
        raise ValueError("no fake-quant layers: prepare the model with prepare_qat first")
    for layer in layers.values():
        cfg = layer.config
        for fq, bits, floor in ((layer.weight_fq, weight_bits, cfg.weight_bits),
                                (layer.input_fq, act_bits, cfg.act_bits)):
            if bits is None:
                continue
            bits = max(bits, floor)
            if isinstance(fq, LEARNED):  # LSQ keeps its clipping range, PACT its alpha
                fq.set_bits(bits)
            else:
                obs = fq.observer
                obs.quant_min, obs.quant_max = quant_range(bits, obs.signed)
                obs.bits = bits
                fq.clear_frozen()
    refresh_weight_qparams(model)
    return model


def check_schedule(bits_schedule, config: QuantConfig, epochs: int) -> dict[int, tuple[int, int]]:
    """``{epoch: (weight_bits, act_bits)}`` from a ``bits_schedule`` (module docstring); ``{}`` for None."""
    if bits_schedule is None:
        return {}
    if not isinstance(bits_schedule, dict) or 0 not in bits_schedule:
        raise ValueError(f"bits_schedule must be a dict {{epoch: bits}} starting at epoch 0, got {bits_schedule!r}")
    sched = {}
    for epoch, bits in sorted(bits_schedule.items()):
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < max(epochs, 1):
            raise ValueError(f"bits_schedule epochs must be ints in [0, epochs={epochs}), got {epoch!r}")
        if isinstance(bits, (tuple, list)) and len(bits) != 2:
            raise ValueError(f"bits_schedule[{epoch}] must be bits or a (weight_bits, act_bits) pair, got {bits!r}")
        w, a = bits if isinstance(bits, (tuple, list)) else (bits, bits)
        quant_range(w), quant_range(a)  # TypeError/ValueError for bad bits
        sched[epoch] = (max(w, config.weight_bits), max(a, config.act_bits))
    if sched[max(sched)] != (config.weight_bits, config.act_bits):
        raise ValueError(f"bits_schedule ends at W{sched[max(sched)][0]}A{sched[max(sched)][1]}, above the "
                         f"config's W{config.weight_bits}A{config.act_bits}: the last entry must reach them")
    return sched


def freeze_observers(model: nn.Module) -> nn.Module:
    """Freeze every STE activation quantizer that still observes (its range stops moving)."""
    for fq in act_quantizers(model):
        if isinstance(fq, FakeQuantize) and not fq.dynamic and fq.observe:
            fq.freeze()
    return model


def freeze_bn_stats(model: nn.Module) -> nn.Module:
    """Put every BatchNorm in eval mode: it normalizes with, and no longer updates, its running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model
