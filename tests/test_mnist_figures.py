"""benchmarks/mnist_figures.py runs either learned optimizer at its default settings."""


import pytest
import torch
from benchmark_scripts import load_script

from learned_optim import NTMBFGS, LSTMOptimizer

mnist_figures = load_script("mnist_figures")


def test_weights_name_either_learned_optimizer():
    chosen = mnist_figures.learned_optimizers(["mnist", "ntm-bfgs:ntm-bfgs-suite", "lstm-gac:suite-time-half"])
    assert list(chosen) == ["lstm-gac (mnist)", "ntm-bfgs (ntm-bfgs-suite)", "lstm-gac (suite-time-half)"]
    made = [spec.factory([torch.zeros(3, requires_grad=True)], 1.0, None) for spec, _ in chosen.values()]
    assert [type(o) for o in made] == [LSTMOptimizer, NTMBFGS, LSTMOptimizer]
    assert all(o.param_groups[0]["lr"] == 1.0 for o in made)  # the default setting, not a tuned lr
    assert chosen["ntm-bfgs (ntm-bfgs-suite)"][1]["name"] == "ntm-bfgs-suite"


def test_unknown_weights_are_named():
    with pytest.raises((ValueError, FileNotFoundError, KeyError), match="no-such-weights"):
        mnist_figures.learned_optimizers(["no-such-weights"])
