"""The quantized-update FedAvg of :mod:`.fedavg`, run by Flower's simulation engine.

Flower (``flwr``) runs the same ``ClientApp`` / ``ServerApp`` on real phones and boards that
it runs here in simulation (on Ray, one actor per client slot), so what you write for the
course carries over. The pieces:

- ``QuantizedUpdateClient`` (a ``flwr.client.NumPyClient``): receives the global float state
  as numpy arrays, trains locally (:func:`.fedavg.client_update`) and sends the *wire
  payload*: for each quantized tensor its packed codes (uint8, ``8 // bits`` per byte) and its
  float32 scales; fp32 tensors as they are. The bytes Flower carries are these arrays' bytes
  (plus Flower's own framing, not counted).
- ``QuantizedFedAvg`` (a ``flwr.server.strategy.FedAvg``): unpacks and decodes, averages with
  :func:`.fedavg.aggregate` (clients sorted by id, so that the order of arrival does not
  change the last bit), applies the update to the server's model and records accuracy and
  exact uplink bytes per round.
- ``simulate(model, clients, cfg)``: builds both apps and calls ``flwr.simulation.run_simulation``.

Given the same seeds it produces exactly the global model of :func:`.fedavg.run_rounds` (a
test checks it). Error feedback needs per-client memory between rounds, which the in-process
driver keeps; ``simulate`` refuses it rather than silently dropping it.

Cost: almost all of it is starting Ray. A 2-client, 2-round run of the digits MLP took
26-54 s of wall time on a shared 2-core machine (load 3 to 8; the rounds themselves take
0.1 s in process), and under heavy load Ray's node can time out starting
(``RuntimeError``); ``benchmarks/federated.py`` records the time of its run.
"""

from __future__ import annotations

import copy
import logging
import os

import numpy as np
import torch
from torch import nn

from . import codec
from ..qparams import PerChannel
from .fedavg import FedConfig, aggregate, apply_update, client_update, float_state

__all__ = ["available", "to_wire", "from_wire", "simulate"]


def available() -> bool:
    """True when ``flwr[simulation]`` is installed (``pip install 'qlib[federated]'``)."""
    try:
        import flwr.simulation  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def to_wire(encoded: dict, keys: list[str]) -> list[np.ndarray]:
    """Numpy arrays that travel: per key, ``[packed codes, scales]`` or ``[fp32 values]``."""
    out = []
    for k in keys:
        v = encoded[k]
        if isinstance(v, codec.EncodedTensor):
            out += [codec.pack_codes(v.codes, v.bits).cpu().numpy(), v.scale.to(torch.float32).reshape(-1).cpu().numpy()]
        else:
            out.append(v.to(torch.float32).cpu().numpy())
    return out


def from_wire(arrays: list[np.ndarray], template: dict[str, torch.Tensor], bits: int | None,
              quantized: set[str], granularity=PerChannel(0)) -> dict:
    """Inverse of :func:`to_wire`, given the shapes (``template``), which keys are quantized
    and the granularity (per channel applies to tensors of 2 or more dims, as in ``encode_update``)."""
    out, i = {}, 0
    for k, t in template.items():
        if k in quantized and bits is not None:
            codes = codec.unpack_codes(torch.from_numpy(arrays[i]), bits, t.shape)
            scale = torch.from_numpy(arrays[i + 1]).clone()
            per_channel = isinstance(granularity, PerChannel) and t.dim() >= 2
            out[k] = codec.EncodedTensor(codes, scale if per_channel else scale.reshape(()), bits, per_channel)
            i += 2
        else:
            out[k] = torch.from_numpy(arrays[i]).clone()
            i += 1
    return out


def _state_arrays(model: nn.Module, keys: list[str]) -> list[np.ndarray]:
    state = model.state_dict()
    return [state[k].detach().cpu().numpy().copy() for k in keys]


