"""Federated learning with quantized updates, on Flower.

Read in this order:

=============  ========================================================================
``codec``      quantize a client's update to 8/4/2 bits (per tensor or per channel,
               nearest or stochastic rounding, error feedback); exact uplink bytes
``partition``  split the data among clients: IID, or non-IID by a Dirichlet label draw
``fedavg``     the client's local training (plain or QAT) and FedAvg aggregation, as pure
               functions; an in-process driver that runs rounds without Flower
``flower``     the same client and aggregation inside Flower's simulation engine
               (``flwr[simulation]``, which brings Ray)
``server``     after training: PTQ of the global model, calibrated on BN-statistics
               synthetic data (the server has no data) or, for comparison, on real data
=============  ========================================================================
"""

from . import codec, partition  # noqa: F401
from .codec import (ErrorFeedback, EncodedTensor, decode, decode_update, encode, encode_update,  # noqa: F401
                    payload_bytes, update_bytes)
from .partition import client_datasets, dirichlet_partition, iid_partition, label_histogram  # noqa: F401
from .fedavg import FedConfig, aggregate, client_update, run_rounds  # noqa: F401
from .server import calibration_sets, quantize_global  # noqa: F401

__all__ = ["codec", "partition", "ErrorFeedback", "EncodedTensor", "decode", "decode_update", "encode",
           "encode_update", "payload_bytes", "update_bytes", "client_datasets", "dirichlet_partition",
           "iid_partition", "label_histogram", "FedConfig", "aggregate", "client_update", "run_rounds",
           "calibration_sets", "quantize_global"]
