"""Reconstruction PTQ: learn how to round the weights so that each layer or block reproduces
the float model's output (the optimisation form of distribution matching).

Read in this order:

==================  ======================================================================
``rounding``        AdaRound's rectified sigmoid ``h(V)``, the rounding regulariser and its
                    ``beta`` schedule, the soft/hard rounding quantizer (Nagel et al. 2020)
``reconstruction``  the shared loop: capture a unit's quantized input and float output,
                    minimise output MSE + regulariser, write the weights back on the grid
``adaround``        one layer at a time (AdaRound)
``brecq``           one block at a time, optional LSQ activation step sizes (Li et al. 2021)
==================  ======================================================================

Both take a converted model from ``qlib.ptq.quantize_static`` and calibration inputs (real or
from ``qlib.datafree``) and return a new converted model on the same integer grids.
"""

from .adaround import adaround, calibration_tensor, float_reference  # noqa: F401
from .brecq import brecq, find_blocks  # noqa: F401
from .reconstruction import capture, quant_layers_in, reconstruct_unit, run_chain  # noqa: F401
from .rounding import (GAMMA, ZETA, AdaRoundQuantizer, beta_schedule, inverse_rectified_sigmoid,  # noqa: F401
                       rectified_sigmoid, rounding_regularizer)

__all__ = ["ZETA", "GAMMA", "rectified_sigmoid", "inverse_rectified_sigmoid", "rounding_regularizer",
           "beta_schedule", "AdaRoundQuantizer", "capture", "run_chain", "quant_layers_in", "reconstruct_unit",
           "adaround", "float_reference", "calibration_tensor", "brecq", "find_blocks"]
