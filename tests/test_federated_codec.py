"""Tests of qlib.federated.codec.

References: nearest codes against ``torch.quantize_per_tensor`` / ``quantize_per_channel``
(symmetric, zero point 0, range [-qmax, qmax]); stochastic rounding against its definition
``E[q] = d / scale`` (QSGD, Alistarh et al. 2017) measured over many draws; byte counts
against the written formula ``ceil(n * bits / 8) + 4 * scales`` and against the length of
the packed bytes themselves.
"""

import math

import pytest
import torch

from qlib.federated import codec
from qlib.qparams import PerChannel, PerTensor


def _fresh(*shape):
    return torch.randn(*shape) * torch.rand(()) * 0.1


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_nearest_matches_torch(bits, per_channel):
    d = _fresh(6, 13)
    qmax = 2 ** (bits - 1) - 1
    e = codec.encode(d, bits, PerChannel(0) if per_channel else PerTensor(), "nearest")
    if per_channel:
        want = torch.quantize_per_channel(d, e.scale.double(), torch.zeros(6, dtype=torch.int64), 0,
                                          torch.qint32).int_repr()
    else:
        want = torch.quantize_per_tensor(d, float(e.scale), 0, torch.qint32).int_repr()
    assert torch.equal(e.codes.to(torch.int32), want.clamp(-qmax, qmax))
    assert e.codes.abs().max() <= qmax
    # round trip: error at most scale/2 (nothing is clipped: scale = max|d| / qmax)
    s = e.scale.reshape(-1, 1) if per_channel else e.scale
    assert ((codec.decode(e) - d).abs() <= s / 2 + 1e-7).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_is_unbiased(bits):
    d = _fresh(40)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    draws = 4000
    # one row per draw: per-channel scales along axis 0 all equal max|d| / qmax
    many = codec.encode(d.expand(draws, -1).contiguous(), bits, PerChannel(0), "stochastic", g)
    mean = codec.decode(many).mean(0)
    scale = float(d.abs().max()) / (2 ** (bits - 1) - 1)
    # per-entry variance <= scale^2 / 4: 6 standard errors of the mean
    tol = 6 * scale / 2 / math.sqrt(draws)
    assert (mean - d).abs().max() <= tol
    # nearest rounding is biased on entries below scale/2 (always sent as 0)
    small = d.abs() < scale / 2
    if bits == 2 and small.any():
        near = codec.decode(codec.encode(d, bits, PerTensor(), "nearest"))
        assert (near[small] == 0).all() and (mean[small] != 0).any()


def test_stochastic_codes_are_floor_or_ceil():
    d = _fresh(5, 7)
    e = codec.encode(d, 4, PerChannel(0), "stochastic", torch.Generator().manual_seed(3))
    v = d / e.scale.reshape(-1, 1)
    assert ((e.codes.float() == v.floor()) | (e.codes.float() == v.ceil())).all()


def test_stochastic_seeded_is_deterministic():
    d = _fresh(9, 4)
    a = codec.encode(d, 2, PerTensor(), "stochastic", torch.Generator().manual_seed(7))
    b = codec.encode(d, 2, PerTensor(), "stochastic", torch.Generator().manual_seed(7))
    c = codec.encode(d, 2, PerTensor(), "stochastic", torch.Generator().manual_seed(8))
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 3, 3, 3), (1,)])
def test_exact_bytes_and_packing(bits, shape):
    d = _fresh(*shape)
    for gran in (PerTensor(), PerChannel(0)):
        e = codec.encode(d, bits, gran, "nearest")
        scales = shape[0] if isinstance(gran, PerChannel) else 1
        n = math.prod(shape)
        assert e.nbytes == math.ceil(n * bits / 8) + 4 * scales
        packed = codec.pack_codes(e.codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(codec.unpack_codes(packed, bits, shape), e.codes)


def test_update_bytes_of_a_model_update():
    upd = {"w": _fresh(16, 8), "b": _fresh(16), "w2": _fresh(3, 16)}
    enc = codec.encode_update(upd, 4, PerChannel(0), "nearest")
    want = (math.ceil(128 * 4 / 8) + 4 * 16) + (math.ceil(16 * 4 / 8) + 4) + (math.ceil(48 * 4 / 8) + 4 * 3)
    assert codec.update_bytes(enc) == want
    assert codec.update_bytes(codec.encode_update(upd, None)) == 4 * (128 + 16 + 48)


def test_error_feedback_accumulates_what_was_dropped():
    # a constant update below scale/2 of its tensor: nearest sends 0 for the small entries
    d = {"w": torch.tensor([1.0, 0.01, 0.01, 0.01])}
    ef = codec.ErrorFeedback()
    sent_total = torch.zeros(4)
    for _ in range(200):
        x = ef.compensate(d)
        enc = codec.encode_update(x, 2, PerTensor(), "nearest")
        ef.remember(x, enc)
        sent_total += codec.decode_update(enc)["w"]
    # without feedback the small entries would never move; with it the sum tracks 200 * d
    assert torch.allclose(sent_total, 200 * d["w"], atol=1.0 + 1e-5)
    no_fb = codec.decode_update(codec.encode_update(d, 2, PerTensor(), "nearest"))["w"]
    assert (no_fb[1:] == 0).all()


def test_zero_update_and_bad_inputs():
    e = codec.encode(torch.zeros(3, 4), 4, PerChannel(0), "nearest")
    assert torch.equal(codec.decode(e), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="bits"):
        codec.encode(torch.ones(3), 3)
    with pytest.raises(ValueError, match="rounding"):
        codec.encode(torch.ones(3), 8, rounding="up")
    with pytest.raises(ValueError, match="generator"):
        codec.encode(torch.ones(3), 8, rounding="stochastic")
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(torch.tensor([1.0, float("nan")]), 8, rounding="nearest")
    with pytest.raises(TypeError, match="granularity"):
        codec.encode(torch.ones(3), 8, "per_channel", "nearest")
    with pytest.raises(TypeError, match="dict"):
        codec.encode_update([torch.ones(3)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_codec_stays_on_device():
    d = _fresh(8, 5).cuda()
    for rounding in ("nearest", "stochastic"):
        e = codec.encode(d, 4, PerChannel(0), rounding, torch.Generator(device="cuda").manual_seed(0))
        assert e.codes.is_cuda and e.scale.is_cuda and codec.decode(e).is_cuda
        assert codec.unpack_codes(codec.pack_codes(e.codes, 4), 4, d.shape).is_cuda
