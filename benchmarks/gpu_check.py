"""The prepared GPU check (issue 17): one command, at most about 8 minutes on one GPU, writing a
markdown report.

Sections (each timed and guarded: a failing section is reported, and the rest still run; a
section that would start after ``--budget`` seconds is listed as not run):

1. the CUDA tests (``pytest -k "cuda or fused or tf32"`` over the test files that have them);
2. the Triton step against the eager step on the GPU: max error of one step of ``lstm-gac``
   (float32 and bfloat16 state) and of ``ntm-bfgs``, from the same state;
3. step throughput in parameters per second of ``lstm-gac`` (Triton, float32 and bfloat16
   state; eager float32) and ``ntm-bfgs`` (Triton) at 1e6, 1e7 and 1e8 parameters, against
   ``torch.optim.Adam(fused=True)``, with the fraction of the measured copy bandwidth the
   kernels' traffic (``kernels.lstm_gac.bytes_per_coordinate``) reaches and of the measured
   TF32 matmul rate their FLOPs (``flops_per_coordinate``) reach; state bytes per parameter;
4. meta-steps per second of the meta-trainer (``benchmarks/meta_speed.py``: the quadratic
   setting, and MNIST when ``--data`` has it; float32 and TF32);
5. a 1-process NCCL run: ``LSTMOptimizer`` (Triton) on an FSDP2-sharded model, whose GAC sums
   then go through ``all_reduce``, against the same model unsharded.

Usage: ``python benchmarks/gpu_check.py --out results/gpu_check`` on a machine with CUDA and
triton (from an uninstalled checkout: ``PYTHONPATH=$PWD``; ``--data DIR`` with DIR/mnist adds the
MNIST settings). A first call with ``--sizes 1e6 1e7`` and a second with ``--sizes 1e8 --sections 3``
keep what the first measured should the largest size take the machine down. ``--device cpu --sizes 1e3 1e4`` under ``TRITON_INTERPRET=1`` runs the same code on the
CPU (Triton's interpreter, gloo), to check the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from step_speed import bandwidth, matmul_rate, synchronize  # noqa: E402
from test_step_time import param_shapes  # noqa: E402

CUDA_TEST_FILES = ["tests/test_fused_step.py", "tests/test_meta.py", "tests/test_initialization.py",
                   "tests/test_ntm_bfgs.py", "tests/test_state_dtype.py"]


def tf32_rate(device: torch.device, size: int = 4096) -> float:
    """FLOP/s of a square GEMM with TF32 allowed: the tensor-core bound used here."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return matmul_rate(device, size)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def time_steps(opt: torch.optim.Optimizer, device: torch.device, budget: float, rounds: int = 5) -> float:
    """Median seconds per ``opt.step()``: each round times enough back-to-back steps (one sync at
    each end) to last about budget/rounds, so a GPU step of microseconds is not a sync's latency."""
    synchronize(device)
    t = time.perf_counter()
    opt.step()
    synchronize(device)
    one = max(time.perf_counter() - t, 1e-6)
    repeats = max(1, min(1000, int(budget / rounds / one)))
    times = []
    for _ in range(rounds):
        synchronize(device)
        t = time.perf_counter()
        for _ in range(repeats):
            opt.step()
        synchronize(device)
        times.append((time.perf_counter() - t) / repeats)
    return sorted(times)[len(times) // 2]


class SectionFailed(Exception):
    """A section that ran to its end but whose check failed; its argument is the report's text."""


def run_logged(cmd: list[str], timeout: float, lines: int = 25) -> tuple[bool, str, str]:
    """(passed, status, the output's last ``lines`` lines) of a subprocess; a timed-out one keeps
    what it printed and has not passed."""
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        passed, status, output = done.returncode == 0, f"exit status {done.returncode}", done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        text = [part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                for part in (expired.stdout, expired.stderr)]
        passed, status, output = False, f"stopped after {timeout:.0f} s (timeout)", "".join(text)
    return passed, status, "\n".join(output.strip().splitlines()[-lines:])


def checked(passed: bool, body: str) -> str:
    """``body``, or SectionFailed(body) when the section's subprocess did not pass."""
    if not passed:
        raise SectionFailed(body)
    return body


def make_params(n: int, device: torch.device) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in param_shapes(n):
        p = torch.nn.Parameter(0.05 * torch.randn(shape, generator=gen, device=device))
        p.grad = 1e-2 * torch.randn(shape, generator=gen, device=device)
        params.append(p)
    return params


def make(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    import learned_optim

    if name == "adam-fused":
        return torch.optim.Adam(params, lr=1e-3, fused=params[0].is_cuda)
    kinds = {
        "lstm-gac (triton)": lambda: learned_optim.LSTMOptimizer(params, fused=True),
        "lstm-gac (triton, bf16 state)": lambda: learned_optim.LSTMOptimizer(params, fused=True,
                                                                             state_dtype=torch.bfloat16),
        "lstm-gac (eager)": lambda: learned_optim.LSTMOptimizer(params, fused=False),
        "ntm-bfgs (triton)": lambda: learned_optim.NTMBFGS(params, fused=True),
    }
    return kinds[name]()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


# ------------------------------------------------------------------------------- sections

def cuda_tests(args) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *CUDA_TEST_FILES,
           "-k", "cuda or fused or tf32"]
    passed, status, tail = run_logged(cmd, timeout=args.section_timeout)
    return checked(passed, f"`{' '.join(cmd[2:])}`: {status}\n\n```\n{tail}\n```")


def step_errors(args) -> str:
    """One step, Triton against eager, from the same (nonzero) state, at 1e6 coordinates."""
    from learned_optim.optim.lstm import DEFAULT_WEIGHTS
    from learned_optim.optim.ntm import NTM_DEFAULT_WEIGHTS
    from learned_optim.rules import load_rule

    device = args.device
    num = int(min(1e6, max(args.sizes)))
    rows = ["| rule | state | max abs error of g_t | max abs g_t | max abs error of the state |",
            "| --- | --- | ---: | ---: | ---: |"]
    gen = torch.Generator(device=device).manual_seed(0)
    for name in (DEFAULT_WEIGHTS, "suite", "mnist"):
        rule = load_rule(name)[0].to(device)
        layout = rule.segments([num // 2, num - num // 2], device)
        for dtype in (torch.float32, torch.bfloat16):
            apart = dtype != torch.float32 and rule.config.bias_correction
            state = torch.zeros(rule.config.state_rows - int(apart), num, device=device, dtype=dtype)
            count = torch.zeros(num, device=device) if apart else None
            out = torch.empty(num, device=device)
            theta = torch.randn(num, generator=gen, device=device) if rule.needs_params else None  # relative_step
            for _ in range(3):  # a state that is not zero
                rule.step_(1e-2 * torch.randn(num, generator=gen, device=device), state, layout, out, count=count,
                           params=theta)
            grad = 1e-2 * torch.randn(num, generator=gen, device=device)
            eager, fused = state.clone(), state.clone()
            counts = [None if count is None else count.clone() for _ in range(2)]
            out_eager, out_fused = torch.empty_like(out), torch.empty_like(out)
            rule.step_(grad, eager, layout, out_eager, count=counts[0], params=theta)
            rule.step_(grad, fused, layout, out_fused, count=counts[1], params=theta, fused=True)
            synchronize(torch.device(device))
            rows.append(f"| {name} | {str(dtype).removeprefix('torch.')} | {(out_fused - out_eager).abs().max():.3g} "
                        f"| {out_eager.abs().max():.3g} | {(fused.float() - eager.float()).abs().max():.3g} |")
    import learned_optim

    params_a, params_b = make_params(num, torch.device(device)), make_params(num, torch.device(device))
    opts = [learned_optim.NTMBFGS(params_a, fused=True), learned_optim.NTMBFGS(params_b, fused=False)]
    for _ in range(3):
        for opt in opts:
            opt.step()
    error = max(float((a - b).detach().abs().max()) for a, b in zip(params_a, params_b))
    rows.append(f"| NTMBFGS default ({NTM_DEFAULT_WEIGHTS}), 3 optimizer steps | float32 | parameters differ by at most {error:.3g} | | |")
    return f"{num:,} coordinates (two tensors):\n\n" + "\n".join(rows)


def throughput(args) -> str:
    device = torch.device(args.device)
    peak_bw = bandwidth(device, megabytes=1024 if device.type == "cuda" else 64)
    peak_flops = tf32_rate(device) if device.type == "cuda" else float("nan")
    from learned_optim.kernels.lstm_gac import bytes_per_coordinate, flops_per_coordinate
    from learned_optim.optim.lstm import DEFAULT_WEIGHTS
    from learned_optim.rules import load_rule

    rule = load_rule(DEFAULT_WEIGHTS)[0]
    lines = [f"Measured in this run: copy bandwidth {peak_bw / 1e12:.2f} TB/s (read + write), TF32 GEMM "
             f"{peak_flops / 1e12:.0f} TFLOP/s. Design traffic of the Triton LSTM+GAC step: "
             f"{bytes_per_coordinate(rule)} B per coordinate in float32 state, "
             f"{bytes_per_coordinate(rule, state_bytes=2)} B in bfloat16; {flops_per_coordinate(rule):,} FLOP "
             "on the padded tiles.", "",
             "| optimizer | parameters | step (ms) | parameters/s | × Adam's rate | bandwidth fraction | "
             "tensor-core fraction | state B/param |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    names = ["adam-fused", "lstm-gac (triton)", "lstm-gac (triton, bf16 state)", "lstm-gac (eager)", "ntm-bfgs (triton)"]
    footprint: dict[str, float] = {}  # bytes per parameter (state, parameter, gradient) seen at a smaller size
    for size in sorted(args.sizes):
        n = int(size)
        adam_rate = None
        for name in names:
            if time.perf_counter() - args.start > args.budget:
                lines.append(f"| {name} | {n:.0e} | not run: past the budget | | | | | |")
                continue
            if device.type == "cuda" and name in footprint:
                free = torch.cuda.mem_get_info(device)[0]
                if 1.25 * n * footprint[name] > free:  # an allocation that would fill the card: not tried
                    lines.append(f"| {name} | {n:.0e} | not run: needs about {n * footprint[name] / 1e9:.0f} GB, "
                                 f"{free / 1e9:.0f} GB free | | | | | |")
                    continue
            try:
                params = make_params(n, device)
                opt = make(name, params)
                for _ in range(2):
                    opt.step()
                seconds = time_steps(opt, device, budget=1.0 if device.type == "cuda" else 0.2)
                rate = n / seconds
                adam_rate = rate if name == "adam-fused" else adam_rate
                bw = flops = ""
                if name.startswith("lstm-gac (triton"):
                    b = bytes_per_coordinate(rule, state_bytes=2 if "bf16" in name else 4)
                    bw = f"{rate * b / peak_bw:.2f}"
                    flops = f"{rate * flops_per_coordinate(rule) / peak_flops:.2f}"
                ratio = f"{rate / adam_rate:.3g}" if adam_rate else ""
                lines.append(f"| {name} | {n:.0e} | {seconds * 1e3:.2f} | {rate:.3g} | {ratio} | {bw} | {flops} | "
                             f"{state_bytes(opt) / n:.0f} |")
                footprint[name] = state_bytes(opt) / n + 2 * params[0].element_size()
                del opt, params
            except Exception as error:  # an out-of-memory at 1e8, say: reported, and the rest go on
                lines.append(f"| {name} | {n:.0e} | failed: {type(error).__name__}: {str(error)[:120]} | | | | | |")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return "\n".join(lines)


def meta_speed(args) -> str:
    precisions = ["float32", "tf32"] if args.device == "cuda" else ["float32"]
    out = Path(args.out) / "meta_speed"
    cmd = [sys.executable, "benchmarks/meta_speed.py", "--device", args.device, "--episodes", "2",
           "--precision", *precisions, "--out", str(out)]
    if args.data and (Path(args.data) / "mnist").is_dir():
        cmd += ["--data", args.data]
    passed, status, tail = run_logged(cmd, timeout=args.section_timeout)
    report = out / "meta_speed.md"  # written row by row: a timed-out or failed run keeps its rows
    body = (report.read_text() if report.exists() else "") + ("" if passed else f"\n```\n{tail}\n```")
    return checked(passed, f"`{' '.join(cmd[1:])}`: {status}\n\n{body}")


_DIST_WORKER = r'''
import os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import learned_optim
device = torch.device(sys.argv[1])
backend = "nccl" if device.type == "cuda" else "gloo"
dist.init_process_group(backend, init_method="tcp://127.0.0.1:%s" % sys.argv[2], rank=0, world_size=1)
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(device)
x, y = torch.randn(64, 16, device=device), torch.randn(64, 1, device=device)
results = []
for shard in (False, True):
    m = model()
    if shard:
        for layer in m:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(m)
    opt = learned_optim.LSTMOptimizer(m.parameters(), fused=True)
    for _ in range(5):
        opt.zero_grad(); ((m(x) - y) ** 2).mean().backward(); opt.step()
    results.append([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for p in m.parameters()])
error = max(float((a - b).abs().max()) for a, b in zip(*results))
print("max parameter difference, FSDP2 (1 rank, %s) against unsharded, 5 steps: %.3g" % (backend, error))
dist.destroy_process_group()
'''


def distributed(args) -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    passed, status, tail = run_logged([sys.executable, "-c", _DIST_WORKER, args.device, str(port)], timeout=120,
                                      lines=12)
    return checked(passed, f"{status}\n\n```\n{tail}\n```")


SECTIONS = [("CUDA tests", cuda_tests), ("Triton step against the eager step", step_errors),
            ("Step throughput", throughput), ("Meta-training speed", meta_speed),
            ("1-process NCCL run", distributed)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no section starts")
    parser.add_argument("--data", default=os.environ.get("LEARNED_OPTIM_DATA"))
    parser.add_argument("--sections", default="all", help="comma-separated numbers (1-5), run in that order, or 'all'")
    parser.add_argument("--section-timeout", type=float, default=180.0,
                        help="seconds for each of the subprocess sections (tests, meta-training speed)")
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here (--device cpu under TRITON_INTERPRET=1 checks the script on the CPU)")
    args.start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = range(1, len(SECTIONS) + 1) if args.sections == "all" else [int(s) for s in args.sections.split(",")]
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    report = [f"# GPU check\n\nCommand: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
              f"on {name}; torch {torch.__version__}, triton {triton_version}, Python {platform.python_version()}."]
    summary = {}
    for index in chosen:
        title, section = SECTIONS[index - 1]
        elapsed = time.perf_counter() - args.start
        if elapsed > args.budget:
            report.append(f"## {index}. {title}\n\nNot run: {elapsed:.0f} s had passed (budget {args.budget:.0f} s).")
            continue
        t = time.perf_counter()
        try:
            body = section(args)
            status = "ok"
        except SectionFailed as failed:
            body, status = str(failed.args[0]), "failed"
        except Exception:
            body = f"```\n{traceback.format_exc()[-3000:]}\n```"
            status = "failed"
        seconds = time.perf_counter() - t
        summary[title] = {"status": status, "seconds": round(seconds, 1)}
        report.append(f"## {index}. {title} ({seconds:.0f} s{', FAILED' if status != 'ok' else ''})\n\n{body}")
        print(f"{title}: {status} in {seconds:.0f} s", flush=True)
        (args.out / "report.md").write_text("\n\n".join(report) + "\n")  # written as it goes: a cut-off run keeps its part
    report.append(f"Total: {time.perf_counter() - args.start:.0f} s.")
    (args.out / "report.md").write_text("\n\n".join(report) + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out / 'report.md'}")
    return 0 if all(s["status"] == "ok" for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
