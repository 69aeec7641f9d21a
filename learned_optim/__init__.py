"""learned_optim: learned and adaptive optimizers for PyTorch.

Every optimizer is a ``torch.optim.Optimizer`` subclass, so one line replaces Adam::

    opt = learned_optim.ConjugateMomentumSGD(model.parameters(), lr=1e-3, batch_size=32)
"""

from .optim import (
    NTMBFGS,
    AdaptiveBatchSampler,
    AdaptiveBatchSGD,
    ConjugateAdam,
    ConjugateMomentumSGD,
    LSTMOptimizer,
    per_example_gradients,
)
from .registry import OptimizerInfo, available, create, info, register
from .rules import LSTMGACConfig, LSTMGACRule, NTMBFGSConfig, NTMBFGSRule, available_weights

__version__ = "0.1.0"

__all__ = [
    "AdaptiveBatchSGD",
    "AdaptiveBatchSampler",
    "ConjugateAdam",
    "ConjugateMomentumSGD",
    "LSTMGACConfig",
    "LSTMGACRule",
    "LSTMOptimizer",
    "NTMBFGS",
    "NTMBFGSConfig",
    "NTMBFGSRule",
    "OptimizerInfo",
    "available",
    "available_weights",
    "create",
    "info",
    "per_example_gradients",
    "register",
]
