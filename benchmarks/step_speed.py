"""Step time of every optimizer against torch.optim.Adam from 1e4 to 1e7 parameters, the state
bytes per parameter, and how close the LSTM+GAC step comes to the hardware's limits.

In one run, on one device (``--device``; CUDA when asked for and present):

* the median ``step()`` time of ``torch.optim.Adam(foreach=True)`` and of every registered
  optimizer at each size (parameters as in ``benchmarks/test_step_time.py``: three matrices,
  their biases and a vector; fixed gradients), and its ratio to Adam's;
* optimizer state bytes per parameter after stepping;
* the hardware limits, measured in the same run: the matrix-multiply rate (a square float32
  GEMM) and the memory bandwidth (a large copy: bytes read plus written per second);
* for ``lstm-gac``: its floating-point work per step (the LSTM gate matrix products, output
  and momentum layers: 2·Σ_l 4H·(in_l + H) + 2·H·(1 + M) per coordinate, the elementwise
  work not counted) divided by the step time, as a fraction of the matmul rate; and the least
  bytes a step must move (read the gradient, read and write the parameter and the R rows of
  rule state per coordinate, in float32) divided by the step time, as a fraction of the
  bandwidth.

Usage: ``python benchmarks/step_speed.py --out results/step_speed`` (``--sizes 1e4 1e5`` for a
quick run; ``--device cuda`` on a GPU; ``--skip NAME@SIZE`` leaves out a case (one that does
not fit in memory, say), listed in the table as not run; ``--lstm-chunk N`` sets LSTMOptimizer's
``chunk_size``, to compare chunk sizes; ``--profile`` adds the time per operation of one
LSTM+GAC step at each size; ``--rounds R`` times every optimizer R times per size, interleaved
and in alternating order, and reports medians over rounds and each ratio to Adam paired with
Adam's time in the same round, so two optimizers a few percent apart can be told from the
machine's drift; ``--paired-with NAME`` adds each one's paired ratio to NAME's). Every optimizer
of a size is built before any is timed, so their states are all in memory at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import learned_optim

sys.path.insert(0, str(Path(__file__).parent))
from test_step_time import make_optimizer, make_params, warmup_steps  # noqa: E402

BASELINE = "adam-foreach"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(opt: torch.optim.Optimizer, device: torch.device, budget: float, max_steps: int = 20) -> float:
    """Median seconds of ``opt.step()`` over steps until ``budget`` seconds (at least 2 steps)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 2 or (time.perf_counter() - start < budget and len(times) < max_steps):
        synchronize(device)
        t = time.perf_counter()
        opt.step()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_rate(device: torch.device, size: int = 2048) -> float:
    """float32 FLOP/s of a square GEMM (best of 5)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def bandwidth(device: torch.device, megabytes: int = 512) -> float:
    """Bytes read plus written per second by a large tensor copy (best of 5)."""
    src = torch.empty(megabytes * 2**20 // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        t = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def lstm_work(rule) -> tuple[float, float]:
    """(matmul FLOPs, least bytes moved) per coordinate of one LSTM+GAC step."""
    cfg = rule.config
    h = cfg.hidden_size
    flops = sum(2 * w.shape[0] * w.shape[1] for w in rule.core.weights)  # (in_l + H) × 4H per layer
    flops += 2 * h * (1 + len(cfg.momentum_decays))  # output and momentum step-size layers
    bytes_moved = 4 * (1 + 2 + 2 * cfg.state_rows)  # grad; param read+write; state read+write
    return float(flops), float(bytes_moved)


def profile_step(opt: torch.optim.Optimizer, device: torch.device, rows: int = 12) -> str:
    """Self time per aten op of one ``step()`` (torch.profiler), the top ``rows`` of them
    (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        opt.step()
        synchronize(device)
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                     row_limit=rows)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def build(name: str, size: int, device: torch.device, lstm_chunk: int | None) -> torch.optim.Optimizer:
    """Optimizer ``name`` on fresh parameters of ``size`` coordinates with fixed gradients,
    stepped past its warm-up."""
    made = make_params(size)  # on the CPU, with fixed gradients
    params = [torch.nn.Parameter(p.detach().to(device)) for p in made]
    for p, q in zip(params, made):
        p.grad = q.grad.to(device)
    opt = make_optimizer(name, params)
    if name.partition(":")[0] == "lstm-gac" and lstm_chunk is not None:
        for group in opt.param_groups:
            group["chunk_size"] = lstm_chunk
    for _ in range(warmup_steps(opt)):
        opt.step()
    return opt


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> tuple[float, float, float]:
    """Median over rounds of ``name``'s step time over ``reference``'s in the same round (paired,
    so the machine's drift between rounds cancels), and the least and greatest of those ratios."""
    ratios = [t / r for t, r in zip(times[name], times[reference])]
    return statistics.median(ratios), min(ratios), max(ratios)


