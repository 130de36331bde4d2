"""qlib.kernels.dispatch: exact int8 x int8 -> int32 products. Reference: int64 matmul."""

import pytest
import torch

from qlib.kernels import BACKENDS, choose_backend, int8_matmul


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 7), (17, 64, 33), (64, 512, 256)])
def test_every_backend_is_exact(backend, m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
    a[0, :] = -128
    b[:, 0] = -128  # the extreme product 128 * 128 * K
    out = int8_matmul(a, b, backend=backend)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), a.long() @ b.long())


def test_cpu_picks_int_mm_and_bad_input_is_rejected():
    a = torch.zeros(4, 8, dtype=torch.int8)
    assert choose_backend(a, a.t().contiguous()) == "int_mm"
    with pytest.raises(TypeError, match="int8"):
        int8_matmul(a.float(), a.t())
    with pytest.raises(ValueError, match="inner"):
        int8_matmul(a, a)
    with pytest.raises(ValueError, match="backend"):
        int8_matmul(a, a.t(), backend="magic")
