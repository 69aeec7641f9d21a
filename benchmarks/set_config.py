"""Weights with a fixed option of the rule's config changed: the same learned tensors φ, a new
config (a post-processing option that adds no tensor, such as ``direction_clip``).

    python benchmarks/set_config.py --weights suite-time-half --set direction_clip=1 --out runs/suite-clip
    python benchmarks/set_config.py --weights ntm-bfgs-suite --set controller.direction_clip=1 --out runs/ntm-clip

With ``--validation-tasks N`` both the source and the result are first scored as
``benchmarks/step_scale.py`` scores its factors: the meta-trainer's validation on N held-out
tasks (validation seeds, never the suite's evaluation seeds), recorded in the metadata. Only the options in :data:`SETTABLE` may change: they alter what the rule does with the learned
tensors, not which tensors it has, so the result is scored like any weights (``benchmarks/suite.py``)
before it replaces anything. The written metadata names this command and keeps the source's
provenance (its meta-training command and config) under ``set_config.source``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any

import torch

from learned_optim.meta.trainer import VALIDATION_SEED_BASE, validate
from learned_optim.rules import load_rule, save_rule
from learned_optim.rules.weights import rule_from_config
from learned_optim.tasks import get_family

#: Config fields (of an LSTM+GAC config, ``controller.`` + field inside NTM-BFGS's; ``trust_ratio``,
#: ``reset_on_backtrack``, ``memory``, ``memory_capacity``, ``bfgs_write_bases`` and ``curvature_eps`` of
#: NTM-BFGS's own) this script may set.
#: ``momentum_rms_decay`` (β₂ of v) changes the normalization the inputs and directions share, not
#: the tensors: like the others, a fixed option scored before it replaces anything.
#: ``relative_floor`` (the relative step's factor never below θ₀'s) adds s_0 to the state (a row of the
#: meta-trainer's, one number per tensor in LSTMOptimizer), not a tensor or an input; ``shrink_discount``
#: (its growth past a shrink counted at the shrink's ratio) adds m_t the same way.
SETTABLE = ("direction_clip", "step_decay_after", "momentum_rms_decay", "relative_floor", "shrink_discount",
            "trust_ratio",
            "reset_on_backtrack", "memory", "memory_capacity", "bfgs_write_bases", "curvature_eps")


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``FIELD=VALUE`` (``controller.FIELD`` for NTM-BFGS's controller) with VALUE as JSON."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set takes FIELD=VALUE, got {text!r}")
    path = key.split(".")
    if path[-1] not in SETTABLE or len(path) > 2 or (len(path) == 2 and path[0] != "controller"):
        raise ValueError(f"--set can change only {', '.join(SETTABLE)} (or controller.FIELD of NTM-BFGS), got {key!r}")
    try:
        return path, json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"--set {key}: the value must be JSON (a number, null, a quoted string), got {value!r}") from error


def with_config(config: dict[str, Any], assignments: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """A copy of the saved ``config`` dict with the assignments made (each field must exist)."""
    out = json.loads(json.dumps(config))
    for path, value in assignments:
        target = out
        for part in path[:-1]:
            if not isinstance(target.get(part), dict):
                raise ValueError(f"the weights' config has no {part!r} section (--set {'.'.join(path)})")
            target = target[part]
        target[path[-1]] = value
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="benchmarks/set_config.py")
    parser.add_argument("--weights", required=True, help="weights (a shipped name or a path)")
    parser.add_argument("--set", action="append", required=True, metavar="FIELD=VALUE",
                        help=f"a config field to change ({', '.join(SETTABLE)}; controller.FIELD for ntm-bfgs)")
    parser.add_argument("--out", required=True, help="where to write the weights (PATH.json/.safetensors)")
    parser.add_argument("--validation-tasks", type=int, default=0,
                        help="score source and result on this many held-out validation tasks first (0: do not)")
    parser.add_argument("--family", default="suite-mix", help="the validation tasks' family")
    parser.add_argument("--family-kwargs", default='{"part": "held-out"}', help="JSON keyword arguments")
    parser.add_argument("--data", default=None, help="MNIST directory (families that read it)")
    parser.add_argument("--horizon", type=int, default=2000, help="steps of each validation run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.validation_tasks < 0 or args.horizon < 1:
        parser.error("--validation-tasks must be ≥ 0 and --horizon ≥ 1")
    try:
        assignments = [parse_assignment(text) for text in args.set]
    except ValueError as error:
        parser.error(str(error))
    rule, metadata = load_rule(args.weights)
    try:
        config = with_config(metadata["config"], assignments)
        new_rule = rule_from_config(metadata["rule"], config)  # the config's own checks run here
    except ValueError as error:  # WeightsError is one: an unknown field, a value the config refuses
        parser.error(str(error))
    new_rule.load_state_dict(rule.state_dict())  # strict: the same tensors, no more, no fewer
    command = "python benchmarks/set_config.py " + " ".join(shlex.quote(a) for a in argv)
    changes = {".".join(path): value for path, value in assignments}
    validation = None
    if args.validation_tasks:
        kwargs = json.loads(args.family_kwargs)
        if args.data is not None:
            kwargs.setdefault("root", args.data)
        torch.set_num_threads(args.threads)
        family = get_family(args.family, **kwargs)
        seeds = [VALIDATION_SEED_BASE + k for k in range(args.validation_tasks)]
        start = time.perf_counter()
        validation = {"family": args.family, "kwargs": kwargs, "tasks": args.validation_tasks,
                      "horizon": args.horizon, "source": validate(rule, family, seeds, args.horizon, "log"),
                      "result": validate(new_rule, family, seeds, args.horizon, "log")}
        validation["seconds"] = round(time.perf_counter() - start, 1)
        print(f"Command: `{command}` ({validation['seconds']:.0f} s; validation: {args.validation_tasks} "
              f"{args.family} tasks {kwargs}, {args.horizon} steps)\n\n"
              "| weights | validation meta-loss | median final loss |\n| --- | ---: | ---: |")
        for name, score in (("source", validation["source"]), (f"with {changes}", validation["result"])):
            print(f"| {name} | {score['meta_loss']:.4g} | {score['median_final_loss']:.4g} |")
    # The source's provenance moves under set_config: its commands made the tensors, not this config.
    own = ("format", "name", "rule", "config", "tensors_sha256", "torch_version", "date")
    source = {k: v for k, v in metadata.items() if k not in own}
    meta = {"set_config": {"from": str(args.weights), "changes": changes, "command": command,
                           "source_tensors_sha256": metadata["tensors_sha256"], "validation": validation,
                           "source": source}}
    path = save_rule(new_rule, args.out, meta)
    print(f"wrote {path}: {args.weights} with {changes}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
