"""Quantized model updates: what a federated client sends uplink, and exactly how many bytes.

Idea. A client does not send its new weights ``w_k`` but the *update* (delta)
``d = w_k - w_global``. Updates are small, centred on zero and differ in range from one
layer (or output channel) to the next, so a *symmetric* b-bit code with a scale per tensor
or per output channel (axis 0) carries them well::

    qmax  = 2**(b-1) - 1                       (b = 8: 127,  b = 4: 7,  b = 2: 1)
    scale = max|d| / qmax                       (per tensor, or per row along axis 0)
    nearest:     q = clamp(round_half_even(d * (1/scale)), -qmax, qmax)
    stochastic:  q = floor(d * (1/scale) + u),  u ~ U[0, 1) drawn per element
    decode:      d_hat = q * scale

Nearest rounding (``qlib.quantize``, bit-exact with PyTorch) has the smaller error on one
draw but is *biased*: an entry smaller than scale/2 is always sent as 0, round after round.
Stochastic rounding rounds ``v = d/scale`` up with probability ``v - floor(v)``, so
``E[q] = v`` exactly and the server's average of many clients' updates is unbiased
(Alistarh et al., QSGD, NeurIPS 2017). 2 bits gives the ternary codes {-1, 0, 1}.

Error feedback (Seide et al. 2014; Karimireddy et al., ICML 2019) keeps what was lost,
``e <- (d + e) - decode(encode(d + e))``, and adds it to the next round's update.

Bytes, counted exactly: codes are packed ``8 // b`` to a byte within each tensor
(``ceil(n * b / 8)`` bytes for ``n`` entries), plus one float32 scale (4 bytes) per tensor or
per channel; no zero point is sent (symmetric). An fp32 update costs ``4 n`` bytes.

Shapes and dtypes: ``d`` is any float tensor on any device; codes are int8 on ``d.device``,
scales float32 of shape ``()`` (per tensor) or ``(d.shape[0],)`` (per channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..qparams import PerChannel, PerTensor, check_tensor
from ..quantize import dequantize, quantize

__all__ = ["BITS", "ROUNDINGS", "EncodedTensor", "encode", "decode", "pack_codes", "unpack_codes",
           "payload_bytes", "fp32_bytes", "encode_update", "decode_update", "update_bytes", "ErrorFeedback"]

BITS = (2, 4, 8)
ROUNDINGS = ("nearest", "stochastic")


@dataclass
class EncodedTensor:
    """One quantized update tensor: int8 ``codes`` (shape of the update), float32 ``scale``."""

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    per_channel: bool

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: packed codes plus float32 scales."""
        return payload_bytes(self.codes.numel(), self.bits, self.scale.numel())


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return bits


def _check_granularity(granularity) -> bool:
    if isinstance(granularity, PerTensor):
        return False
    if isinstance(granularity, PerChannel):
        if granularity.axis != 0:
            raise ValueError(f"updates are quantized per output channel (PerChannel(0)), got axis {granularity.axis}")
        return True
    raise TypeError(f"granularity must be PerTensor() or PerChannel(0), got {granularity!r}")


def payload_bytes(numel: int, bits: int, num_scales: int) -> int:
    """``ceil(numel * bits / 8)`` packed code bytes + 4 bytes per float32 scale."""
    _check_bits(bits)
    if numel < 0 or num_scales < 0:
        raise ValueError(f"numel and num_scales must be >= 0, got {numel}, {num_scales}")
    return math.ceil(numel * bits / 8) + 4 * num_scales


def fp32_bytes(numel: int) -> int:
    """An unquantized float32 update: 4 bytes an entry."""
    return 4 * numel


