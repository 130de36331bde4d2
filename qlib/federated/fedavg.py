"""FedAvg with quantized updates, as pure functions: one client step, one server step.

Idea (McMahan et al., AISTATS 2017). Each round the server sends the global weights ``w``;
client ``k`` trains a copy on its own ``n_k`` examples for a few local epochs, giving ``w_k``,
and sends the *update* ``d_k = w_k - w``, here quantized by :mod:`qlib.federated.codec`. The
server decodes and averages, weighting by data size::

    w <- w + sum_k (n_k / n) * decode(encode(d_k))          n = sum_k n_k

Every float entry of the state dict travels (weights, biases and BatchNorm running
statistics, so the server's model has BN statistics for data-free calibration). Parameters
are quantized; the float *buffers* (BN running mean and variance: a few hundred numbers)
travel in fp32, because a 2-bit running-variance update can drive a variance below zero.
Integer buffers (``num_batches_tracked``) stay on the server.

**QAT in the clients** (``qat_bits=b``): the local loss is computed with every conv/linear
weight fake-quantized symmetric per output channel to ``b`` bits (straight-through gradient,
:func:`qlib.quantize.fake_quantize`), so the global model learns weights that survive
``b``-bit quantization; compare with PTQ of a model trained in float.

``run_rounds`` is an in-process driver over the same two functions; :mod:`.flower` runs them
inside Flower's simulation engine, and a test checks both give the same global model.

Seeds: client ``k`` in round ``r`` shuffles and draws its stochastic-rounding noise from
``client_seed(seed, r, k)``; nothing else is random.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..batching import check_seed
from ..qparams import PerChannel, qparams_for, quant_range
from ..quantize import fake_quantize
from . import codec

__all__ = ["FedConfig", "client_seed", "float_state", "local_train", "client_update", "aggregate",
           "apply_update", "run_rounds"]


@dataclass
class FedConfig:
    """One federated run. ``bits=None`` sends fp32 updates."""

    rounds: int = 5
    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    bits: int | None = 8
    granularity: object = field(default_factory=lambda: PerChannel(0))
    rounding: str = "stochastic"
    error_feedback: bool = False
    qat_bits: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.bits is not None and self.bits not in codec.BITS:
            raise ValueError(f"bits must be None (fp32) or one of {codec.BITS}, got {self.bits!r}")
        if self.rounding not in codec.ROUNDINGS:
            raise ValueError(f"rounding must be one of {codec.ROUNDINGS}, got {self.rounding!r}")
        for name in ("rounds", "local_epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a number > 0, got {self.lr!r}")
        if self.qat_bits is not None and (isinstance(self.qat_bits, bool) or self.qat_bits not in range(2, 9)):
            raise ValueError(f"qat_bits must be None or an int in 2..8, got {self.qat_bits!r}")
        check_seed(self.seed)


def client_seed(seed: int, round_: int, client: int) -> int:
    """A distinct, reproducible seed for client ``client`` in round ``round_``."""
    return (check_seed(seed) * 1_000_003 + round_ * 1009 + client) % (2**31)


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float entries of the state dict (what travels), detached copies."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def _fq_weights(model: nn.Module, bits: int) -> dict[str, torch.Tensor]:
    """Conv/linear weights fake-quantized symmetric per output channel (STE gradient)."""
    qmin, qmax = quant_range(bits, signed=True)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            scale, zp = qparams_for(m.weight.detach(), bits, symmetric=True, granularity=PerChannel(0))
            out[f"{name}.weight"] = fake_quantize(m.weight, scale, zp, qmin, qmax, granularity=PerChannel(0))
    return out


def local_train(model: nn.Module, data, cfg: FedConfig, seed: int) -> nn.Module:
    """``cfg.local_epochs`` epochs of plain SGD (lr ``cfg.lr``) on ``data``, in place."""
    x, y = data.tensors if hasattr(data, "tensors") else data
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in range(cfg.local_epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two examples
                continue
            xb, yb = x[idx].to(device), y[idx].to(device)
            if cfg.qat_bits is None:
                logits = model(xb)
            else:
                logits = functional_call(model, _fq_weights(model, cfg.qat_bits), (xb,), strict=False)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def client_update(global_model: nn.Module, data, cfg: FedConfig, round_: int, client: int,
                  feedback: codec.ErrorFeedback | None = None) -> tuple[dict, int]:
    """Train a copy of the global model on ``data``; return ``(encoded update, n_k)``."""
    seed = client_seed(cfg.seed, round_, client)
    local = local_train(copy.deepcopy(global_model), data, cfg, seed)
    before, after = float_state(global_model), float_state(local)
    delta = {k: after[k] - before[k] for k in before}
    if cfg.bits is None:
        return codec.encode_update(delta, None), len(data)
    params = {k for k, _ in global_model.named_parameters()}
    buffers = {k: v for k, v in delta.items() if k not in params}
    delta = {k: v for k, v in delta.items() if k in params}
    if feedback is not None:
        delta = feedback.compensate(delta)
    device = next(global_model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    enc = codec.encode_update(delta, cfg.bits, cfg.granularity, cfg.rounding, gen)
    if feedback is not None:
        feedback.remember(delta, enc)
    enc.update(codec.encode_update(buffers, None))
    return enc, len(data)


def aggregate(updates: list[tuple[dict, int]]) -> dict[str, torch.Tensor]:
    """FedAvg: ``sum_k (n_k / n) decode(update_k)``, the sum taken in float64 then rounded once."""
    if not updates:
        raise ValueError("aggregate needs at least one (update, num_examples) pair")
    n = sum(nk for _, nk in updates)
    if n <= 0:
        raise ValueError("the clients hold no examples")
    out: dict[str, torch.Tensor] = {}
    for enc, nk in updates:
        for k, v in codec.decode_update(enc).items():
            out[k] = out.get(k, 0) + v.to(torch.float64) * (nk / n)
    return {k: v.to(torch.float32) for k, v in out.items()}


@torch.no_grad()
def apply_update(model: nn.Module, update: dict[str, torch.Tensor]) -> nn.Module:
    """``w <- w + update`` for the float entries of the state dict, in place."""
    state = model.state_dict()
    for k, v in update.items():
        state[k].add_(v.to(state[k].device, state[k].dtype))
    return model


def run_rounds(model: nn.Module, clients: list, cfg: FedConfig, evaluate=None) -> dict:
    """The in-process driver: ``cfg.rounds`` rounds of every client + FedAvg, model in place.

    ``evaluate(model) -> float`` is called after every round. Returns the history:
    ``acc`` per round and cumulative uplink ``bytes`` (exact, every client).
    """
    feedback = [codec.ErrorFeedback() if cfg.error_feedback else None for _ in clients]
    hist = {"acc": [], "bytes": []}
    total = 0
    for r in range(cfg.rounds):
        ups = [client_update(model, data, cfg, r, k, feedback[k]) for k, data in enumerate(clients)]
        total += sum(codec.update_bytes(u) for u, _ in ups)
        apply_update(model, aggregate(ups))
        hist["bytes"].append(total)
        if evaluate is not None:
            hist["acc"].append(evaluate(model))
    model.eval()
    return hist

