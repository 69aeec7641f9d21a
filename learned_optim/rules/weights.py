"""Weights of learned update rules on disk: ``NAME.safetensors`` (tensors) + ``NAME.json``.

The JSON holds the rule's name and config, the sha256 of the tensor file, and whatever the
producer records (task family, meta-training settings and command, evaluation, torch
version, date). Loading checks the hash, then that the tensors are exactly those of the
configured rule; nothing is ever unpickled (safetensors holds raw tensors only).

Shipped weights live in the package's ``pretrained/`` folder (installed as
``learned_optim.pretrained``) and are loaded by name: ``load_rule("quadratic")``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

__all__ = [
    "WeightsError",
    "register_rule",
    "rule_from_config",
    "save_rule",
    "load_rule",
    "available_weights",
    "pretrained_dir",
    "resolve_weights",
]

FORMAT = "learned_optim.weights/1"

_RULES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}


class WeightsError(ValueError):
    """A weights file that is missing, altered, truncated or does not fit its rule."""


def register_rule(name: str, build: Callable[[dict[str, Any]], nn.Module]) -> None:
    """Make rule ``name`` loadable: ``build(config_dict)`` returns a fresh rule."""
    _RULES[name] = build


def rule_from_config(rule_name: str, config: dict[str, Any]) -> nn.Module:
    """A freshly initialised rule of the named kind and config."""
    try:
        build = _RULES[rule_name]
    except KeyError:
        raise WeightsError(f"unknown rule {rule_name!r}; known rules: {', '.join(sorted(_RULES))}") from None
    try:
        return build(dict(config))
    except (TypeError, ValueError) as error:
        raise WeightsError(f"bad config for rule {rule_name!r}: {error}") from None


def pretrained_dir() -> Path:
    """The folder of the weights shipped with the package: ``learned_optim.pretrained`` once
    installed; run from a source checkout on PYTHONPATH (not installed), the checkout's pretrained/."""
    try:
        return Path(str(resources.files("learned_optim.pretrained")))
    except ModuleNotFoundError:  # pyproject maps pretrained/ into the package only when installed
        checkout = Path(__file__).resolve().parents[2] / "pretrained"
        if checkout.is_dir():
            return checkout
        raise WeightsError("no pretrained weights found: learned_optim.pretrained is not installed and "
                           f"{checkout} does not exist (install the package: pip install -e .)") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_rule(rule: nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``PATH.safetensors`` and ``PATH.json`` (``path`` without suffix); returns the JSON path.

    ``rule`` must have ``name`` and ``config`` (with ``to_dict``). Tensors are saved in float32.
    """
    from safetensors.torch import save

    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in rule.state_dict().items()}
    blob = save(tensors)
    meta = {
        "format": FORMAT,
        "name": stem.name,
        "rule": rule.name,
        "config": cast(Any, rule.config).to_dict(),  # the rule's config dataclass (typed Tensor | Module by nn.Module)
        "tensors_sha256": _sha256(blob),
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(metadata or {})
    stem.with_suffix(".safetensors").write_bytes(blob)
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return json_path


def _stem(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def resolve_weights(weights: str | os.PathLike) -> Path:
    """The file stem of shipped weights called ``weights``, or of a path to weights."""
    text = os.fspath(weights)
    if os.sep not in text and "/" not in text and not text.endswith((".safetensors", ".json")):
        stem = pretrained_dir() / text
        if not stem.with_suffix(".json").exists():
            names = ", ".join(sorted(available_weights())) or "none"
            raise WeightsError(f"no shipped weights named {text!r}; shipped: {names} (or give a path)")
        return stem
    return _stem(text)


def load_rule(weights: str | os.PathLike, expected_rule: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The rule stored as ``weights`` (a shipped name or a path), and its metadata.

    Raises :class:`WeightsError` naming the file when it is missing, not valid JSON, its hash
    differs (altered or truncated), it is of another rule than ``expected_rule``, or its
    tensors do not fit the configured rule.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    stem = resolve_weights(weights)
    json_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsError(f"{json_path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeightsError(f"{json_path} is not a learned_optim weights description (format {FORMAT!r})")
    for key in ("rule", "config", "tensors_sha256"):
        if key not in meta:
            raise WeightsError(f"{json_path} lacks the field {key!r}")
    blob = tensor_path.read_bytes()
    digest = _sha256(blob)
    if digest != meta["tensors_sha256"]:
        raise WeightsError(
            f"{tensor_path} does not match its description: sha256 {digest[:16]}… but {json_path.name} "
            f"says {str(meta['tensors_sha256'])[:16]}… (the file is altered, truncated or not the one described)"
        )
    if expected_rule is not None and meta["rule"] != expected_rule:
        raise WeightsError(f"{json_path} holds weights of rule {meta['rule']!r}, not {expected_rule!r}")
    rule = rule_from_config(meta["rule"], meta["config"])
    try:
        tensors = load(blob)
    except SafetensorError as error:
        raise WeightsError(f"{tensor_path} is not a valid safetensors file: {error}") from None
    expected = rule.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {', '.join(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise WeightsError(f"{tensor_path} does not fit rule {meta['rule']!r} with its config ({details})")
    rule.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    meta["path"] = str(stem)
    return rule, meta


def available_weights() -> dict[str, dict[str, Any]]:
    """The shipped weights: name → metadata (from the JSON files; tensors not loaded)."""
    out = {}
    folder = pretrained_dir()
    for json_path in sorted(folder.glob("*.json")):
        try:
            meta = json.loads(json_path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(meta, dict) and meta.get("format") == FORMAT:
            out[json_path.stem] = meta
    return out
