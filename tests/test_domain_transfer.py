"""qlib.domain.transfer: backbone/head split, few-shot subsets, frozen and quantized transfer.

Reference: the zoo's ``nn.Sequential`` layout (``qlib.models``), ``qlib.ptq`` for the
quantized parts, and the definitions of the module docstring.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from qlib import models
from qlib.domain import transfer as T
from qlib.modules import fake_quantizers
from qlib.train import evaluate


def test_split_head_recombines_to_the_model(digits8):
    model = models.pretrained("cnn8", 0)
    backbone, head = T.split_head(model)
    x = digits8.test.tensors[0][:16]
    with torch.no_grad():
        assert torch.equal(head(backbone(x)), model(x))
    assert backbone[0] is not model[0]  # copies
    with pytest.raises(TypeError, match="nn.Linear head"):
        T.split_head(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_few_shot_takes_k_per_class_seeded(digits8):
    fs = T.few_shot(digits8.train, 3, seed=1)
    assert torch.bincount(fs.tensors[1], minlength=10).tolist() == [3] * 10
    assert torch.equal(fs.tensors[0], T.few_shot(digits8.train, 3, seed=1).tensors[0])
    assert not torch.equal(fs.tensors[0], T.few_shot(digits8.train, 3, seed=2).tensors[0])
    with pytest.raises(ValueError, match="per_class"):
        T.few_shot(digits8.train, 0)


def test_frozen_backbone_new_head_and_quantized_parts(digits8):
    model = models.pretrained("cnn8", 0)
    calib = [digits8.train.tensors[0][:128]]
    qb = T.quantized_backbone(model, calib, 8)
    assert fake_quantizers(qb)
    before = {k: v.clone() for k, v in qb.state_dict().items()}
    net = T.train_head(qb, T.few_shot(digits8.train, 10), epochs=100, seed=0)
    for k, v in net[0].state_dict().items():
        assert torch.equal(v, before[k]), k               # the backbone is frozen
    assert not any(p.requires_grad for p in net[0].parameters())
    assert evaluate(net, digits8.test) > 85               # 100 labels are enough on its features
    qnet = T.quantize_head(net, calib, 8)
    assert fake_quantizers(qnet[1])
    assert abs(evaluate(qnet, digits8.test) - evaluate(net, digits8.test)) < 3


def test_features_shape(digits8):
    backbone, _ = T.split_head(models.pretrained("cnn8", 0))
    f, y = T.features(backbone, TensorDataset(*(t[:10] for t in digits8.test.tensors)))
    assert f.shape == (10, 64) and y.shape == (10,)


def test_qat_finetune_returns_a_quantized_model(digits8):
    tiny = TensorDataset(*(t[:64] for t in digits8.train.tensors))
    q = T.qat_finetune(models.pretrained("mlp", 0), tiny, None, bits=8, epochs=1)
    assert fake_quantizers(q) and all(fq.bits == 8 for fq in fake_quantizers(q).values())


def test_synthetic_calibration_uses_no_data():
    backbone, _ = T.split_head(models.pretrained("cnn8", 0))
    batches = T.synthetic_calibration(backbone, (1, 8, 8), num_samples=64, steps=2)
    assert len(batches) == 1 and batches[0].shape == (64, 1, 8, 8)
