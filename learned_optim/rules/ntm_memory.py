"""The memory of NTM-BFGS (Andrychowicz et al. 2016, appendix): a matrix M shared by all
coordinates, read as i = M·r and written only by low-rank sums, M ← M + Σ_heads a·bᵀ.

Two forms behind one functional interface (``init_state``, ``read``, ``write``), so the rule
and the meta-trainer never care which one runs:

- :class:`DenseMemory` keeps M (n × n) itself: n² floats (4·n² bytes in float32; 4 MB at
  n = 1,000, 400 GB at n = 10⁷), exact for any number of writes;
- :class:`LimitedMemory` keeps the K most recent write pairs and M₀ = γ·I implicitly,
  M·r = γ·r + Σ_k a_k·(b_kᵀ·r): 2·K·n floats and O(K·n) work per read, the limited-memory
  form (as L-BFGS keeps its last m pairs), usable on models with millions of parameters.

Both are pure functions of tensors (no in-place updates), so gradients flow through reads and
writes when the meta-trainer keeps the graph. With the head outputs a BFGS step would write,
the dense form reproduces BFGS and the limited form L-BFGS (``tests/test_ntm_memory.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DenseMemory", "LimitedMemory", "choose_memory", "DENSE_MAX_COORDINATES"]

#: Up to this many coordinates "auto" picks the dense form (4 MB of float32 memory at 1,024).
DENSE_MAX_COORDINATES = 1024


def _check_heads(name: str, heads: Tensor, state_n: int) -> None:
    if heads.dim() != 2 or heads.shape[1] != state_n:
        raise ValueError(f"{name} must have shape (heads, {state_n}), got {tuple(heads.shape)}")


class DenseMemory:
    """M as an explicit (n, n) matrix, starting at M₀ = γ·I (``initial_scale`` γ)."""

    kind = "dense"

    def __init__(self, initial_scale: float = 0.0) -> None:
        if not math.isfinite(initial_scale):
            raise ValueError(f"initial_scale must be finite, got {initial_scale!r}")
        self.initial_scale = float(initial_scale)

    def init_state(self, num_coordinates: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> Tensor:
        """M₀ = γ·I, shape (n, n)."""
        return torch.eye(num_coordinates, dtype=dtype, device=device) * self.initial_scale

    def read(self, state: Tensor, keys: Tensor) -> Tensor:
        """i = M·r for each read head: keys (R, n) → reads (R, n)."""
        _check_heads("read keys", keys, state.shape[0])
        return keys @ state.T

    def write(self, state: Tensor, left: Tensor, right: Tensor) -> Tensor:
        """M + Σ_w a_w·b_wᵀ for write heads a = ``left`` (W, n), b = ``right`` (W, n)."""
        _check_heads("write left vectors", left, state.shape[0])
        _check_heads("write right vectors", right, state.shape[0])
        return state + left.T @ right

    @staticmethod
    def state_bytes(num_coordinates: int, bytes_per_float: int = 4) -> int:
        return num_coordinates * num_coordinates * bytes_per_float


class LimitedMemory:
    """The K most recent write pairs (a_k, b_k) and M₀ = γ·I: M·r = γ·r + Σ_k a_k·(b_kᵀ·r).

    State (2, K, n): row 0 the left vectors a_k, row 1 the right vectors b_k, oldest first.
    Empty slots are zero pairs, which add nothing; a write of W pairs drops the W oldest.
    """

    kind = "limited"

    def __init__(self, capacity: int, initial_scale: float = 0.0) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity (K) must be a positive integer, got {capacity!r}")
        if not math.isfinite(initial_scale):
            raise ValueError(f"initial_scale must be finite, got {initial_scale!r}")
        self.capacity, self.initial_scale = capacity, float(initial_scale)

    def init_state(self, num_coordinates: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> Tensor:
        """K empty slots: zeros of shape (2, K, n)."""
        return torch.zeros(2, self.capacity, num_coordinates, dtype=dtype, device=device)

    def read(self, state: Tensor, keys: Tensor) -> Tensor:
        """i = γ·r + Σ_k a_k·(b_kᵀ·r) for each read head: keys (R, n) → reads (R, n), O(K·n)."""
        _check_heads("read keys", keys, state.shape[2])
        left, right = state.unbind(0)
        return keys * self.initial_scale + (keys @ right.T) @ left

    def write(self, state: Tensor, left: Tensor, right: Tensor) -> Tensor:
        """Append the W pairs (a_w, b_w), keeping the K most recent."""
        _check_heads("write left vectors", left, state.shape[2])
        _check_heads("write right vectors", right, state.shape[2])
        if left.shape[0] != right.shape[0]:
            raise ValueError(f"write heads need as many left as right vectors, got {left.shape[0]} and {right.shape[0]}")
        if left.shape[0] > self.capacity:
            raise ValueError(f"{left.shape[0]} write pairs exceed the memory's capacity K = {self.capacity}")
        return torch.cat((state, torch.stack((left, right))), dim=1)[:, -self.capacity:]

    def state_bytes(self, num_coordinates: int, bytes_per_float: int = 4) -> int:
        return 2 * self.capacity * num_coordinates * bytes_per_float


def choose_memory(num_coordinates: int, form: str = "auto", capacity: int = 30,
                  initial_scale: float = 0.0) -> DenseMemory | LimitedMemory:
    """The memory for n coordinates: ``"dense"``, ``"limited"``, or ``"auto"`` (dense up to
    :data:`DENSE_MAX_COORDINATES`, where its n² floats still cost no more than 4 MB)."""
    if form == "auto":
        form = "dense" if num_coordinates <= DENSE_MAX_COORDINATES else "limited"
    if form == "dense":
        return DenseMemory(initial_scale)
    if form == "limited":
        return LimitedMemory(capacity, initial_scale)
    raise ValueError(f"memory form must be 'auto', 'dense' or 'limited', got {form!r}")
