"""qlib.domain.domains: one loader for the offline and the opt-in digit domains.

Reference: ``qlib.data.load_digits``, ``qlib.domain.printed.load_printed`` and
``qlib.data.load_dataset`` on tiny torchvision files written here (MNIST's IDX format,
USPS's bz2 libsvm format, SVHN's .mat), never downloaded.
"""

from __future__ import annotations

import bz2
import struct

import numpy as np
import pytest
import torch

from qlib import data, models
from qlib.domain import domains
from qlib.train import evaluate


def write_idx(path, array):
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_offline_domains_match_their_loaders():
    hand = domains.load_domain("digits", 8)
    assert torch.equal(hand.test.tensors[0], data.load_digits(8).test.tensors[0])
    printed = domains.load_domain("printed", 16)
    assert printed.name == "printed" and printed.image_shape == (1, 16, 16)
    # a zoo model runs on every domain at its own image size
    assert 0 <= evaluate(models.pretrained("cnn16", 0), printed.test) <= 100


def test_mnist_from_tiny_files_at_zoo_sizes(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng()
    for prefix, n in [("train", 20), ("t10k", 6)]:
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    for size in (8, 16):
        splits = domains.load_domain("mnist", size, root=tmp_path)
        assert splits.image_shape == (1, size, size)
        assert splits.test.tensors[1].tolist() == [0, 1, 2, 3, 4, 5]
        with torch.no_grad():
            assert models.pretrained("cnn8" if size == 8 else "cnn16", 0)(splits.test.tensors[0]).shape == (6, 10)


def test_usps_from_tiny_files(tmp_path):
    rng = np.random.default_rng()
    for fname, n in [("usps.bz2", 12), ("usps.t.bz2", 5)]:
        lines = [f"{i % 10 + 1} " + " ".join(f"{j + 1}:{v:.4f}" for j, v in enumerate(rng.uniform(-1, 1, 256)))
                 for i in range(n)]
        with bz2.open(tmp_path / fname, "wt") as f:
            f.write("\n".join(lines) + "\n")
    splits = domains.load_domain("usps", 8, root=tmp_path)
    assert splits.image_shape == (1, 8, 8) and len(splits.test) == 5


def test_svhn_colour_becomes_standardized_grey(tmp_path, monkeypatch):
    from scipy.io import savemat
    from torchvision import datasets

    rng = np.random.default_rng()
    for split, n in [("train", 12), ("test", 4)]:
        savemat(tmp_path / f"{split}_32x32.mat",
                {"X": rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8), "y": (np.arange(n) % 10 + 1)[:, None]})
    monkeypatch.setattr(datasets.SVHN, "_check_integrity", lambda self: True)
    splits = domains.load_domain("svhn", 16, root=tmp_path)
    x = splits.train.tensors[0]
    assert splits.image_shape == (1, 16, 16)
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-4


def test_missing_files_and_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        domains.load_domain("mnist", 8, root=tmp_path)
    with pytest.raises(ValueError, match="unknown domain"):
        domains.load_domain("imagenet")
    with pytest.raises(ValueError, match="image_size"):
        domains.load_domain("digits", 4)
