"""Persistent evolution strategies (meta/estimators.py): the estimate by hand for one pair, the
particles carried across truncations, and the average against the exact gradient of the whole
unroll (which truncated BPTT does not give)."""

from __future__ import annotations

import pytest
import torch

from learned_optim.meta import Unroll, meta_loss
from learned_optim.meta.estimators import PersistentES
from learned_optim.rules import LSTMGACConfig, LSTMGACRule
from learned_optim.tasks import get_family

F64 = torch.float64


def _setup(hidden: int = 4):
    rule = LSTMGACRule(LSTMGACConfig(hidden_size=hidden, num_layers=1, gac_cells=0, output_scale=0.1), seed=1)
    rule = rule.double()
    stack = get_family("quadratic", dim=3, dtype=F64).stack([5])
    return rule, Unroll(rule, stack, "second-order")


def _losses_at(rule, unroll, phis: list[list[torch.Tensor]], steps: int) -> list[float]:
    """Meta-losses of consecutive truncations of ``steps`` steps, truncation k run at φ = phis[k]."""
    saved = [p.detach().clone() for p in rule.parameters()]
    state, out = unroll.start(), []
    with torch.no_grad():
        for phi in phis:
            for p, value in zip(rule.parameters(), phi):
                p.copy_(value)
            losses, state = unroll.run(state, steps, track=False)
            out.append(float(meta_loss(losses)))
        for p, value in zip(rule.parameters(), saved):
            p.copy_(value)
    return out


def test_one_pair_over_two_truncations_by_hand():
    """pairs = 1: truncation 1 gives ε₁·(L⁺ − L⁻)/(2σ²); truncation 2 continues the same two
    particles (now at φ ± ε₂) and weighs ξ = ε₁ + ε₂, all reproduced by separate unrolls."""
    rule, unroll = _setup()
    sigma, steps = 0.05, 4
    pes = PersistentES(sigma=sigma, pairs=1, seed=3)
    draw = torch.Generator().manual_seed(3)  # the estimator's own draws, repeated
    phi = [p.detach().clone() for p in rule.parameters()]
    eps1 = [torch.randn(p.shape, generator=draw, dtype=p.dtype) * sigma for p in phi]
    eps2 = [torch.randn(p.shape, generator=draw, dtype=p.dtype) * sigma for p in phi]
    first = pes.estimate(rule, unroll, unroll.start(), steps)
    assert all(torch.equal(p, q) for p, q in zip(rule.parameters(), phi))  # φ restored
    second = pes.estimate(rule, unroll, first.state, steps)
    plus = _losses_at(rule, unroll, [[a + e for a, e in zip(phi, eps1)], [a + e for a, e in zip(phi, eps2)]], steps)
    minus = _losses_at(rule, unroll, [[a - e for a, e in zip(phi, eps1)], [a - e for a, e in zip(phi, eps2)]], steps)
    for g, e in zip(first.grads, eps1):
        torch.testing.assert_close(g, e * (plus[0] - minus[0]) / (2 * sigma ** 2))
    for g, e1, e2 in zip(second.grads, eps1, eps2):
        torch.testing.assert_close(g, (e1 + e2) * (plus[1] - minus[1]) / (2 * sigma ** 2))
    assert first.meta_loss == pytest.approx((plus[0] + minus[0]) / 2)
    restarted = pes.estimate(rule, unroll, unroll.start(), steps)  # a state it did not return: a new episode
    for g, e in zip(restarted.grads, [torch.randn(p.shape, generator=draw, dtype=p.dtype) * sigma for p in phi]):
        assert torch.allclose(g / e, (g / e).flatten()[0].expand_as(g))  # ξ is the fresh ε alone again


def test_pes_averages_to_the_gradient_of_the_whole_unroll():
    """Summed over two truncations, PES estimates ∇ of both truncations' losses through the
    whole unroll, which BPTT over all the steps at once gives exactly (second-order, a
    deterministic quadratic): with enough pairs the two point the same way."""
    torch.manual_seed(0)
    rule, unroll = _setup(hidden=2)
    steps = 5
    state = unroll.start()
    losses, _ = unroll.run(state, 2 * steps, track=True)
    exact = torch.autograd.grad(2 * meta_loss(losses), list(rule.parameters()))
    pes = PersistentES(sigma=1e-3, pairs=600, seed=0)
    first = pes.estimate(rule, unroll, unroll.start(), steps)
    second = pes.estimate(rule, unroll, first.state, steps)
    estimate = torch.cat([(a + b).flatten() for a, b in zip(first.grads, second.grads)])
    truth = torch.cat([g.flatten() for g in exact])
    cosine = float(torch.nn.functional.cosine_similarity(estimate, truth, dim=0))
    assert cosine > 0.8, cosine
    assert 0.7 < float(estimate @ truth / (truth @ truth)) < 1.3  # the right size too


def test_bad_pes_settings_are_refused_by_name():
    for kwargs, message in (({"sigma": 0.0}, "sigma"), ({"sigma": float("nan")}, "sigma"),
                            ({"pairs": 0}, "pairs"), ({"loss_transform": "sum"}, "loss_transform")):
        with pytest.raises(ValueError, match=message):
            PersistentES(**kwargs)


def test_the_meta_trainer_runs_pes_and_keeps_it_in_its_settings(tmp_path):
    """estimator="pes" in the trainer: an episode applies finite PES updates to φ (φ moves), the
    settings are saved for resuming, and a checkpoint of the other estimator is refused."""
    from learned_optim.meta import MetaTrainConfig, MetaTrainer

    base = dict(task="quadratic", task_kwargs={"dim": 3}, horizon=10, truncation=5, tasks_per_step=2,
                episodes=1, validate_every=1, validation_tasks=2, checkpoint_every=1, device="cpu",
                rule_config={"hidden_size": 4})
    trainer = MetaTrainer(MetaTrainConfig(**base, estimator="pes", pes_pairs=2, pes_sigma=0.02), tmp_path,
                          progress=False, log=None)
    before = [p.detach().clone() for p in trainer.rule.parameters()]
    applied = trainer.run_episode()
    assert len(applied) == 2 and all(torch.isfinite(torch.tensor(applied)))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.rule.parameters()))
    assert trainer.config.training()["estimator"] == "pes"
    trainer.save_checkpoint()
    with pytest.raises(ValueError, match="other training settings .*estimator"):
        MetaTrainer(MetaTrainConfig(**base), tmp_path, progress=False, log=None).try_resume()
    with pytest.raises(ValueError, match="estimator must be one of"):
        MetaTrainConfig(**base, estimator="es")
    with pytest.raises(ValueError, match="pes_pairs must be a positive integer"):
        MetaTrainConfig(**base, pes_pairs=0)
