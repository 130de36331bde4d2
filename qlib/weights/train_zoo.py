"""Reproduce the shipped weights: every zoo model, three seeds, on the digits.

    python -m qlib.weights.train_zoo            # all models, seeds 0 1 2 (a few minutes)
    python -m qlib.weights.train_zoo cnn16      # one model
    python -m qlib.weights.train_zoo dsc16      # the depthwise-separable model (about 4 minutes)

Writes ``<name>_digits_s<seed>.pt`` (float32 state dict) and ``zoo.json`` with the test
accuracy each model reached and the recipe that trained it, which ``tests/test_models.py``
checks against the shipped files.

Two recipes (``RECIPES``):

- ``"adamw"`` (every plain model): AdamW, one-cycle lr 3e-3, weight decay 1e-4 on every
  parameter, batch 64, 40 epochs (``qlib.train.train``).
- ``"mobilenet"`` (``dsc16``): MobileNetV2's recipe (Sandler et al. 2018): RMSprop (decay
  0.9, momentum 0.9; PyTorch's eps 0.02, added outside the square root), lr 0.045 per 96 images (0.03 at batch 64) from the first step (no
  warm-up), times 0.98 every epoch; weight decay 4e-5 on the plain conv and linear weights
  only: none on the depthwise weights, the BN parameters or biases. Batch 64, 40 epochs.

Why ``dsc16`` has its own recipe: it is the zoo's model where post-training quantization
hurts, as it hurt MobileNetV2 (Nagel et al. 2019, DFQ, section 3 and fig. 2: per-tensor
8-bit weights at 0.1% top-1). The mechanism: large steps held for many epochs kill some
ReLU6 channels. Somewhere in training (seed 0: one channel at epoch 5, the others by epoch
11) an update drives a pointwise layer's BN shift so far below 0 (beta -1.2 to -2.0 against
|gamma| 0.03 to 0.4) that its ReLU6 outputs 0 on every image; the channel then gets no
gradient and never comes back. The depthwise layer after a dead channel sees only zeros,
so its BN running variance decays to ~0 (1e-25 in the shipped seed 0), and batch-norm folding
``w_fold[c] = gamma_c * w[c] / sqrt(var_c + eps)`` multiplies that channel by about
``gamma_c / sqrt(eps)``, hundreds of times more than a live channel. Nothing pulls it back:
a dead channel's ``w[c]`` and ``gamma_c`` get no gradient, and the recipe does not decay
them. In float the channel multiplies zeros and does no harm; one per-tensor scale sized
for it rounds most live channels of that layer to all-zero codes (and the model to chance).
Per-channel scales give each channel its own and keep the float accuracy.

The tries on ``dsc16`` (digits test accuracy, %; "dead": depthwise input channels that are
0 on every training image, per depthwise layer; "spread": largest / median folded depthwise
channel range max|w|, worst layer; PTQ: min-max, static, W8A8 and W4A8 with per-tensor /
per-channel weights; all 40 epochs, batch 64, one thread, seed 0 unless said):

- AdamW, one-cycle lr 3e-3, wd 1e-4 on everything (the plain models' recipe, shipped
  before): fp32 98.6; dead 0 0 0 0; spread 3.3; W8A8 98.6 / 98.6; W4A8 84.2 / 97.2.
- AdamW without decay on depthwise weights and BN; SGD Nesterov, one-cycle lr 0.2, wd 4e-5
  on plain weights only: spread about 3 (6 largest / smallest), no collapse at 8 bits.
- SGD Nesterov, cosine lr 0.5 (*): fp32 99.4; dead 0 0 0 0; spread 2.8;
  W8A8 99.4 / 99.4; W4A8 98.6 / 98.1.
- Adam, constant lr 1e-2 (*): fp32 98.9; dead 0 0 0 0; spread 3.1; W8A8 98.9 / 98.9;
  W4A8 95.8 / 98.3.
- RMSprop, constant lr 0.03 (*): fp32 99.2; dead 0 5 1 2; spread 1453; W8A8 10.6 / 99.2;
  W4A8 10.6 / 99.2.
- SGD Nesterov, constant lr 2.0 (*): fp32 98.9; dead 7 1 8 7; spread 34626; W8A8 10.0 / 98.9;
  W4A8 10.0 / 88.3 (so many dead channels that even per-channel 4-bit weights suffer).
- Adam, cosine lr 3e-2 (*): fp32 99.7; dead 0 0 3 4; spread 486; W8A8 10.8 / 99.7;
  W4A8 9.4 / 99.2.
- ``"mobilenet"`` (shipped): RMSprop lr 0.03 x 0.98 per epoch (*).
  Seed 0: fp32 99.4; dead 0 0 1 2; spread 395; W8A8 10.6 / 99.4; W4A8 10.6 / 98.1.
  Seed 1: fp32 99.4; dead 1 1 0 2; spread 1164; W8A8 11.7 / 99.4; W4A8 11.7 / 99.4.
  Seed 2: fp32 99.2; dead 2 0 0 3; spread 691; W8A8 10.6 / 99.2; W4A8 10.3 / 98.9.
  ``benchmarks/ptq_depthwise.py`` on these weights, per-tensor W8A8, plain / bias
  correction / CLE / CLE + bias correction: seed 0 10.6 / 16.7 / 99.2 / 99.2, seed 1
  11.7 / 11.7 / 99.4 / 99.4, seed 2 10.6 / 10.6 / 98.9 / 98.9 (DFQ's recovery in miniature).

(*) no warm-up; weight decay 4e-5 on the plain conv and linear weights only. In these tries
only large steps killed channels: RMSprop at 0.03 (its normalized steps are all about lr in
size), Adam at 3e-2, SGD at 2.0; AdamW one-cycle 3e-3, Adam 1e-2 and SGD 0.5 killed none.
MobileNetV2's recipe kills a few on every seed and leaves per-channel scales intact; SGD at
lr 2 kills so many that per-channel 4-bit weights lose ten points too.
"""

