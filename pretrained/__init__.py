"""Weights of the learned optimizers shipped with learned_optim (data files only; see README.md)."""
