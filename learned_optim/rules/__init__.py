"""Learned update rules: functional modules mapping gradients and state to updates.

A rule is a ``torch.nn.Module`` (its parameters are φ) with ``init_state(n)``,
``segments(sizes)`` and ``forward(grad, state, segments) -> (update, new_state)``. The same
module serves the drop-in optimizers (under ``no_grad``) and the meta-trainer (with graph).
"""

from .lstm_gac import LSTMGACConfig, LSTMGACCore, LSTMGACRule, Segments
from .ntm_memory import DenseMemory, LimitedMemory, choose_memory
from .preprocess import log_sign_preprocess
from .weights import (
    WeightsError,
    available_weights,
    load_rule,
    pretrained_dir,
    register_rule,
    rule_from_config,
    save_rule,
)

register_rule(LSTMGACRule.name, lambda config: LSTMGACRule(LSTMGACConfig.from_dict(config)))

__all__ = [
    "DenseMemory",
    "LSTMGACConfig",
    "LSTMGACCore",
    "LSTMGACRule",
    "LimitedMemory",
    "Segments",
    "WeightsError",
    "available_weights",
    "choose_memory",
    "load_rule",
    "log_sign_preprocess",
    "pretrained_dir",
    "register_rule",
    "rule_from_config",
    "save_rule",
]
