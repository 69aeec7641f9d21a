"""The LSTM+GAC update rule: preprocessing by hand, the LSTM math against torch.nn.LSTMCell,
global averaging cells, order independence, and config validation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from learned_optim.rules import LSTMGACConfig, LSTMGACRule, Segments, log_sign_preprocess

F64 = torch.float64


def test_preprocessing_matches_the_papers_formula_by_hand():
    p = 10.0
    grads = torch.tensor([1.0, -math.e**2, 1e-3, 0.0, 1e-6, -2e-5], dtype=F64)
    features = log_sign_preprocess(grads, p)
    expected = torch.tensor(
        [  # one row per gradient: (log feature, sign feature)
            [0.0, 1.0],  # log 1 / 10, sign
            [0.2, -1.0],  # log e² / 10
            [math.log(1e-3) / 10, 1.0],  # 1e-3 ≥ e^-10 ≈ 4.5e-5
            [-1.0, 0.0],  # below the threshold: (−1, e^p·∇)
            [-1.0, 1e-6 * math.exp(10)],
            [-1.0, -2e-5 * math.exp(10)],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(features.T, expected, rtol=1e-12, atol=1e-12)


def test_preprocessing_is_continuous_at_the_threshold_and_has_finite_gradients():
    t = math.exp(-10.0)
    below = log_sign_preprocess(torch.tensor([t * (1 - 1e-9)], dtype=F64))
    above = log_sign_preprocess(torch.tensor([t * (1 + 1e-9)], dtype=F64))
    torch.testing.assert_close(below, above, atol=1e-8, rtol=0)
    g = torch.tensor([0.0, 1e-7, 3.0, -2.0], dtype=F64, requires_grad=True)
    log_sign_preprocess(g).sum().backward()
    assert torch.isfinite(g.grad).all()


def _rule(**overrides) -> LSTMGACRule:
    return LSTMGACRule(LSTMGACConfig(**overrides), seed=3).double()


def test_lstm_without_gac_is_exactly_a_stack_of_torch_lstm_cells():
    rule = _rule(gac_cells=0)
    cfg = rule.config
    torch.manual_seed(0)
    grad = torch.randn(7, dtype=F64) * 3
    state = torch.randn(cfg.state_rows, 7, dtype=F64) * 0.5
    update, new_state = rule(grad, state, Segments.single(7))
    state, new_state = rule.split_state(state)[0], rule.split_state(new_state)[0]  # (L, h/c, H, N)

    x = log_sign_preprocess(grad, cfg.preprocess_p).T  # (N, 2) for torch's (batch, features)
    for layer in range(cfg.num_layers):
        w, b = rule.core.weights[layer], rule.core.biases[layer]
        n_in = x.shape[1]
        cell = torch.nn.LSTMCell(n_in, cfg.hidden_size).double()
        with torch.no_grad():
            cell.weight_ih.copy_(w[:n_in].T)
            cell.weight_hh.copy_(w[n_in:].T)
            cell.bias_ih.copy_(b)
            cell.bias_hh.zero_()
        h, c = cell(x, (state[layer, 0].T, state[layer, 1].T))
        torch.testing.assert_close(new_state[layer, 0].T, h, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new_state[layer, 1].T, c, rtol=1e-12, atol=1e-12)
        x = h
    expected = (x @ rule.output_weight + rule.output_bias).squeeze(1) * cfg.output_scale
    torch.testing.assert_close(update, expected, rtol=1e-12, atol=1e-12)


def test_global_averaging_cells_output_the_scope_mean():
    rule = _rule(gac_cells=3)
    torch.manual_seed(1)
    grad = torch.randn(9, dtype=F64)
    state = rule.init_state(9)
    segments = Segments.from_sizes([4, 5])
    _, new_state = rule(grad, state, segments)
    h0 = rule.split_state(new_state)[0][0, 0].T  # layer 0's h as (N, H)
    # GAC units are constant within each scope and differ between them...
    for a, b in ((0, 4), (4, 9)):
        assert torch.allclose(h0[a:b, :3], h0[a:a + 1, :3].expand(b - a, 3))
    assert not torch.allclose(h0[0, :3], h0[4, :3])
    # ...and equal the scope mean of what those units compute without averaging.
    plain = _rule(gac_cells=0)
    plain.load_state_dict(rule.state_dict())
    _, raw = plain(grad, state, segments)
    raw_h0 = plain.split_state(raw)[0][0, 0].T
    torch.testing.assert_close(h0[:4, :3], raw_h0[:4, :3].mean(0).expand(4, 3))
    # Non-GAC units are per coordinate.
    torch.testing.assert_close(h0[:, 3:], raw_h0[:, 3:])


def test_group_scope_averages_over_every_tensor_of_the_group():
    rule = _rule(gac_scope="group")
    segments = rule.segments([4, 5])
    assert segments.count == 1
    _, state = rule(torch.randn(9, dtype=F64), rule.init_state(9), segments)
    gac = rule.split_state(state)[0][0, 0, :2]  # (2, N)
    assert torch.allclose(gac, gac[:, :1].expand(2, 9))


def test_permuting_coordinates_permutes_the_updates():
    rule = _rule()
    torch.manual_seed(2)
    sizes = [6, 10]
    grad = torch.randn(16, dtype=F64)
    state = torch.randn(rule.config.state_rows, 16, dtype=F64) * 0.3
    update, new_state = rule(grad, state, Segments.from_sizes(sizes))
    # Permute within each tensor, and swap the order of the two tensors.
    perm = torch.cat([6 + torch.randperm(10), torch.randperm(6)])
    update_p, state_p = rule(grad[perm], state[..., perm], Segments.from_sizes([10, 6]))
    torch.testing.assert_close(update_p, update[perm], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(state_p, new_state[..., perm], rtol=1e-12, atol=1e-13)


def test_segments_from_ids_match_consecutive_sizes():
    x = torch.randn(2, 7, dtype=F64)  # (features, coordinates)
    by_sizes = Segments.from_sizes([3, 0, 4]).mean(x)
    by_ids = Segments.from_ids(torch.tensor([0, 0, 0, 2, 2, 2, 2]), 3).mean(x)
    torch.testing.assert_close(by_sizes, by_ids)
    torch.testing.assert_close(by_sizes[:, 0], x[:, :3].mean(1))
    torch.testing.assert_close(by_sizes[:, 6], x[:, 3:].mean(1))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_layers": 1.5}, "num_layers"),
        ({"gac_cells": 30}, "gac_cells"),
        ({"gac_cells": -1}, "gac_cells"),
        ({"gac_scope": "layer"}, "gac_scope"),
        ({"preprocess_p": 0.0}, "preprocess_p"),
        ({"output_scale": float("nan")}, "output_scale"),
        ({"momentum_decays": (0.9, 1.0)}, "momentum_decays"),
        ({"momentum_decays": (0.9,), "momentum_rms_decay": 1.0}, "momentum_rms_decay"),
        ({"momentum_rms_decay": 0.99}, "momentum_rms_decay needs momentum_decays"),
        ({"momentum_decays": (0.5, 0.999), "momentum_rms_decay": 0.99}, r"square of every momentum decay.*0\.999"),
        ({"momentum_decays": (0.9,), "momentum_rms_decay": 0.999, "direction_clip": 0.0}, "direction_clip"),
        ({"momentum_decays": (0.9,), "momentum_rms_decay": 0.999, "direction_clip": True}, "direction_clip"),
        ({"momentum_decays": (0.9,), "direction_clip": 1.0}, "direction_clip needs momentum_rms_decay"),
        ({"momentum_decays": (0.9,), "momentum_rms_decay": 0.999, "bias_correction": True, "step_decay_after": 0.5}, "step_decay_after must be"),
        ({"momentum_decays": (0.9,), "momentum_rms_decay": 0.999, "bias_correction": True, "step_decay_after": True}, "step_decay_after must be"),
        ({"momentum_decays": (0.9,), "momentum_rms_decay": 0.999, "step_decay_after": 100}, "step_decay_after needs bias_correction"),
    ],
)
def test_bad_configs_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LSTMGACConfig(**kwargs)


def test_config_round_trips_and_refuses_unknown_fields():
    cfg = LSTMGACConfig(hidden_size=8, gac_cells=1, gac_scope="group", momentum_decays=[0.5, 0.9])
    assert cfg.momentum_decays == (0.5, 0.9)
    assert LSTMGACConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # through JSON
    with pytest.raises(ValueError, match="unknown LSTMGACConfig fields.*colour"):
        LSTMGACConfig.from_dict({**cfg.to_dict(), "colour": "red"})


def test_momentum_sums_and_their_learned_step_sizes_by_hand():
    """m_j ← β_j·m_j + ∇; g = s·(wᵀh + b) + Σ_j (u_jᵀh + c_j)·m_j with h the LSTM's top output."""
    rule = _rule(momentum_decays=(0.5, 0.9))
    assert rule.config.state_rows == 2 * 2 * 20 + 2
    torch.manual_seed(4)
    n = 6
    grad = torch.randn(n, dtype=F64)
    state = torch.randn(rule.config.state_rows, n, dtype=F64) * 0.3
    with torch.no_grad():
        rule.momentum_weight.normal_()
        rule.momentum_bias.copy_(torch.tensor([-0.7, 0.2]))
    update, new_state = rule(grad, state, Segments.single(n))
    lstm, momentum, _ = rule.split_state(state)
    expected_m = torch.stack([0.5 * momentum[0] + grad, 0.9 * momentum[1] + grad])
    torch.testing.assert_close(rule.split_state(new_state)[1], expected_m, rtol=1e-14, atol=1e-14)
    # The LSTM sees the log/sign features of ∇, m_1, m_2 (in that order of signals).
    features = torch.cat([log_sign_preprocess(v, 10.0) for v in (grad, expected_m[0], expected_m[1])])
    order = [0, 2, 4, 1, 3, 5]  # (log ∇, log m_1, log m_2, sign ∇, sign m_1, sign m_2)
    top, new_lstm = rule.core(features[order], lstm, Segments.single(n))
    torch.testing.assert_close(rule.split_state(new_state)[0], new_lstm, rtol=1e-14, atol=1e-14)
    plain = (top.T @ rule.output_weight + rule.output_bias).squeeze(1) * 0.1
    step_sizes = top.T @ rule.momentum_weight + rule.momentum_bias  # (N, M)
    torch.testing.assert_close(update, plain + (step_sizes * expected_m.T).sum(1), rtol=1e-12, atol=1e-12)


