"""The memory of NTM-BFGS (Andrychowicz et al. 2016, appendix): a matrix M shared by all
coordinates, read as i = M·r and written only by low-rank sums, M ← M + Σ_heads a·bᵀ.

Two forms behind one functional interface (``init_state``, ``read``, ``write``), so the rule
and the meta-trainer never care which one runs:

- :class:`DenseMemory` keeps M (n × n) itself: n² floats (4·n² bytes in float32; 4 MB at
  n = 1,000, 400 GB at n = 10⁷), exact for any number of writes;
- :class:`LimitedMemory` keeps the K most recent write pairs and M₀ = γ·I implicitly,
  M·r = γ·r + Σ_k a_k·(b_kᵀ·r): 2·K·n floats and O(K·n) work per read, the limited-memory
  form (as L-BFGS keeps its last m pairs), usable on models with millions of parameters.

Both are pure functions of tensors (their inputs are never updated in place), so gradients flow
through reads and writes when the meta-trainer keeps the graph. With the head outputs a BFGS step would write,
the dense form reproduces BFGS, and the limited form L-BFGS when the heads rewrite all K pairs
from the last m (s, y) each step (``tests/test_ntm_memory.py``). Heads that append BFGS's
three pairs per step are not L-BFGS once the oldest fall out: the newer pairs hold M·y of the
forgotten ones, and the rest can be indefinite (``reset`` puts a memory back at M₀; the rule's
``reset_indefinite`` does so where it finds M indefinite).

Every state may carry leading batch dimensions, one memory per *group* (G memories of n
coordinates: a param group in the optimizer, a task in the meta-trainer); heads then carry
the same leading dimensions. :class:`MemoryGroups` moves flat per-coordinate vectors (k, N)
into that (G, k, n) layout and back, and takes the per-group inner products (global dot
products) the heads need.

Sharded coordinates (FSDP: each rank holds a shard of every tensor): with a
``process_group``, :class:`LimitedMemory` and :class:`MemoryGroups` all-reduce their inner
products and sums across it, so every read and average is over all coordinates, as
unsharded; the per-coordinate vectors stay sharded. The dense form cannot be sharded.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .segments import Segments, all_reduced

__all__ = ["DenseMemory", "LimitedMemory", "MemoryGroups", "choose_memory", "DENSE_MAX_COORDINATES"]

#: Up to this many coordinates "auto" picks the dense form (4 MB of float32 memory at 1,024).
DENSE_MAX_COORDINATES = 1024


def _check_heads(name: str, heads: Tensor, batch: tuple[int, ...], state_n: int) -> None:
    if tuple(heads.shape[:-2]) != batch or heads.dim() != len(batch) + 2 or heads.shape[-1] != state_n:
        lead = "".join(f"{b}, " for b in batch)
        raise ValueError(f"{name} must have shape ({lead}heads, {state_n}), got {tuple(heads.shape)}")


def _batched(shape: tuple[int, ...], groups: int | None) -> tuple[int, ...]:
    return shape if groups is None else (groups, *shape)


class DenseMemory:
    """M as an explicit (n, n) matrix, starting at M₀ = γ·I (``initial_scale`` γ)."""

    kind = "dense"

    def __init__(self, initial_scale: float = 0.0) -> None:
        if not math.isfinite(initial_scale):
            raise ValueError(f"initial_scale must be finite, got {initial_scale!r}")
        self.initial_scale = float(initial_scale)

    def init_state(self, num_coordinates: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None, groups: int | None = None) -> Tensor:
        """M₀ = γ·I, shape (n, n), or (G, n, n) for ``groups`` G."""
        eye = torch.eye(num_coordinates, dtype=dtype, device=device) * self.initial_scale
        return eye if groups is None else eye.expand(groups, -1, -1).clone()

    def check_state(self, state: Tensor, num_coordinates: int, groups: int | None = None) -> None:
        expected = _batched((num_coordinates, num_coordinates), groups)
        if tuple(state.shape) != expected:
            raise ValueError(f"dense memory state must have shape {expected}, got {tuple(state.shape)}")

    def read(self, state: Tensor, keys: Tensor) -> Tensor:
        """i = M·r for each read head: keys (…, R, n) → reads (…, R, n)."""
        _check_heads("read keys", keys, tuple(state.shape[:-2]), state.shape[-1])
        return keys @ state.mT

    def write(self, state: Tensor, left: Tensor, right: Tensor, reset: Tensor | None = None) -> Tensor:
        """M + Σ_w a_w·b_wᵀ for write heads a = ``left`` (…, W, n), b = ``right`` (…, W, n); the
        memories flagged in ``reset`` (…,) are written onto M₀ instead (see :meth:`reset`)."""
        batch = tuple(state.shape[:-2])
        _check_heads("write left vectors", left, batch, state.shape[-1])
        _check_heads("write right vectors", right, batch, state.shape[-1])
        return (state if reset is None else self.reset(state, reset)) + left.mT @ right

    def reset(self, state: Tensor, where: Tensor) -> Tensor:
        """The state with the memories flagged in ``where`` (…,) back at M₀ = γ·I (differentiable
        in the others; no host sync)."""
        n = state.shape[-1]
        initial = torch.eye(n, dtype=state.dtype, device=state.device) * self.initial_scale
        return torch.where(where[..., None, None], initial, state)

    def reset_(self, state: Tensor, where: Tensor) -> Tensor:
        """:meth:`reset` in place (no allocation; not for a state autograd still needs)."""
        state.masked_fill_(where[..., None, None], 0)
        state.diagonal(dim1=-2, dim2=-1).add_(where[..., None].to(state.dtype) * self.initial_scale)
        return state

    @staticmethod
    def state_bytes(num_coordinates: int, bytes_per_float: int = 4) -> int:
        return num_coordinates * num_coordinates * bytes_per_float


class LimitedMemory:
    """The K most recent write pairs (a_k, b_k) and M₀ = γ·I: M·r = γ·r + Σ_k a_k·(b_kᵀ·r).

    State (…, 2, K, n): row 0 the left vectors a_k, row 1 the right vectors b_k, oldest first.
    Empty slots are zero pairs, which add nothing; a write of W pairs drops the W oldest.
    """

    kind = "limited"

    def __init__(self, capacity: int, initial_scale: float = 0.0, process_group: Any = None) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity (K) must be a positive integer, got {capacity!r}")
        if not math.isfinite(initial_scale):
            raise ValueError(f"initial_scale must be finite, got {initial_scale!r}")
        self.capacity, self.initial_scale = capacity, float(initial_scale)
        self.process_group = process_group  # the coordinates are shards across it: all-reduce b_kᵀ·r

    def init_state(self, num_coordinates: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None, groups: int | None = None) -> Tensor:
        """K empty slots: zeros of shape (2, K, n), or (G, 2, K, n) for ``groups`` G."""
        return torch.zeros(_batched((2, self.capacity, num_coordinates), groups), dtype=dtype, device=device)

    def check_state(self, state: Tensor, num_coordinates: int, groups: int | None = None) -> None:
        expected = _batched((2, self.capacity, num_coordinates), groups)
        if tuple(state.shape) != expected:
            raise ValueError(f"limited memory state (K = {self.capacity}) must have shape {expected}, "
                             f"got {tuple(state.shape)}")

    def read(self, state: Tensor, keys: Tensor) -> Tensor:
        """i = γ·r + Σ_k a_k·(b_kᵀ·r) for each read head: keys (…, R, n) → reads (…, R, n), O(K·n)."""
        _check_heads("read keys", keys, tuple(state.shape[:-3]), state.shape[-1])
        left, right = state.unbind(-3)
        inner = all_reduced(keys @ right.mT, self.process_group)  # b_kᵀ·r over every shard
        return keys * self.initial_scale + inner @ left

    def write(self, state: Tensor, left: Tensor, right: Tensor, reset: Tensor | None = None) -> Tensor:
        """Append the W pairs (a_w, b_w), keeping the K most recent; the memories flagged in
        ``reset`` (…,) are emptied first (see :meth:`reset`), with no further allocation."""
        batch = tuple(state.shape[:-3])
        _check_heads("write left vectors", left, batch, state.shape[-1])
        _check_heads("write right vectors", right, batch, state.shape[-1])
        if left.shape[-2] != right.shape[-2]:
            raise ValueError(f"write heads need as many left as right vectors, got {left.shape[-2]} and {right.shape[-2]}")
        if left.shape[-2] > self.capacity:
            raise ValueError(f"{left.shape[-2]} write pairs exceed the memory's capacity K = {self.capacity}")
        kept = state[..., left.shape[-2]:, :]  # the K − W most recent pairs
        # one copy into a contiguous state: a strided view would be multiplied by another BLAS
        # path than the same state reloaded from a state_dict, and resumed runs would differ in the last bits
        new = torch.cat((kept, torch.stack((left, right), dim=-3)), dim=-2)
        if reset is not None:  # in place in the fresh copy (which no autograd node keeps): no allocation
            new[..., :kept.shape[-2], :].masked_fill_(reset[..., None, None, None], 0)
        return new

    def reset(self, state: Tensor, where: Tensor) -> Tensor:
        """The state with the memories flagged in ``where`` (…,) emptied, back at M₀ = γ·I
        (differentiable in the others; no host sync)."""
        empty = torch.zeros((), dtype=state.dtype, device=state.device)
        return torch.where(where[..., None, None, None], empty, state)

    def reset_(self, state: Tensor, where: Tensor) -> Tensor:
        """:meth:`reset` in place (no allocation; not for a state autograd still needs)."""
        return state.masked_fill_(where[..., None, None, None], 0)

    def state_bytes(self, num_coordinates: int, bytes_per_float: int = 4) -> int:
        return 2 * self.capacity * num_coordinates * bytes_per_float


def choose_memory(num_coordinates: int, form: str = "auto", capacity: int = 30,
                  initial_scale: float = 0.0, process_group: Any = None) -> DenseMemory | LimitedMemory:
    """The memory for n coordinates: ``"dense"``, ``"limited"``, or ``"auto"`` (dense up to
    :data:`DENSE_MAX_COORDINATES`, where its n² floats still cost no more than 4 MB).

    With a ``process_group`` (coordinates sharded across it) only the limited form works:
    "auto" picks it, "dense" is refused."""
    if form == "auto":
        form = "dense" if num_coordinates <= DENSE_MAX_COORDINATES and process_group is None else "limited"
    if form == "dense":
        if process_group is not None:
            raise ValueError("the dense memory (n × n) cannot be sharded across ranks; use memory='limited'")
        return DenseMemory(initial_scale)
    if form == "limited":
        return LimitedMemory(capacity, initial_scale, process_group)
    raise ValueError(f"memory form must be 'auto', 'dense' or 'limited', got {form!r}")


class MemoryGroups:
    """Which of N flat coordinates share a memory: G groups, each laid out in n = (largest
    group's size) slots, smaller groups zero-padded (padding slots get zero keys and writes,
    so they never touch the other coordinates).

    Built from per-coordinate group ids (``None``: one group of all N coordinates, no copy).
    Sums and means over a group are those of :class:`~learned_optim.rules.Segments` over the
    same ids (all-reduced across ``process_group`` for sharded coordinates).
    """

    def __init__(self, ids: Tensor | None, count: int, size: int, process_group: Any = None) -> None:
        self.count, self.size = count, size
        self.ids = ids
        self.scopes = Segments(ids, count, size, process_group)
        if ids is None:
            self.width = size
            return
        counts = torch.bincount(ids, minlength=count)
        self.width = int(counts.max()) if size else 0
        order = torch.argsort(ids, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        sorted_ids = ids[order]
        position = torch.arange(size, device=ids.device) - starts[sorted_ids]
        self._order = order  # coordinates sorted by group
        self._slots = sorted_ids * self.width + position  # their slots in the (G·n) layout

    @classmethod
    def from_segments(cls, scopes: Segments) -> MemoryGroups:
        """The groups of ``scopes`` (a partition of the coordinates, with its process group)."""
        return cls(scopes.ids, scopes.count, scopes.size, scopes.process_group)

    def gather(self, x: Tensor) -> Tensor:
        """(k, N) flat vectors → (G, k, n) per-group layout."""
        if self.ids is None:
            return x.unsqueeze(0)
        k = x.shape[0]
        padded = x.new_zeros(k, self.count * self.width).index_copy(1, self._slots, x.index_select(1, self._order))
        return padded.view(k, self.count, self.width).transpose(0, 1)

    def scatter(self, y: Tensor) -> Tensor:
        """(G, k, n) per-group layout → (k, N) flat vectors (padding dropped)."""
        if self.ids is None:
            return y.squeeze(0)
        k = y.shape[1]
        values = y.transpose(0, 1).reshape(k, self.count * self.width).index_select(1, self._slots)
        return values.new_zeros(k, self.size).index_copy(1, self._order, values)

    def sum(self, x: Tensor) -> Tensor:
        """(k, N) → (k, N): each coordinate's column replaced by the sum over its group."""
        return self.scopes.sum(x)

    def mean(self, x: Tensor) -> Tensor:
        """(k, N) → (k, N): each coordinate's column replaced by the mean over its group."""
        return self.scopes.mean(x)

    def dot(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-group inner products xᵀy of flat (N,) vectors, broadcast to every coordinate (N,)."""
        return self.sum((x * y).unsqueeze(0)).squeeze(0)

    def any(self, flags: Tensor) -> Tensor:
        """(N,) per-coordinate flags → (G,): whether any coordinate of each group is flagged
        (a group with no coordinates here is not)."""
        laid_out = self.gather(flags.to(torch.float32).unsqueeze(0))  # (G, 1, n), padding 0
        return laid_out.sum(-1).squeeze(-1) > 0

    def expand(self, flags: Tensor) -> Tensor:
        """(G,) per-group values → (N,): each coordinate gets its group's."""
        return flags.expand(self.size) if self.ids is None else flags[self.ids]
