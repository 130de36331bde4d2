"""qlib.models gives access to the transformer of lesson 16 (issue 15: "a small decoder-only
transformer (qlib.models)") without joining the digit zoo.

Reference: ``qlib.llm.model`` itself (the same class, the same shipped weights, the same seeded
initialisation) and ``sys.modules`` of a fresh interpreter (``import qlib.models`` does not
import ``qlib.llm``; ``models.CharLM`` then loads it without a cycle).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_lazy_and_no_import_cycle():
    """A fresh interpreter: ``import qlib.models`` leaves ``qlib.llm`` alone; ``models.CharLM``
    then imports it (qlib.llm.model imports only batching and corpus, never qlib.models)."""
    code = ("import sys; import qlib.models as m; lazy = 'qlib.llm' not in sys.modules; "
            "print(lazy, m.CharLM.__module__, 'qlib.models' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])          # this checkout's qlib
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "qlib.llm.model", "True"]
