"""Reproduce the shipped character-level transformers (lesson 16, lab 11).

    python -m qlib.weights.train_charlm                  # default recipe, seeds 0 1 2
    python -m qlib.weights.train_charlm 1                # one seed
    python -m qlib.weights.train_charlm --recipe long 0  # the long run where outliers emerge

The corpus is Python's own standard library (``qlib.llm.corpus``), read from this machine, so
the numbers depend a little on the Python version, which is recorded.

Recipe ``default`` (``charlm_s{seed}.pt``): AdamW (betas 0.9/0.95, weight decay 0.1 on
matrices), lr 3e-3 with a linear warm-up and a cosine decay to 10%, 400 steps of 32 windows of
128 bytes, gradient norm clipped at 1.

Recipe ``long`` (``charlm_long_s{seed}.pt``, shipped for the three seeds 0, 1 and 2, each run
on its own: 25 to 40 minutes a seed on one CPU thread, ``train_seconds`` in ``charlm.json``):
ten times the steps, *no* weight decay and Adam's usual betas 0.9/0.999, the conditions under
which outlier features grow (Dettmers et al. 2022: with training; Elhage et al. 2023: Adam's
per-coordinate steps give the residual stream a privileged basis; weight decay would pull the
large LayerNorm gains and weights back). Every
``log_every`` steps it measures, on 16 fixed held-out windows, ``qlib.llm.stats.snapshot``
(absmax, channel max/median and LLM.int8() columns at every linear input and in the
residual stream) and the held-out perplexity on 64 windows: the *emergence curve*, stored
in ``charlm.json`` under ``recipes.long`` beside the final numbers.

Weights are stored in float16 (half the bytes; the models compute in float32) and every
final perplexity in ``charlm.json`` is measured on the stored weights, on the held-out files.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch.nn import functional as F

from qlib.llm import corpus, evaluate, model as charlm, stats

SETTINGS = {"steps": 400, "batch_size": 32, "lr": 3e-3, "warmup": 20, "weight_decay": 0.1,
            "betas": [0.9, 0.95], "clip": 1.0, "storage": "float16"}
RECIPES = {
    "default": SETTINGS,
    "long": {**SETTINGS, "steps": 4000, "warmup": 100, "weight_decay": 0.0, "betas": [0.9, 0.999],
             "log_every": 250, "probe_windows": 16, "ppl_windows": 64},
}


def lr_at(step: int, s: dict = SETTINGS) -> float:
    """Linear warm-up over ``s["warmup"]`` steps, then a cosine from ``lr`` down to ``lr / 10``."""
    if step < s["warmup"]:
        return s["lr"] * (step + 1) / s["warmup"]
    frac = (step - s["warmup"]) / max(1, s["steps"] - s["warmup"])
    return s["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _point(model, step, seconds, losses, data, s) -> dict:
    """One point of the emergence curve (the model is put back in train mode by the helpers)."""
    probe = corpus.windows(data.val, model.cfg.context, limit=s["probe_windows"])[:, :-1]
    snap = stats.snapshot(model, probe)
    ppl = evaluate.perplexity(model, data.val, limit=s["ppl_windows"])
    return {"step": step, "seconds": round(seconds, 1), "val_ppl_64": round(ppl, 4),
            "train_loss": round(sum(losses) / len(losses), 4) if losses else None, **snap}


def _save(model, seed: int, recipe: str) -> dict:
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save(state, charlm.weights_path(seed, recipe))
    return state


def train_one(seed: int, data: corpus.Corpus, cfg: charlm.CharLMConfig, recipe: str = "default",
              record: dict | None = None, write=lambda: None, max_minutes: float | None = None) -> dict:
    """Train one seed with ``RECIPES[recipe]``; save float16 weights; return the measured record.

    For a recipe with ``log_every``, ``record["curve"]`` grows by one point every ``log_every``
    steps, and ``write()`` is called after each (so a stopped run keeps its curve and weights).
    ``max_minutes`` stops early (recorded as ``stopped_at``).
    """
    s = RECIPES[recipe]
    record = {} if record is None else record
    model = charlm.create(seed, cfg).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]},
                             {"params": other, "weight_decay": 0.0}],
                            lr=s["lr"], betas=tuple(s["betas"]))
    gen = torch.Generator().manual_seed(seed)
    every = s.get("log_every")
    curve = record.setdefault("curve", []) if every else None
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    for step in range(s["steps"]):
        if every and step % every == 0:
            curve.append(_point(model, step, time.perf_counter() - start, losses, data, s))
            losses = []
            _save(model, seed, recipe)
            write()
            c = curve[-1]["summary"]
            print(f"seed {seed} step {step:5d} ppl64 {curve[-1]['val_ppl_64']:.3f} "
                  + " ".join(f"{k} {c[k]['absmax']:.2f}/{c[k]['channel_ratio']:.1f}"
                             for k in ("ln1", "ln2", "gelu", "resid") if k in c)
                  + f" int8cols {c['int8_columns']}", flush=True)
        if max_minutes is not None and time.perf_counter() - start > 60 * max_minutes:
            record["stopped_at"] = step
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        x, y = corpus.random_batch(data.train, s["batch_size"], cfg.context, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["clip"])
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"seed {seed} step {step:4d} loss {loss.item():.3f}", flush=True)
    else:
        step = s["steps"]
    seconds = time.perf_counter() - start
    state = _save(model, seed, recipe)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    if every:
        curve.append(_point(model, step, seconds, losses, data, s))
    result = evaluate.evaluate(model.eval(), data.val)
    record.update(val_ppl=result["ppl"], val_acc=result["acc"], train_loss=loss.item(),
                  train_seconds=round(seconds, 1), steps_done=step)
    return record


def main(seeds: list[int], recipe: str = "default", max_minutes: float | None = None) -> None:
    torch.set_num_threads(1)
    cfg = charlm.CharLMConfig()
    data = corpus.load()
    path = charlm.charlm_info_path()
    info = json.loads(path.read_text()) if path.exists() else {"seeds": {}}
    about = dict(settings=RECIPES[recipe], config=charlm.config_dict(cfg), torch=torch.__version__,
                 python=data.python, threads=torch.get_num_threads())
    if recipe == "default":
        info.update(about, corpus={"train_files": list(corpus.TRAIN_FILES),
                                   "val_files": list(corpus.VAL_FILES),
                                   "train_bytes": data.train.numel(), "val_bytes": data.val.numel()})
        target = info
    else:
        target = info.setdefault("recipes", {}).setdefault(recipe, {"seeds": {}})
        target.update(about, recipe=recipe)
    write = lambda: path.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")  # noqa: E731
    for seed in seeds:
        record = target["seeds"][str(seed)] = {}
        train_one(seed, data, cfg, recipe, record, write, max_minutes)
        print(f"seed {seed}: held-out ppl {record['val_ppl']:.3f}  next-byte acc "
              f"{record['val_acc']:.1f}%  ({record['train_seconds']} s)", flush=True)
        write()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("seeds", nargs="*", type=int)
    parser.add_argument("--recipe", choices=list(RECIPES), default="default")
    parser.add_argument("--max-minutes", type=float, default=None)
    args = parser.parse_args()
    main(args.seeds or list(charlm.SEEDS), args.recipe, args.max_minutes)
