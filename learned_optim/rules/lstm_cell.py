"""The LSTM of the coordinatewise rules: the cell's math (one copy, shared by the in-place
drop-in step and the differentiable meta-training path) and the stacked core with global
averaging cells (Andrychowicz et al. 2016, §3.2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .segments import Segments

__all__ = ["CellBuffers", "NO_BUFFERS", "lstm_cell", "LSTMGACCore"]


@dataclass(frozen=True)
class CellBuffers:
    """Where one chunk's LSTM layer writes in the in-place step; every field None (the
    differentiable path): fresh tensors. ``h`` and ``c`` are views of the rule state (``c``
    holds the old c, overwritten); the others are scratch."""

    inputs: Tensor | None = None  # [x; h]: (in_l + H, n)
    gates: Tensor | None = None  # pre-activations, then σ of them: (4H, n)
    tanh: Tensor | None = None  # tanh(c): (H, n)
    h: Tensor | None = None
    c: Tensor | None = None


NO_BUFFERS = CellBuffers()


def lstm_cell(gates: Tensor, c: Tensor, hidden: int, out: CellBuffers = NO_BUFFERS,
              sigmoid_tanh: bool = False) -> tuple[Tensor, Tensor]:
    """The LSTM cell on pre-activations (4H, n), gate order i, f, g, o:

        c ← σ(f)⊙c + σ(i)⊙tanh(g),    h = σ(o)⊙tanh(c).

    The one copy of the cell's math: the chunked drop-in step passes ``out`` buffers (every op
    writes into them; nothing is allocated), the meta-trainer none (differentiable).

    ``sigmoid_tanh`` computes tanh(x) as 2σ(2x) − 1 (the g rows of ``gates`` then hold 2g, see
    :meth:`LSTMGACCore.gate_weights`), so one sigmoid pass serves all four gates: torch's CPU
    tanh runs at about a sixth of its sigmoid's rate. Same function, but rounded in absolute
    terms (|error| ≤ 2.4e-7 in float32, against tanh's relative 1 ulp): near 0 it is coarser,
    which makes float32 runs that differ only in summation order drift apart faster (NTM-BFGS
    sharded vs unsharded, 12 steps of tests/test_distributed.py: about 20× further apart). The drop-in LSTM step uses it; the differentiable
    path and NTM-BFGS keep torch.tanh.
    """
    if not sigmoid_tanh:
        into = out.gates is not None  # activations overwrite the pre-activations in the buffer
        input_forget, g, o = gates.split((2 * hidden, hidden, hidden))
        i, f = torch.sigmoid(input_forget, out=input_forget if into else None).split(hidden)
        g = torch.tanh(g, out=g if into else None)
        o = torch.sigmoid(o, out=o if into else None)
        c = torch.addcmul(torch.mul(f, c, out=out.c), i, g, out=out.c)
        return torch.mul(o, torch.tanh(c, out=out.tanh), out=out.h), c
    s = torch.sigmoid(gates, out=out.gates)
    i, f, g, o = s.split(hidden)
    c = torch.sub(torch.addcmul(torch.mul(f, c, out=out.c), i, g, value=2, out=out.c), i, out=out.c)  # f⊙c + i⊙(2σ_g − 1)
    t = torch.sigmoid(torch.mul(c, 2, out=out.tanh), out=out.tanh)
    t = torch.sub(torch.mul(t, 2, out=out.tanh), 1, out=out.tanh)
    return torch.mul(o, t, out=out.h), c


class LSTMGACCore(nn.Module):
    """Stacked LSTM cells over N coordinates at once, with global averaging cells.

    Feature-major layout: activations are (features, N), so every gate is a contiguous
    (H, N) block and elementwise work runs on dense memory (8× faster on CPU than strided
    (N, H) column slices). Layer l computes its gates with one matrix multiply,
    Wₗᵀ (4H, in_l + H) @ [x; h] (in_l + H, N); the stored Wₗ is (in_l + H, 4H), gate order
    i, f, g, o; the forget bias starts at 1. State: (L, 2, H, N) holding h and c per layer.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, gac_cells: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.gac_cells = num_layers, gac_cells
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self._g_doubled: dict[tuple[torch.dtype, torch.device], Tensor] = {}  # see gate_weights
        for layer in range(num_layers):
            fan_in = (input_size if layer == 0 else hidden_size) + hidden_size
            bound = 1.0 / math.sqrt(hidden_size)
            w = (torch.rand(fan_in, 4 * hidden_size, generator=generator) * 2 - 1) * bound
            b = torch.zeros(4 * hidden_size)
            b[hidden_size : 2 * hidden_size] = 1.0  # forget gate: remember by default
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    def gate_weights(self, layer: int, sigmoid_tanh: bool = False) -> tuple[Tensor, Tensor]:
        """Wₗᵀ (4H, in_l + H) and bₗ (4H, 1), differentiable in φ. With ``sigmoid_tanh`` the
        cell-input gate's rows are doubled (exactly), for :func:`lstm_cell`'s tanh(x) = 2σ(2x) − 1."""
        w, b = self.weights[layer], self.biases[layer]
        if not sigmoid_tanh:
            return w.t(), b.unsqueeze(1)
        key = (w.dtype, w.device)
        if key not in self._g_doubled:  # 1 for the i, f, o gates, 2 for g: made once
            H = self.hidden_size
            self._g_doubled[key] = torch.ones(4 * H, dtype=w.dtype, device=w.device).index_fill_(
                0, torch.arange(2 * H, 3 * H, device=w.device), 2.0)
        scale = self._g_doubled[key]
        return (w * scale).t(), (b * scale).unsqueeze(1)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_g_doubled", {})  # a core pickled before gate_weights cached its scale

    def layer(self, weights: tuple[Tensor, Tensor], x: Tensor, h: Tensor, c: Tensor,
              out: CellBuffers | None = None, sigmoid_tanh: bool = False) -> tuple[Tensor, Tensor]:
        """One layer's new h and c (H, n) from its input x (in_l, n) and old h, c; ``weights``
        from :meth:`gate_weights` (with the same ``sigmoid_tanh``). With ``out`` the results go
        into its buffers (the chunked in-place step); without, into fresh tensors (differentiable)."""
        out = out or NO_BUFFERS
        w_t, b = weights
        gates = torch.addmm(b, w_t, torch.cat((x, h), dim=0, out=out.inputs), out=out.gates)
        return lstm_cell(gates, c, self.hidden_size, out, sigmoid_tanh)

    def forward(self, inputs: Tensor, state: Tensor, segments: Segments) -> tuple[Tensor, Tensor]:
        """(in, N), (L, 2, H, N) → top-layer output (H, N), new state (L, 2, H, N)."""
        H, k = self.hidden_size, self.gac_cells
        # Views are taken with split/unbind, never with indexing: under autograd each slice
        # taken by indexing costs a zero-filled copy of the whole tensor in the backward pass
        # (this halved the meta-training time of an MNIST episode); split/unbind cost one cat.
        x = inputs
        new_layers = []
        for layer, (h, c) in enumerate(state.unbind(0)):
            h, c = self.layer(self.gate_weights(layer), x, h, c)
            if k:
                averaged, local = h.split((k, H - k))
                h = torch.cat((segments.mean(averaged), local), dim=0)
            new_layers.append(torch.stack((h, c)))
            x = h
        return x, torch.stack(new_layers)
