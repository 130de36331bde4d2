"""qlib.packing: 1/2/4/8-bit codes packed into uint8 bytes.

Reference: the byte layout written out by hand (first code in the low bits: bitsandbytes'
and GGUF's nibble order) and the identity ``unpack(pack(q)) == q``; sizes against
``ceil(numel * bits / 8)`` (``qlib.measure.tensor_bytes``).
"""

from __future__ import annotations

import pytest
import torch

from qlib import measure
from qlib.packing import pack, packed_numel, unpack


def test_byte_layout_written_by_hand():
    # 4 bits: first code in the low nibble; an odd length pads the last high nibble with 0
    q = torch.tensor([0x1, 0xA, 0xF, 0x3, 0x7])
    assert pack(q, 4).tolist() == [0xA1, 0x3F, 0x07]
    # 2 bits: a | b << 2 | c << 4 | d << 6
    q = torch.tensor([1, 2, 3, 0, 2])
    assert pack(q, 2).tolist() == [1 | 2 << 2 | 3 << 4 | 0 << 6, 2]
    # signed 4-bit: two's complement nibbles (-1 = 0xF, -8 = 0x8)
    assert pack(torch.tensor([-1, -8, 7]), 4, signed=True).tolist() == [0x8F, 0x07]
    # 1 bit: bit i of byte 0 is code i
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1]), 1).tolist() == [0b10001101, 1]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 9), (0,)])
def test_round_trip_is_exact(bits, signed, shape):
    g = torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)  # fresh codes for each QLIB_TEST_SEED
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    q = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int16)
    packed = pack(q, bits, signed)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(q.numel(), bits)
    assert packed.numel() == measure.tensor_bytes(q.numel(), bits)
    out = unpack(packed, bits, q.shape, signed)
    assert out.dtype == (torch.int8 if signed else torch.uint8) and out.shape == q.shape
    assert torch.equal(out.to(torch.int16), q)


def test_int4_matches_the_lesson_01_packing():
    """Lesson 01 packs int4 as ``u[0::2] | u[1::2] << 4`` (even lengths): the same bytes."""
    q = torch.randint(-8, 8, (1000,), dtype=torch.int8)
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    assert torch.equal(pack(q, 4, signed=True), u[0::2] | (u[1::2] << 4))


def test_bad_inputs_say_what_is_expected():
    with pytest.raises(ValueError, match="one of"):
        pack(torch.tensor([1]), 3)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack(torch.tensor([8]), 4, signed=True)
    with pytest.raises(TypeError, match="integer"):
        pack(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 7)
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(3, dtype=torch.int8), 4, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packing_stays_on_the_device():
    q = torch.randint(0, 16, (33,), device="cuda")
    packed = pack(q, 4)
    assert packed.device == q.device
    assert torch.equal(unpack(packed, 4, 33).long(), q)
