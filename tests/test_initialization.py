"""Meta-gradient estimators of a learned initialization θ₀, against closed forms.

Quadratic tasks: L_i(φ) = ½(φ − c)ᵀA(φ − c), L_test(φ) = ½(φ − d)ᵀB(φ − d). k SGD steps of
size α give φ = c + (I − αA)ᵏ(θ − c), so dL_test/dθ = ((I − αA)ᵏ)ᵀ·B(φ − d); the proximal
inner problem's Jacobian is (I + A/λ)⁻¹.
"""

from __future__ import annotations

import math

import pytest
import torch

from learned_optim import ConjugateMomentumSGD
from learned_optim.meta import (
    MAML,
    FirstOrder,
    GDBySGD,
    Implicit,
    InnerOptimizer,
    InnerSGD,
    MetaTask,
    SecondOrder,
    conjugate_gradient,
    get_estimator,
    peak_memory,
)
from learned_optim.tasks import QuadraticFamily, SinusoidFamily, get_family

DT = torch.float64


def random_spd(n: int, generator: torch.Generator, low: float = 0.1, high: float = 2.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=DT))
    eig = low + (high - low) * torch.rand(n, generator=generator, dtype=DT)
    return (q * eig) @ q.T


def quadratic_task(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a, b = random_spd(n, g), random_spd(n, g)
    c, d = torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)

    def train(params, batch=None):
        e = params[0] - c
        return 0.5 * e @ a @ e

    def test(params):
        e = params[0] - d
        return 0.5 * e @ b @ e

    return MetaTask(train, lambda: None, test), (a, b, c, d)


def test_second_order_matches_the_analytic_meta_gradient():
    n, lr, steps = 6, 0.3, 4
    for seed in range(3):
        task, (a, b, c, d) = quadratic_task(n, seed)
        theta = torch.randn(n, generator=torch.Generator().manual_seed(100 + seed), dtype=DT)
        result = SecondOrder().estimate([theta], task, InnerSGD(lr, steps))
        jac = torch.linalg.matrix_power(torch.eye(n, dtype=DT) - lr * a, steps)
        phi = c + jac @ (theta - c)
        expected = jac.T @ b @ (phi - d)
        torch.testing.assert_close(result.adapted[0], phi, rtol=0, atol=1e-12)
        torch.testing.assert_close(result.grads[0], expected, rtol=0, atol=1e-6)
        assert result.meta_loss == pytest.approx(float(0.5 * (phi - d) @ b @ (phi - d)), rel=1e-12)


def test_first_order_keeps_the_identity_path_only():
    """Its meta-gradient is ∇L_test(φ) at the adapted φ (not zero, as a detached φ would give)."""
    n, lr, steps = 6, 0.3, 4
    task, (a, b, c, d) = quadratic_task(n, 1)
    theta = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=DT)
    phi = c + torch.linalg.matrix_power(torch.eye(n, dtype=DT) - lr * a, steps) @ (theta - c)
    for inner in (InnerSGD(lr, steps), InnerOptimizer(lambda ps: torch.optim.SGD(ps, lr=lr), steps)):
        result = FirstOrder().estimate([theta], task, inner)
        torch.testing.assert_close(result.grads[0], b @ (phi - d), rtol=0, atol=1e-10)


def test_gd_by_sgd_equals_second_order_on_a_deterministic_task():
    task, _ = quadratic_task(5, 2)
    theta = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=DT)
    second = SecondOrder().estimate([theta], task, InnerSGD(0.2, 3))
    gd_sgd = GDBySGD().estimate([theta], task, InnerSGD(0.2, 3))
    torch.testing.assert_close(gd_sgd.grads[0], second.grads[0], rtol=0, atol=1e-12)


