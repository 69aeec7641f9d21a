"""The averaging scopes of the global averaging cells (Andrychowicz et al. 2016, §3.2).

A global averaging cell outputs the mean of its activation over a *scope* of coordinates (one
parameter tensor, one param group, or one task in the meta-trainer); :class:`Segments` holds
which coordinate belongs to which scope and computes those means, differentiably for the
meta-trainer, chunk by chunk for the in-place step, and all-reduced over ranks when the
coordinates are shards (FSDP).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

__all__ = ["Segments", "all_reduced"]


class Segments:
    """The averaging scopes of the global averaging cells over N flat coordinates.

    ``ids[i]`` is the scope of coordinate i (0 ≤ ids < count). The mean is a sum divided by
    a count, so it does not depend on the order of the coordinates (up to float rounding).

    With a ``process_group``, the coordinates are this rank's shard of tensors sharded across
    the group (FSDP): sums and counts are all-reduced, so every scope's sum and mean is over
    the whole tensor on every rank, as in the unsharded run. (Not differentiable: for the
    drop-in step.)
    """

    def __init__(self, ids: Tensor | None, count: int, size: int, process_group: Any = None,
                 lengths: Sequence[int] | None = None) -> None:
        self.ids, self.count, self.size = ids, count, size
        self.process_group = process_group
        # Scope lengths when the scopes are consecutive runs of coordinates (one per tensor):
        # lets the chunked step sum a chunk that lies in one scope without index_add.
        self.lengths = tuple(int(n) for n in lengths) if lengths is not None else None
        self._counts: Tensor | None = None  # per scope, over every rank, at least 1: made on first use
        self._plans: dict[int, list[tuple[int, int, int | None]]] = {}

    @classmethod
    def single(cls, size: int, process_group: Any = None) -> Segments:
        """All coordinates in one scope."""
        return cls(None, 1, size, process_group)

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], device: torch.device | str | None = None,
                   process_group: Any = None) -> Segments:
        """Consecutive scopes of the given sizes (e.g. the numel of each parameter tensor)."""
        if len(sizes) == 1:
            return cls.single(int(sizes[0]), process_group)
        lengths = torch.tensor(list(sizes), dtype=torch.long, device=device)
        ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), lengths)
        return cls(ids, len(sizes), int(lengths.sum()), process_group, lengths=sizes)

    @classmethod
    def from_ids(cls, ids: Tensor, count: int) -> Segments:
        return cls(ids, count, ids.shape[0])

    def sums(self, x: Tensor) -> Tensor:
        """(k, N) → (k, count): the sum over each scope (over every rank's shard)."""
        if self.ids is None:
            sums = x.sum(dim=1, keepdim=True)
        else:
            sums = torch.zeros(x.shape[0], self.count, dtype=x.dtype, device=x.device).index_add(1, self.ids, x)
        return all_reduced(sums, self.process_group)

    def counts(self, like: Tensor) -> Tensor:
        """(count,) coordinates per scope (over every rank's shard; empty scopes count 1, so
        their mean is 0, not NaN), in ``like``'s dtype and device."""
        if self._counts is None:
            local = torch.full((1,), self.size, dtype=torch.long, device=like.device) if self.ids is None \
                else torch.bincount(self.ids, minlength=self.count).to(like.device)
            self._counts = all_reduced(local, self.process_group).clamp_min(1)
        return self._counts.to(like.dtype)

    def _broadcast(self, per_scope: Tensor, like: Tensor) -> Tensor:
        return per_scope.expand_as(like) if self.ids is None else per_scope.index_select(1, self.ids)

    def sum(self, x: Tensor) -> Tensor:
        """(k, N) → (k, N): every coordinate's column replaced by the sum over its scope."""
        return self._broadcast(self.sums(x), x)

    def mean(self, x: Tensor) -> Tensor:
        """(k, N) → (k, N): every coordinate's column replaced by the mean over its scope."""
        if self.ids is None and self.process_group is None:
            return x.mean(dim=1, keepdim=True).expand_as(x)
        return self._broadcast(self.sums(x) / self.counts(x), x)


    def chunks(self, width: int) -> list[tuple[int, int, int | None]]:
        """The coordinates cut into consecutive chunks [start, stop) of ``width``, each with the
        one scope it lies in, or None if it spans several (its sums then need the ids)."""
        if width not in self._plans:
            ends = list(itertools.accumulate(self.lengths)) if self.lengths is not None else None
            plan = []
            for start in range(0, self.size, width):
                stop = min(start + width, self.size)
                scope: int | None
                if self.ids is None:
                    scope = 0
                elif ends is not None:  # the scopes holding the chunk's first and last coordinates
                    first, last = bisect.bisect_right(ends, start), bisect.bisect_right(ends, stop - 1)
                    scope = first if first == last else None
                else:
                    scope = None
                plan.append((start, stop, scope))
            self._plans[width] = plan
        return self._plans[width]

    def add_sums(self, sums: Tensor, x: Tensor, start: int, scope: int | None) -> None:
        """Add the sums over each scope of the chunk ``x`` (k, n) of coordinates from ``start``
        to ``sums`` (k, count), in place (for the chunked step; not all-reduced yet)."""
        if scope is not None:
            sums[:, scope] += x.sum(dim=1)
        else:  # chunks spanning scopes exist only where there are ids
            sums.index_add_(1, cast(Tensor, self.ids)[start : start + x.shape[1]], x)

    def fill_means(self, rows: Tensor, sums: Tensor, width: int) -> None:
        """Overwrite ``rows`` (k, N) with each coordinate's scope mean, given this rank's sums
        (k, count) of them (all-reduced here when the coordinates are sharded); chunk by chunk
        of ``width`` as :meth:`chunks` cuts them (a chunk in one scope is a broadcast copy)."""
        means = all_reduced(sums, self.process_group) / self.counts(sums)
        for start, stop, scope in self.chunks(width):
            if scope is not None:
                rows[:, start:stop].copy_(means[:, scope : scope + 1].expand(-1, stop - start))
            else:
                rows[:, start:stop].copy_(means.index_select(1, cast(Tensor, self.ids)[start:stop]))

def all_reduced(x: Tensor, process_group: Any) -> Tensor:
    """``x`` summed over the ranks of ``process_group`` (``x`` itself without one): how the
    rules' sums over coordinates stay global when the coordinates are sharded."""
    if process_group is None:
        return x
    import torch.distributed as dist

    x = x.contiguous().clone()
    dist.all_reduce(x, group=process_group)
    return x
