"""NTM-BFGS memory algebra: with the head outputs BFGS would emit, the dense memory reproduces
textbook BFGS's iterates and the limited memory L-BFGS's directions (two-loop recursion on the
same history), to 1e-6 or better."""

from __future__ import annotations

import pytest
import torch
from bfgs_reference import two_loop

from learned_optim.rules.ntm_memory import DENSE_MAX_COORDINATES, DenseMemory, LimitedMemory, choose_memory

F64 = torch.float64


def _quadratic(n: int, seed: int, condition: float = 50.0):
    """f(θ) = ½θᵀAθ − bᵀθ with A SPD of the given condition number."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    eig = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), n, dtype=F64)
    a = q @ torch.diag(eig) @ q.T
    b = torch.randn(n, generator=g, dtype=F64)
    return a, b, torch.randn(n, generator=g, dtype=F64)


def _exact_step(a, grad, direction):
    """α minimizing the quadratic along the direction: −gᵀp / pᵀAp."""
    return -(grad @ direction) / (direction @ a @ direction)


def _bfgs_heads(memory, state, s, y):
    """The three write pairs of the inverse-Hessian BFGS update, H⁺ = H + c·s·sᵀ − ρ·s·(Hy)ᵀ − ρ·(Hy)·sᵀ,
    with ρ = 1/(yᵀs) and c = ρ + ρ²·yᵀHy; Hy is a read of the memory."""
    hy = memory.read(state, y.unsqueeze(0))[0]
    rho = 1.0 / (y @ s)
    c = rho + rho * rho * (y @ hy)
    return torch.stack((c * s, -rho * s, -rho * hy)), torch.stack((s, hy, s))


def test_dense_memory_with_bfgs_heads_reproduces_textbook_bfgs():
    n = 8
    a, b, theta = _quadratic(n, seed=0)
    gamma = 0.5
    memory = DenseMemory(initial_scale=gamma)
    state = memory.init_state(n, F64)
    reference_theta, reference_h = theta.clone(), torch.eye(n, dtype=F64) * gamma
    eye = torch.eye(n, dtype=F64)
    for _ in range(n):
        grad = a @ theta - b
        direction = memory.read(state, -grad.unsqueeze(0))[0]  # read head r = −∇, i = M·r
        step = _exact_step(a, grad, direction) * direction
        theta_next = theta + step
        left, right = _bfgs_heads(memory, state, step, a @ theta_next - b - grad)
        state, theta = memory.write(state, left, right), theta_next
        # Textbook BFGS, product form: H⁺ = (I − ρ·s·yᵀ)·H·(I − ρ·y·sᵀ) + ρ·s·sᵀ.
        ref_grad = a @ reference_theta - b
        ref_direction = -reference_h @ ref_grad
        ref_step = _exact_step(a, ref_grad, ref_direction) * ref_direction
        ref_y = a @ (reference_theta + ref_step) - b - ref_grad
        rho = 1.0 / (ref_y @ ref_step)
        reference_h = (eye - rho * torch.outer(ref_step, ref_y)) @ reference_h @ (eye - rho * torch.outer(ref_y, ref_step)) \
            + rho * torch.outer(ref_step, ref_step)
        reference_theta = reference_theta + ref_step
        torch.testing.assert_close(theta, reference_theta, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state, reference_h, rtol=1e-6, atol=1e-6)
    # BFGS with exact line search ends at the minimum of an n-dimensional quadratic in n steps,
    # and its M is then A⁻¹.
    torch.testing.assert_close(theta, torch.linalg.solve(a, b), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, torch.linalg.inv(a), rtol=1e-5, atol=1e-6)


def test_limited_memory_with_bfgs_heads_reproduces_lbfgs_with_the_same_history():
    """At every step the memory's read, M·(−∇), is L-BFGS's direction −H·∇ from the same m pairs."""
    n, history, gamma = 20, 3, 0.2
    a, b, theta = _quadratic(n, seed=1, condition=200.0)
    first_grad_norm = (a @ theta - b).norm()
    memory = LimitedMemory(capacity=3 * history, initial_scale=gamma)
    state = memory.init_state(n, F64)
    pairs = []
    for _ in range(30):
        grad = a @ theta - b
        direction = memory.read(state, -grad.unsqueeze(0))[0]
        torch.testing.assert_close(direction, -two_loop(grad, pairs, gamma), rtol=1e-9, atol=1e-9 * grad.norm().item())
        step = _exact_step(a, grad, direction) * direction
        theta_next = theta + step
        pairs = (pairs + [(step, a @ theta_next - b - grad)])[-history:]
        # The heads rebuild H from γ·I over the last m pairs (3 write pairs each), as L-BFGS does,
        # and write all K = 3m of them (zero pairs pad the first steps), replacing the old history.
        scratch = memory.init_state(n, F64)
        for s, y in pairs:
            scratch = memory.write(scratch, *_bfgs_heads(memory, scratch, s, y))
        state, theta = memory.write(state, scratch[0], scratch[1]), theta_next
    # The limited memory's M equals L-BFGS's H on any vector, and L-BFGS converged.
    probes = torch.randn(4, n, dtype=F64, generator=torch.Generator().manual_seed(5))
    want = torch.stack([two_loop(p, pairs, gamma) for p in probes])
    torch.testing.assert_close(memory.read(state, probes), want, rtol=1e-9, atol=1e-12)
    assert (a @ theta - b).norm() < 1e-6 * first_grad_norm


def test_limited_memory_equals_dense_until_full_then_forgets_the_oldest_pairs():
    n, gamma = 5, 0.3
    dense, limited = DenseMemory(gamma), LimitedMemory(capacity=4, initial_scale=gamma)
    d_state, l_state = dense.init_state(n, F64), limited.init_state(n, F64)
    g = torch.Generator().manual_seed(2)
    writes = [(torch.randn(2, n, generator=g, dtype=F64), torch.randn(2, n, generator=g, dtype=F64)) for _ in range(3)]
    keys = torch.randn(3, n, generator=g, dtype=F64)
    for left, right in writes[:2]:  # 4 pairs: exactly full
        d_state, l_state = dense.write(d_state, left, right), limited.write(l_state, left, right)
    torch.testing.assert_close(limited.read(l_state, keys), dense.read(d_state, keys), rtol=1e-12, atol=1e-12)
    l_state = limited.write(l_state, *writes[2])  # the 2 oldest pairs fall out
    only_recent = dense.init_state(n, F64)
    for left, right in writes[1:]:
        only_recent = dense.write(only_recent, left, right)
    torch.testing.assert_close(limited.read(l_state, keys), dense.read(only_recent, keys), rtol=1e-12, atol=1e-12)
    assert l_state.shape == (2, 4, n)


def test_memory_reads_and_writes_are_differentiable():
    memory = LimitedMemory(capacity=2, initial_scale=0.1)
    left = torch.randn(1, 4, dtype=F64, requires_grad=True)
    right = torch.randn(1, 4, dtype=F64, requires_grad=True)
    key = torch.randn(1, 4, dtype=F64)
    state = memory.write(memory.init_state(4, F64), left, right)
    memory.read(state, key).sum().backward()
    torch.testing.assert_close(left.grad, (right @ key.T) * torch.ones_like(left), rtol=1e-12, atol=1e-12)  # ∂/∂a of a·(bᵀr)
    torch.testing.assert_close(right.grad, key * left.sum(), rtol=1e-12, atol=1e-12)


def test_memory_form_is_chosen_by_size_and_costs_what_the_docs_say():
    assert choose_memory(DENSE_MAX_COORDINATES).kind == "dense"
    assert choose_memory(DENSE_MAX_COORDINATES + 1).kind == "limited"
    assert choose_memory(10, form="limited", capacity=6).capacity == 6
    assert DenseMemory.state_bytes(1000) == 4_000_000
    assert LimitedMemory(30).state_bytes(1_000_000) == 240_000_000


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: choose_memory(5, form="sparse"), "memory form must be 'auto', 'dense' or 'limited'"),
        (lambda: LimitedMemory(0), r"capacity \(K\) must be a positive integer"),
        (lambda: DenseMemory(float("nan")), "initial_scale must be finite"),
        (lambda: DenseMemory().read(torch.zeros(3, 3), torch.zeros(1, 4)), r"read keys must have shape \(heads, 3\)"),
        (lambda: LimitedMemory(2).write(torch.zeros(2, 2, 3), torch.zeros(3, 3), torch.zeros(3, 3)),
         "3 write pairs exceed the memory's capacity K = 2"),
        (lambda: LimitedMemory(4).write(torch.zeros(2, 4, 3), torch.zeros(2, 3), torch.zeros(1, 3)),
         "as many left as right vectors"),
    ],
)
def test_bad_memory_input_is_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()
