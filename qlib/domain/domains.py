"""Named domains of the ten digit classes, at the zoo's image sizes: one loader for all.

==============  ==========================================================================
``digits``      scikit-learn's handwritten digits (the source of every zoo model), offline
``printed``     digits typeset in matplotlib's fonts (``qlib.domain.printed``), offline
``mnist``       MNIST handwritten digits (28x28, resized)         } opt-in: through
``usps``        USPS postal digits (16x16 scans, resized)          } ``qlib.data.load_dataset``,
``svhn``        house numbers from Street View (RGB -> grey)       } only when the files are on disk
==============  ==========================================================================

Every domain comes as ``qlib.data.Splits`` of one-channel ``(N, 1, S, S)`` float32 images
(``S`` = 8 or 16, what the zoo model expects: ``qlib.models.image_size(name)``) and int64
labels 0-9, standardized with one scalar mean and std. The torchvision sets are
standardized with *their own* training statistics (``qlib.data``'s rule), so the shift
they bring is one of shapes and styles, not of overall brightness; SVHN's colour images are
averaged to grey first (then re-standardized). Nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

from torch.utils.data import TensorDataset

from ..data import Splits, load_dataset, load_digits, standardize
from .printed import load_printed

__all__ = ["DOMAINS", "OFFLINE", "load_domain"]

OFFLINE = ("digits", "printed")
DOMAINS = OFFLINE + ("mnist", "usps", "svhn")


def _grey(splits: Splits) -> Splits:
    """Average colour channels to one grey channel and re-standardize on the training part."""
    parts = [getattr(splits, p).tensors for p in ("train", "val", "test")]
    greys = standardize(*(x.mean(dim=1, keepdim=True) for x, _ in parts))
    return Splits(*(TensorDataset(g, y) for g, (_, y) in zip(greys, parts)), num_classes=splits.num_classes,
                  name=splits.name)


def load_domain(name: str, image_size: int = 16, root=None, download: bool = False) -> Splits:
    """The digits of domain ``name`` (``DOMAINS``) as grey ``(N, 1, image_size, image_size)`` Splits.

    ``root``/``download`` are passed to ``qlib.data.load_dataset`` for the opt-in sets; a
    missing file raises its ``FileNotFoundError`` that says how to get it.
    """
    if not isinstance(name, str) or name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; expected one of {', '.join(DOMAINS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (the zoo uses 8 and 16), got {image_size!r}")
    if name == "digits":
        return load_digits(image_size)
    if name == "printed":
        return load_printed(image_size)
    splits = load_dataset(name, image_size=image_size, root=root, download=download)
    if splits.image_shape[0] != 1:
        splits = _grey(splits)
    return splits
