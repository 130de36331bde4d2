"""Mixed precision: spend bits where the network is sensitive.

Two steps, one module each:

- ``sensitivity``: how much does each layer suffer when its weights get ``b`` bits?
  Three measures (one layer at a time on held-out data; HAWQ-v2's Hessian trace times the
  quantization perturbation; the SQNR of the layer's output) and a Spearman rank
  correlation to compare their rankings.
- ``allocate``: choose one bit width per layer to minimize the summed sensitivity under a
  model-size budget (and optionally a BitOps budget): an integer linear program
  (``scipy.optimize.milp``, as HAWQ-v3), a greedy baseline and uniform widths. The result
  is a ``{layer: bits}`` dict; ``to_per_layer`` turns it into the ``per_layer`` configs of
  ``qlib.ptq.prepare`` and ``qlib.qat.quantization_aware_training``.
"""

from .allocate import (allocation_bits, greedy_allocate, ilp_allocate, layer_macs, layer_sizes, to_per_layer,  # noqa: F401
                       uniform_allocate)
from .sensitivity import (hawq_sensitivity, hessian_traces, one_at_a_time, quantization_perturbation,  # noqa: F401
                          ranking, spearman, sqnr_sensitivity)

__all__ = ["allocation_bits", "greedy_allocate", "ilp_allocate", "layer_macs", "layer_sizes", "to_per_layer",
           "uniform_allocate", "hawq_sensitivity", "hessian_traces", "one_at_a_time",
           "quantization_perturbation", "ranking", "spearman", "sqnr_sensitivity"]
