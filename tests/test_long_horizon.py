"""benchmarks/long_horizon.py: the windows and the late peak it scores each seed by."""

from __future__ import annotations

import math

import torch
from benchmark_scripts import load_script

long_horizon = load_script("long_horizon")


def test_window_mean_and_peak_by_hand():
    """20 steps: the tenth is the mean of steps 1-2 (5-15%), the end of steps 18-19, and the peak
    the highest loss from step 3 (15%) on: a spike at step 10 that the end does not show."""
    losses = torch.tensor([9.0, 4.0, 2.0, 8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                           6.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    assert long_horizon.window_mean(losses, 0.05, 0.15) == 3.0
    assert long_horizon.window_mean(losses, 0.9, 1.0) == 0.375
    assert long_horizon.peak_after(losses, 0.15) == 8.0
    assert long_horizon.peak_after(losses, 0.2) == 6.0


def test_peak_is_inf_after_a_non_finite_loss():
    losses = torch.ones(20, dtype=torch.float64)
    losses[15] = math.inf
    assert long_horizon.peak_after(losses, 0.15) == math.inf
    assert long_horizon.peak_after(losses, 0.8) == 1.0