def test_implicit_converges_to_the_analytic_implicit_gradient_as_cg_steps_grow():
    n, lam = 30, 0.5
    g = torch.Generator().manual_seed(11)
    task, (a, b, c, d) = quadratic_task(n, 3)
    a = random_spd(n, g, low=0.05, high=5.0)  # a wider spectrum, so CG needs its steps
    task = MetaTask(lambda p, z=None: 0.5 * (p[0] - c) @ a @ (p[0] - c), lambda: None, task.test_loss)
    theta = torch.randn(n, generator=g, dtype=DT)
    inner = InnerSGD(lr=0.3, steps=200)
    errors = []
    for cg_steps in (1, 3, 8, 20):
        result = Implicit(lam=lam, cg_steps=cg_steps).estimate([theta], task, inner)
        phi = result.adapted[0]
        expected = torch.linalg.solve(torch.eye(n, dtype=DT) + a / lam, b @ (phi - d))
        errors.append(float((result.grads[0] - expected).norm() / expected.norm()))
    assert errors[-1] < 1e-4, errors
    assert errors[0] > 1e-2 and errors[0] > errors[1] > errors[2] > errors[3], errors
    # the proximal inner problem was solved: (A + λI)φ = Ac + λθ
    exact_phi = torch.linalg.solve(a + lam * torch.eye(n, dtype=DT), a @ c + lam * theta)
    torch.testing.assert_close(phi, exact_phi, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.LBFGS(ps, lr=1, max_iter=50, tolerance_grad=1e-12, tolerance_change=1e-14),
    lambda ps: ConjugateMomentumSGD(ps, lr=0.05, momentum_horizon=5, batch_size=1),  # one of this package's
], ids=["torch-lbfgs", "conjugate-momentum-sgd"])
def test_implicit_solves_the_proximal_problem_with_any_optimizer(make):
    task, (a, b, c, d) = quadratic_task(4, 5)
    theta = torch.zeros(4, dtype=DT)
    lam = 2.0
    inner = InnerOptimizer(make, steps=3 if isinstance(make([torch.zeros(1, requires_grad=True)]), torch.optim.LBFGS)
                           else 300)
    result = Implicit(lam=lam, cg_steps=10).estimate([theta], task, inner)
    exact_phi = torch.linalg.solve(a + lam * torch.eye(4, dtype=DT), a @ c + lam * theta)
    torch.testing.assert_close(result.adapted[0], exact_phi, rtol=0, atol=1e-7)
    expected = torch.linalg.solve(torch.eye(4, dtype=DT) + a / lam, b @ (exact_phi - d))
    torch.testing.assert_close(result.grads[0], expected, rtol=0, atol=1e-7)


def test_conjugate_gradient_solves_spd_systems_and_stops_on_negative_curvature():
    g = torch.Generator().manual_seed(0)
    m = random_spd(12, g)
    rhs = torch.randn(12, generator=g, dtype=DT)
    result = conjugate_gradient(lambda v: m @ v, rhs, steps=50, tol=1e-12)
    torch.testing.assert_close(result.solution, torch.linalg.solve(m, rhs), rtol=0, atol=1e-9)
    assert len(result.residuals) - 1 <= 13 and not result.negative_curvature  # ≤ n steps (plus rounding)
    indefinite = -torch.eye(3, dtype=DT)
    stopped = conjugate_gradient(lambda v: indefinite @ v, torch.ones(3, dtype=DT), steps=5)
    assert stopped.negative_curvature
    torch.testing.assert_close(stopped.solution, torch.ones(3, dtype=DT))  # b, as truncated Newton-CG


def _least_squares_problem():
    """A finite dataset whose one-example Hessians x·xᵀ differ a lot, and a fixed test set."""
    g = torch.Generator().manual_seed(42)
    n, dim = 6, 3
    scales = torch.tensor([0.3, 0.5, 1.0, 1.5, 2.0, 2.5], dtype=DT).unsqueeze(1)
    x = torch.randn(n, dim, generator=g, dtype=DT) * scales
    y = torch.randn(n, generator=g, dtype=DT)
    x_test = torch.randn(20, dim, generator=g, dtype=DT)
    y_test = torch.randn(20, generator=g, dtype=DT)
    theta = torch.tensor([1.5, -1.0, 0.8], dtype=DT)
    return x, y, x_test, y_test, theta