def _load_arrays(model: nn.Module, keys: list[str], arrays) -> None:
    state = model.state_dict()
    with torch.no_grad():
        for k, a in zip(keys, arrays):
            state[k].copy_(torch.from_numpy(np.asarray(a)))


def simulate(model: nn.Module, clients: list, cfg: FedConfig, evaluate=None,
             num_cpus: int = 1, verbose: bool = False) -> dict:
    """Run ``cfg.rounds`` rounds of quantized FedAvg on Flower's simulation engine.

    ``clients``: one ``TensorDataset`` per client (client ``k`` is Flower's partition ``k``).
    ``model`` is the global model, updated in place. Returns the history as
    :func:`.fedavg.run_rounds` does (``acc``, cumulative ``bytes``), plus ``wall_s``.
    """
    if not available():
        raise ImportError("Flower's simulation engine is not installed: pip install 'flwr[simulation]>=1.42' "
                          "(or qlib[federated]); qlib.federated.fedavg.run_rounds runs without it")
    if not isinstance(cfg, FedConfig):
        raise TypeError(f"cfg must be a FedConfig, got {type(cfg).__name__}")
    if cfg.error_feedback:
        raise ValueError("error feedback keeps per-client memory between rounds: use fedavg.run_rounds for it")
    if not clients:
        raise ValueError("give at least one client data set")
    import time

    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    template = float_state(model)
    keys = list(template)
    params = {k for k, _ in model.named_parameters()}
    cpu_model = copy.deepcopy(model).cpu()

    class QuantizedUpdateClient(NumPyClient):
        def __init__(self, k: int):
            self.k = k

        def fit(self, parameters, config):
            torch.set_num_threads(1)
            local = copy.deepcopy(cpu_model)
            _load_arrays(local, keys, parameters)
            enc, n = client_update(local, clients[self.k], cfg, int(config["round"]), self.k)
            return to_wire(enc, keys), n, {"client": self.k, "bytes": codec.update_bytes(enc)}

    def client_fn(context: Context):
        return QuantizedUpdateClient(int(context.node_config["partition-id"])).to_client()

    history = {"acc": [], "bytes": []}

    class QuantizedFedAvg(FedAvg):
        """FedAvg whose clients send quantized updates (decoded and averaged here)."""

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"{len(failures)} Flower clients failed: {failures[:1]}")
            ups, sent = [], 0
            for _, res in sorted(results, key=lambda r: int(r[1].metrics["client"])):
                arrays = parameters_to_ndarrays(res.parameters)
                sent += sum(a.nbytes for a in arrays)
                ups.append((from_wire(arrays, template, cfg.bits, params, cfg.granularity), res.num_examples))
            apply_update(model, aggregate(ups))
            history["bytes"].append((history["bytes"][-1] if history["bytes"] else 0) + sent)
            if evaluate is not None:
                history["acc"].append(evaluate(model))
            return ndarrays_to_parameters(_state_arrays(model, keys)), {}

    def server_fn(context: Context):
        strategy = QuantizedFedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(clients),
            min_available_clients=len(clients), min_evaluate_clients=0,
            initial_parameters=ndarrays_to_parameters(_state_arrays(model, keys)),
            on_fit_config_fn=lambda r: {"round": r - 1})
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg.rounds))

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": num_cpus, "include_dashboard": False,
                             }}  # actors inherit OMP_NUM_THREADS; fit() also sets one torch thread
    level = logging.getLogger("flwr").level
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    t = time.perf_counter()
    try:
        run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                       num_supernodes=len(clients), backend_config=backend, verbose_logging=verbose)
    finally:
        logging.getLogger("flwr").setLevel(level)
    history["wall_s"] = time.perf_counter() - t
    if len(history["bytes"]) != cfg.rounds:
        raise RuntimeError(f"the Flower simulation ran {len(history['bytes'])} of {cfg.rounds} rounds")
    model.eval()
    return history
