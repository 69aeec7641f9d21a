"""Gradient preprocessing of Andrychowicz et al. 2016 (appendix A).

Gradients of very different magnitudes are mapped to two features of bounded scale:

    ∇ ↦ (log|∇|/p, sign ∇)   if |∇| ≥ e^−p
        (−1, e^p·∇)           otherwise

Both branches meet at |∇| = e^−p, so the map is continuous; it is differentiable almost
everywhere (the meta-trainer's second-order mode differentiates through it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["log_sign_preprocess"]


def log_sign_preprocess(grad: Tensor, p: float = 10.0) -> Tensor:
    """The two features (2, *shape) of a gradient of any shape (N,) or (k, N), exponent ``p``."""
    threshold = math.exp(-p)
    magnitude = grad.abs()
    large = magnitude >= threshold
    # Clamping keeps log finite (and its gradient zero) on the branch where it is unused.
    log_feature = torch.where(large, torch.log(magnitude.clamp_min(threshold)) / p, -1.0)
    sign_feature = torch.where(large, torch.sign(grad), grad * math.exp(p))
    return torch.stack((log_feature, sign_feature))
