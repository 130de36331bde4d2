"""Reproduce the shipped character-level transformer (lesson 16, lab 11): three seeds.

    python -m qlib.weights.train_charlm            # seeds 0 1 2 (a few minutes each, 1 thread)
    python -m qlib.weights.train_charlm 1          # one seed

The corpus is Python's own standard library (``qlib.llm.corpus``), read from this machine, so
the numbers depend a little on the Python version, which is recorded. Settings: AdamW
(betas 0.9/0.95, weight decay 0.1 on matrices), lr 3e-3 with a linear warm-up and a cosine
decay to 10%, batch 32 windows of 128 bytes, gradient norm clipped at 1. Weights are stored
in float16 (half the bytes; the models compute in float32) and every perplexity in
``charlm.json`` is measured on the stored weights, on the held-out files.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
from torch.nn import functional as F

from qlib.llm import corpus, evaluate, model as charlm

SETTINGS = {"steps": 400, "batch_size": 32, "lr": 3e-3, "warmup": 20, "weight_decay": 0.1,
            "betas": [0.9, 0.95], "clip": 1.0, "storage": "float16"}


def lr_at(step: int) -> float:
    s = SETTINGS
    if step < s["warmup"]:
        return s["lr"] * (step + 1) / s["warmup"]
    frac = (step - s["warmup"]) / max(1, s["steps"] - s["warmup"])
    return s["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_one(seed: int, data: corpus.Corpus, cfg: charlm.CharLMConfig) -> dict:
    model = charlm.create(seed, cfg).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": SETTINGS["weight_decay"]},
                             {"params": other, "weight_decay": 0.0}],
                            lr=SETTINGS["lr"], betas=tuple(SETTINGS["betas"]))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(SETTINGS["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = corpus.random_batch(data.train, SETTINGS["batch_size"], cfg.context, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), SETTINGS["clip"])
        opt.step()
        if step % 100 == 0:
            print(f"seed {seed} step {step:4d} loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - start
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save(state, charlm.weights_path(seed))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    result = evaluate.evaluate(model.eval(), data.val)
    return {"val_ppl": result["ppl"], "val_acc": result["acc"], "train_loss": loss.item(),
            "train_seconds": round(seconds, 1)}


def main(seeds: list[int]) -> None:
    torch.set_num_threads(1)
    cfg = charlm.CharLMConfig()
    data = corpus.load()
    path = charlm.charlm_info_path()
    info = json.loads(path.read_text()) if path.exists() else {"seeds": {}}
    info.update(settings=SETTINGS, config=charlm.config_dict(cfg), torch=torch.__version__,
                python=data.python, threads=torch.get_num_threads(),
                corpus={"train_files": list(corpus.TRAIN_FILES), "val_files": list(corpus.VAL_FILES),
                        "train_bytes": data.train.numel(), "val_bytes": data.val.numel()})
    for seed in seeds:
        info["seeds"][str(seed)] = r = train_one(seed, data, cfg)
        print(f"seed {seed}: held-out ppl {r['val_ppl']:.3f}  next-byte acc {r['val_acc']:.1f}%  "
              f"({r['train_seconds']} s)", flush=True)
        path.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or list(charlm.SEEDS))
