"""The drop-in optimizers: functional update cores and thin ``torch.optim.Optimizer`` classes."""

from .adaptive_batch import AdaptiveBatchSampler, AdaptiveBatchSGD, adaptive_batch_sgd
from .conjugate import (
    ConjugateAdam,
    ConjugateMomentumSGD,
    conjugate_adam,
    conjugate_momentum_hyperparameters,
    conjugate_momentum_sgd,
    per_example_gradients,
)
from .lstm import DEFAULT_WEIGHTS, LSTMOptimizer
from .ntm import NTM_DEFAULT_WEIGHTS, NTMBFGS

__all__ = [
    "AdaptiveBatchSGD",
    "AdaptiveBatchSampler",
    "ConjugateAdam",
    "ConjugateMomentumSGD",
    "DEFAULT_WEIGHTS",
    "LSTMOptimizer",
    "NTMBFGS",
    "NTM_DEFAULT_WEIGHTS",
    "adaptive_batch_sgd",
    "conjugate_adam",
    "conjugate_momentum_hyperparameters",
    "conjugate_momentum_sgd",
    "per_example_gradients",
]
