"""Meta-training a part of φ (meta/trainable.py): the masks by hand, bad specs refused by name,
and in the trainer, for both estimators, the frozen part left exactly as it started."""

from __future__ import annotations

import pytest
import torch

from learned_optim.meta import MetaTrainConfig, MetaTrainer
from learned_optim.meta.estimators import PersistentES
from learned_optim.meta.trainable import trainable_masks
from learned_optim.rules import LSTMGACConfig, LSTMGACRule

SMALL = {"hidden_size": 4, "num_layers": 1, "gac_cells": 0}


def test_masks_by_hand():
    rule = LSTMGACRule(LSTMGACConfig(**SMALL))
    names = [n for n, _ in rule.named_parameters()]
    assert names == ["output_weight", "output_bias", "core.weights.0", "core.biases.0"]
    assert trainable_masks(rule, None) == [None] * 4
    masks = trainable_masks(rule, ["output_bias", "core.weights.0[1:3]", "core.weights.0[5:6]"])
    assert masks[1] is None  # the whole tensor trains
    assert torch.equal(masks[0], torch.zeros(4, 1)) and torch.equal(masks[3], torch.zeros(16))  # frozen
    rows = masks[2].sum(1)  # core.weights.0: (2 inputs + 4 hidden, 16 gates)
    assert rows.tolist() == [0, 16, 16, 0, 0, 16]
    assert trainable_masks(rule, ["core.weights.0[0:6]"])[2] is None  # every row named: the whole tensor


@pytest.mark.parametrize("specs, message", [
    (["momentum_bias"], r"names no tensor of the rule; its tensors: output_weight \[4, 1\]"),
    (["core.weights.0[3:3]"], r"rows 3:3 are not a non-empty range within the 6 rows of core.weights.0"),
    (["core.weights.0[2:9]"], "within the 6 rows"),
    (["core.weights.0[2]"], r"is not NAME or NAME\[start:stop\]"),
    ([], "non-empty list"),
    ("output_bias", "non-empty list"),
])
def test_bad_specs_are_refused_by_name(specs, message):
    with pytest.raises(ValueError, match=message):
        trainable_masks(LSTMGACRule(LSTMGACConfig(**SMALL)), specs)


def test_pes_perturbs_only_the_masked_part():
    """PES draws ε only where the mask is 1: its estimate is exactly 0 elsewhere."""
    from learned_optim.meta import Unroll
    from learned_optim.tasks import get_family

    rule = LSTMGACRule(LSTMGACConfig(**SMALL), seed=1)
    masks = trainable_masks(rule, ["core.weights.0[0:2]"])
    unroll = Unroll(rule, get_family("quadratic", dim=3).stack([5]))
    result = PersistentES(sigma=0.01, pairs=2, seed=0, masks=masks).estimate(rule, unroll, unroll.start(), 4)
    weights = result.grads[2]
    assert torch.count_nonzero(weights[2:]) == 0 and torch.count_nonzero(weights[:2]) > 0
    assert all(torch.count_nonzero(g) == 0 for g in (result.grads[0], result.grads[1], result.grads[3]))
    with pytest.raises(ValueError, match="2 masks for a rule of 4 parameters"):
        PersistentES(masks=masks[:2]).estimate(rule, unroll, unroll.start(), 4)


@pytest.mark.parametrize("estimator", ["truncated-bptt", "pes"])
def test_the_trainer_keeps_the_frozen_part_exactly(tmp_path, estimator):
    base = dict(task="quadratic", task_kwargs={"dim": 3}, horizon=10, truncation=5, tasks_per_step=2,
                episodes=1, validate_every=1, validation_tasks=2, checkpoint_every=1, device="cpu",
                rule_config=SMALL, estimator=estimator, pes_pairs=2, pes_sigma=0.02)
    trainer = MetaTrainer(MetaTrainConfig(**base, trainable=["output_bias", "core.weights.0[0:2]"]), tmp_path,
                          progress=False, log=None)
    before = {n: p.detach().clone() for n, p in trainer.rule.named_parameters()}
    assert len(trainer.run_episode()) == 2
    after = dict(trainer.rule.named_parameters())
    assert torch.equal(after["output_weight"], before["output_weight"])
    assert torch.equal(after["core.biases.0"], before["core.biases.0"])
    assert torch.equal(after["core.weights.0"][2:], before["core.weights.0"][2:])
    assert not torch.equal(after["core.weights.0"][:2], before["core.weights.0"][:2])
    assert not torch.equal(after["output_bias"], before["output_bias"])
    trainer.save_checkpoint()  # the subset is a training setting: a resume must match it
    with pytest.raises(ValueError, match="other training settings .*trainable"):
        MetaTrainer(MetaTrainConfig(**base), tmp_path, progress=False, log=None).try_resume()
    with pytest.raises(ValueError, match="names no tensor of the rule"):
        MetaTrainer(MetaTrainConfig(**base, trainable=["nope"]), tmp_path / "b", progress=False, log=None)
    with pytest.raises(ValueError, match="trainable must be None or a non-empty list"):
        MetaTrainConfig(**base, trainable=[])
