"""Which part of φ a meta-training run trains: masks over the rule's tensors.

A run may train a subset of φ and keep the rest as it started (a warm start's weights): the
estimators then work in fewer dimensions, which matters most for evolution strategies, whose
variance grows with them (PES's estimate in d dimensions from P pairs has a cosine to the true
gradient of about √(2P/d)). A spec names a tensor of ``rule.named_parameters()``, whole
(``"momentum_bias"``) or by a range of its rows (``"core.weights.0[4:7]"``: rows 4, 5 and 6,
e.g. the first LSTM layer's weights from the time features; see ``LSTMGACConfig.input_names``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["trainable_masks"]

_SPEC = re.compile(r"^(?P<name>[^\[\]]+)(?:\[(?P<start>\d+):(?P<stop>\d+)\])?$")


def trainable_masks(rule: nn.Module, specs: Sequence[str] | None) -> list[Tensor | None]:
    """One mask per parameter of ``rule`` (in ``parameters()`` order) from ``specs``: None where
    the whole tensor trains, a 0/1 tensor of its shape where only some rows do (all 0: frozen).
    ``specs=None`` trains everything (every mask None)."""
    named = list(rule.named_parameters())
    if specs is None:
        return [None] * len(named)
    if isinstance(specs, str) or not specs:
        raise ValueError(f"trainable must be a non-empty list of tensor names, got {specs!r}")
    shapes = {name: tuple(p.shape) for name, p in named}
    rows: dict[str, list[tuple[int, int]]] = {}
    for spec in specs:
        match = _SPEC.match(spec) if isinstance(spec, str) else None
        if match is None:
            raise ValueError(f"trainable entry {spec!r} is not NAME or NAME[start:stop]")
        name = match["name"]
        if name not in shapes:
            raise ValueError(f"trainable entry {spec!r} names no tensor of the rule; its tensors: "
                             + ", ".join(f"{n} {list(s)}" for n, s in shapes.items()))
        if match["start"] is None:
            rows.setdefault(name, []).append((0, shapes[name][0] if shapes[name] else 1))
            continue
        start, stop = int(match["start"]), int(match["stop"])
        length = shapes[name][0] if shapes[name] else 1
        if not 0 <= start < stop <= length:
            raise ValueError(f"trainable entry {spec!r}: rows {start}:{stop} are not a non-empty range "
                             f"within the {length} rows of {name}")
        rows.setdefault(name, []).append((start, stop))
    masks: list[Tensor | None] = []
    for name, p in named:
        spans = rows.get(name, [])
        mask = torch.zeros_like(p)
        for start, stop in spans:
            if p.dim() == 0:
                mask.fill_(1)
            else:
                mask[start:stop] = 1
        masks.append(None if bool((mask == 1).all()) else mask)
    return masks
