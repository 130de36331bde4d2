"""qlib.domain.printed: the printed-digit domain builds offline from matplotlib's own fonts.

Reference: matplotlib's ``mpl-data/fonts/ttf`` (the files must be the ones rendered) and
``qlib.data.load_digits`` (same image sizes, same standardization, same label set).
"""

from __future__ import annotations

import os
import socket

import matplotlib
import pytest
import torch

from qlib import data
from qlib.domain import printed


@pytest.fixture(scope="module")
def printed8():
    return printed.load_printed(8)


def test_fonts_come_from_matplotlib():
    paths = printed.font_paths()
    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    assert len(paths) >= 10
    assert all(p.startswith(folder) and os.path.exists(p) for p in paths)
    names = " ".join(os.path.basename(p) for p in paths)
    for family in ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono", "STIX", "cm"):
        assert family in names


def test_builds_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_printed tried to open a network connection")
    monkeypatch.setattr(socket, "socket", no_network)
    printed._render_cached.cache_clear()
    splits = printed.load_printed(8, variants=1)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 10 * len(printed.font_paths())


def test_glyphs_are_ink_in_unit_range():
    g = printed.render_glyphs()
    assert g.shape[1:] == (10, printed.RENDER, printed.RENDER)
    assert g.min() >= 0 and g.max() <= 1
    ink = g.flatten(2).sum(-1)
    assert (ink > 20).all()                      # every glyph has ink
    assert not torch.allclose(g[0, 1], g[0, 7])  # different digits look different


@pytest.mark.parametrize("size", [8, 16])
def test_shapes_labels_and_standardization_match_the_handwritten_digits(size):
    p = printed.load_printed(size, variants=2)
    hand = data.load_digits(size)
    x, y = p.train.tensors
    assert p.image_shape == hand.image_shape == (1, size, size)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10)) and p.num_classes == 10
    # pixels standardized with the handwritten training set's mean and std: the blank
    # background maps to the same value in both domains
    assert torch.isclose(x.min(), hand.train.tensors[0].min(), atol=1e-5)


def test_fixed_split_is_reproducible_and_disjoint(printed8):
    again = printed.load_printed(8)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(printed8, part).tensors[0], getattr(again, part).tensors[0])
    n = len(printed8.train) + len(printed8.val) + len(printed8.test)
    assert n == 6 * 10 * len(printed.font_paths())
    assert abs(len(printed8.train) / n - 0.6) < 0.01


def test_sklearn_like_grey_levels():
    ink = printed.render_glyphs()[:2].reshape(-1, 1, printed.RENDER, printed.RENDER)
    x = printed.to_digits_format(ink)
    assert x.shape == (20, 1, 8, 8)
    assert torch.equal(torch.round(x * 16), x * 16)  # 17 grey levels, like sklearn's 0..16


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        printed.load_printed(4)
    with pytest.raises(ValueError, match="variants"):
        printed.load_printed(8, variants=0)
