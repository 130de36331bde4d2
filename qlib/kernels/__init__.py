"""Integer kernels: exact int8 x int8 -> int32 matrix products, and the backend that runs them.

``int8_matmul(a, b)`` is the contract every integer path in qlib uses; ``choose_backend``
says which implementation it picked for given tensors (see ``dispatch.py``).
"""

from .dispatch import BACKENDS, choose_backend, int8_matmul  # noqa: F401
