"""qlib.models gives access to the transformer of lesson 16 (issue 15: "a small decoder-only
transformer (qlib.models)") without joining the digit zoo.

Reference: ``qlib.llm.model`` itself (the same class, the same shipped weights, the same seeded
initialisation) and ``sys.modules`` of a fresh interpreter (no import of ``qlib.llm`` and no
cycle when ``qlib.models`` is imported first or second).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qlib import models
from qlib.llm import model as llm_model


def test_the_class_and_the_pretrained_weights_are_those_of_qlib_llm():
    assert models.CharLM is llm_model.CharLM and models.CharLMConfig is llm_model.CharLMConfig
    m = models.charlm(1)
    assert isinstance(m, models.CharLM) and not m.training
    ref = llm_model.pretrained(1).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())
    tokens = torch.randint(0, 256, (2, 16))
    assert m(tokens).shape == (2, 16, 256)


def test_fresh_model_is_seeded():
    a, b = models.charlm(3, pretrained=False), llm_model.create(3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="seed"):
        models.charlm(7)


def test_not_in_the_digit_zoo():
    assert "charlm" in models.LANGUAGE_MODELS
    assert "charlm" not in models.ZOO and "charlm" not in models.ALL_MODELS
    with pytest.raises(AttributeError, match="no attribute"):
        models.NoSuchModel  # noqa: B018


@pytest.mark.parametrize("first", ["qlib.models", "qlib.llm.model"])
def test_lazy_and_no_import_cycle(first):
    other = "qlib.llm.model" if first == "qlib.models" else "qlib.models"
    code = (f"import sys, importlib; importlib.import_module({first!r}); "
            f"lazy = 'qlib.llm' not in sys.modules; importlib.import_module({other!r}); "
            "import qlib.models as m; print(lazy, m.CharLM.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lazy, where = out.stdout.split()
    assert where == "qlib.llm.model" and (lazy == "True" or first == "qlib.llm.model")
