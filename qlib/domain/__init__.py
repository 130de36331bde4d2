"""Domain shift: what happens to a (quantized) model when the world moves, and what repairs it.

Read in this order:

==================  ======================================================================
``shifts``          corruptions of the test images at five severities, seeded, bounded
``printed``         a different source of the same classes: digits typeset in
                    matplotlib's fonts, made to look like scikit-learn's digits
``evaluate``        the (shift x severity x bits) accuracy grid over seeds; which data
                    to calibrate on when the target differs from the source
``domains``         one loader for every digit domain: digits, printed, and the opt-in
                    MNIST / USPS / SVHN when their files are on disk
``adapt``           AdaBN (re-estimate BN statistics) for float and quantized models; TENT
``generalization``  train/test gap, robustness and flatness of fp32 vs QAT models
``transfer``        reuse a (quantized) backbone: frozen + new head, QAT fine-tuning,
                    few-shot, data-free calibration
==================  ======================================================================

Lessons 10-12 and lab 08 use them; ``benchmarks/domain.py`` measures them over the three
shipped seeds.
"""

from . import adapt, domains, evaluate, generalization, printed, shifts, transfer  # noqa: F401
from .adapt import adabn, adabn_quantized, tent  # noqa: F401
from .evaluate import accuracy_grid, calibration_sources, drop_grid, ptq_config  # noqa: F401
from .domains import DOMAINS, load_domain  # noqa: F401
from .printed import load_printed  # noqa: F401
from .shifts import SEVERITIES, SHIFTS, corrupt, corrupt_dataset  # noqa: F401

__all__ = ["adapt", "domains", "DOMAINS", "load_domain", "evaluate", "generalization", "printed", "shifts", "transfer", "adabn", "adabn_quantized",
           "tent", "accuracy_grid", "calibration_sources", "drop_grid", "ptq_config", "load_printed",
           "SEVERITIES", "SHIFTS", "corrupt", "corrupt_dataset"]
