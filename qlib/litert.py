"""LiteRT (TensorFlow Lite): a second deployment runtime next to ONNX Runtime (``qlib.export``).

Idea. LiteRT runs ``.tflite`` flatbuffers, a format of on-device deployment (Android, iOS,
embedded Linux). ``litert_torch`` converts a PyTorch model to one (it builds on ``torch.export``,
which traces the model for the example's shape, and maps the traced ATen operators to LiteRT's;
a float model here, so the file computes the same float32 function), and the ``ai_edge_litert``
interpreter runs it. Lesson 13 and ``benchmarks/mixed.py`` compare its logits and latency with
PyTorch's and ONNX Runtime's.

Both packages are optional (``pip install 'qlib[litert]'``): they bring jax, about 0.75 GB, where
ONNX and ONNX Runtime take about 110 MB. ``litert_available()`` is None when both import, else
the reason to print when skipping; ``to_litert`` and ``litert_predict`` raise ``RuntimeError``
with that reason rather than an ``ImportError`` deep inside.

- ``to_litert(model, example, path)``: ``example`` one input batch ``(N, ...)`` float32 (its
  shape is traced); writes ``path`` and returns it as a ``Path``.
- ``litert_predict(path, data, batch_size=1)``: float32 CPU logits ``(len(data), classes)`` on
  every batch of ``data`` (``qlib.batching``: tensors, datasets, loaders), concatenated; the
  interpreter's input is resized to each batch.

Re-exported by ``qlib.export`` (``export.to_litert`` as before). Tests: tests/test_litert.py
(a round trip within 1e-4 of PyTorch where LiteRT is installed, a clear skip where not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .batching import input_batches

__all__ = ["litert_available", "to_litert", "litert_predict"]


def litert_available() -> str | None:
    """None when LiteRT can run here, else the reason (a message to print when skipping)."""
    missing = []
    for module, package in (("litert_torch", "litert-torch"), ("ai_edge_litert", "ai-edge-litert")):
        try:
            __import__(module)
        except Exception:  # noqa: BLE001 - any import failure means: not usable here
            missing.append(package)
    if missing:
        return (f"LiteRT is not installed ({', '.join(missing)} missing): it is optional, about 0.75 GB "
                "with jax; install it with pip install 'qlib[litert]'")
    return None


def to_litert(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Convert a float ``model`` to a ``.tflite`` file with ``litert_torch`` (optional extra)."""
    reason = litert_available()
    if reason:
        raise RuntimeError(reason)
    import litert_torch

    edge = litert_torch.convert(model.eval(), (example,))
    edge.export(str(path))
    return Path(path)


def litert_predict(path: str | Path, data, batch_size: int = 1) -> torch.Tensor:
    """Logits of the ``.tflite`` model at ``path`` from the LiteRT interpreter."""
    reason = litert_available()
    if reason:
        raise RuntimeError(reason)
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    outs = []
    for x in input_batches(data, batch_size, device="cpu", dtype=torch.float32, finite=True):
        interp.resize_tensor_input(inp["index"], list(x.shape))
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], x.numpy())
        interp.invoke()
        outs.append(interp.get_tensor(out["index"]).copy())
    return torch.from_numpy(np.concatenate(outs))
