"""Reproduce the shipped weights: every zoo model, three seeds, on the digits.

    python -m qlib.weights.train_zoo            # all models, seeds 0 1 2 (a few minutes)
    python -m qlib.weights.train_zoo cnn16      # one model
    python -m qlib.weights.train_zoo dsc16      # the depthwise-separable model (about 2 minutes)

Settings: AdamW, one-cycle lr 3e-3, weight decay 1e-4, batch 64, 40 epochs.
Writes ``<name>_digits_s<seed>.pt`` (float32 state dict) and ``zoo.json`` with the test
accuracy each model reached, which ``tests/test_models.py`` checks against the shipped files.

Every model, ``dsc16`` included, uses the same recipe. For ``dsc16`` MobileNet's recipe
choices were tried too (seed 0): no weight decay on depthwise weights and BN (AdamW), and
SGD with Nesterov momentum 0.9, one-cycle lr 0.2, weight decay 4e-5 on the plain conv and
linear weights only. Neither made the folded depthwise ranges spread more than about 3x
(largest / median channel; 6x largest / smallest), too little for 8-bit per-tensor weights
to fail on the digits; at 4 bits they do (``benchmarks/ptq.py``).
"""

from __future__ import annotations

import json
import platform
import sys
import time

import torch

from qlib import data, models, train

SETTINGS = {"epochs": 40, "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 64, "dataset": "digits"}


def train_one(name: str, seed: int) -> dict:
    splits = data.load_digits(models.image_size(name))
    model = models.create(name, seed=seed)
    start = time.perf_counter()
    train.train(model, splits.train, splits.val, epochs=SETTINGS["epochs"], lr=SETTINGS["lr"],
                weight_decay=SETTINGS["weight_decay"], batch_size=SETTINGS["batch_size"],
                seed=seed, progress=False)
    seconds = time.perf_counter() - start
    torch.save(model.state_dict(), models.weights_path(name, seed))
    return {"val_acc": train.evaluate(model, splits.val),
            "test_acc": train.evaluate(model, splits.test),
            "train_seconds": round(seconds, 1)}


def main(names: list[str]) -> None:
    path = models.WEIGHTS_DIR / "zoo.json"
    info = json.loads(path.read_text()) if path.exists() else {"models": {}}
    info.update(settings=SETTINGS, torch=torch.__version__, python=platform.python_version(),
                threads=torch.get_num_threads())
    for name in names:
        info["models"][name] = {}
        for seed in models.SEEDS:
            info["models"][name][str(seed)] = result = train_one(name, seed)
            print(f"{name:6s} seed {seed}: test {result['test_acc']:.1f}%  "
                  f"val {result['val_acc']:.1f}%  ({result['train_seconds']} s)")
    path.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:] or list(models.ALL_MODELS))
