"""Math of the batch-size-conjugate optimizers (McAllester, TTIC 31230 SGD notes).

ConjugateMomentumSGD must be torch.optim.SGD(lr=B·η'/N_g, momentum=1 − 1/N_g) with
N_g = max(1, N'_g/B); ConjugateAdam must follow the notes' simplified Adam with the
1/min(t, N) bias correction and the step N_g·η = √B·η' (batch second moments) or B·η'
(per-example second moments). Every expected value here is computed independently of the
library's code path (closed forms, literal numbers, or torch's own SGD).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learned_optim import ConjugateAdam, ConjugateMomentumSGD, per_example_gradients
from learned_optim.optim import conjugate_momentum_hyperparameters

DT = torch.float64


def _grads(seed: int, steps: int, *shapes: tuple[int, ...]) -> list[list[torch.Tensor]]:
    """A fixed stream of gradients: ``steps`` lists with one tensor per shape."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=DT) for s in shapes] for _ in range(steps)]


def _set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


def _snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]):
    """Copies of the params and of every tensor in the optimizer state."""
    state = {
        id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
        for p in params
    }
    return [p.detach().clone() for p in params], state


def _assert_unchanged(opt, params, snapshot) -> None:
    before_params, before_state = snapshot
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)
    for p in params:
        now = opt.state[p]
        assert set(now) == set(before_state[id(p)])
        for k, v in now.items():
            old = before_state[id(p)][k]
            assert torch.equal(v, old) if torch.is_tensor(v) else v == old


# --------------------------------------------------------------------------------------
# ConjugateMomentumSGD
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lr, horizon, batch_size, weight_decay",
    [
        (0.01, 100.0, 8, 0.0),  # N_g = 12.5
        (0.003, 320.0, 32, 0.0),  # N_g = 10
        (0.02, 50.0, 3, 0.1),  # N_g = 16.67, with weight decay
        (0.01, 4.0, 16, 0.0),  # N'_g < B: N_g clamps to 1 -> plain SGD at lr B·η'
        (0.005, 10.0, 64, 0.05),  # clamped, with weight decay
    ],
)
def test_momentum_sgd_equals_torch_sgd(lr, horizon, batch_size, weight_decay):
    n_g = max(1.0, horizon / batch_size)
    torch_lr, momentum = batch_size * lr / n_g, 1.0 - 1.0 / n_g
    if horizon < batch_size:
        assert momentum == 0.0 and torch_lr == pytest.approx(batch_size * lr, rel=1e-15)

    init = _grads(1, 1, (5, 3), (3,))[0]
    ours = [t.clone().requires_grad_() for t in init]
    ref = [t.clone().requires_grad_() for t in init]
    opt = ConjugateMomentumSGD(ours, lr=lr, momentum_horizon=horizon, batch_size=batch_size,
                               weight_decay=weight_decay)
    sgd = torch.optim.SGD(ref, lr=torch_lr, momentum=momentum, weight_decay=weight_decay)
    moved = False
    for grads in _grads(2, 25, (5, 3), (3,)):
        _set_grads(ours, grads)
        _set_grads(ref, grads)
        opt.step()
        sgd.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
        moved = moved or not torch.equal(ours[0].detach(), init[0])
    assert moved


def test_derived_hyperparameters_hand_worked():
    # η' = 0.01, N'_g = 100, B = 8: N_g = 100/8 = 12.5, η = 8·0.01/12.5 = 0.0064.
    n_g, eta = conjugate_momentum_hyperparameters(0.01, 100.0, 8)
    assert n_g == pytest.approx(12.5, rel=1e-15)
    assert eta == pytest.approx(0.0064, rel=1e-13)
    # B = 200 > N'_g: N_g = max(1, 0.5) = 1, η = 200·0.01 = 2 (not min(1, ·) as printed).
    n_g, eta = conjugate_momentum_hyperparameters(0.01, 100.0, 200)
    assert n_g == 1.0 and eta == pytest.approx(2.0, rel=1e-15)
    # B = N'_g: the boundary, N_g = 1 exactly.
    assert conjugate_momentum_hyperparameters(0.01, 100.0, 100) == pytest.approx((1.0, 1.0))

    p = torch.zeros(2, requires_grad=True)
    opt = ConjugateMomentumSGD([p], lr=0.01, momentum_horizon=100.0, batch_size=8)
    d = opt.derived_hyperparameters()
    assert d["n_g"] == pytest.approx(12.5)
    assert d["lr"] == pytest.approx(0.0064)
    assert d["momentum"] == pytest.approx(0.92)  # 1 - 1/12.5
    # N_g·η = B·η' whatever B is: the step per unit of μ is conjugate to B.
    for b in (1, 3, 8, 64, 100, 1000):
        opt.set_batch_size(b)
        d = opt.derived_hyperparameters()
        assert d["n_g"] * d["lr"] == pytest.approx(b * 0.01, rel=1e-12)


