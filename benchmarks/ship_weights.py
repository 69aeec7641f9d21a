"""Ship weights: copy them into ``pretrained/`` under a name, with the metadata a shipped file
carries (the whole command chain that made its tensors and config, the suite's scores of this
very file, the code commit and a provenance note), so that no packaging is done by hand.

    python benchmarks/ship_weights.py --weights runs/ntm-trust1000 --name ntm-bfgs-trust \\
        --suite results/suite-ntm-trust/suite.json --note "what it is and why"

The suite file must hold a row for these weights (``OPTIMIZER:WEIGHTS`` as given to
``benchmarks/suite.py``); its summary becomes the ``evaluation`` block. Weights written by
``benchmarks/set_config.py`` get their source's command chain (a shipped source's ``command``,
or the one recorded under ``set_config.source``) followed by the set_config command. Weights
written by ``learned-optim meta-train`` or ``learned-optim export`` get the chain of the weights
the run started from (``--init-weights``/``--init-controller``), then the meta-train command(s)
(recorded in the checkpoint, or given with ``--meta-train-command`` and checked), then the export.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from learned_optim.rules import available_weights, load_rule
from learned_optim.rules.weights import pretrained_dir, resolve_weights

ROOT = Path(__file__).resolve().parent.parent


def command_chain(metadata: dict[str, Any], shipped: dict[str, dict[str, Any]],
                  meta_train_command: str | None = None) -> str:
    """The commands that made these tensors and this config, in order, joined by ``&&``: the
    chain of the weights a run started from (``--init-weights``, ``--init-controller``), then the
    ``learned-optim meta-train`` command(s) and, for an exported file, ``learned-optim export``."""
    record = metadata.get("set_config")
    if record is not None:
        if meta_train_command is not None:
            raise ValueError("--meta-train-command is for weights exported from a meta-training checkpoint; "
                             "these were written by set_config")
        source = str(record["from"])
        if source in shipped and "command" in shipped[source]:
            before = str(shipped[source]["command"])
        elif "command" in record.get("source", {}) or "set_config" in record.get("source", {}):
            before = command_chain(record["source"], shipped)  # an unshipped source: its own chain
        else:
            raise ValueError(f"the source weights {source!r} record no command that made them")
        return f"{before} && {record['command']}"
    if "command" not in metadata:
        raise ValueError("the weights record no command that made them (neither meta-train's nor set_config's)")
    command = str(metadata["command"])
    training = metadata.get("meta_training") or {}
    if command.startswith("learned-optim export"):
        steps = [*_meta_train_commands(training, meta_train_command), command]
    elif meta_train_command is not None:
        raise ValueError("--meta-train-command is for weights exported from a meta-training checkpoint; "
                         "these record their own command")
    else:
        steps = [command]
    starts = [_start_chain(str(training[key]), shipped) for key in ("init_weights", "init_controller")
              if training.get(key)]
    return " && ".join([*starts, *steps])


def _start_chain(weights: str, shipped: dict[str, dict[str, Any]]) -> str:
    """The chain of the weights a meta-training run started from: a shipped file's recorded
    command, or (weights in a run directory) the chain their own metadata gives."""
    if weights in shipped:
        if "command" not in shipped[weights]:
            raise ValueError(f"the shipped start weights {weights!r} record no command that made them")
        return str(shipped[weights]["command"])
    try:
        _, metadata = load_rule(weights)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"the run started from {weights!r}, which cannot be read to record its chain: {error}") from None
    return command_chain(metadata, shipped)


def _meta_train_commands(training: dict[str, Any], given: str | None) -> list[str]:
    """The meta-train commands that ran on the exported checkpoint, in order (a repeat of the same
    command resumes it, so consecutive repeats are one step of the chain). A checkpoint begun before
    commands were recorded needs its first command given, checked against the recorded settings."""
    entries = training.get("commands") or []
    recorded = [str(entry["command"]) for entry in entries]
    if entries and entries[0]["from_episode"] == 0:
        if given is not None:
            raise ValueError("the checkpoint records its meta-train commands; drop --meta-train-command")
    elif given is None:
        raise ValueError("these weights were exported from a checkpoint begun before meta-train commands were "
                         "recorded; pass the command that started it as --meta-train-command")
    else:
        _check_meta_train_command(given, training)
        recorded.insert(0, given)
    return [c for i, c in enumerate(recorded) if i == 0 or c != recorded[i - 1]]


def _check_meta_train_command(given: str, training: dict[str, Any]) -> None:
    """Refuse a meta-train command whose settings or workdir are not the ones the weights record."""
    from learned_optim.cli import build_parser, meta_train_config

    words = shlex.split(given)
    if words[:2] != ["learned-optim", "meta-train"]:
        raise ValueError(f"--meta-train-command must be a 'learned-optim meta-train ...' command, got {given[:60]!r}")
    try:
        args = build_parser().parse_args(words[1:])
    except SystemExit:
        raise ValueError("--meta-train-command does not parse as learned-optim meta-train's arguments "
                         "(argparse's message above)") from None
    config, _ = meta_train_config(args)
    expected = json.loads(json.dumps(config.training()))
    differ = sorted(k for k in expected if k in training and training[k] != expected[k])
    if differ:
        raise ValueError(f"--meta-train-command does not match the settings recorded with the weights: {', '.join(differ)}")
    workdir = Path(args.workdir or f"{args.out}.run")
    if "exported_from" in training and Path(training["exported_from"]).parent != workdir:
        raise ValueError(f"--meta-train-command ran in {workdir}, but the weights were exported from "
                         f"{training['exported_from']}")


def suite_evaluation(suite: dict[str, Any], weights: str, suite_file: str) -> dict[str, Any]:
    """The evaluation block from a ``benchmarks/suite.py`` result holding a row for ``weights``."""
    labels = [label for label in suite.get("summary", {}) if label.partition(":")[2] == weights]
    if len(labels) != 1:
        raise ValueError(f"{suite_file} must hold exactly one optimizer row for the weights {weights!r} "
                         f"(OPTIMIZER:{weights}), found {labels or 'none'}")
    summary = suite["summary"][labels[0]]
    tasks = summary["tasks"]
    medians = {task: entry["median"] for task, entry in tasks.items()}
    return {
        "suite": f"{suite['command']} ({weights}: these tensors and config)",
        "score": "median over seeds 0..9 of the mean of the last 10% of steps, per suite task",
        "per_task_median_final_loss": medians,
        "per_task_ratio_to_tuned_adam": {task: round(entry["ratio"], 4) for task, entry in tasks.items()
                                         if "ratio" in entry},
        "geomean_ratio_to_tuned_adam": round(summary["geomean_ratio"], 4),
        "beaten": f"{summary['beaten']}/{summary['compared']}",
        "diverged": summary["divergences"],
        "median_final_loss": statistics.median(medians.values()),
        "median_final_loss_is": "the median over the suite's tasks of the per-task median final losses above",
    }


def long_horizon_evaluation(run: dict[str, Any], weights: str, run_file: str) -> dict[str, Any]:
    """Per task, from a ``benchmarks/long_horizon.py`` result: seeds whose loss still falls, and medians."""
    rows = [r for r in run["rows"] if r["optimizer"].partition(":")[2] == weights]
    if not rows:
        raise ValueError(f"{run_file} holds no run of the weights {weights!r} (OPTIMIZER:{weights})")
    out: dict[str, Any] = {"command": run["command"]}
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        out[task] = {"seeds": sorted(r["seed"] for r in mine), "falling": f"{sum(r['falling'] for r in mine)}/{len(mine)}",
                     "median_at_tenth": statistics.median(r["at_tenth"] for r in mine),
                     "median_final": statistics.median(r["final"] for r in mine)}
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="benchmarks/ship_weights.py")
    parser.add_argument("--weights", required=True, help="the weights to ship (PATH of PATH.json/.safetensors)")
    parser.add_argument("--name", required=True, help="the shipped name (pretrained/NAME.json/.safetensors)")
    parser.add_argument("--suite", required=True, help="benchmarks/suite.py's suite.json with a row for the weights")
    parser.add_argument("--long-horizon", action="append", default=[], metavar="JSON",
                        help="benchmarks/long_horizon.py results with runs of the weights (repeatable)")
    parser.add_argument("--note", required=True, help="provenance: what these weights are, how and why they were made")
    parser.add_argument("--meta-train-command", default=None, metavar="COMMAND",
                        help="for weights exported from a checkpoint that predates recorded commands: the "
                             "'learned-optim meta-train ...' command that ran it (checked against its settings)")
    parser.add_argument("--replace", action="store_true", help="overwrite shipped weights of the same name")
    parser.add_argument("--into", default=str(pretrained_dir()), help=argparse.SUPPRESS)  # tests ship elsewhere
    args = parser.parse_args(argv)
    if not args.name or "/" in args.name or args.name.startswith("."):
        parser.error(f"--name must be a plain file name, got {args.name!r}")
    into = Path(args.into)
    shipped = available_weights()
    if (into / f"{args.name}.json").exists() and not args.replace:
        parser.error(f"{into / args.name}.json exists; pass --replace to overwrite it")
    try:
        _, metadata = load_rule(args.weights)  # checks the tensors against the recorded hash and config
        suite = json.loads(Path(args.suite).read_text())
        chain = command_chain(metadata, shipped, args.meta_train_command)
        evaluation = suite_evaluation(suite, args.weights, args.suite)
        horizons = [long_horizon_evaluation(json.loads(Path(f).read_text()), args.weights, f) for f in args.long_horizon]
        if horizons:
            evaluation["long_horizon"] = horizons
    except (ValueError, OSError, KeyError) as error:
        parser.error(str(error))
    recorded = ["<provenance_note>" if before == "--note" else "--note=<provenance_note>" if a.startswith("--note=")
                else a for before, a in zip(["", *argv], argv)]
    command = "python benchmarks/ship_weights.py " + " ".join(shlex.quote(a) for a in recorded)  # the note is its own key
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = dict(metadata, name=args.name, command=f"{chain} && {command}", evaluation=evaluation,
               code_commit=commit or None, provenance_note=args.note)
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(resolve_weights(args.weights).with_suffix(".safetensors"), into / f"{args.name}.safetensors")
    (into / f"{args.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {into / args.name}.json/.safetensors: geo-mean ratio to tuned Adam "
          f"{evaluation['geomean_ratio_to_tuned_adam']}, beaten {evaluation['beaten']}, diverged {evaluation['diverged']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
