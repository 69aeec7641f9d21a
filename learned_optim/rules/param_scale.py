"""The factor of the parameter-relative step (``relative_step`` ε_θ, Celo's): RMS(θ) + ε_θ.

Two forms of the same number. :func:`flat_param_scale` is per coordinate, over its GAC scope, from
flat θ (N,), and differentiable: the meta-trainer and sharded params use it. :class:`TensorScales`
gives one value per whole parameter tensor without a flat copy of θ: the drop-in optimizer
multiplies each tensor's step by it. On the CPU it returns them as Python floats (the float32
values exactly), with which the caller's per-tensor multiply is a scalar one rather than a
broadcast of a 0-d tensor; elsewhere as 0-d tensors, so a CUDA step never waits on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .lstm_gac_config import SQRT_FLOOR
from .segments import Segments

__all__ = ["flat_param_scale", "TensorScales"]


def flat_param_scale(params: Tensor, segments: Segments, eps: float) -> Tensor:
    """RMS(θ) + ε_θ (N,) of flat parameters (N,) over each coordinate's scope, differentiable."""
    mean_square = segments.mean(params.unsqueeze(0) * params.unsqueeze(0)).squeeze(0)
    return mean_square.clamp_min(SQRT_FLOOR).sqrt() + eps


class TensorScales:
    """RMS(θ_k) + ε_θ for each whole tensor θ_k (or over all of them, ``per_tensor=False``), from
    their norms: one ``_foreach_norm`` per dtype, then a few operations on one small vector."""

    def __init__(self, eps: float, per_tensor: bool = True) -> None:
        self.eps, self.per_tensor = eps, per_tensor
        self._counts: dict[tuple, Tensor] = {}  # element counts as a vector, per layout/dtype/device

    def __call__(self, params: Sequence[Tensor]) -> list[Tensor] | list[float]:
        if not params:
            return []
        scales = self.vector(params)
        if not self.per_tensor:
            return [scales] * len(params)
        # On the CPU, floats: a tensor list would make the caller's multiply a broadcast per tensor.
        return scales.tolist() if scales.device.type == "cpu" else list(scales.unbind())

    def vector(self, params: Sequence[Tensor]) -> Tensor:
        """The scales as one float32 tensor on the params' device: (len(params),), or 0-d over all
        of them with ``per_tensor=False``."""
        squares = torch.stack(self._norms(params)).square_()
        if not self.per_tensor:
            mean_square = squares.sum() / max(sum(p.numel() for p in params), 1)
            return mean_square.clamp_min(SQRT_FLOOR).sqrt() + self.eps
        mean_squares = squares.div_(self._count_vector(params, squares))
        return mean_squares.clamp_min_(SQRT_FLOOR).sqrt_().add_(self.eps)

    def _norms(self, params: Sequence[Tensor]) -> list[Tensor]:
        """‖θ_k‖₂ as float32 0-d tensors, accumulated in float32 at least (float64 in its own)."""
        norms: list[Tensor] = [params[0]] * len(params)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        for dtype, indices in by_dtype.items():
            wide = dtype == torch.float64
            for i, norm in zip(indices, torch._foreach_norm([params[i] for i in indices], 2,
                                                            dtype=None if wide else torch.float32)):
                norms[i] = norm.float()
        return norms

    def _count_vector(self, params: Sequence[Tensor], like: Tensor) -> Tensor:
        """The tensors' element counts (at least 1) in ``like``'s dtype and device, made once per
        layout (made anew every step it would be a host-to-device copy on CUDA)."""
        sizes = tuple(max(p.numel(), 1) for p in params)
        key = (sizes, like.dtype, like.device)
        counts = self._counts.get(key)
        if counts is None:
            counts = torch.tensor([float(n) for n in sizes], dtype=like.dtype, device=like.device)
            self._counts[key] = counts  # one per param group and device in use: a few numbers each
        return counts
