"""A small decoder-only transformer (a character-level GPT) that a laptop trains in minutes.

The idea: predict the next byte of text from the bytes before it. Every block is *pre-LayerNorm*::

    x = x + attn(ln1(x))          # causal self-attention, 4 heads
    x = x + mlp(ln2(x))           # fc1 (d -> 4d), GELU, fc2 (4d -> d)

and the logits are ``head(ln_f(x))``. Shapes: tokens ``(batch, T)`` int64 with ``T <= context``;
hidden states ``(batch, T, width)``; logits ``(batch, T, vocab)`` float32.

Every projection is a plain ``nn.Linear`` (``q``, ``k``, ``v``, ``proj`` in attention, ``fc1``,
``fc2`` in the MLP), so the quantizers of ``qlib.llm`` can read their inputs with hooks and
replace their weights. Attention is written out (scores, causal mask, softmax) so a student
can read where the softmax and the KV cache live. The token embedding, the position embedding
and the output ``head`` stay in float in every method of this course, as in the GPTQ and AWQ
papers (they are a small part of a large model).

``pretrained(seed)`` loads the weights that ``qlib/weights/train_charlm.py`` trained on the
Python standard library (``qlib.llm.corpus``); ``charlm_info()`` lists their held-out perplexity.
``pretrained(seed, recipe="long")`` loads the model of that seed trained ten times longer without
weight decay (``train_charlm.py --recipe long``; three seeds, 0, 1 and 2, like the default
recipe), the ones lesson 16 and ``benchmarks/llm_outliers.py`` use to watch outliers emerge.
``generate`` writes text from a prompt, greedily or with a seeded temperature sampler.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..batching import check_seed, model_device
from . import corpus

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
SEEDS = (0, 1, 2)
RECIPES = ("default", "long")


@dataclass(frozen=True)
class CharLMConfig:
    """Sizes of the model: ``vocab`` bytes, ``width`` channels, ``layers`` blocks, ``heads``."""
    vocab: int = corpus.VOCAB_SIZE
    width: int = 128
    layers: int = 4
    heads: int = 4
    context: int = 128


class CausalSelfAttention(nn.Module):
    """``softmax(q k^T / sqrt(d_head) + causal mask) v``, heads concatenated, then ``proj``."""

    def __init__(self, width: int, heads: int, context: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.proj = nn.Linear(width, width)
        mask = torch.ones(context, context, dtype=torch.bool).tril()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))       # (b, heads, t, dh)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)       # (b, heads, t, t)
        scores = scores.masked_fill(~self.mask[:t, :t], float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: attention then GELU MLP, each with a residual."""

    def __init__(self, cfg: CharLMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg.width, cfg.heads, cfg.context)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.fc1 = nn.Linear(cfg.width, 4 * cfg.width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class CharLM(nn.Module):
    """Decoder-only transformer over bytes: ``(batch, T)`` int64 -> ``(batch, T, vocab)`` logits."""

    def __init__(self, cfg: CharLMConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or CharLMConfig()
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype != torch.long or tokens.dim() != 2:
            raise TypeError(f"tokens must be a (batch, T) int64 tensor, got {tuple(tokens.shape)} "
                            f"{tokens.dtype}")
        t = tokens.shape[1]
        if not 0 < t <= self.cfg.context:
            raise ValueError(f"sequence length must be in 1..{self.cfg.context}, got {t}")
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def create(seed: int = 0, cfg: CharLMConfig | None = None) -> CharLM:
    """A freshly initialised ``CharLM`` (GPT-2 style init, std 0.02), seeded by ``seed``."""
    gen = torch.Generator().manual_seed(check_seed(seed))
    model = CharLM(cfg)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.data.normal_(0.0, 0.02, generator=gen)
        elif name.endswith("bias"):
            p.data.zero_()
    return model


def _check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    return recipe


def weights_path(seed: int, recipe: str = "default") -> Path:
    """``charlm_s{seed}.pt`` (default recipe) or ``charlm_{recipe}_s{seed}.pt``."""
    tag = "" if _check_recipe(recipe) == "default" else f"{recipe}_"
    return WEIGHTS_DIR / f"charlm_{tag}s{seed}.pt"


def pretrained(seed: int = 0, recipe: str = "default") -> CharLM:
    """The shipped model of ``seed`` (0, 1 or 2) in eval mode, float32, on the CPU.

    ``recipe="long"``: the long-trained model of ``seed`` (``charlm.json["recipes"]["long"]``).
    """
    if seed not in SEEDS:
        raise ValueError(f"seed must be one of {SEEDS}, got {seed!r}")
    path = weights_path(seed, recipe)
    if not path.exists():
        flag = "" if recipe == "default" else f" --recipe {recipe}"
        raise FileNotFoundError(f"{path} is missing: run python -m qlib.weights.train_charlm{flag} {seed}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    info = json.loads(charlm_info_path().read_text())
    if recipe != "default":
        info = info["recipes"][recipe]
    cfg = CharLMConfig(**info["config"])
    model = CharLM(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def charlm_info_path() -> Path:
    return WEIGHTS_DIR / "charlm.json"


def charlm_info() -> dict:
    """What ``train_charlm.py`` recorded: settings, Python version, perplexity of every seed."""
    return json.loads(charlm_info_path().read_text())


def config_dict(cfg: CharLMConfig) -> dict:
    return asdict(cfg)


@torch.no_grad()
def generate(model: CharLM, prompt: str, n: int = 80, temperature: float = 0.0,
             seed: int = 0) -> str:
    """Continue ``prompt`` by ``n`` bytes: greedy for ``temperature=0``, else sampled.

    Sampling draws from ``softmax(logits / temperature)`` with a ``torch.Generator`` seeded
    by ``seed``, so the same call writes the same text. The window is the last ``context``
    bytes (no KV cache: every step recomputes attention over the window).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    device = model_device(model)
    tokens = corpus.encode(prompt or "\n").to(device)[None]
    gen = torch.Generator(device=device).manual_seed(check_seed(seed))
    was_training = model.training
    model.eval()
    for _ in range(n):
        logits = model(tokens[:, -model.cfg.context:])[0, -1].float()
        if temperature == 0:
            nxt = logits.argmax()[None]
        else:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen)
        tokens = torch.cat([tokens, nxt[None]], dim=1)
    model.train(was_training)
    return corpus.decode(tokens[0, -n:] if n else tokens[0, :0])