def _hand_momentum_run(p0, grads, schedule, lr, horizon):
    """Notes' recursion μ ← (1 − 1/N_g)μ + ĝ/N_g, Φ −= B·η'·μ with N_g re-derived per step."""
    p, mu = p0.clone(), torch.zeros_like(p0)
    for g, b in zip(grads, schedule):
        n_g = max(1.0, horizon / b)
        mu = (1 - 1 / n_g) * mu + g / n_g
        p = p - b * lr * mu
    return p, mu


@pytest.mark.parametrize("how", ["set_batch_size", "param_group"])
def test_batch_size_change_mid_run_keeps_momentum(how):
    lr, horizon = 0.01, 64.0
    schedule = [4] * 5 + [16] * 4 + [128] * 2 + [2] * 3  # N_g: 16, 4, 1 (clamped), 32
    grads = [g[0] for g in _grads(3, len(schedule), (6,))]
    p0 = torch.linspace(-1, 1, 6, dtype=DT)
    p = p0.clone().requires_grad_()
    opt = ConjugateMomentumSGD([p], lr=lr, momentum_horizon=horizon, batch_size=schedule[0])
    buffer = None
    for t, (g, b) in enumerate(zip(grads, schedule)):
        if how == "set_batch_size":
            opt.set_batch_size(b)
        else:
            opt.param_groups[0]["batch_size"] = b
        assert opt.batch_size == b
        assert opt.derived_hyperparameters()["n_g"] == max(1.0, horizon / b)
        p.grad = g.clone()
        opt.step()
        if buffer is None:
            buffer = opt.state[p]["momentum_buffer"]
        assert opt.state[p]["momentum_buffer"] is buffer  # the same buffer, carried over
        expected_p, expected_mu = _hand_momentum_run(p0, grads[: t + 1], schedule[: t + 1], lr, horizon)
        torch.testing.assert_close(p.detach(), expected_p, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(buffer, expected_mu, rtol=1e-12, atol=1e-14)

    # A reset buffer would give a different trajectory: the check above is not vacuous.
    p_reset, _ = _hand_momentum_run(p0, grads[:5], schedule[:5], lr, horizon)
    p_reset, _ = _hand_momentum_run(p_reset, grads[5:], schedule[5:], lr, horizon)
    assert not torch.allclose(p_reset, p.detach(), rtol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [0, -4, 2.5, "8", None, True, float("nan"), float("inf"), 1e300],
)
def test_bad_batch_size_raises_naming_batch_size(bad):
    p = torch.ones(3, requires_grad=True)
    opt = ConjugateMomentumSGD([p], lr=0.1, momentum_horizon=10.0, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        opt.set_batch_size(bad)
    assert opt.batch_size == 4
    with pytest.raises(ValueError, match="batch_size"):
        ConjugateMomentumSGD([torch.ones(1, requires_grad=True)], lr=0.1, batch_size=bad)


def test_bad_batch_size_in_param_group_refused_at_step_without_changes():
    p = torch.ones(3, dtype=DT, requires_grad=True)
    opt = ConjugateMomentumSGD([p], lr=0.1, momentum_horizon=10.0, batch_size=4)
    p.grad = torch.ones(3, dtype=DT)
    opt.step()
    snap = _snapshot(opt, [p])
    for bad in (0, 1.5):
        opt.param_groups[0]["batch_size"] = bad
        with pytest.raises(ValueError, match="batch_size"):
            opt.step()
        _assert_unchanged(opt, [p], snap)


# --------------------------------------------------------------------------------------
# ConjugateAdam
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("second_moment", ["batch", "per_example"])
def test_adam_running_means_are_exact_while_t_below_horizons(second_moment):
    # B = 4, N'_g = 400, N'_s = 4000: N_g = 100, N_s = 1000 ≥ t, so 1/min(t, N) = 1/t and
    # μ_t, s_t are exactly the means of the first t samples.
    b, lr, eps, steps = 4, 0.01, 1e-8, 7
    grads = [g[0] for g in _grads(4, steps, (5,))]
    squares = [g[0].abs() + 0.5 for g in _grads(5, steps, (5,))]  # any positive q_t
    p0 = torch.randn(5, generator=torch.Generator().manual_seed(6), dtype=DT)
    p = p0.clone().requires_grad_()
    opt = ConjugateAdam([p], lr=lr, grad_horizon=400.0, square_horizon=4000.0, batch_size=b,
                        eps=eps, second_moment=second_moment)
    per_example = second_moment == "per_example"
    step_size = b * lr if per_example else math.sqrt(b) * lr  # B·η' or √B·η'
    expected = p0.clone()
    for t in range(1, steps + 1):
        p.grad = grads[t - 1].clone()
        if per_example:
            opt.step(per_example_squares={p: squares[t - 1]})
        else:
            opt.step()
        mu = torch.stack(grads[:t]).mean(0)
        q = squares[:t] if per_example else [g * g for g in grads[:t]]
        s = torch.stack(q).mean(0)
        expected = expected - step_size * mu / torch.sqrt(s + eps)
        state = opt.state[p]
        assert int(state["step"]) == t
        torch.testing.assert_close(state["grad_average"], mu, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(state["square_average"], s, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)


def test_adam_hand_worked_scalar_with_forgetting():
    # B = 1, N_g = N_s = 2, η' = 0.1, ε = 1e-16, ĝ = 1, 2, 3, 4:
    #   μ: 1, (1+2)/2 = 1.5, ½·1.5 + ½·3 = 2.25, ½·2.25 + ½·4 = 3.125
    #   s: 1, (1+4)/2 = 2.5, ½·2.5 + ½·9 = 5.75, ½·5.75 + ½·16 = 10.875
    mus, ss = [1.0, 1.5, 2.25, 3.125], [1.0, 2.5, 5.75, 10.875]
    p = torch.zeros(1, dtype=DT, requires_grad=True)
    opt = ConjugateAdam([p], lr=0.1, grad_horizon=2.0, square_horizon=2.0, batch_size=1)
    expected = 0.0
    for g, mu, s in zip([1.0, 2.0, 3.0, 4.0], mus, ss):
        p.grad = torch.tensor([g], dtype=DT)
        opt.step()
        expected -= 0.1 * mu / math.sqrt(s)
        assert opt.state[p]["grad_average"].item() == pytest.approx(mu, rel=1e-14)
        assert opt.state[p]["square_average"].item() == pytest.approx(s, rel=1e-14)
        assert p.item() == pytest.approx(expected, rel=1e-13)


def _forgetting_weights(t: int, n: int) -> torch.Tensor:
    """Closed-form weights of x_1..x_t in the notes' average with 1/min(k, N), integer N.

    Up to t = N it is the plain mean (weights 1/N at t = N); after that each new x_k enters
    with 1/N and everything older decays by (1 − 1/N) a step.
    """
    if t <= n:
        return torch.full((t,), 1.0 / t, dtype=DT)
    decay = 1.0 - 1.0 / n
    w = [decay ** (t - n) / n] * n + [decay ** (t - k) / n for k in range(n + 1, t + 1)]
    return torch.tensor(w, dtype=DT)


@pytest.mark.parametrize("second_moment", ["batch", "per_example"])
def test_adam_exponential_forgetting_when_t_exceeds_horizon(second_moment):
    # B = 2, N'_g = 6 → N_g = 3; N'_s = 10 → N_s = 5; 9 steps, so both horizons are passed.
    b, lr, eps, steps, n_g, n_s = 2, 0.05, 1e-10, 9, 3, 5
    grads = [g[0] for g in _grads(7, steps, (4,))]
    squares = [g[0] ** 2 + 0.1 for g in _grads(8, steps, (4,))]
    p = torch.zeros(4, dtype=DT, requires_grad=True)
    opt = ConjugateAdam([p], lr=lr, grad_horizon=2.0 * n_g, square_horizon=2.0 * n_s,
                        batch_size=b, eps=eps, second_moment=second_moment)
    per_example = second_moment == "per_example"
    step_size = b * lr if per_example else math.sqrt(b) * lr
    q = squares if per_example else [g * g for g in grads]
    expected = torch.zeros(4, dtype=DT)
    for t in range(1, steps + 1):
        p.grad = grads[t - 1].clone()
        opt.step(per_example_squares={p: squares[t - 1]} if per_example else None)
        mu = _forgetting_weights(t, n_g) @ torch.stack(grads[:t])
        s = _forgetting_weights(t, n_s) @ torch.stack(q[:t])
        expected = expected - step_size * mu / torch.sqrt(s + eps)
        torch.testing.assert_close(opt.state[p]["grad_average"], mu, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["square_average"], s, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
    # Past the horizon the average is no longer the plain mean (the test would notice).
    assert not torch.allclose(opt.state[p]["grad_average"], torch.stack(grads).mean(0))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)


@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_per_example_gradients_match_a_loop(kind):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, 3, generator=g, dtype=DT)
    if kind == "cross_entropy":
        y, loss_fn = torch.randint(4, (7,), generator=g), F.cross_entropy
    else:
        y, loss_fn = torch.randn(7, 4, generator=g, dtype=DT), F.mse_loss
    model = _mlp()
    params = list(model.parameters())

    per_example, losses = [], []
    for i in range(x.shape[0]):
        loss_i = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        per_example.append(torch.autograd.grad(loss_i, params))
        losses.append(loss_i.detach())
    for p in params:  # stale gradients must be overwritten, not accumulated
        p.grad = torch.full_like(p, 123.0)

    loss, squares = per_example_gradients(model, loss_fn, x, y)

    assert loss.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-12)
    assert set(squares) == {p for p in params}
    batch_grads = torch.autograd.grad(loss_fn(model(x), y), params)
    for j, p in enumerate(params):
        stacked = torch.stack([ge[j] for ge in per_example])
        torch.testing.assert_close(p.grad, stacked.mean(0), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(p.grad, batch_grads[j], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(squares[p], (stacked**2).mean(0), rtol=1e-12, atol=1e-14)
        # The per-example second moment exceeds the squared mean (Jensen), strictly here.
        assert (squares[p] >= p.grad**2 - 1e-15).all()
        assert (squares[p] - p.grad**2).sum() > 0


def test_per_example_mode_refuses_bad_squares_without_changes():
    model = _mlp()
    params = list(model.parameters())
    opt = ConjugateAdam(params, lr=0.01, batch_size=4, second_moment="per_example")
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(4, 3, generator=g, dtype=DT), torch.randint(4, (4,), generator=g)

    # Refused on the very first step: nothing moves and no state is created.
    _, squares = per_example_gradients(model, F.cross_entropy, x, y)
    snap0 = _snapshot(opt, params)
    with pytest.raises(ValueError, match="per_example_squares"):
        opt.step()
    _assert_unchanged(opt, params, snap0)
    assert all(not opt.state[p] for p in params)

    opt.step(per_example_squares=squares)  # a good step, so there is state to protect
    _, squares = per_example_gradients(model, F.cross_entropy, x, y)
    snap = _snapshot(opt, params)
    missing = {p: s for p, s in squares.items() if p is not params[2]}
    misshaped = dict(squares)
    misshaped[params[1]] = squares[params[1]].reshape(1, -1)
    cases = [(None, "per_example_squares"), (missing, "no entry"), (misshaped, "shape")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            opt.step(per_example_squares=bad)
        _assert_unchanged(opt, params, snap)
    assert int(opt.state[params[0]]["step"]) == 1


def test_batch_and_per_example_modes_agree_at_batch_size_one():
    # At B = 1 the per-example square is ĝ² and √B = B, so the two modes are one algorithm.
    g = torch.Generator().manual_seed(11)
    xs, ys = torch.randn(12, 1, 3, generator=g, dtype=DT), torch.randint(4, (12, 1), generator=g)
    batch_model, example_model = _mlp(), _mlp()
    kwargs = dict(lr=0.02, grad_horizon=5.0, square_horizon=7.0, batch_size=1, eps=1e-12)
    batch_opt = ConjugateAdam(batch_model.parameters(), second_moment="batch", **kwargs)
    example_opt = ConjugateAdam(example_model.parameters(), second_moment="per_example", **kwargs)
    start = [p.detach().clone() for p in batch_model.parameters()]
    for x, y in zip(xs, ys):
        batch_opt.zero_grad()
        F.cross_entropy(batch_model(x), y).backward()
        batch_opt.step()
        _, squares = per_example_gradients(example_model, F.cross_entropy, x, y)
        example_opt.step(per_example_squares=squares)
        for a, b in zip(batch_model.parameters(), example_model.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
    assert any(not torch.equal(a.detach(), s) for a, s in zip(batch_model.parameters(), start))


def test_square_root_rule_on_pure_noise_coordinates():
    # Per-example gradients σ·ξ (mean 0, variance σ²), B = 16: the batch mean ĝ has variance
    # σ²/B, so batch-mode s → σ²/B while per-example s → σ², a factor B apart. The steps
    # √B·η'/√(σ²/B) = B·η'/σ and B·η'/√σ² agree: that is why batch mode uses √B·η'.
    b, sigma, dim, steps, lr = 16, 2.0, 256, 60, 1e-3
    gen = torch.Generator().manual_seed(12)
    noise = sigma * torch.randn(steps, b, dim, generator=gen, dtype=DT)
    horizon = float(b * steps)  # N_g = N_s = steps: exact means over the whole run
    p_batch = torch.zeros(dim, dtype=DT, requires_grad=True)
    p_example = torch.zeros(dim, dtype=DT, requires_grad=True)
    common = dict(lr=lr, grad_horizon=horizon, square_horizon=horizon, batch_size=b, eps=1e-16)
    opt_batch = ConjugateAdam([p_batch], second_moment="batch", **common)
    opt_example = ConjugateAdam([p_example], second_moment="per_example", **common)
    for per_ex in noise:
        p_batch.grad = per_ex.mean(0)
        p_example.grad = per_ex.mean(0)
        opt_batch.step()
        opt_example.step(per_example_squares={p_example: (per_ex**2).mean(0)})

    s_batch = opt_batch.state[p_batch]["square_average"].mean().item()
    s_example = opt_example.state[p_example]["square_average"].mean().item()
    assert s_batch == pytest.approx(sigma**2 / b, rel=0.1)
    assert s_example == pytest.approx(sigma**2, rel=0.1)
    assert s_example / s_batch == pytest.approx(b, rel=0.15)
    # Same gradients in, (nearly) the same displacement out: the √B rule compensates.
    ratio = p_batch.detach().norm() / p_example.detach().norm()
    assert ratio.item() == pytest.approx(1.0, rel=0.1)
    # A linear rule (B·η') in batch mode would have moved √B = 4 times too far.
    assert (math.sqrt(b) * ratio).item() > 3.0


def test_per_example_squares_are_checked_after_the_closure_makes_the_grads():
    w = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.zeros(1))
    opt = ConjugateAdam([w, b], lr=0.1, batch_size=4, second_moment="per_example")

    def closure():
        opt.zero_grad()
        loss = (w.sum() + b.sum()) ** 2
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"no entry for parameter 1 of param group 0"):
        opt.step(closure, per_example_squares={w: torch.ones(3)})
    assert torch.equal(w.detach(), torch.ones(3)) and not opt.state