def test_a_momentum_rule_with_zero_lstm_output_is_heavy_ball_momentum():
    """With w = u = 0 and b = 0, the rule is θ ← θ + c·m, m ← β·m + ∇: heavy ball with lr −c."""
    rule = _rule(momentum_decays=(0.9,))
    with torch.no_grad():
        rule.output_weight.zero_()
        rule.momentum_bias.fill_(-0.05)
    theta = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    reference = theta.clone().requires_grad_(True)
    sgd = torch.optim.SGD([reference], lr=0.05, momentum=0.9)
    state = rule.init_state(3)
    for _ in range(5):
        grad = 2 * theta * torch.tensor([1.0, 3.0, 0.5], dtype=F64)  # a diagonal quadratic
        update, state = rule(grad, state, Segments.single(3))
        theta = theta + update
        sgd.zero_grad()
        reference.grad = 2 * reference.detach() * torch.tensor([1.0, 3.0, 0.5], dtype=F64)
        sgd.step()
        torch.testing.assert_close(theta, reference.detach(), rtol=1e-12, atol=1e-12)


def _adam_like_reference(grads, betas, beta2, c):
    """θ-increments Σ_j c_j·(1−β_j)·m_j/(√v + ε), written out loop by loop (no bias correction)."""
    m = [torch.zeros_like(grads[0]) for _ in betas]
    v = torch.zeros_like(grads[0])
    out = []
    for g in grads:
        v = beta2 * v + (1 - beta2) * g * g
        step = torch.zeros_like(g)
        for j, beta in enumerate(betas):
            m[j] = beta * m[j] + g
            step = step + c[j] * (1 - beta) * m[j] / (v.sqrt() + 1e-8)
        out.append(step)
    return out


