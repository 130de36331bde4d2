"""qlib: the teaching library of the course *Quantization of Deep Models*.

Read the modules in the order of the course: ``data``/``models``/``train`` (the playground),
``qparams`` -> ``quantize`` -> ``observers`` -> ``modules`` -> ``fold`` -> ``ptq`` ->
``intops`` (post-training quantization down to integer arithmetic), then ``qat``,
``datafree`` and ``distill``. Nothing is seeded at import; every random function takes a
``seed=`` or a ``torch.Generator``.
"""

__version__ = "0.1.0"

from . import check, data, measure, models, runtime, train  # noqa: F401
from .data import load_dataset, load_digits  # noqa: F401
from .measure import latency, model_size_bytes  # noqa: F401
from .models import pretrained  # noqa: F401
from .train import evaluate  # noqa: F401
