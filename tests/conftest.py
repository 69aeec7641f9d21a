"""Shared fixtures."""

from __future__ import annotations

import pytest
from test_tasks import mnist_root


@pytest.fixture
def mnist_dir():
    """The data directory holding mnist/ (LEARNED_OPTIM_DATA or ../shared/data); skips without it."""
    root = mnist_root()
    if root is None:
        pytest.skip("MNIST files not found (set LEARNED_OPTIM_DATA)")
    return root
