"""Integer kernels: exact int8 x int8 -> int32 GEMMs, their backends, and W8A8 linear layers.

- ``int8_matmul(a, b)``: the exact int32 product every integer path in qlib uses;
  ``choose_backend(a, b)`` says which backend it picked and why (``dispatch.py``).
- ``int8_matmul_scaled(a, b, row_scale, col_scale, bias, out_dtype)``: the product with its
  dequantizing epilogue (fused in Triton); ``quantize_per_token(x)``: per-row int8 codes.
- ``Int8Linear.from_float(linear)``: per-channel int8 weights, dynamic per-token int8
  activations (``linear.py``).
- ``load_triton()``: import Triton, with its CPU interpreter when there is no CUDA GPU
  (``triton_runtime.py``). Nothing here imports Triton until a Triton backend is used; the
  kernels themselves live in ``gemm.py`` and ``quantize_kernel.py``.
"""

from .dispatch import (BACKENDS, MAX_K, BackendChoice, choose_backend, int8_matmul,  # noqa: F401
                       int8_matmul_scaled, quantize_per_token)
from .linear import Int8Linear  # noqa: F401
from .reference import (QUANT_MAX, QUANT_MIN, quantize_per_token_reference,  # noqa: F401
                        scaled_epilogue_reference)
from .triton_runtime import interpreting, kernel_device, load_triton, triton_status  # noqa: F401
