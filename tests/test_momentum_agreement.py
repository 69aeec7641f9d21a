"""``momentum_agreement``: the LSTM's input a_t = ∇_t·m̂_{t−1}/v̂_t, by hand; its invariance to the
gradients' scale; and that weights widened to read it (a zero input row) step exactly as before."""

from __future__ import annotations

import pytest
import torch

from learned_optim import LSTMOptimizer
from learned_optim.rules import LSTMGACConfig, LSTMGACRule, Segments, load_rule
from learned_optim.rules.lstm_gac import widened_inputs

NORMALIZED = dict(momentum_decays=(0.5, 0.9, 0.99), momentum_rms_decay=0.999, input_features="normalized",
                  bias_correction=True, absolute_step=False)


def _agreements(rule: LSTMGACRule, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The agreement input (the last LSTM input row) at each step of a gradient sequence."""
    state = rule.init_state(grads[0].numel())
    lstm, momentum, second_moment = rule.split_state(state)
    rows = []
    for grad in grads:
        features, momentum, second_moment = rule.signals(grad, momentum, second_moment)
        rows.append(features[-1])
    return rows


def test_agreement_is_zero_first_then_plus_one_on_a_repeated_gradient_and_minus_one_on_a_reversed_one():
    """Step 1: m_0 = 0, so a_1 = 0. Step 2 after ∇_1 = g: m̂_1 = (1 − 0.9)·g/(1 − 0.9) = g and
    v̂_2 = (0.999·0.001 + 0.001)·g²/(1 − 0.999²) = g², so a_2 = ∇_2·g/g² = +1 for ∇_2 = g, −1 for −g."""
    rule = LSTMGACRule(LSTMGACConfig(momentum_agreement=True, **NORMALIZED), seed=0)
    assert rule.config.input_names()[-1] == "agreement[0.9]"
    g = torch.tensor([0.3, -2.0, 5e-3, 7.0])
    same = _agreements(rule, [g, g])
    turned = _agreements(rule, [g, -g])
    torch.testing.assert_close(same[0], torch.zeros(4))
    torch.testing.assert_close(same[1], torch.ones(4), rtol=1e-4, atol=1e-4)  # (v in float32, ε = 1e-8)
    torch.testing.assert_close(turned[1], -torch.ones(4), rtol=1e-4, atol=1e-4)


def test_agreement_is_invariant_to_the_gradients_scale_and_bounded():
    rule = LSTMGACRule(LSTMGACConfig(momentum_agreement=True, **NORMALIZED), seed=0)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(50, generator=gen) for _ in range(6)]
    base = _agreements(rule, grads)
    scaled = _agreements(rule, [g * 1e3 for g in grads])
    for a, b in zip(base, scaled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # 1,000 quiet steps, then gradients 10³ larger: v̂ is still mostly the quiet stretch's when m̂
    # already holds the large ones (a_t ≈ 40 at the third), so the clamp at 10 bites
    spike = _agreements(rule, [torch.full((3,), 1e-3)] * 1000 + [torch.ones(3)] * 3)
    torch.testing.assert_close(spike[-1], torch.full((3,), 10.0))
    assert all(float(a.abs().max()) <= 10.0 for a in base)


def test_default_weights_widened_to_read_agreement_step_exactly_as_before():
    """A zero input row: the widened rule (as the meta-trainer's warm start makes it) takes the
    shipped default's steps bit for bit, so a run from it starts where the default is."""
    shipped, _ = load_rule("suite-relative-offset")
    config = LSTMGACConfig(**{**shipped.config.to_dict(), "momentum_agreement": True})
    widened = LSTMGACRule(config)
    widened.load_state_dict(widened_inputs(shipped.state_dict(), shipped.config, config))
    results = []
    for rule in (shipped, widened):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        opt = LSTMOptimizer(model.parameters(), weights=rule)
        x, y = torch.randn(32, 6), torch.randn(32, 1)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_agreement_reaches_the_step_once_its_input_row_is_trained():
    rule = LSTMGACRule(LSTMGACConfig(momentum_agreement=True, **NORMALIZED), seed=0)
    with torch.no_grad():
        rule.momentum_weight.fill_(0.05)  # the LSTM's output sets the step sizes (a fresh rule's do not read it)
    segments = Segments.from_sizes([4])
    g = torch.tensor([0.3, -2.0, 0.5, 1.0])
    steps = []
    for weight in (0.0, 2.0):
        with torch.no_grad():
            rule.core.weights[0][rule.config.input_names().index("agreement[0.9]")] = weight
        state = rule.init_state(4)
        _, state = rule(g, state, segments)
        update, _ = rule(-g, state, segments)
        steps.append(update.detach())
    assert not torch.allclose(steps[0], steps[1])


@pytest.mark.parametrize(("changes", "message"), [
    ({"momentum_agreement": 1}, "momentum_agreement must be True or False"),
    ({"momentum_agreement": True, "bias_correction": False}, "momentum_agreement needs input_features"),
    ({"momentum_agreement": True, "input_features": "log-sign"}, "momentum_agreement needs input_features"),
])
def test_bad_agreement_configs_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        LSTMGACConfig(**{**NORMALIZED, **changes})
