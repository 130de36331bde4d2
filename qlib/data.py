"""Datasets for the course: real handwritten digits offline, larger datasets on request.

The default dataset is scikit-learn's *digits*: 1797 real handwritten digits, 8x8 pixels,
16 grey levels, that ship with scikit-learn, so every notebook runs offline. We split them
once, with a fixed seed, into 1078 train / 359 validation / 360 test images and standardize
every pixel with the mean and standard deviation of the training images:

    x_std = (x - mean_train) / std_train          (one scalar mean and std)

One test image is 1/360 = 0.28 accuracy points, so a difference of one point is three images.

Larger public datasets (MNIST, Fashion-MNIST, CIFAR-10, USPS, SVHN) load through torchvision
with the same function, only when the files are on disk or when you pass ``download=True``
and are online.

Shapes and dtypes: images are float32 ``(N, C, H, W)``, labels int64 ``(N,)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .batching import check_seed

SPLIT_SEED = 0
"""The digits split is the same for everyone: it is drawn with this seed, never another."""

TORCHVISION_DATASETS = ("mnist", "fashion_mnist", "cifar10", "usps", "svhn")
DATASETS = ("digits",) + TORCHVISION_DATASETS


@dataclass
class Splits:
    """Train, validation and test sets of one dataset, as TensorDatasets."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    name: str

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.tensors[0].shape[1:])

    def loader(self, part: str = "train", batch_size: int = 128, shuffle: bool | None = None,
               seed: int = 0) -> DataLoader:
        """A DataLoader over one part; the training part is shuffled with an explicit seed."""
        if part not in ("train", "val", "test"):
            raise ValueError(f"part must be 'train', 'val' or 'test', got {part!r}")
        _check_count("batch_size", batch_size)
        shuffle = (part == "train") if shuffle is None else shuffle
        gen = torch.Generator().manual_seed(check_seed(seed))
        return DataLoader(getattr(self, part), batch_size=batch_size, shuffle=shuffle,
                          generator=gen if shuffle else None)


