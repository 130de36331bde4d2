"""qlib.granularity: the row view of a tensor per granularity.

Reference: the layouts written in the module docstring (PerGroup rows in the row-major order of
``qparams_shape``); ``rows_to_qparams`` must broadcast back against ``x``.
"""

import pytest
import torch

from qlib.granularity import PerAxis, PerChannel, PerGroup, PerTensor, qparams_shape, rows_to_qparams, to_rows


@pytest.mark.parametrize("gran,rows,shape", [
    (PerTensor(), (1, 64 * 256), ()),
    (PerChannel(0), (64, 256), (64,)),
    (PerGroup(32), (512, 32), (64, 8)),
    (PerGroup(16, axis=0), (4 * 256, 16), (4, 256)),
])
def test_row_view_and_back(gran, rows, shape):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    r = to_rows(x, gran)
    assert tuple(r.shape) == rows and qparams_shape(x.shape, gran) == shape
    # each row's max, put back in qparams shape, bounds every element of its slice
    hi = rows_to_qparams(r.amax(dim=1), x.shape, gran)
    if isinstance(gran, PerChannel):  # 1-D, as torch's per-channel qparams: one per slice of axis 0
        hi = hi[:, None]
    elif isinstance(gran, PerGroup):
        hi = hi.repeat_interleave(gran.group_size, dim=gran.axis)
    assert (x <= hi).all() and (x == hi).any()


def test_per_axis_is_per_channel_and_bad_groups_are_rejected():
    assert PerAxis is PerChannel and PerAxis(1) == PerChannel(1)
    with pytest.raises(ValueError, match="divisible"):
        qparams_shape((10, 30), PerGroup(32))
    with pytest.raises(ValueError, match="positive"):
        PerGroup(0)
    with pytest.raises(TypeError, match="granularity"):
        to_rows(torch.ones(3), "per_tensor")