from __future__ import annotations

import json
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from qlib import data, models, train

SETTINGS = {"epochs": 40, "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 64, "dataset": "digits"}
"""The ``"adamw"`` recipe (the settings every plain model was trained with)."""

MOBILENET = {"optimizer": "RMSprop", "alpha": 0.9, "momentum": 0.9, "eps": 0.02, "lr": 0.03,
             "lr_decay_per_epoch": 0.98, "weight_decay": 4e-5,
             "weight_decay_on": "plain conv and linear weights (not depthwise, BN or biases)",
             "epochs": 40, "batch_size": 64, "dataset": "digits"}
"""The ``"mobilenet"`` recipe (MobileNetV2's, scaled to batch 64): see the module docstring."""

RECIPES = {"adamw": SETTINGS, "mobilenet": MOBILENET}
MODEL_RECIPE = {"dsc16": "mobilenet"}
"""Models that do not use ``"adamw"``."""


def mobilenet_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: plain conv/linear weights decayed by ``weight_decay``; depthwise
    weights (``groups > 1``), BatchNorm weights and biases, and every bias not decayed."""
    decay, no_decay = [], []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            depthwise = isinstance(m, nn.Conv2d) and m.groups > 1
            (no_decay if depthwise else decay).append(m.weight)
            if m.bias is not None:
                no_decay.append(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            no_decay += [m.weight, m.bias]
    if len(decay) + len(no_decay) != len(list(model.parameters())):
        raise ValueError("mobilenet_param_groups expects conv, linear and BatchNorm parameters only")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_mobilenet(model: nn.Module, train_data, seed: int, r: dict = MOBILENET) -> None:
    """Train ``model`` in place with the ``"mobilenet"`` recipe ``r``; ends in eval mode."""
    loader = train.as_loader(train_data, r["batch_size"], shuffle=True, seed=seed)
    opt = torch.optim.RMSprop(mobilenet_param_groups(model, r["weight_decay"]), lr=r["lr"],
                              alpha=r["alpha"], momentum=r["momentum"], eps=r["eps"])
    per_epoch = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: r["lr_decay_per_epoch"] ** (step // per_epoch))
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)  # noqa: E731
    for epoch in range(r["epochs"]):
        model.train()
        train.train_epoch(model, loader, opt, sched, loss_fn, start_step=epoch * per_epoch)
    model.eval()


def train_one(name: str, seed: int) -> dict:
    splits = data.load_digits(models.image_size(name))
    model = models.create(name, seed=seed)
    recipe = MODEL_RECIPE.get(name, "adamw")
    start = time.perf_counter()
    if recipe == "mobilenet":
        train_mobilenet(model, splits.train, seed)
    else:
        train.train(model, splits.train, splits.val, epochs=SETTINGS["epochs"], lr=SETTINGS["lr"],
                    weight_decay=SETTINGS["weight_decay"], batch_size=SETTINGS["batch_size"],
                    seed=seed, progress=False)
    seconds = time.perf_counter() - start
    torch.save(model.state_dict(), models.weights_path(name, seed))
    return {"val_acc": train.evaluate(model, splits.val),
            "test_acc": train.evaluate(model, splits.test),
            "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
            "recipe": {"name": recipe, **RECIPES[recipe]}}


def main(names: list[str]) -> None:
    path = models.WEIGHTS_DIR / "zoo.json"
    info = json.loads(path.read_text()) if path.exists() else {"models": {}}
    info["settings"] = SETTINGS  # the "adamw" recipe; each model's entries name their own
    if set(names) == set(models.ALL_MODELS):  # the environment of a full retrain
        info.update(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads())
    for name in names:
        info["models"][name] = {}
        for seed in models.SEEDS:
            info["models"][name][str(seed)] = result = train_one(name, seed)
            print(f"{name:6s} seed {seed}: test {result['test_acc']:.1f}%  "
                  f"val {result['val_acc']:.1f}%  ({result['train_seconds']} s, {result['recipe']['name']})")
    path.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:] or list(models.ALL_MODELS))
