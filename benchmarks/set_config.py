"""Weights with a fixed option of the rule's config changed: the same learned tensors φ, a new
config (a post-processing option that adds no tensor, such as ``direction_clip``).

    python benchmarks/set_config.py --weights suite-time-half --set direction_clip=1 --out runs/suite-clip
    python benchmarks/set_config.py --weights ntm-bfgs-suite --set controller.direction_clip=1 --out runs/ntm-clip

Only the options in :data:`SETTABLE` may change: they alter what the rule does with the learned
tensors, not which tensors it has, so the result is scored like any weights (``benchmarks/suite.py``)
before it replaces anything. The written metadata names this command and keeps the source's
provenance (its meta-training command and config) under ``set_config.source``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from learned_optim.rules import load_rule, save_rule
from learned_optim.rules.weights import rule_from_config

#: Config fields (of an LSTM+GAC config; ``controller.`` + field inside NTM-BFGS's) this script may set.
SETTABLE = ("direction_clip",)


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
        raise ValueError(f"--set {key}: the value must be JSON (a number, null), got {value!r}") from error


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
    args = parser.parse_args(argv)
    try:
        assignments = [parse_assignment(text) for text in args.set]
    except ValueError as error:
        parser.error(str(error))
    rule, metadata = load_rule(args.weights)
    config = with_config(metadata["config"], assignments)
    new_rule = rule_from_config(metadata["rule"], config)  # the config's own checks run here
    new_rule.load_state_dict(rule.state_dict())  # strict: the same tensors, no more, no fewer
    command = "python benchmarks/set_config.py " + " ".join(shlex.quote(a) for a in argv)
    # The source's provenance moves under set_config: its commands made the tensors, not this config.
    own = ("format", "name", "rule", "config", "tensors_sha256", "torch_version", "date")
    source = {k: v for k, v in metadata.items() if k not in own}
    changes = {".".join(path): value for path, value in assignments}
    meta = {"set_config": {"from": str(args.weights), "changes": changes, "command": command,
                           "source_tensors_sha256": metadata["tensors_sha256"], "source": source}}
    path = save_rule(new_rule, args.out, meta)
    print(f"wrote {path}: {args.weights} with {changes}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