def test_normalized_momentum_by_hand_is_scale_free_and_bounded():
    """With β₂ set, d_j = (1−β_j)·m_j/(√v+ε), v ← β₂·v + (1−β₂)·∇²: steps do not grow with ∇."""
    betas, beta2, c = (0.5, 0.9, 0.99), 0.99, (-0.3, 0.2, -0.1)
    rule = _rule(momentum_decays=betas, momentum_rms_decay=beta2)
    assert rule.config.state_rows == 2 * 2 * 20 + 3 + 1
    with torch.no_grad():
        rule.output_weight.zero_()  # isolate the momentum term: update = Σ_j c_j·d_j
        rule.momentum_bias.copy_(torch.tensor(c, dtype=F64))
    torch.manual_seed(7)
    base = [torch.randn(5, dtype=F64) * torch.rand(1, dtype=F64) for _ in range(30)]
    for scale in (1e-5, 1.0, 1e6):
        state = rule.init_state(5)
        expected = _adam_like_reference([g * scale for g in base], betas, beta2, c)
        for g, want in zip(base, expected):
            update, state = rule(g * scale, state, Segments.single(5))
            torch.testing.assert_close(update, want, rtol=1e-10, atol=1e-12)
    # Scale-free: the same updates at gradient scales 1e-2 and 1e6 (up to ε = 1e-8 against √v).
    small = _adam_like_reference([g * 1e-2 for g in base], betas, beta2, c)
    large = _adam_like_reference([g * 1e6 for g in base], betas, beta2, c)
    for a, b in zip(small, large):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-9)  # unnormalized: 1e8 apart
    # Bounded: |d_j| ≤ (1−β_j)/√((1−β₂)(1−β_j²/β₂)) even for an adversarial sequence (huge, then tiny, same sign).
    rule_one = _rule(momentum_decays=(0.9,), momentum_rms_decay=beta2)
    with torch.no_grad():
        rule_one.output_weight.zero_()
        rule_one.momentum_bias.fill_(1.0)
    state, worst = rule_one.init_state(1), 0.0
    for g in [1e3] * 20 + [1e-3] * 200:
        update, state = rule_one(torch.tensor([g], dtype=F64), state, Segments.single(1))
        worst = max(worst, abs(update.item()))
    bound = 0.1 / math.sqrt((1 - beta2) * (1 - 0.81 / beta2))
    assert 0.5 * bound < worst <= bound