def summarize(name: str, size: int, times: dict[str, list[float]], rate: float, bw: float,
              opt: torch.optim.Optimizer, reference: str | None = None) -> dict:
    """One table row: the median step time over rounds, the paired ratio to Adam (when timed)
    and to ``reference`` (when given), with their ranges over rounds."""
    seconds = statistics.median(times[name])
    row: dict = {"optimizer": name, "params": size, "seconds": seconds, "round_seconds": times[name],
                 "state_bytes_per_param": state_bytes(opt) / size, "ratio_to_adam": None}
    if BASELINE in times:
        median, low, high = paired_ratio(times, name, BASELINE)
        row.update(ratio_to_adam=median, ratio_range=[low, high])
    if reference is not None and reference in times:
        median, low, high = paired_ratio(times, name, reference)
        row.update(ratio_to_reference=median, reference_range=[low, high])
    if name.partition(":")[0] == "lstm-gac":
        flops, moved = lstm_work(opt.rule)
        row["flop_fraction"] = flops * size / seconds / rate
        row["bandwidth_fraction"] = moved * size / seconds / bw
    return row


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--optimizers", nargs="+", default=[BASELINE, *learned_optim.available()],
                        help="registered names, or NAME:WEIGHTS for a learned optimizer with other shipped weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timed steps per case and round (at least 2 steps)")
    parser.add_argument("--paired-with", default=None, metavar="NAME",
                        help="also report each optimizer's step time over NAME's (one of --optimizers), "
                             "paired by round as the ratio to Adam is")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every optimizer this many times per size, interleaved, the order reversed "
                             "every other round; report medians over rounds (a noisy machine's drift cancels "
                             "in the paired ratios to Adam)")
    parser.add_argument("--skip", nargs="*", default=[], metavar="NAME@SIZE",
                        help="cases not to run (e.g. ntm-bfgs@1e7 on a machine without the memory for it)")
    parser.add_argument("--lstm-chunk", type=int, default=None, metavar="N",
                        help="chunk_size of lstm-gac (default: the optimizer's own)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one lstm-gac step at each size: time per aten op (profile_<size>.txt)")
    parser.add_argument("--out", type=Path, default=Path("results/step_speed"))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.paired_with is not None and args.paired_with not in args.optimizers:
        parser.error(f"--paired-with {args.paired_with!r} is not one of --optimizers {args.optimizers}")
    skipped = set()
    for case in args.skip:
        name, _, size = case.partition("@")
        if not size:
            parser.error(f"--skip takes NAME@SIZE, got {case!r}")
        skipped.add((name, int(float(size))))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available here")

    start = time.perf_counter()
    rate, bw = matmul_rate(device), bandwidth(device)
    rows = []
    profiles: dict[int, str] = {}
    for size in (int(s) for s in args.sizes):
        names = [n for n in args.optimizers if (n, size) not in skipped]
        opts = {name: build(name, size, device, args.lstm_chunk) for name in names}
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):  # interleaved, the order reversed every other round
            for name in (names if r % 2 == 0 else names[::-1]):
                times[name].append(time_steps(opts[name], device, args.budget))
        for name in args.optimizers:
            if name not in opts:
                rows.append({"optimizer": name, "params": size, "skipped": True})
                continue
            row = summarize(name, size, times, rate, bw, opts[name], args.paired_with)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if name == "lstm-gac" and args.profile:
                profiles[size] = profile_step(opts[name], device)
        del opts
    seconds = time.perf_counter() - start

    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    lines = [f"Command: `python benchmarks/{Path(__file__).name} {' '.join(argv)}` ({seconds:.0f} s, torch "
             f"{torch.__version__}, {where}). Measured in the same run: matmul {rate / 1e9:.1f} GFLOP/s "
             f"(float32 GEMM 2048²), bandwidth {bw / 1e9:.1f} GB/s (copy, read + write).", "",
             "| optimizer | params | step | × Adam" + (" (range over rounds)" if args.rounds > 1 else "")
             + (f" | × {args.paired_with}" if args.paired_with else "")
             + " | state bytes / param | % of matmul rate | % of bandwidth |",
             "|---|---:|---:|---:|" + ("---:|" if args.paired_with else "") + "---:|---:|---:|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['optimizer']} | {r['params']:.0e} | not run (--skip) | | |"
                         + (" |" if args.paired_with else "") + " | |")
            continue
        ms = r["seconds"] * 1e3
        step = f"{ms:.3g} ms" if ms < 1000 else f"{r['seconds']:.3g} s"
        flop = f"{100 * r['flop_fraction']:.1f}%" if "flop_fraction" in r else ""
        band = f"{100 * r['bandwidth_fraction']:.1f}%" if "bandwidth_fraction" in r else ""
        ratio = f"{r['ratio_to_adam']:.2f}" if r["ratio_to_adam"] is not None else ""  # Adam not run
        if r.get("ratio_range") and len(r["round_seconds"]) > 1:
            ratio += " ({:.2f}–{:.2f})".format(*r["ratio_range"])
        paired = ""
        if args.paired_with:
            paired = " {:.3f} ({:.3f}–{:.3f}) |".format(r["ratio_to_reference"], *r["reference_range"]) \
                if "ratio_to_reference" in r else " |"
        lines.append(f"| {r['optimizer']} | {r['params']:.0e} | {step} | {ratio} |{paired} "
                     f"{r['state_bytes_per_param']:.0f} | {flop} | {band} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_speed.md").write_text(text + "\n")
    for size, table in profiles.items():
        (args.out / f"profile_{size:.0e}.txt").write_text(table + "\n")
        print(f"lstm-gac, one step at {size:.0e} params:\n{table}")
    (args.out / "step_speed.json").write_text(json.dumps({"matmul_flops": rate, "bandwidth_bytes": bw,
                                                          "device": where, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
