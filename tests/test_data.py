"""qlib.data: the digits split and the opt-in torchvision loaders on tiny files.

Reference: sklearn.datasets.load_digits (1797 images) and torchvision's dataset file formats,
which these tests write themselves (no download).
"""

from __future__ import annotations

import bz2
import pickle
import struct

import numpy as np
import pytest
import torch

from qlib import data


def test_digits_split_sizes_and_standardization(digits8):
    assert (len(digits8.train), len(digits8.val), len(digits8.test)) == (1078, 359, 360)
    x = digits8.train.tensors[0]
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-4
    assert digits8.train.tensors[1].dtype == torch.int64


def test_digits_split_is_fixed_and_disjoint(digits8):
    again = data.load_digits(8)
    assert torch.equal(again.test.tensors[0], digits8.test.tensors[0])
    rows = lambda ds: {tuple(r.tolist()) for r in ds.tensors[0].flatten(1)}  # noqa: E731
    assert not rows(digits8.train) & rows(digits8.test)


def test_digits_image_size(digits16):
    assert digits16.image_shape == (1, 16, 16)
    with pytest.raises(ValueError, match="image_size"):
        data.load_digits(4)


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="expected one of"):
        data.load_dataset("imagenet")


def test_loader_shuffles_with_its_seed(digits8):
    a = next(iter(digits8.loader("train", seed=1)))[1]
    b = next(iter(digits8.loader("train", seed=1)))[1]
    c = next(iter(digits8.loader("train", seed=2)))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_batches(digits8):
    batches = data.calibration_batches(digits8.train, num_samples=100, batch_size=32, seed=0)
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    with pytest.raises(ValueError):
        data.calibration_batches(digits8.train, num_samples=0)


# --- torchvision datasets from tiny files written here ------------------------------------

def write_idx(path, array: np.ndarray):
    """MNIST's IDX format: magic (0, 0, dtype 0x08, ndim), big-endian sizes, then bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_from_tiny_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng()
    for prefix, n in [("train", 20), ("t10k", 6)]:
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    splits = data.load_dataset(name, root=tmp_path, image_size=14)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 6)
    assert splits.image_shape == (1, 14, 14)
    assert splits.test.tensors[1].tolist() == [0, 1, 2, 3, 4, 5]


def test_usps_from_tiny_files(tmp_path):
    rng = np.random.default_rng()
    for fname, n in [("usps.bz2", 12), ("usps.t.bz2", 5)]:
        lines = []
        for i in range(n):
            pixels = " ".join(f"{j + 1}:{v:.4f}" for j, v in enumerate(rng.uniform(-1, 1, 256)))
            lines.append(f"{i % 10 + 1} {pixels}")
        with bz2.open(tmp_path / fname, "wt") as f:
            f.write("\n".join(lines) + "\n")
    splits = data.load_dataset("usps", root=tmp_path)
    assert splits.image_shape == (1, 16, 16)
    assert len(splits.test) == 5 and splits.test.tensors[1].tolist() == [0, 1, 2, 3, 4]


def test_cifar10_from_tiny_files(tmp_path, monkeypatch):
    from torchvision import datasets

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng()
    for fname, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    # The tiny files cannot match the real files' md5 sums: skip only that integrity check.
    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    splits = data.load_dataset("cifar10", root=tmp_path)
    assert splits.image_shape == (3, 32, 32)
    assert len(splits.train) + len(splits.val) == 20 and len(splits.test) == 3


def test_svhn_from_tiny_files(tmp_path, monkeypatch):
    from scipy.io import savemat
    from torchvision import datasets

    rng = np.random.default_rng()
    for fname, n in [("train_32x32.mat", 10), ("test_32x32.mat", 4)]:
        savemat(tmp_path / fname, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                   "y": (np.arange(n) % 10 + 1).reshape(n, 1)})
    monkeypatch.setattr(datasets.SVHN, "_check_integrity", lambda self: True)
    splits = data.load_dataset("svhn", root=tmp_path)
    assert splits.image_shape == (3, 32, 32)
    assert splits.test.tensors[1].tolist() == [1, 2, 3, 4]  # SVHN's label 10 means digit 0


@pytest.mark.parametrize("name", data.TORCHVISION_DATASETS)
def test_missing_files_offline_say_how_to_get_them(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="download=True"):
        data.load_dataset(name, root=tmp_path)
