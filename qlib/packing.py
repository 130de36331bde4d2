"""Packing low-bit codes into bytes: 1-, 2- and 4-bit codes several to a uint8.

torch has no 4-bit or 2-bit dtype, so a 4-bit model stored one code per int8 byte would
take as much memory as an 8-bit one. Real formats (GGUF, bitsandbytes NF4, GPTQ/AWQ
checkpoints, TFLite int4) **pack** ``8 // bits`` codes into each byte and unpack them right
before the arithmetic. This module is that step, exact in both directions.

Layout (little-end first, as bitsandbytes' and most GGUF blocks' nibbles): the codes are
flattened (row-major), and code ``i`` goes into byte ``i // per_byte`` at bit offset
``(i % per_byte) * bits``, where ``per_byte = 8 // bits``. So for 4 bits the *first* code of
a pair is the **low** nibble and the second the high nibble::

    codes  [a, b, c]            (4 bits)     ->  bytes [a | b << 4,  c]     (c's high nibble: 0 padding)
    codes  [a, b, c, d, e]      (2 bits)     ->  bytes [a | b << 2 | c << 4 | d << 6,  e]

A length that is not a multiple of ``per_byte`` is padded with zero fields, so
``packed_numel = ceil(numel * bits / 8)`` (``qlib.measure.tensor_bytes``); ``unpack`` needs
the number of codes (or the shape) to drop the padding. 3-bit codes do not divide a byte:
store them in 4-bit fields (``pack(q, 4)``), or use a bit stream (not done here).

Codes are **unsigned** fields ``0 .. 2**bits - 1`` (codebook indices, uint4 codes) or, with
``signed=True``, two's complement ``-2**(bits-1) .. 2**(bits-1) - 1`` (int4 codes): the field
holds the low ``bits`` bits and ``unpack`` sign-extends them. Shapes: any integer tensor in,
a 1-D uint8 tensor out, on the input's device.
"""

from __future__ import annotations

import math

import torch

__all__ = ["PACK_BITS", "packed_numel", "pack", "unpack"]

PACK_BITS = (1, 2, 4, 8)
"""Field widths that divide a byte."""


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in PACK_BITS:
        raise ValueError(f"bits must be one of {PACK_BITS} (a field width that divides a byte), got {bits!r}; "
                         "store 3-bit codes in 4-bit fields")
    return bits


def packed_numel(numel: int, bits: int) -> int:
    """Bytes holding ``numel`` codes of ``bits`` bits: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    return (numel * bits + 7) // 8


def _field_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def pack(codes: torch.Tensor, bits: int, signed: bool = False) -> torch.Tensor:
    """Pack integer ``codes`` (any shape) into a 1-D uint8 tensor, ``8 // bits`` codes a byte.

    ``codes``: an integer tensor whose values fit the field (``0 .. 2**bits - 1``, or
    ``-2**(bits-1) .. 2**(bits-1) - 1`` with ``signed=True``): ValueError otherwise, so that no
    code is silently truncated. Layout in the module docstring (first code in the low bits).
    """
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    lo, hi = _field_range(bits, signed)
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise ValueError(f"{'signed' if signed else 'unsigned'} {bits}-bit codes must lie in [{lo}, {hi}], "
                         f"got values in [{int(flat.min())}, {int(flat.max())}]")
    per_byte = 8 // bits
    fields = (flat & (2**bits - 1)).to(torch.uint8)  # two's complement low bits for signed codes
    pad = (-fields.numel()) % per_byte
    if pad:
        fields = torch.cat([fields, fields.new_zeros(pad)])
    fields = fields.reshape(-1, per_byte)
    out = torch.zeros(fields.shape[0], dtype=torch.uint8, device=codes.device)
    for j in range(per_byte):
        out |= fields[:, j] << (j * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, shape, signed: bool = False) -> torch.Tensor:
    """Inverse of ``pack``: the codes as an int8 (signed) or uint8 tensor of ``shape``.

    ``shape``: an int (the number of codes) or a tuple; it tells how many trailing fields of
    the last byte are padding. ``unpack(pack(q, b, s), b, q.shape, s) == q`` exactly.
    """
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed must be a 1-D uint8 tensor (from pack), got "
                        f"{getattr(packed, 'dtype', type(packed).__name__)} {tuple(getattr(packed, 'shape', ()))}")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    if packed.numel() != packed_numel(numel, bits):
        raise ValueError(f"{numel} codes of {bits} bits take {packed_numel(numel, bits)} bytes, "
                         f"got {packed.numel()}")
    per_byte, mask = 8 // bits, 2**bits - 1
    fields = torch.stack([(packed >> (j * bits)) & mask for j in range(per_byte)], dim=1).reshape(-1)[:numel]
    if not signed:
        return fields.reshape(shape)
    wide = fields.to(torch.int16)
    wide = torch.where(wide >= 2 ** (bits - 1), wide - 2**bits, wide)  # sign extension
    return wide.to(torch.int8).reshape(shape)