def test_gd_by_sgd_is_unbiased_and_the_same_minibatch_estimator_is_not():
    """Monte Carlo over minibatches of one example: E[same-batch estimate] ≠ ∇J, E[GD-by-SGD] = ∇J.

    J(θ) = L_test(θ − α·E_z∇L_z(θ)) = L_test(θ − α·∇L̄(θ)), so ∇J = (I − αH̄)·∇L_test(θ − α·ḡ)
    with H̄, ḡ the full-data Hessian and gradient.
    """
    x, y, x_test, y_test, theta = _least_squares_problem()
    lr, draws = 0.15, 3000
    h_bar = x.T @ x / len(x)
    g_bar = h_bar @ theta - x.T @ y / len(x)
    phi = theta - lr * g_bar
    h_test = x_test.T @ x_test / len(x_test)
    true = (torch.eye(3, dtype=DT) - lr * h_bar) @ (h_test @ phi - x_test.T @ y_test / len(x_test))

    def train(params, idx):
        return 0.5 * (x[idx] @ params[0] - y[idx]).square().mean()

    def test(params):
        return 0.5 * (x_test @ params[0] - y_test).square().mean()

    def estimates(estimator, seed):
        gen = torch.Generator().manual_seed(seed)
        task = MetaTask(train, lambda: torch.randint(len(x), (1,), generator=gen), test)
        return torch.stack([estimator.estimate([theta], task, InnerSGD(lr, 1)).grads[0] for _ in range(draws)])

    for estimator, biased in ((SecondOrder(), True), (GDBySGD(), False)):
        samples = estimates(estimator, seed=1)
        z = (samples.mean(0) - true) / (samples.std(0) / math.sqrt(draws))  # errors in standard errors
        if biased:
            assert z.abs().max() > 6, z
        else:
            assert z.abs().max() < 3, z


def _peak_bytes(estimator, steps: int) -> int:
    family = SinusoidFamily()
    torch.manual_seed(0)
    model = family.model()
    maml = MAML(model, family, estimator, InnerSGD(0.01, steps), tasks_per_step=1)
    task = maml.meta_task(family.sample(0))
    _, peak = peak_memory(lambda: estimator.estimate(maml.params, task, maml.inner))
    return peak


def test_implicit_memory_does_not_grow_with_inner_steps_and_second_order_grows_linearly():
    steps = (2, 8, 32)
    implicit = [_peak_bytes(Implicit(lam=1.0, cg_steps=3, damping=1.0), k) for k in steps]
    second = [_peak_bytes(SecondOrder(), k) for k in steps]
    assert max(implicit) <= 1.1 * min(implicit), implicit
    per_step = [(second[i + 1] - second[i]) / (steps[i + 1] - steps[i]) for i in range(2)]
    assert per_step[0] > 0 and abs(per_step[1] / per_step[0] - 1) < 0.2, (second, per_step)
    assert second[-1] > 2 * implicit[-1], (second, implicit)


def test_estimators_that_backprop_through_updates_refuse_a_torch_optimizer():
    task, _ = quadratic_task(3, 0)
    inner = InnerOptimizer(lambda ps: torch.optim.Adam(ps), 2)
    for estimator in (SecondOrder(), GDBySGD()):
        with pytest.raises(ValueError, match="not differentiable.*InnerSGD"):
            estimator.estimate([torch.zeros(3, dtype=DT)], task, inner)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="lam"):
        Implicit(lam=0.0)
    with pytest.raises(ValueError, match="cg_steps"):
        Implicit(cg_steps=0)
    with pytest.raises(ValueError, match="inner lr"):
        InnerSGD(lr=-1.0, steps=1)
    with pytest.raises(KeyError, match="available: second-order, first-order, gd-by-sgd, implicit"):
        get_estimator("reptile")
    with pytest.raises(ValueError, match="no criterion"):
        MAML(torch.nn.Linear(10, 1), QuadraticFamily())


