"""The text our language model reads: Python's own standard library, found on every machine.

Every Python installation ships the source of its standard library, so the course can train
and evaluate a language model offline without copying any text into the repository. The corpus
is a *fixed list* of module files (``TRAIN_FILES``, ``VAL_FILES``), read at run time from
``sysconfig.get_paths()["stdlib"]``. The split is *by file*: the held-out perplexity measures
text from modules the model never saw, not other windows of the same files.

Vocabulary: bytes. ``encode(text)`` is ``text.encode("utf-8")`` as an int64 tensor of codes in
``0..255``; ``decode`` inverts it (bytes that are not valid UTF-8 become U+FFFD). Byte-level
models need no tokenizer, and every character of every file has a code.

The files differ a little between Python versions, so ``python_version()`` is recorded beside
every number measured on this corpus (``charlm.json``, ``benchmarks/results/llm.json``).
"""

from __future__ import annotations

import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256

#: Modules the model is trained on (present, as single files, from Python 3.9 to 3.13).
TRAIN_FILES = (
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "contextlib.py",
    "copy.py", "dataclasses.py", "difflib.py", "enum.py", "fnmatch.py", "functools.py",
    "gettext.py", "glob.py", "inspect.py", "ipaddress.py", "operator.py", "pprint.py",
    "queue.py", "random.py", "shutil.py", "statistics.py", "string.py", "threading.py",
    "tokenize.py", "typing.py", "uuid.py", "weakref.py",
)
#: Held-out modules: the perplexity of every method in the course is measured on these.
VAL_FILES = ("csv.py", "fractions.py", "heapq.py", "shlex.py", "textwrap.py")


def stdlib_dir() -> Path:
    """Where this Python keeps its standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return platform.python_version()


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as an int64 tensor of shape ``(len(bytes),)``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(codes: torch.Tensor) -> str:
    """Inverse of ``encode``: int codes in ``0..255`` back to text (invalid UTF-8 -> U+FFFD)."""
    return bytes(int(c) for c in codes.reshape(-1).tolist()).decode("utf-8", errors="replace")


def read_files(names, root: Path | None = None) -> torch.Tensor:
    """The bytes of the files ``names`` (under ``root``, default ``stdlib_dir()``), concatenated.

    Raises ``FileNotFoundError`` naming the missing module and the Python version, so that a
    student on an unusual installation knows what is absent.
    """
    root = Path(root) if root is not None else stdlib_dir()
    chunks = []
    for name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus file {name} not found in {root} (Python {python_version()}): the course "
                f"reads the standard library's sources; install a Python that ships them")
        chunks.append(path.read_bytes())
    data = b"\n\n".join(chunks)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


@dataclass(frozen=True)
class Corpus:
    """Train and validation bytes (int64 tensors of shape ``(n,)``) and the Python version."""
    train: torch.Tensor
    val: torch.Tensor
    python: str


def load(root: Path | None = None) -> Corpus:
    """Read ``TRAIN_FILES`` and ``VAL_FILES`` (the split is by file)."""
    return Corpus(read_files(TRAIN_FILES, root), read_files(VAL_FILES, root), python_version())


def windows(data: torch.Tensor, length: int, *, stride: int | None = None,
            limit: int | None = None) -> torch.Tensor:
    """Consecutive windows of ``length + 1`` bytes, shape ``(n, length + 1)``.

    Inputs are ``w[:, :-1]`` and next-byte targets ``w[:, 1:]``. ``stride`` defaults to
    ``length`` (non-overlapping targets: every byte after the first is scored once); ``limit``
    keeps the first ``limit`` windows (the fast mode of lessons and tests).
    """
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D bytes, got shape {tuple(data.shape)}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if data.numel() < length + 1:
        raise ValueError(f"data has {data.numel()} bytes, fewer than one window of {length + 1}")
    w = data.unfold(0, length + 1, stride or length)
    return w[:limit] if limit is not None else w


def random_batch(data: torch.Tensor, batch_size: int, length: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: inputs and targets, each ``(batch_size, length)`` int64."""
    starts = torch.randint(0, data.numel() - length - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(length + 1)
    w = data[idx]
    return w[:, :-1], w[:, 1:]