def _check_count(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def default_root() -> Path:
    """Where opt-in datasets live: ``$QLIB_DATA`` or ``~/.cache/qlib``."""
    return Path(os.environ.get("QLIB_DATA", Path.home() / ".cache" / "qlib"))


def resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` images to ``image_size`` x ``image_size``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor (N, C, H, W), got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    _check_count("image_size", image_size)
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                         align_corners=False)


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Standardize every tensor with the scalar mean and std of ``train``.

    ``train`` must hold at least two finite values that are not all equal (``std > 0``):
    dividing by a zero std would fill the result with NaN or infinity.
    """
    for t in (train, *others):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"expected floating-point tensors, got {getattr(t, 'dtype', type(t).__name__)}")
        if not torch.isfinite(t).all():
            raise ValueError("the images contain NaN or infinite values")
    if train.numel() < 2:
        raise ValueError(f"train must hold at least 2 values to estimate a std, got {train.numel()}")
    mean, std = train.mean(), train.std()
    if not std > 0:
        raise ValueError("train has zero spread (every value equal): cannot standardize")
    return [(t - mean) / std for t in (train, *others)]


def split_indices(n: int, fractions=(0.6, 0.2), seed: int = SPLIT_SEED):
    """A seeded permutation of ``range(n)`` cut into train / val / test index tensors."""
    _check_count("n", n)
    if (len(fractions) != 2 or not all(isinstance(f, (int, float)) and 0 <= f <= 1 for f in fractions)
            or sum(fractions) > 1):
        raise ValueError(f"fractions must be (train, val) in [0, 1] with a sum <= 1, got {fractions!r}")
    seed = check_seed(seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = round(n * fractions[0])
    n_val = round(n * fractions[1])
    return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]


def load_digits(image_size: int = 8) -> Splits:
    """scikit-learn's real handwritten digits: fixed split, standardized, ``(N, 1, S, S)``."""
    from sklearn.datasets import load_digits as sk_digits

    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (digits are 8x8), got {image_size!r}")
    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    x = resize(x, image_size)
    i_tr, i_va, i_te = split_indices(len(x))
    x_tr, x_va, x_te = standardize(x[i_tr], x[i_va], x[i_te])
    return Splits(TensorDataset(x_tr, y[i_tr]), TensorDataset(x_va, y[i_va]),
                  TensorDataset(x_te, y[i_te]), num_classes=10, name="digits")


def _torchvision_pair(name: str, root: Path, download: bool):
    """Build torchvision's train and test datasets for ``name`` (files must exist or download)."""
    from torchvision import datasets

    if name == "mnist":
        make = lambda train: datasets.MNIST(root, train=train, download=download)  # noqa: E731
    elif name == "fashion_mnist":
        make = lambda train: datasets.FashionMNIST(root, train=train, download=download)  # noqa: E731
    elif name == "cifar10":
        make = lambda train: datasets.CIFAR10(root, train=train, download=download)  # noqa: E731
    elif name == "usps":
        make = lambda train: datasets.USPS(root, train=train, download=download)  # noqa: E731
    else:  # svhn
        make = lambda train: datasets.SVHN(root, split="train" if train else "test",  # noqa: E731
                                           download=download)
    return make(True), make(False)


def _to_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 ``(N, C, H, W)`` in [0, 1] and labels int64, whatever torchvision stores."""
    data = ds.data
    data = torch.as_tensor(data) if not isinstance(data, torch.Tensor) else data
    if data.ndim == 3:                      # MNIST-like (N, H, W)
        data = data.unsqueeze(1)
    elif data.shape[-1] == 3:               # CIFAR (N, H, W, C)
        data = data.permute(0, 3, 1, 2)
    x = data.float() / 255.0 if data.dtype == torch.uint8 else data.float()
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels
    return x.contiguous(), torch.as_tensor(labels, dtype=torch.int64)


def load_torchvision(name: str, image_size: int | None = None, root: str | Path | None = None,
                     download: bool = False, val_fraction: float = 0.1) -> Splits:
    """An opt-in torchvision dataset, split into train / val (seeded) / test, standardized."""
    if name not in TORCHVISION_DATASETS:
        raise ValueError(f"unknown torchvision dataset {name!r}; expected one of {', '.join(TORCHVISION_DATASETS)}")
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    root = Path(root) if root is not None else default_root()
    try:
        train_ds, test_ds = _torchvision_pair(name, root, download)
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name} was not found under {root}. It is not shipped with qlib. Either pass "
            f"download=True while online (it downloads through torchvision), or copy the "
            f"torchvision files for {name} into {root} (or set $QLIB_DATA). "
            f"torchvision said: {err}") from err
    x_tr, y_tr = _to_tensors(train_ds)
    x_te, y_te = _to_tensors(test_ds)
    if image_size is not None:
        x_tr, x_te = resize(x_tr, image_size), resize(x_te, image_size)
    perm = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = max(1, round(len(x_tr) * val_fraction))
    i_va, i_tr = perm[:n_val], perm[n_val:]
    x_tr_s, x_va_s, x_te_s = standardize(x_tr[i_tr], x_tr[i_va], x_te)
    n_classes = int(max(y_tr.max(), y_te.max()).item()) + 1
    return Splits(TensorDataset(x_tr_s, y_tr[i_tr]), TensorDataset(x_va_s, y_tr[i_va]),
                  TensorDataset(x_te_s, y_te), num_classes=max(n_classes, 10), name=name)


def load_dataset(name: str = "digits", image_size: int | None = None,
                 root: str | Path | None = None, download: bool = False) -> Splits:
    """Load a dataset by name: ``"digits"`` (default, offline) or a torchvision one.

    ``image_size`` resizes the images (digits: default 8; 16 for ``cnn16``/``res16``).
    torchvision datasets download only with ``download=True``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a dataset name (str), one of {', '.join(DATASETS)}; got {type(name).__name__}")
    if name.lower() not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    name = name.lower()
    if name == "digits":
        return load_digits(8 if image_size is None else image_size)
    return load_torchvision(name, image_size=image_size, root=root, download=download)


def calibration_batches(dataset: TensorDataset, num_samples: int = 256, batch_size: int = 64,
                        seed: int = 0) -> list[torch.Tensor]:
    """A few input batches (no labels) drawn from ``dataset`` with a seed, for calibration.

    ``num_samples`` distinct images (a seeded permutation, at most the dataset's size) in
    batches of ``batch_size`` (the last one may be smaller), on the dataset's device.
    """
    if not isinstance(dataset, TensorDataset):
        raise TypeError(f"dataset must be a TensorDataset (e.g. load_digits().train), got {type(dataset).__name__}")
    _check_count("num_samples", num_samples)
    _check_count("batch_size", batch_size)
    seed = check_seed(seed)
    x = dataset.tensors[0]
    if num_samples > len(x):
        raise ValueError(f"num_samples ({num_samples}) is more than the dataset's {len(x)} images")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return list(x[idx].split(batch_size))
