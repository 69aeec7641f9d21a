"""Meta-training learned update rules, in layers with narrow interfaces (as in
learned_optimization):

* tasks: :mod:`learned_optim.tasks` (families and :class:`~learned_optim.tasks.TaskStack`),
  shared with the benchmark harness;
* unrolling: :class:`Unroll` runs a rule on a task stack, carrying θ and the rule state;
* meta-gradient estimators: :class:`TruncatedBPTT` over an unroll whose optimizee gradient
  enters first-order, second-order or GD-by-SGD (see :data:`GRADIENT_MODES`), and
  :class:`PersistentES` (antithetic PES: forward unrolls only, no truncation bias), over all
  of φ or the part :func:`trainable_masks` names;
* the outer trainer: :class:`MetaTrainer` (Adam on φ, clipping, validation and early
  stopping, checkpoints, logs).

Learned initializations (the MAML family) have their own estimators of ∂L_test/∂θ₀ in
:mod:`learned_optim.meta.initialization`: :class:`SecondOrder`, :class:`FirstOrder`,
:class:`GDBySGD` and :class:`Implicit` (iMAML), driven by :class:`MAML`.
"""

from .estimators import ESTIMATORS, LOSS_TRANSFORMS, PersistentES, TruncatedBPTT, TruncationResult, meta_loss
from .initialization import (
    INIT_ESTIMATORS,
    MAML,
    CGResult,
    FirstOrder,
    GDBySGD,
    Implicit,
    InitEstimate,
    InitEstimator,
    InnerOptimizer,
    InnerSGD,
    MetaTask,
    SecondOrder,
    conjugate_gradient,
    get_estimator,
)
from .memory import peak_memory
from .trainable import trainable_masks
from .trainer import (
    TRAIN_SEED_BASE,
    VALIDATION_SEED_BASE,
    MetaTrainConfig,
    MetaTrainer,
    resolve_device,
    validate,
)
from .unroll import GRADIENT_MODES, PRECISIONS, Unroll, UnrollState, stack_segments

__all__ = [
    "CGResult",
    "FirstOrder",
    "GDBySGD",
    "GRADIENT_MODES",
    "PRECISIONS",
    "INIT_ESTIMATORS",
    "Implicit",
    "InitEstimate",
    "InitEstimator",
    "InnerOptimizer",
    "InnerSGD",
    "MAML",
    "MetaTask",
    "SecondOrder",
    "conjugate_gradient",
    "get_estimator",
    "LOSS_TRANSFORMS",
    "MetaTrainConfig",
    "MetaTrainer",
    "TRAIN_SEED_BASE",
    "TruncatedBPTT",
    "PersistentES",
    "ESTIMATORS",
    "TruncationResult",
    "Unroll",
    "UnrollState",
    "VALIDATION_SEED_BASE",
    "meta_loss",
    "peak_memory",
    "resolve_device",
    "stack_segments",
    "trainable_masks",
    "validate",
]
