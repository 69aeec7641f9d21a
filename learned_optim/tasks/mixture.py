"""A mixture of task families: each seed draws one component, then a task from it.

Meta-training on many small, different tasks is what makes a learned optimizer generalize
(Metz et al. 2022; Celo, Moudgil et al. 2025). ``suite-mix`` mixes the evaluation suite's
families (MLPs of several activations, convnets, a transformer and a GRU language model) on
their meta-training data: the suite evaluates on the held-out part and on other seeds.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import torch

from .base import Task, TaskFamily, TaskStack, get_family, register_family

__all__ = ["MixtureFamily", "SUITE_MIX_COMPONENTS"]


class MixtureFamily(TaskFamily):
    """Seed s draws component ``choose(s)`` (uniformly, by a generator seeded with s) and
    that component's task s: the same task for the same seed, whatever else is drawn."""

    def __init__(self, components: Sequence[TaskFamily], name: str = "mixture") -> None:
        if not components:
            raise ValueError("a mixture needs at least one component family")
        for c in components:
            if not isinstance(c, TaskFamily):
                raise TypeError(f"mixture components must be TaskFamily instances, got a {type(c).__name__}")
        self.components = list(components)
        self.name = name

    def choose(self, seed: int) -> int:
        """The component that seed ``seed`` draws from."""
        return random.Random(seed * 2_654_435_761 + 97).randrange(len(self.components))

    def sample(self, seed: int) -> Task:
        task = self.components[self.choose(seed)].sample(seed)
        task.info = {**task.info, "component": self.choose(seed)}
        return task

    def stack(self, seeds: Sequence[int], device: torch.device | str | None = None) -> TaskStack:
        """Each run of consecutive seeds from one component is stacked by that component
        (vectorized where it can); the runs are concatenated, so task k is seed k's."""
        runs: list[tuple[int, list[int]]] = []
        for seed in seeds:
            c = self.choose(seed)
            if runs and runs[-1][0] == c:
                runs[-1][1].append(seed)
            else:
                runs.append((c, [seed]))
        return TaskStack.concatenate([self.components[c].stack(s, device=device) for c, s in runs])


#: suite-mix's components: the suite's families (see learned_optim.suite) at meta-training sizes,
#: smaller than the suite's where a family has widths to draw (the rule's cost per step grows
#: with the coordinates; the suite then also measures how the rule carries to larger nets).
SUITE_MIX_COMPONENTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("mnist-mlp", {}),
    ("mnist-mlp-nn", {"activation": "relu", "image_side": 14, "widths": (16, 32)}),
    ("mnist-mlp-nn", {"activation": "gelu", "layer_norm": True, "image_side": 14, "widths": (16, 32)}),
    ("mnist-mlp-nn", {"activation": "tanh", "image_side": 14, "widths": (16, 32)}),
    ("mnist-conv", {}),
    ("mnist-conv", {"batch_norm": True}),
    ("text-transformer", {"widths": (16, 24)}),
    ("text-gru", {"widths": (16, 24)}),
)


@register_family("suite-mix")
def suite_mix(root: str | os.PathLike | None = None, part: str = "meta-train",
              components: Sequence[str] | None = None,
              extra: Sequence[str | Sequence[Any]] = ()) -> MixtureFamily:
    """The suite's families mixed (MNIST ones read ``root``), on their ``part`` of the data;
    ``components`` picks some by index or family name (default: all of SUITE_MIX_COMPONENTS).
    ``extra`` adds registered families as further components, each a name or [name, kwargs]
    (e.g. ``["quadratic"]``: the paper's quadratics beside the nets; they take no ``part``:
    held-out draws are other seeds)."""
    chosen = list(SUITE_MIX_COMPONENTS)
    if components is not None:
        picked = []
        for key in components:
            matches = [c for i, c in enumerate(SUITE_MIX_COMPONENTS) if key in (str(i), c[0])]
            if not matches:
                raise ValueError(f"suite-mix has no component {key!r}; components: "
                                 f"{', '.join(f'{i}: {n} {kw}' for i, (n, kw) in enumerate(SUITE_MIX_COMPONENTS))}")
            picked += [m for m in matches if m not in picked]
        chosen = picked
    families = []
    for family, kwargs in chosen:
        data: dict[str, Any] = {"part": part}
        if family.startswith("mnist"):
            data["root"] = root
        families.append(get_family(family, **kwargs, **data))
    for item in extra:
        name, kwargs = (item, {}) if isinstance(item, str) else _named_family(item)
        families.append(get_family(name, **kwargs))
    return MixtureFamily(families, name="suite-mix")


def _named_family(item: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """An ``extra`` component given as [name, kwargs]."""
    if len(item) != 2 or not isinstance(item[0], str) or not isinstance(item[1], dict):
        raise ValueError(f"a suite-mix extra component is a family name or [name, kwargs], got {item!r}")
    return item[0], item[1]