def test_rule_state_of_the_wrong_shape_is_refused():
    rule = _rule()
    with pytest.raises(ValueError, match=r"rule state must have shape \(80, N\)"):
        rule(torch.zeros(3, dtype=F64), torch.zeros(2, 2, 20, 3, dtype=F64), Segments.single(3))


# ---------------------------------------------------------------- the in-place, chunked step


def _perturbed_rule(config: LSTMGACConfig, dtype: torch.dtype = F64) -> LSTMGACRule:
    rule = LSTMGACRule(config, seed=1).to(dtype)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # away from the initial weights, so every output layer matters
        for p in rule.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=dtype))
    return rule


def _random_inputs(rule: LSTMGACRule, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    cfg, gen, dtype = rule.config, torch.Generator().manual_seed(seed), rule.dtype
    state = torch.randn(cfg.state_rows, n, generator=gen, dtype=dtype)
    if cfg.momentum_rms_decay is not None:
        state[-1].abs_()  # v ≥ 0
    grad = torch.randn(n, generator=gen, dtype=dtype) * 10 ** (2 * torch.randn(n, generator=gen, dtype=dtype))
    extra = torch.randn(cfg.extra_inputs, n, generator=gen, dtype=dtype) if cfg.extra_inputs else None
    return grad, state, extra


STEP_CONFIGS = [
    dict(),  # the paper's rule
    dict(momentum_decays=(0.5, 0.9, 0.99), momentum_rms_decay=0.99),  # the shipped weights' architecture
    dict(momentum_decays=(0.9,), gac_scope="group", num_layers=3, hidden_size=7, gac_cells=3),
    dict(extra_inputs=2, gac_cells=0),  # NTM-BFGS's controller shape, no averaging cells
    dict(momentum_decays=(0.5, 0.9), momentum_rms_decay=0.99, input_features="normalized", bias_correction=True,
         step_timescales=(3.0,), direction_clip=0.5, step_decay_after=1.5),  # clamped directions (the random v
    # makes many |d_j| > 0.5) and a decay that bites where the random t exceeds 1.5
]


@pytest.mark.parametrize("kwargs", STEP_CONFIGS)
@pytest.mark.parametrize("chunk", [1, 7, 300, 4096])
def test_in_place_step_is_the_differentiable_step(kwargs, chunk):
    """step_ (chunks, buffers, states overwritten) against step (fresh tensors), float64, over
    tensors that chunks straddle, an empty one included: same update, state and top output."""
    rule = _perturbed_rule(LSTMGACConfig(**kwargs))
    sizes = [5, 1000, 37, 0, 300]
    segments = rule.segments(sizes)
    grad, state, extra = _random_inputs(rule, sum(sizes))
    with torch.no_grad():
        update, new_state, top = rule.step(grad, state, segments, extra)
    for sigmoid_tanh in (False, True):
        in_place, out = state.clone(), torch.full_like(grad, float("nan"))
        returned_top = rule.step_(grad, in_place, segments, out, extra, chunk=chunk, sigmoid_tanh=sigmoid_tanh)
        torch.testing.assert_close(out, update, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(in_place, new_state, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(returned_top, top, rtol=1e-12, atol=1e-12)


def test_in_place_step_in_one_chunk_is_bitwise_the_differentiable_step_in_float32():
    rule = _perturbed_rule(LSTMGACConfig(momentum_decays=(0.5, 0.9), momentum_rms_decay=0.99), torch.float32)
    segments = rule.segments([64, 200])
    grad, state, _ = _random_inputs(rule, 264)
    with torch.no_grad():
        update, new_state, _ = rule.step(grad, state, segments)
    out = torch.empty_like(grad)
    rule.step_(grad, state, segments, out, chunk=264, sigmoid_tanh=False)
    assert torch.equal(out, update) and torch.equal(state, new_state)


def test_tanh_from_sigmoid_stays_within_its_stated_float32_error():
    """lstm_cell's 2σ(2x) − 1 against torch.tanh in float64: |error| ≤ 2.4e-7 in float32."""
    from learned_optim.rules.lstm_cell import CellBuffers, lstm_cell

    x = torch.linspace(-12, 12, 200_001)
    gates = torch.cat((torch.zeros(2, x.numel()), 2 * x.unsqueeze(0), torch.full((1, x.numel()), 30.0)))
    c = torch.zeros(1, x.numel())
    h, c_new = lstm_cell(gates.clone(), c, 1, sigmoid_tanh=True)  # i = f = 1/2, o = 1: c = tanh(x)/2
    exact = torch.tanh(x.double())
    assert (c_new.double().squeeze(0) - exact / 2).abs().max() <= 1.2e-7
    assert (h.double().squeeze(0) - torch.tanh(exact / 2)).abs().max() <= 2.4e-7
    # and the buffered form writes the same values where it is told to
    buffers = CellBuffers(gates=gates.clone(), tanh=torch.empty(1, x.numel()), h=torch.empty(1, x.numel()),
                          c=torch.zeros(1, x.numel()))
    h2, c2 = lstm_cell(buffers.gates, buffers.c, 1, buffers, sigmoid_tanh=True)
    assert h2.data_ptr() == buffers.h.data_ptr() and c2.data_ptr() == buffers.c.data_ptr()
    assert torch.equal(h2, h) and torch.equal(c2, c_new)


def test_chunks_know_the_one_scope_they_lie_in():
    segments = Segments.from_sizes([3, 5, 0, 4])  # scopes 0: 0–2, 1: 3–7, 2: empty, 3: 8–11
    assert segments.chunks(3) == [(0, 3, 0), (3, 6, 1), (6, 9, None), (9, 12, 3)]
    assert segments.chunks(12) == [(0, 12, None)]
    assert Segments.single(5).chunks(2) == [(0, 2, 0), (2, 4, 0), (4, 5, 0)]
    ids = torch.tensor([1, 0, 1, 0])
    assert Segments.from_ids(ids, 2).chunks(2) == [(0, 2, None), (2, 4, None)]


def test_chunked_averages_are_accurate_on_a_large_scope():
    """The GAC mean of 2e6 float32 values summed chunk by chunk against float64: within a
    few float32 ulps (index_add's one-by-one sum is about 100 times further off here)."""
    x = torch.rand(2, 2_000_000, generator=torch.Generator().manual_seed(0)) + 0.5
    segments = Segments.from_sizes([1_000, 1_999_000])
    sums = torch.zeros(2, 2)
    for start, stop, scope in segments.chunks(16384):
        segments.add_sums(sums, x[:, start:stop], start, scope)
    rows = torch.empty_like(x)
    segments.fill_means(rows, sums, 16384)
    exact = torch.stack((x[:, :1000].double().mean(1), x[:, 1000:].double().mean(1)), dim=1)
    torch.testing.assert_close(rows[:, [0, -1]].double(), exact, rtol=5e-7, atol=0)


def test_in_place_step_refuses_mismatched_inputs_by_name_before_changing_anything():
    rule = _perturbed_rule(LSTMGACConfig(), torch.float32)
    segments = rule.segments([10])
    grad, state, _ = _random_inputs(rule, 10)
    before = state.clone()
    cases = [
        (dict(grad=grad[:9]), "grad must be a torch.float32 tensor of shape \\(10,\\)"),
        (dict(out=torch.empty(10, dtype=F64)), "out must be a torch.float32 tensor"),
        (dict(segments=rule.segments([4, 5])), "segments cover 9 coordinates, the state 10"),
        (dict(extra=torch.zeros(1, 10)), "expects 0 extra input rows, got 1"),
        (dict(chunk=0), "chunk must be a positive integer"),
        (dict(state=state[:-1]), "rule state must have shape"),
    ]
    for change, message in cases:
        args = dict(grad=grad, state=state, segments=segments, out=torch.empty(10), extra=None, chunk=4) | change
        with pytest.raises(ValueError, match=message):
            rule.step_(**args)
        assert torch.equal(state, before)


NORMALIZED = dict(momentum_decays=(0.5, 0.9, 0.99), momentum_rms_decay=0.999, input_features="normalized")


def test_normalized_inputs_need_the_second_moment_and_a_known_name():
    with pytest.raises(ValueError, match="needs momentum_rms_decay"):
        LSTMGACConfig(momentum_decays=(0.9,), input_features="normalized")
    with pytest.raises(ValueError, match="input_features must be one of"):
        LSTMGACConfig(input_features="raw")
    assert LSTMGACConfig(**NORMALIZED).input_size == 4  # ∇/√v and three directions
    assert LSTMGACConfig(momentum_decays=(0.9,)).input_size == 4  # log/sign of ∇ and of one sum


def test_a_fresh_normalized_rule_takes_adams_first_step_by_hand():
    rule = LSTMGACRule(LSTMGACConfig(**NORMALIZED), seed=0)
    grad = torch.tensor([3.0, -0.02, 5e-4, -40.0])
    update, _ = rule(grad, rule.init_state(4), Segments.single(4))
    # v₁ = (1−β₂)∇², d = (1−0.9)·∇/(√v₁ + ε) ≈ 0.1·sign ∇/√0.001, step −0.01·d
    expected = -0.01 * 0.1 * grad / (math.sqrt(0.001) * grad.abs() + 1e-8)
    torch.testing.assert_close(update, expected, rtol=1e-5, atol=0)


def test_the_normalized_rule_is_invariant_to_each_tensors_gradient_scale():
    torch.manual_seed(0)
    rule = LSTMGACRule(LSTMGACConfig(hidden_size=8, **NORMALIZED), seed=3)
    with torch.no_grad():  # a trained-looking rule: every term of the output in use
        for p in rule.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    segments = Segments.from_sizes([5, 7])
    scales = torch.cat([torch.full((5,), 0.1), torch.full((7,), 1000.0)])  # per tensor
    state_a, state_b = rule.init_state(12), rule.init_state(12)
    for _ in range(6):
        grad = torch.sign(torch.randn(12)) * (0.5 + torch.rand(12))  # ε/√v ≤ 1e-8/(√0.001·0.05) = 6e-6
        a, state_a = rule(grad, state_a, segments)
        b, state_b = rule(grad * scales, state_b, segments)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    log_sign = LSTMGACRule(LSTMGACConfig(hidden_size=8, momentum_decays=(0.9,), momentum_rms_decay=0.999), seed=3)
    a, _ = log_sign(grad, log_sign.init_state(12), segments)
    b, _ = log_sign(grad * scales, log_sign.init_state(12), segments)
    assert not torch.allclose(a, b, rtol=1e-3)  # the paper's inputs see the scale (the property is not vacuous)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_the_in_place_step_of_the_normalized_rule_matches_the_differentiable_one(bias_correction):
    rule = LSTMGACRule(LSTMGACConfig(hidden_size=8, bias_correction=bias_correction, **NORMALIZED), seed=1)
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    segments = Segments.from_sizes([30, 50])
    state, flat = rule.init_state(80), rule.init_state(80)
    out = torch.empty(80)
    for _ in range(3):
        grad = torch.randn(80)
        expected, state = rule(grad, state, segments)
        rule.step_(grad.clone(), flat, segments, out, chunk=16, sigmoid_tanh=False)
        torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat, state.detach(), rtol=1e-5, atol=1e-6)
    if bias_correction:
        assert torch.equal(flat[-1], torch.full((80,), 3.0))  # the step count


def test_a_fresh_bias_corrected_normalized_rule_is_adam_at_lr_0_01():
    rule = LSTMGACRule(LSTMGACConfig(bias_correction=True, **NORMALIZED), seed=0)
    assert rule.config.state_rows == 80 + 3 + 2  # LSTM, three sums, v and the step count
    torch.manual_seed(0)
    theta = torch.randn(7)
    reference = torch.nn.Parameter(theta.clone())
    adam = torch.optim.Adam([reference], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    state = rule.init_state(7)
    for _ in range(6):
        grad = torch.randn(7) * torch.logspace(-3, 2, 7)
        update, state = rule(grad, state, Segments.single(7))
        theta = theta + update.detach()
        reference.grad = grad
        adam.step()
        torch.testing.assert_close(theta, reference.detach(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="bias_correction needs momentum_rms_decay"):
        LSTMGACConfig(momentum_decays=(0.9,), bias_correction=True)


def test_clipped_directions_are_adams_step_clamped_by_hand():
    """direction_clip c = 1 on a fresh bias-corrected rule (Adam at lr 0.01 on d_0.9): while the
    gradient is steady the clamp never bites and the steps are Adam's; after 300 quiet steps a
    gradient 1000× larger makes Adam's m̂/√v̂ about 1.6 (its step 0.016), the clipped rule steps
    exactly 0.01·c, in the differentiable and the in-place step."""
    config = LSTMGACConfig(bias_correction=True, direction_clip=1.0, **NORMALIZED)
    rule = LSTMGACRule(config, seed=0)
    reference = torch.nn.Parameter(torch.zeros(3))
    adam = torch.optim.Adam([reference], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    state, flat, out = rule.init_state(3), rule.init_state(3), torch.empty(3)
    segments = Segments.single(3)
    quiet, spike = torch.tensor([1e-3, -1e-3, 2e-3]), torch.tensor([1.0, -1.0, 0.0])
    for t in range(301):
        grad = quiet if t < 300 else spike
        before = reference.detach().clone()
        reference.grad = grad.clone()
        adam.step()
        update, state = rule(grad, state, segments)
        rule.step_(grad.clone(), flat, segments, out, sigmoid_tanh=False)
        torch.testing.assert_close(out, update.detach(), rtol=1e-5, atol=1e-9)
        adam_step = reference.detach() - before
        if t < 300:
            torch.testing.assert_close(update.detach(), adam_step, rtol=1e-4, atol=1e-8)
    assert adam_step[0] < -0.015 and adam_step[1] > 0.015  # Adam's d_0.9 is about ±1.6 there
    torch.testing.assert_close(update.detach()[:2], torch.tensor([-0.01, 0.01]), rtol=1e-6, atol=0)
    assert abs(float(update.detach()[2])) < 0.01  # coordinate 2's gradient vanished: its d_0.9 shrinks, unclamped
    # the clamp is in the meta-trainer's graph: ∂(g₀ − g₁)/∂c_0.9 = d₀ − d₁ = 1 − (−1), the clamped values
    (bias_grad,) = torch.autograd.grad(update[0] - update[1], [rule.momentum_bias])
    assert float(bias_grad[1]) == pytest.approx(2.0, abs=1e-6)


def test_step_decay_is_adams_step_until_t0_then_shrinks_as_one_over_root_t():
    """step_decay_after t₀ = 4 on a fresh bias-corrected rule (Adam at lr 0.01 on d_0.9) under a
    constant gradient, where Adam's step is 0.01 at every t: the rule's steps are exactly the
    undecayed rule's up to t = 4, then 0.01·√(4/t) (half at t = 16), in the differentiable and
    the in-place step, and the factor is in the meta-trainer's graph."""
    plain = LSTMGACRule(LSTMGACConfig(bias_correction=True, **NORMALIZED), seed=0)
    decayed = LSTMGACRule(LSTMGACConfig(bias_correction=True, step_decay_after=4, **NORMALIZED), seed=0)
    segments, grad = Segments.single(2), torch.tensor([0.3, -2.0])
    state, reference, flat, out = decayed.init_state(2), plain.init_state(2), decayed.init_state(2), torch.empty(2)
    for t in range(1, 17):
        update, state = decayed(grad, state, segments)
        expected, reference = plain(grad, reference, segments)
        decayed.step_(grad.clone(), flat, segments, out, sigmoid_tanh=False)
        torch.testing.assert_close(out, update.detach(), rtol=1e-6, atol=0)
        factor = min(1.0, (4 / t) ** 0.5)
        if t <= 4:
            assert torch.equal(update, expected)
        torch.testing.assert_close(update.detach(), expected.detach() * factor, rtol=1e-6, atol=0)
        torch.testing.assert_close(update.detach(), torch.tensor([-0.01, 0.01]) * factor, rtol=1e-5, atol=0)
    torch.testing.assert_close(update.detach(), torch.tensor([-0.005, 0.005]), rtol=1e-5, atol=0)
    (bias_grad,) = torch.autograd.grad(update[0], [decayed.momentum_bias])  # ∂g₀/∂c_0.9 = d₀·√(4/16) = 0.5
    assert float(bias_grad[1]) == pytest.approx(0.5, rel=1e-5)


def test_without_the_absolute_step_the_rule_is_its_direction_terms_alone():
    """absolute_step=False drops s·(wᵀh + b): the rule is then the same rule with w = b = 0,
    in the differentiable and the in-place step, and a coordinate whose directions are all zero
    does not move (with the LSTM's own term it drifts by s·(wᵀh + b))."""
    config = dict(hidden_size=8, bias_correction=True, **NORMALIZED)
    with_term = LSTMGACRule(LSTMGACConfig(**config), seed=4)
    without = LSTMGACRule(LSTMGACConfig(absolute_step=False, **config), seed=4)
    assert not hasattr(without, "output_weight") and set(without.state_dict()) == \
        set(with_term.state_dict()) - {"output_weight", "output_bias"}
    with torch.no_grad():
        for p in with_term.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        without.load_state_dict({k: v for k, v in with_term.state_dict().items() if not k.startswith("output_")})
    zeroed = LSTMGACRule(LSTMGACConfig(**config), seed=4)
    zeroed.load_state_dict(with_term.state_dict())
    with torch.no_grad():
        zeroed.output_weight.zero_()
        zeroed.output_bias.zero_()
    segments = Segments.from_sizes([6, 4])
    grad = torch.randn(10)
    grad[3] = 0.0  # coordinate 3: zero gradient from the start, so m = v = 0 and every d_j = 0
    state, flat, out = without.init_state(10), without.init_state(10), torch.empty(10)
    reference = zeroed.init_state(10)
    for _ in range(3):
        update, state = without(grad, state, segments)
        expected, reference = zeroed(grad, reference, segments)
        without.step_(grad.clone(), flat, segments, out, chunk=4, sigmoid_tanh=False)
        torch.testing.assert_close(update, expected, rtol=0, atol=0)
        torch.testing.assert_close(out, update.detach(), rtol=1e-5, atol=1e-7)
        assert update[3] == 0.0
    drift, _ = with_term(grad, with_term.init_state(10), segments)
    assert abs(float(drift[3].detach())) > 1e-4  # the absolute term moves it (the property is not vacuous)
    with pytest.raises(ValueError, match="absolute_step=False needs momentum_decays"):
        LSTMGACConfig(absolute_step=False)
    with pytest.raises(ValueError, match="absolute_step must be True or False"):
        LSTMGACConfig(absolute_step=0, **NORMALIZED)


def test_time_features_are_tanh_of_the_step_count_over_each_timescale():
    """step_timescales (τ₁, τ₂): after t steps the LSTM's last input rows are tanh(t/τ_k), by hand
    at t = 1..3 for τ = (2, 30), in the differentiable step and the in-place one (which agree);
    the names of the inputs say where they sit (after the signals' features)."""
    config = LSTMGACConfig(hidden_size=6, bias_correction=True, step_timescales=(2, 30), **NORMALIZED)
    assert config.step_timescales == (2.0, 30.0) and config.input_size == 1 + 3 + 2
    assert config.input_names()[-2:] == ["tanh(t/2)", "tanh(t/30)"]
    rule = LSTMGACRule(config, seed=1)
    segments = Segments.from_sizes([3, 2])
    state, flat, out = rule.init_state(5), rule.init_state(5), torch.empty(5)
    for t in (1, 2, 3):
        grad = torch.randn(5)
        _, momentum, second_moment = rule.split_state(state)
        features, _, _ = rule.signals(grad, momentum, second_moment)
        expected = torch.tensor([[math.tanh(t / 2)], [math.tanh(t / 30)]]).expand(2, 5)
        torch.testing.assert_close(features[-2:], expected, rtol=1e-6, atol=0)
        update, state = rule(grad, state, segments)
        rule.step_(grad.clone(), flat, segments, out, chunk=2, sigmoid_tanh=False)
        torch.testing.assert_close(out, update.detach(), rtol=1e-5, atol=1e-7)
    assert torch.equal(rule.split_state(state)[2][1], torch.full((5,), 3.0))  # t counted in the state
    with pytest.raises(ValueError, match="step_timescales needs bias_correction"):
        LSTMGACConfig(step_timescales=(10,), **NORMALIZED)
    for bad in (0, -1.0, math.inf, True):
        with pytest.raises(ValueError, match="step_timescales must be finite positive numbers"):
            LSTMGACConfig(bias_correction=True, step_timescales=(bad,), **NORMALIZED)
    assert LSTMGACConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # saved and read back


def test_widened_inputs_step_exactly_as_the_source_until_trained():
    """A rule given more inputs (time features) from another's weights, by widened_inputs: the new
    input rows are zero, so the two step identically; the weights of a rule reading inputs the
    target lacks are refused by name."""
    from learned_optim.rules.lstm_gac import widened_inputs

    base = dict(hidden_size=6, bias_correction=True, **NORMALIZED)
    source = LSTMGACRule(LSTMGACConfig(**base), seed=2)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    target_config = LSTMGACConfig(step_timescales=(5, 50), **base)
    widened = LSTMGACRule(target_config, seed=0)
    widened.load_state_dict(widened_inputs(source.state_dict(), source.config, target_config))
    first = widened.core.weights[0]
    assert target_config.input_names()[4:6] == ["tanh(t/5)", "tanh(t/50)"]
    assert torch.equal(first[4:6], torch.zeros(2, first.shape[1]))
    segments = Segments.from_sizes([4, 3])
    a, b = source.init_state(7), widened.init_state(7)
    for _ in range(4):
        grad = torch.randn(7)
        ua, a = source(grad, a, segments)
        ub, b = widened(grad, b, segments)
        torch.testing.assert_close(ub, ua, rtol=0, atol=0)
    with torch.no_grad():
        widened.core.weights[0][4].fill_(0.5)  # once a time input has weight, the steps differ
    assert not torch.equal(widened(grad, b, segments)[0], source(grad, a, segments)[0])
    with pytest.raises(ValueError, match=r"does not read the inputs \['tanh\(t/5\)'"):
        widened_inputs(widened.state_dict(), target_config, LSTMGACConfig(**base))


def test_the_rule_is_differentiable_through_a_coordinate_whose_gradient_is_zero():
    """The second-order meta-gradient differentiates the step through ∇ (which depends on θ):
    at a coordinate whose gradient is 0 (v = 0, a dead unit) √v's derivative is infinite, and
    without a floor under v that is inf·0 = NaN in every φ's gradient."""
    rule = LSTMGACRule(LSTMGACConfig(hidden_size=6, bias_correction=True, **NORMALIZED), seed=3)
    grad = torch.randn(5)
    grad[2] = 0.0
    grad.requires_grad_(True)
    update, _ = rule(grad, rule.init_state(5), Segments.from_sizes([5]))
    assert update[2] == 0.0
    update.square().sum().backward()
    assert grad.grad is not None and bool(torch.isfinite(grad.grad).all())
    assert all(bool(torch.isfinite(p.grad).all()) for p in rule.parameters() if p.grad is not None)
