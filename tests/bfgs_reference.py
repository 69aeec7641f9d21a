"""Reference quasi-Newton math shared by the NTM-BFGS tests."""

from __future__ import annotations


def two_loop(grad, pairs, gamma):
    """L-BFGS's two-loop recursion: H·∇ with H built from γ·I and the (s, y) pairs, oldest first."""
    q, alphas = grad.clone(), []
    for s, y in reversed(pairs):
        alpha = (s @ q) / (y @ s)
        alphas.append(alpha)
        q = q - alpha * y
    r = gamma * q
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        r = r + s * (alpha - (y @ r) / (y @ s))
    return r
