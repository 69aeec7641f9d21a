"""Meta-training learned update rules, in layers with narrow interfaces (as in
learned_optimization):

* tasks: :mod:`learned_optim.tasks` (families and :class:`~learned_optim.tasks.TaskStack`),
  shared with the benchmark harness;
* unrolling: :class:`Unroll` runs a rule on a task stack, carrying θ and the rule state;
* meta-gradient estimators: :class:`TruncatedBPTT` (first- or second-order);
* the outer trainer: :class:`MetaTrainer` (Adam on φ, clipping, validation and early
  stopping, checkpoints, logs).
"""

from .estimators import LOSS_TRANSFORMS, TruncatedBPTT, TruncationResult, meta_loss
from .trainer import (
    TRAIN_SEED_BASE,
    VALIDATION_SEED_BASE,
    MetaTrainConfig,
    MetaTrainer,
    resolve_device,
    validate,
)
from .unroll import GRADIENT_MODES, Unroll, UnrollState, stack_segments

__all__ = [
    "GRADIENT_MODES",
    "LOSS_TRANSFORMS",
    "MetaTrainConfig",
    "MetaTrainer",
    "TRAIN_SEED_BASE",
    "TruncatedBPTT",
    "TruncationResult",
    "Unroll",
    "UnrollState",
    "VALIDATION_SEED_BASE",
    "meta_loss",
    "resolve_device",
    "stack_segments",
    "validate",
]
