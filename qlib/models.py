"""A small model zoo, with pretrained weights for the digits that ship inside qlib.

| name    | what                                                        | input      | params |
|---------|-------------------------------------------------------------|------------|--------|
| `mlp`   | 64-128-128-10, BatchNorm1d + ReLU                            | 1 x 8 x 8  | ~26k   |
| `cnn8`  | conv 1-16-32-64 (3x3, BatchNorm, ReLU), max-pool, global avg | 1 x 8 x 8  | ~24k   |
| `cnn16` | the same CNN on digits upsampled to 16 x 16                  | 1 x 16 x 16| ~24k   |
| `res16` | stem + 3 basic residual blocks (16/32/64 channels)           | 1 x 16 x 16| ~78k   |
| `dsc16` | MobileNet-style: stem + 4 depthwise-separable blocks, ReLU6  | 1 x 16 x 16| ~58k   |

Every conv or linear layer (except the head) is followed by a BatchNorm, so batch-norm
folding, BN-statistics synthetic data and bias correction all have something to work on.
``dsc16`` is the model where quantization hurts (``make_dsc``): like MobileNet (Howard et al.
2017; Sandler et al. 2018) each block is a depthwise 3x3 convolution (``groups = channels``: one
3x3 filter per channel) and a pointwise 1x1 convolution, each followed by BatchNorm and ReLU6.
Its shipped weights come from MobileNetV2's recipe (``qlib/weights/train_zoo.py``,
``"mobilenet"``: RMSprop at lr 0.03, no weight decay on depthwise weights or BN), whose large
steps kill a few ReLU6 channels on every seed (a pointwise BN shift driven far below zero:
the channel outputs 0 on every image). The depthwise filter after a dead channel sees only
zeros, so its BN running variance decays to ~0, and BN folding (``w * gamma / sqrt(var + eps)``)
multiplies that filter hundreds of times: the folded depthwise ranges spread 400-1200x, one
per-tensor scale sized for the dead channel rounds most live channels to zero, and per-tensor
W8A8 falls to chance while per-channel scales keep fp32 (as in Nagel et al. 2019, DFQ, for
MobileNetV2; ``benchmarks/ptq_depthwise.py`` measures it). Integer-only inference runs it too (grouped
``IntConv2d``, ReLU6 fused into the requantization: ``qlib.accumulator``). It lives in
``DEPTHWISE_ZOO``, not in ``ZOO``, because cross-layer equalization does not take it as it
stands: ReLU6 is not positive homogeneous, so ``qlib.datafree.cross_layer_equalize`` refuses it
unless asked to replace ReLU6 by ReLU first (``replace_relu6=True``, as DFQ does; it then pairs
the depthwise layers too). ``ZOO`` holds the plain-convolution models that every qlib path
takes as they are; ``ALL_MODELS`` holds both, and every function here accepts any of them.

The models are plain ``nn.Sequential`` chains (``res16`` holds ``BasicBlock`` modules), which
keeps module swapping and integer conversion readable.

``pretrained(name, seed=0)`` loads weights trained by ``qlib/weights/train_zoo.py`` (three
seeds per model; ``zoo_info()`` lists the accuracy each reached).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .batching import check_seed

WEIGHTS_DIR = Path(__file__).parent / "weights"
SEEDS = (0, 1, 2)


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    """3x3 convolution (no bias: the BatchNorm has one), BatchNorm, ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU()]


def make_mlp(num_classes: int = 10, in_features: int = 64, hidden: int = 128) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def make_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    return nn.Sequential(
        *conv_bn_relu(in_channels, 16),
        *conv_bn_relu(16, 32), nn.MaxPool2d(2),
        *conv_bn_relu(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, num_classes),
    )


