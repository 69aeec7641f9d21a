"""Learned update rules: functional modules mapping gradients and state to updates.

A rule is a ``torch.nn.Module`` (its parameters are φ) with ``init_state(n, segments=…)``,
``segments(sizes)`` / ``segments_from(tensor_scopes, group_scopes)`` (its layout of the
coordinates) and ``forward(grad, state, segments) -> (update, new_state)``; the state is a
tensor or a tuple of tensors (NTM-BFGS: per-coordinate rows and the group memories). The same
module serves the drop-in optimizers (under ``no_grad``) and the meta-trainer (with graph).
"""

from .lstm_cell import LSTMGACCore
from .lstm_gac import LSTMGACConfig, LSTMGACRule
from .ntm_bfgs import BFGSHeads, HeadInputs, LearnedHeads, NTMBFGSConfig, NTMBFGSRule, NTMLayout
from .ntm_memory import DenseMemory, LimitedMemory, MemoryGroups, choose_memory
from .preprocess import log_sign_preprocess
from .segments import Segments
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
register_rule(NTMBFGSRule.name, lambda config: NTMBFGSRule(NTMBFGSConfig.from_dict(config)))

__all__ = [
    "BFGSHeads",
    "DenseMemory",
    "HeadInputs",
    "LearnedHeads",
    "MemoryGroups",
    "NTMBFGSConfig",
    "NTMBFGSRule",
    "NTMLayout",
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