def _scale(d: torch.Tensor, qmax: int, per_channel: bool) -> torch.Tensor:
    a = d.detach().abs().to(torch.float32)
    amax = a.reshape(a.shape[0], -1).amax(dim=1) if per_channel else a.amax()
    # an all-zero update (or row) gets scale 1: its codes are 0 and decode to exactly 0
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def encode(d: torch.Tensor, bits: int = 8, granularity=PerTensor(), rounding: str = "stochastic",
           generator: torch.Generator | None = None) -> EncodedTensor:
    """Quantize an update ``d`` to symmetric ``bits``-bit codes (module docstring).

    ``rounding="stochastic"`` needs ``generator`` (a ``torch.Generator`` on ``d.device``):
    same generator state, same codes. Per-channel scales need ``d.dim() >= 1``; a 0-d
    tensor is always per tensor.
    """
    check_tensor(d, "d")
    if not torch.isfinite(d).all():
        raise ValueError("the update d holds NaN or infinite values")
    bits = _check_bits(bits)
    per_channel = _check_granularity(granularity) and d.dim() >= 1 and d.numel() > 0
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    qmax = 2 ** (bits - 1) - 1
    scale = _scale(d, qmax, per_channel) if d.numel() else torch.ones((), device=d.device)
    if d.numel() == 0:
        return EncodedTensor(torch.zeros(d.shape, dtype=torch.int8, device=d.device), scale, bits, False)
    if rounding == "nearest":
        codes = quantize(d.to(torch.float32), scale, torch.zeros_like(scale, dtype=torch.int32), -qmax, qmax,
                         granularity=PerChannel(0) if per_channel else PerTensor(), dtype=torch.int8)
        return EncodedTensor(codes, scale, bits, per_channel)
    if generator is None:
        raise ValueError("stochastic rounding needs a torch.Generator (generator=...) so that runs repeat")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    inv = 1.0 / (scale.reshape(-1, *([1] * (d.dim() - 1))) if per_channel else scale)
    v = d.to(torch.float32) * inv
    u = torch.rand(d.shape, generator=generator, device=d.device, dtype=torch.float32)
    codes = torch.clamp(torch.floor(v + u), -qmax, qmax).to(torch.int8)  # clamp only guards float ties
    return EncodedTensor(codes, scale, bits, per_channel)


def decode(e: EncodedTensor) -> torch.Tensor:
    """float32 ``codes * scale`` (qlib.dequantize with zero point 0)."""
    if not isinstance(e, EncodedTensor):
        raise TypeError(f"expected an EncodedTensor, got {type(e).__name__}")
    if e.codes.numel() == 0:
        return torch.zeros(e.codes.shape, device=e.codes.device)
    zp = torch.zeros_like(e.scale, dtype=torch.int32)
    return dequantize(e.codes, e.scale, zp, granularity=PerChannel(0) if e.per_channel else PerTensor())


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit codes ``8 // bits`` to a uint8 byte (little end first).

    Returns ``ceil(n * bits / 8)`` bytes: the length ``payload_bytes`` counts.
    """
    bits = _check_bits(bits)
    flat = (codes.flatten().to(torch.int16) & (2 ** bits - 1)).to(torch.uint8)
    per = 8 // bits
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes of ``shape``."""
    bits = _check_bits(bits)
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    u = (packed.to(torch.int32).unsqueeze(1) >> shifts) & (2 ** bits - 1)
    signed = torch.where(u >= 2 ** (bits - 1), u - 2 ** bits, u).flatten()
    n = math.prod(shape)
    return signed[:n].reshape(shape).to(torch.int8)


def encode_update(update: dict, bits: int | None = 8, granularity=PerTensor(), rounding: str = "stochastic",
                  generator: torch.Generator | None = None) -> dict:
    """Encode every float tensor of a state-dict-like ``update``; ``bits=None`` sends fp32.

    Per-channel scales are used for tensors of 2 or more dims (weights); vectors (biases,
    BatchNorm statistics) get one scale each, as a per-channel scale would cost more than
    their codes.
    """
    if not isinstance(update, dict):
        raise TypeError(f"update must be a dict of tensors, got {type(update).__name__}")
    if bits is None:
        return {k: v.detach().to(torch.float32).clone() for k, v in update.items()}
    out = {}
    for k, v in update.items():
        g = granularity if v.dim() >= 2 else PerTensor()
        out[k] = encode(v, bits, g, rounding, generator)
    return out


def decode_update(encoded: dict) -> dict:
    """Float32 tensors back from :func:`encode_update` (fp32 entries pass through)."""
    return {k: decode(v) if isinstance(v, EncodedTensor) else v for k, v in encoded.items()}


def update_bytes(encoded: dict) -> int:
    """Exact uplink bytes of an encoded update (fp32 entries: 4 bytes each)."""
    return sum(v.nbytes if isinstance(v, EncodedTensor) else fp32_bytes(v.numel()) for v in encoded.values())


class ErrorFeedback:
    """Per-client memory of what quantization dropped: ``e <- (d + e) - decode(encode(d + e))``.

    ``compensate(update)`` returns ``d + e``; after encoding it, ``remember(sent, encoded)``
    stores the new residual. Residuals live on the update's device and dtype.
    """

    def __init__(self):
        self.residual: dict[str, torch.Tensor] = {}

    def compensate(self, update: dict) -> dict:
        return {k: v + self.residual[k] if k in self.residual else v.clone() for k, v in update.items()}

    def remember(self, sent: dict, encoded: dict) -> None:
        decoded = decode_update(encoded)
        self.residual = {k: (sent[k] - decoded[k].to(sent[k].dtype)).detach() for k in sent}
