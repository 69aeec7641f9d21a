"""Would torch.compile speed up the drop-in LSTM step? Time of one LSTM cell on one chunk.

The in-place step (``LSTMGACRule.step_``) runs ``lstm_cell`` on chunks of gate
pre-activations (80 × 16384 with the default weights and the CPU's chunk size). This times
that cell, per call, three ways on the same inputs: eager in place (into buffers and the
state, as the step does), ``torch.compile`` of the functional form (fresh outputs, which the
step would then have to copy into the state), and ``torch.compile`` of the in-place form.
Compilation time is reported too. The inputs are refilled before every call (the cell works
in place); that refill is timed separately and subtracted.

Usage: ``python benchmarks/cell_compile.py --out results/cell_compile`` (``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from learned_optim.rules.lstm_cell import CellBuffers, lstm_cell
from learned_optim.rules.lstm_gac import STEP_CHUNK

HIDDEN = 20


def per_call(fn, device: torch.device, calls: int = 100) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk", type=int, default=STEP_CHUNK)
    parser.add_argument("--out", type=Path, default=Path("results/cell_compile"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    gates0 = torch.randn(4 * HIDDEN, args.chunk, generator=gen, device=device)
    c0 = torch.randn(HIDDEN, args.chunk, generator=gen, device=device)
    state = torch.randn(2 * HIDDEN, 10 * args.chunk, generator=gen, device=device)  # h and c rows, strided like the state
    h, c = state[:HIDDEN, args.chunk:2 * args.chunk], state[HIDDEN:, args.chunk:2 * args.chunk]
    gates, tanh = torch.empty_like(gates0), torch.empty_like(c0)

    def in_place(g, cc, hh, t):
        lstm_cell(g, cc, HIDDEN, CellBuffers(gates=g, tanh=t, h=hh, c=cc), sigmoid_tanh=True)

    def functional(g, cc):
        return lstm_cell(g, cc, HIDDEN, sigmoid_tanh=True)

    def refill():
        gates.copy_(gates0)
        c.copy_(c0)

    rows = {}
    refill_time = per_call(refill, device)
    rows["eager, in place"] = (per_call(lambda: (refill(), in_place(gates, c, h, tanh)), device) - refill_time, 0.0)
    for name, fn, call in (("compiled, functional", functional, lambda f: f(gates0, c0)),
                           ("compiled, in place", in_place, lambda f: (refill(), f(gates, c, h, tanh)))):
        compiled = torch.compile(fn, dynamic=False)
        start = time.perf_counter()
        call(compiled)
        compile_seconds = time.perf_counter() - start
        seconds = per_call(lambda call=call, compiled=compiled: call(compiled), device)
        if name.endswith("in place"):
            seconds -= refill_time
        rows[name] = (seconds, compile_seconds)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"Command: `python benchmarks/{Path(__file__).name} {' '.join(argv)}` (torch {torch.__version__}, {where}); "
             f"one cell on {4 * HIDDEN} × {args.chunk} gates.", "",
             "| form | µs per call | compile s |", "|---|---:|---:|"]
    lines += [f"| {name} | {1e6 * t:.0f} | {c:.1f} |" for name, (t, c) in rows.items()]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cell_compile.md").write_text(text + "\n")
    (args.out / "cell_compile.json").write_text(json.dumps({k: {"seconds": t, "compile_seconds": c}
                                                            for k, (t, c) in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
