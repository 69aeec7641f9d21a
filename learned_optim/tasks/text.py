"""Real text every machine has without a download: the running interpreter's standard
library source files, read at run time as bytes (nothing is committed).

The files are split by a hash of their path, so the split does not depend on which files a
Python version has: about one in five goes to ``"held-out"`` (benchmarks), the rest to
``"meta-train"``. Each part is the concatenation of its files in path order, cut at
``max_bytes``. Different Python versions ship different files, so absolute losses differ a
little between interpreters (the benchmark records the version).
"""

from __future__ import annotations

import functools
import sys
import sysconfig
import zlib
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["stdlib_text", "text_windows", "TEXT_PARTS", "stdlib_files"]

TEXT_PARTS = ("meta-train", "held-out")
_HELD_OUT_EVERY = 5


def stdlib_files(part: str) -> list[Path]:
    """The standard library's ``.py`` files of ``part``, in path order (site-packages excluded)."""
    if part not in TEXT_PARTS:
        raise ValueError(f"part must be one of {TEXT_PARTS}, got {part!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "site-packages" in relative or "dist-packages" in relative:
            continue
        held_out = zlib.crc32(relative.encode()) % _HELD_OUT_EVERY == 0
        if held_out == (part == "held-out"):
            files.append(path)
    return files


@functools.lru_cache(maxsize=4)
def stdlib_text(part: str = "meta-train", max_bytes: int = 1 << 21) -> Tensor:
    """The bytes (uint8 tensor) of ``part`` of the standard library's source, at most ``max_bytes``."""
    if not isinstance(max_bytes, int) or max_bytes < 1024:
        raise ValueError(f"max_bytes must be an integer of at least 1024, got {max_bytes!r}")
    chunks, total = [], 0
    for path in stdlib_files(part):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    if total < 1024:
        raise FileNotFoundError(
            f"found only {total} bytes of standard-library source ({part}) under "
            f"{sysconfig.get_paths()['stdlib']} for Python {sys.version.split()[0]}; "
            "the text tasks need the .py files of the standard library")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def text_windows(text: Tensor, generator: torch.Generator, batch_size: int, context: int) -> tuple[Tensor, Tensor]:
    """A minibatch of next-byte prediction: ``batch_size`` random windows of ``context`` bytes
    (inputs, int64) and the bytes one position later (targets)."""
    starts = torch.randint(text.numel() - context - 1, (batch_size, 1), generator=generator)
    windows = text[starts + torch.arange(context + 1)].long()
    return windows[:, :-1], windows[:, 1:]
