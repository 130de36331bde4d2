"""qlib: the teaching library of the course *Quantization of Deep Models*.

Read the modules in the order of the course: ``data``/``models``/``train`` (the playground),
``qparams`` -> ``quantize`` -> ``observers`` -> ``modules`` -> ``fold`` -> ``ptq`` ->
``requant`` -> ``intops``/``intlayers``/``intmodel`` (post-training quantization down to
integer arithmetic, with ``kernels`` for fast int8 products), then ``qat``, ``datafree`` and
``distill``. ``batching`` feeds every loop its batches on the model's device. Nothing is seeded at import; every random function
takes a ``seed=`` or a ``torch.Generator``.

``qlib.quantize`` is both the module ``qlib/quantize.py`` (``qlib.quantize.dequantize``) and
its function: ``qlib.quantize(x, scale, zero_point, quant_min, quant_max)`` calls
``qlib.quantize.quantize``.
"""

__version__ = "0.1.0"

from . import batching, check, data, kernels, measure, models, runtime, train  # noqa: F401
from . import datafree, distill, fakequant, fold, intlayers, intmodel, intops, lsq, modules  # noqa: F401
from . import observers, ptq, qat, qparams, requant  # noqa: F401
from .data import load_dataset, load_digits  # noqa: F401
from .fold import fold_batchnorm, fold_bn  # noqa: F401
from .intmodel import convert_to_integer  # noqa: F401
from .measure import latency, model_size_bytes  # noqa: F401
from .models import pretrained  # noqa: F401
from .modules import QuantConfig, QuantConv2d, QuantLinear, swap_modules  # noqa: F401
from .observers import make_observer  # noqa: F401
from .qat import quantization_aware_training  # noqa: F401
from .ptq import calibrate, convert, prepare, quantize_dynamic, quantize_static  # noqa: F401
from .qparams import (PerAxis, PerChannel, PerGroup, PerTensor, check_bits, choose_qparams,  # noqa: F401
                      quant_range, qparams_for)
from .quantize import dequantize, fake_quantize  # noqa: F401
from . import quantize  # noqa: F401,E402  the module, callable: qlib.quantize(x, ...) is quantize.quantize
from .train import evaluate  # noqa: F401