def test_sinusoid_family_draws_maml_tasks():
    family = get_family("sinusoid")
    task = family.sample(3)
    assert task.info == family.sample(3).info and 0.1 <= task.info["amplitude"] <= 5.0
    assert 0 <= task.info["phase"] <= math.pi
    x, y = task.sample_batch(task.batch_generator())
    assert x.shape == (10, 1) and (x.abs() <= 5).all()
    torch.testing.assert_close(y, task.info["amplitude"] * torch.sin(x - task.info["phase"]))
    model = family.model()  # the nn.Module and the functional loss agree on a task's θ₀
    with torch.no_grad():
        for p, q in zip(model.parameters(), task.initial_params):
            p.copy_(q)
    torch.testing.assert_close(family.criterion(model(x), y), task.loss(task.initial_params, (x, y)))


@pytest.mark.parametrize("estimator", ["second-order", "first-order", "gd-by-sgd", "implicit"])
def test_maml_meta_training_lowers_the_meta_test_loss_on_sinusoids(estimator):
    family = SinusoidFamily()
    torch.manual_seed(0)
    if estimator == "implicit":  # its inner loop must approach the proximal minimizer: more steps
        chosen, inner = Implicit(lam=1.0, cg_steps=5, damping=1.0), InnerSGD(0.02, 20)
    else:
        chosen, inner = get_estimator(estimator), InnerSGD(0.01, 3)
    maml = MAML(family.model(), family, chosen, inner, meta_lr=3e-3, tasks_per_step=4)
    before = maml.evaluate(query_size=50).mean()
    maml.train(100)
    after = maml.evaluate(query_size=50).mean()
    assert after < 0.85 * before, (before, after)


def test_maml_learns_an_initialization_for_the_quadratic_family():
    """With θ₀ a list of tensors, each task's own loss is used (no model needed); from a poor
    θ₀ (the family's best is near 0, by symmetry) meta-training moves it to a better one."""
    family = QuadraticFamily(dim=5, dtype=DT)
    maml = MAML([torch.full((5,), 3.0, dtype=DT)], family, "second-order", InnerSGD(0.01, 2), meta_lr=0.1,
                tasks_per_step=8)
    before = maml.evaluate(steps=2).mean()
    maml.train(40)
    assert maml.evaluate(steps=2).mean() < 0.7 * before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("estimator", ["second-order", "gd-by-sgd", "implicit"])
def test_cuda_meta_gradient_matches_the_cpu_one(estimator):
    family = SinusoidFamily(dtype=DT)
    torch.manual_seed(0)
    cpu_model = family.model()
    cuda_model = family.model().cuda()
    cuda_model.load_state_dict(cpu_model.state_dict())
    chosen = get_estimator(estimator, **({"lam": 1.0, "cg_steps": 5, "damping": 1.0} if estimator == "implicit" else {}))
    grads = []
    for model in (cpu_model, cuda_model):
        maml = MAML(model, family, chosen, InnerSGD(0.02, 3), tasks_per_step=1)
        task = maml.meta_task(family.sample(4))  # batches drawn on the CPU, moved to the model's device
        grads.append(chosen.estimate(maml.params, task, maml.inner).grads)
    for a, b in zip(*grads):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-8)
    _, peak = peak_memory(lambda: chosen.estimate(maml.params, maml.meta_task(family.sample(4)), maml.inner), "cuda")
    assert peak > 0


def test_a_meta_step_whose_inner_loop_blows_up_is_skipped_and_leaves_theta_unchanged():
    family = QuadraticFamily(dim=5)
    maml = MAML([torch.ones(5)], family, "second-order", InnerSGD(1e6, 30), tasks_per_step=2)
    before = [p.detach().clone() for p in maml.params]
    record = maml.meta_step()
    assert "non-finite" in record["skipped"] and maml.skipped == 1 and math.isnan(record["meta_loss"])
    assert all(torch.equal(p, q) for p, q in zip(maml.params, before)) and not maml.optimizer.state
    maml.inner = InnerSGD(1e-3, 2)
    assert "skipped" not in maml.meta_step() and maml.skipped == 1
    assert not torch.equal(maml.params[0], before[0])