class BasicBlock(nn.Module):
    """Residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


def make_res16(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    return nn.Sequential(
        *conv_bn_relu(in_channels, 16),
        BasicBlock(16, 16), BasicBlock(16, 32, stride=2), BasicBlock(32, 64, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def depthwise_separable(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    """MobileNet's block: depthwise 3x3 (``groups=c_in``), BN, ReLU6; pointwise 1x1, BN, ReLU6.

    Shapes: ``(N, c_in, H, W) -> (N, c_out, H / stride, W / stride)``. Weights: depthwise
    ``(c_in, 1, 3, 3)`` (9 numbers per channel), pointwise ``(c_out, c_in, 1, 1)``.
    """
    return [nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
            nn.BatchNorm2d(c_in), nn.ReLU6(),
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6()]


def make_dsc(num_classes: int = 10, in_channels: int = 1, widths=(32, 64, 128, 128, 192)) -> nn.Sequential:
    """``dsc16``: 3x3 stem conv (BN, ReLU6), then one depthwise-separable block per step of
    ``widths`` (stride 2 into the 3rd and 5th width: 16x16 -> 8x8 -> 4x4), global average
    pool, linear head. About 58k parameters, 88% of them in the pointwise layers."""
    layers = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU6()]
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += depthwise_separable(c_in, c_out, stride=2 if i in (1, 3) else 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))


ZOO = {
    "mlp": (make_mlp, 8),
    "cnn8": (make_cnn, 8),
    "cnn16": (make_cnn, 16),
    "res16": (make_res16, 16),
}
"""name -> (builder, image size of its input): plain convolutions and ReLU, supported by
every qlib path (integer-only inference, cross-layer equalization, bias correction)."""

DEPTHWISE_ZOO = {
    "dsc16": (make_dsc, 16),
}
"""Depthwise-separable models (grouped convolutions, ReLU6): the zoo's hard case for PTQ.
Integer-only inference supports them; cross-layer equalization only after ReLU6 -> ReLU."""

ALL_MODELS = {**ZOO, **DEPTHWISE_ZOO}
"""Every model ``create``/``pretrained`` can build."""


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name must be a model name (str), one of {', '.join(ALL_MODELS)}; "
                        f"got {type(name).__name__}")
    if name not in ALL_MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(ALL_MODELS)}")


def image_size(name: str) -> int:
    """The input image size a zoo model expects (8 or 16)."""
    _check_name(name)
    return ALL_MODELS[name][1]


def create(name: str, num_classes: int = 10, seed: int | None = 0) -> nn.Sequential:
    """A freshly initialized zoo model; ``seed`` makes the initial weights reproducible.

    ``seed=None`` draws from (and advances) the global RNG. With a seed, the global CPU RNG
    is forked (saved and restored, so the caller's random stream is untouched); only the
    CPU's, since the weights are drawn on the CPU: no CUDA context is opened.
    """
    _check_name(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    builder = ALL_MODELS[name][0]
    kwargs = {"num_classes": num_classes}
    if seed is None:
        return builder(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(check_seed(seed))
        return builder(**kwargs)


def weights_path(name: str, seed: int = 0) -> Path:
    """Where the shipped weights of ``name`` trained with ``seed`` live (they may not exist)."""
    _check_name(name)
    check_seed(seed)
    return WEIGHTS_DIR / f"{name}_digits_s{seed}.pt"


def pretrained(name: str = "cnn16", seed: int = 0) -> nn.Sequential:
    """A zoo model with the shipped digits weights, in eval mode (``seed`` in 0, 1, 2)."""
    _check_name(name)
    path = weights_path(name, seed)
    if not path.exists():
        raise FileNotFoundError(f"no shipped weights for {name!r} seed {seed} at {path}; "
                                f"shipped seeds are {SEEDS} (retrain: python -m qlib.weights.train_zoo)")
    model = create(name, seed=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def zoo_info() -> dict:
    """What ``train_zoo`` recorded: settings and the test accuracy of every shipped model."""
    return json.loads((WEIGHTS_DIR / "zoo.json").read_text())


def count_parameters(model: nn.Module) -> int:
    """Number of learnable parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters())


# The transformer of lesson 16. It lives in ``qlib.llm.model`` (one concept per module: the
# character-level GPT beside its corpus and quantizers) and is reachable from here, with the
# rest of the course's models. It is *not* in ``ZOO`` / ``ALL_MODELS``: those are the digit
# classifiers that ``create`` and ``pretrained`` build by name (and that tests loop over with
# digit images). Loaded on first use: ``import qlib.models`` does not import ``qlib.llm``.
LANGUAGE_MODELS = ("charlm",)


def charlm(seed: int = 0, pretrained: bool = True) -> nn.Module:
    """The character-level GPT of lesson 16: ``qlib.llm.model.CharLM`` (4 pre-LN blocks, width 128).

    ``pretrained=True``: the shipped weights of ``seed`` (0, 1 or 2; trained on the Python standard
    library by ``qlib/weights/train_charlm.py``), eval mode, float32, on the CPU; ``False``: a fresh
    model initialised with ``seed``. Input: ``(batch, T)`` int64 byte codes with ``T <= 128``;
    output: logits ``(batch, T, 256)``. ``qlib.llm.model.charlm_info()`` lists their perplexity.
    """
    from .llm import model as llm_model
    return llm_model.pretrained(seed) if pretrained else llm_model.create(seed)


def __getattr__(name: str):
    """``models.CharLM`` and ``models.CharLMConfig``: the classes of ``qlib.llm.model`` (PEP 562)."""
    if name in ("CharLM", "CharLMConfig"):
        from .llm import model as llm_model
        return getattr(llm_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
